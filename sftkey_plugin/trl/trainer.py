"""``SFTKeyMixin`` / ``SFTKeyTrainer``: TRL's ``SFTTrainer`` with the key mask carried from the dataset to the loss."""

from __future__ import annotations

import copy
import json
import logging
from typing import Any

import trl
from datasets import Dataset
from trl import SFTTrainer
from trl.data_utils import is_conversational_from_value, maybe_convert_to_chatml, pack_dataset

from ..collator import SFTKEY_COLUMNS, SFTKEY_MASK, SFTKeyDataCollator
from ..config import SFTKeyArguments, sftkey_arguments_from, validate_sftkey_arguments, weighs_tokens
from ..hf_trainer import SFTKeyLossMixin, main_process_first
from ..loss import IGNORE_INDEX
from ..masking import truncation_slice
from ..stats import CUT, FOUND, KeyDataStats, check_key_share, key_status, missing_keys_error
from ..tokenize import (
    MarkingOptions,
    describe_data_form,
    mark_token_ids,
    require_fast_tokenizer,
    tokenize_with_key_mask,
    warn_if_reasoning_dropped,
)
from ..weights import (
    SFTKEY_EXAMPLE_WEIGHT,
    SFTKEY_WEIGHT,
    DataWeightOptions,
    DataWeightScan,
    compose_data_weights,
    conversation_of,
    features_hold,
    message_features,
    scan_data_weights,
)

logger = logging.getLogger("sftkey_plugin")

# trl 1.15 added the fused LM head that returns per-token log-probs (and computes DFT from them); 1.9-1.14 default to
# chunked_nll and run DFT through compute_loss_func. Told by the feature, not a version number.
FUSED_HEAD = hasattr(trl.trainer.sft_trainer, "add_fused_lm_head")

_STAT_COLUMNS = (
    "sftkey_finder",
    "sftkey_status",
    "sftkey_key_tokens",
    "sftkey_completion_tokens",
    "sftkey_turns",
    "sftkey_turns_found",
)


# per-row counts of the data weights (rows with data weights only)
_WEIGHT_STAT_COLUMNS = ("sftkey_weight_sum", "sftkey_weighted_tokens", "sftkey_zero_weight_tokens")


def _truncate_and_classify(example: dict[str, Any], keep: slice, prompt_weight: float) -> dict[str, Any]:
    """Truncate every per-token column together; count key and trained tokens; mark examples whose key was cut;
    with data weights, compose each token's weight (``compose_data_weights``) and count them."""
    trained = [int(label != IGNORE_INDEX) for label in example["labels"]]
    mask = [m & t for m, t in zip(example[SFTKEY_MASK], trained)]
    kept = mask[keep]
    weights: dict[str, Any] = {}
    if SFTKEY_WEIGHT in example:
        ids, labels = example["input_ids"][keep], example["labels"][keep]
        weights = dict(
            compose_data_weights(
                ids, labels, example[SFTKEY_WEIGHT][keep], example[SFTKEY_EXAMPLE_WEIGHT], prompt_weight
            )
        )
        scored = [w for w, label in zip(weights[SFTKEY_WEIGHT], weights["labels"]) if label != IGNORE_INDEX]
        weights.update(
            {
                "sftkey_weight_sum": sum(scored),
                "sftkey_weighted_tokens": len(scored),
                "sftkey_zero_weight_tokens": scored.count(0.0),
            }
        )
    return {
        "input_ids": example["input_ids"][keep],
        "labels": example["labels"][keep],
        SFTKEY_MASK: kept,
        "sftkey_status": key_status(example["sftkey_finder"], mask, keep),
        "sftkey_key_tokens": sum(kept),
        "sftkey_completion_tokens": sum(trained[keep]),
        # rows that came with their own mask have no turn counts: one turn each
        "sftkey_turns": example.get("sftkey_turns", 1),
        "sftkey_turns_found": example.get("sftkey_turns_found", int(1 in mask)),
        **weights,
    }


def _reject_unsupported_arguments(args: Any, arguments: SFTKeyArguments) -> None:
    """Training arguments SFTKey cannot honour with these SFTKey options: refused before any data is prepared."""
    if getattr(args, "use_liger_kernel", False):
        raise ValueError("SFTKey needs the trainer's own loss path: set use_liger_kernel=False.")
    if weighs_tokens(arguments) and args.loss_type == "chunked_nll":
        raise ValueError(
            f"sftkey_mode='{arguments.sftkey_mode}' weighs tokens, which needs per-token losses, and trl's chunked_nll "
            "does not return them: set loss_type='nll' (or use two_stage/key_only, which keep chunked_nll)."
        )
    if args.loss_type == "dft" and not FUSED_HEAD:
        raise ValueError(
            f"loss_type='dft' on trl {trl.__version__} runs through compute_loss_func, which gives SFTKey no per-token "
            "losses to weigh or mask: use loss_type='nll', or trl >= 1.15, where SFTKey weighs DFT's per-token loss."
        )
    if getattr(args, "label_smoothing_factor", 0.0):
        raise ValueError("SFTKey does not support label_smoothing_factor: set it to 0.")


def reject_unsupported(trainer: Any, arguments: SFTKeyArguments) -> None:
    """Settings SFTKey cannot honour, known once the trainer is built: refuse them rather than train wrongly."""
    _reject_unsupported_arguments(trainer.args, arguments)
    config = trainer.accelerator.parallelism_config
    if config is not None and (config.cp_enabled or getattr(config, "sp_enabled", False)):
        raise ValueError("SFTKey does not support context or sequence parallelism: the key mask is not sharded.")
    if trainer.compute_loss_func is not None:
        raise ValueError("SFTKey computes the loss itself: remove compute_loss_func (or set sftkey=False).")


def preview_command(processing_class: Any, args: Any, arguments: SFTKeyArguments) -> str:
    """The ``sftkey preview`` command line that shows what these settings find in the data."""
    tokenizer = getattr(processing_class, "tokenizer", processing_class)
    command = f"sftkey preview YOUR_DATA.jsonl --tokenizer {getattr(tokenizer, 'name_or_path', '') or 'TOKENIZER'}"
    if arguments.sftkey_finder != "auto":
        command += f" --finder {arguments.sftkey_finder}"
    if arguments.sftkey_finder_options:
        command += f" --finder-options '{json.dumps(arguments.sftkey_finder_options)}'"
    if args.max_length is not None:
        command += f" --max-length {args.max_length} --truncation-mode {args.truncation_mode}"
    if arguments.sftkey_reasoning_field:
        command += f" --reasoning-field {arguments.sftkey_reasoning_field}"
    return command + (f" --turns {arguments.sftkey_turns}" if arguments.sftkey_turns != "all" else "")


class SFTKeyMixin(SFTKeyLossMixin):
    """Mix into any ``trl.SFTTrainer`` subclass (``class MyTrainer(SFTKeyMixin, MySFTTrainer)``) to add SFTKey.

    With ``args.sftkey`` false the trainer is the stock one: nothing is added to the data or the loss.
    """

    _sftkey_data_form = "pre-tokenised input_ids"  # replaced by the training records' form when they are tokenised here

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        if not getattr(self.args, "sftkey", False):
            return
        arguments = sftkey_arguments_from(self.args)
        validate_sftkey_arguments(arguments)
        reject_unsupported(self, arguments)
        # Installed after __init__, where TRL also forbids a custom collator with padding-free (which we support)
        self.data_collator = SFTKeyDataCollator(self.data_collator)
        # The top-level model: PEFT calls its base model's ``forward`` directly, which skips hooks registered there
        self._sftkey_setup(arguments, self.model)
        self.sftkey_callback.data_stats = list(getattr(self, "_sftkey_pending_stats", []))
        for stats in self.sftkey_callback.data_stats:
            if stats.name == "train":  # refuse before the first step
                preview = preview_command(self.processing_class, self.args, arguments)
                check_key_share(stats, arguments, self._sftkey_data_form, preview)

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()  # type: ignore[misc]
        if getattr(self.args, "sftkey", False):
            self._signature_columns.extend(c for c in SFTKEY_COLUMNS if c not in self._signature_columns)

    def _prepare_dataset(self, dataset, processing_class, args, packing, formatting_func, dataset_name):  # type: ignore[no-untyped-def]
        if not getattr(args, "sftkey", False):
            return super()._prepare_dataset(dataset, processing_class, args, packing, formatting_func, dataset_name)  # type: ignore[misc]
        arguments = sftkey_arguments_from(args)
        validate_sftkey_arguments(arguments)
        _reject_unsupported_arguments(args, arguments)
        if not isinstance(dataset, Dataset):
            raise ValueError("SFTKey needs a map-style datasets.Dataset (streaming/IterableDataset is not supported).")
        tokenizer = getattr(processing_class, "tokenizer", processing_class)
        require_fast_tokenizer(tokenizer)
        # As TRL prepares data: the main process first, the others then find its cached results
        return main_process_first(
            lambda: self._sftkey_prepare(
                dataset, processing_class, tokenizer, args, arguments, packing, formatting_func, dataset_name
            )
        )

    def _sftkey_prepare(
        self,
        dataset: Dataset,
        processing_class: Any,
        tokenizer: Any,
        args: Any,
        arguments: SFTKeyArguments,
        packing: bool,
        formatting_func: Any,
        dataset_name: str,
    ) -> Dataset:
        """TRL's preparation with the key mask made in the same tokenisation and carried through truncation, the
        ``sftkey_on_missing`` policy and packing."""
        map_kwargs: dict[str, Any] = {"num_proc": args.dataset_num_proc}
        records = "input_ids" not in dataset.column_names
        if records and formatting_func is not None:
            dataset = dataset.map(lambda example: {args.dataset_text_field: formatting_func(example)}, **map_kwargs)
        if records and len(dataset) and is_conversational_from_value(dataset[0]):
            dataset = dataset.map(maybe_convert_to_chatml, remove_columns=["conversations"], **map_kwargs)
        scan = self._sftkey_scan_data_weights(dataset, args, arguments, dataset_name)

        if records:
            dataset = self._sftkey_tokenize(dataset, tokenizer, args, arguments, dataset_name, map_kwargs, scan)
        elif SFTKEY_MASK in dataset.column_names:
            dataset = dataset.map(lambda _: {"sftkey_finder": "pretokenized"}, **map_kwargs)

        # TRL builds the labels from the masks (completion_only_loss, assistant_only_loss); truncation, packing and
        # shuffling are done below so the key mask goes through them too.
        plain = copy.copy(args)
        plain.max_length, plain.shuffle_dataset = None, False
        dataset = super()._prepare_dataset(dataset, processing_class, plain, False, None, dataset_name)  # type: ignore[misc]
        if SFTKEY_MASK not in dataset.column_names:  # pre-tokenised without a mask: marked from its own tokens
            dataset = dataset.map(
                mark_token_ids,
                fn_kwargs={"tokenizer": tokenizer, "marking": MarkingOptions.from_arguments(arguments)},
                desc=f"SFTKey marking pre-tokenised {dataset_name}",
                **map_kwargs,
            )

        truncates = args.max_length is not None and (not packing or args.packing_strategy == "bfd")
        keep = truncation_slice(
            args.max_length if truncates else None, "keep_start" if packing else args.truncation_mode
        )
        dataset = dataset.map(
            _truncate_and_classify,
            fn_kwargs={"keep": keep, "prompt_weight": float(arguments.sftkey_prompt_weight)},
            remove_columns=[SFTKEY_EXAMPLE_WEIGHT] if SFTKEY_EXAMPLE_WEIGHT in dataset.column_names else None,
            desc=f"SFTKey marking {dataset_name}",
            **map_kwargs,
        )
        dataset, stats = self._sftkey_apply_policy(dataset, arguments, dataset_name, map_kwargs)
        stats.weighted_records = scan.weighted_records if scan.active else None
        self._sftkey_pending_stats = [*getattr(self, "_sftkey_pending_stats", []), stats]

        if packing:
            if args.max_length is None:
                raise ValueError("When packing is enabled, `max_length` can't be `None`.")
            dataset = dataset.select_columns(
                ["input_ids", "labels", *(c for c in SFTKEY_COLUMNS if c in dataset.column_names)]
            )
            if args.shuffle_dataset:
                dataset = dataset.shuffle(seed=args.seed)
            dataset = pack_dataset(dataset, args.max_length, args.packing_strategy, map_kwargs)
        else:
            stat_columns = (*_STAT_COLUMNS, *_WEIGHT_STAT_COLUMNS)
            dataset = dataset.remove_columns([c for c in stat_columns if c in dataset.column_names])
        if args.shuffle_dataset:
            dataset = dataset.shuffle(seed=args.seed)
        return dataset

    def _sftkey_scan_data_weights(
        self, dataset: Dataset, args: Any, arguments: SFTKeyArguments, dataset_name: str
    ) -> DataWeightScan:
        """The data's weights, checked record by record (read only where the columns can hold one), and the settings
        they need refused before anything is tokenised."""
        options = DataWeightOptions.from_arguments(arguments)
        holds = features_hold(message_features(dataset.features), options.message_field) or (
            options.example_field is not None and options.example_field in dataset.column_names
        )
        scan = scan_data_weights(dataset if holds else (), options, dataset_name)
        if scan.active:
            self._sftkey_refuse_data_weights(dataset, args, arguments, scan)
        return scan

    def _sftkey_refuse_data_weights(
        self, dataset: Dataset, args: Any, arguments: SFTKeyArguments, scan: DataWeightScan
    ) -> None:
        """The combinations of data weights and TRL settings that cannot mean what they say."""
        if "input_ids" in dataset.column_names:
            raise ValueError(
                "SFTKey: data weights (sftkey_prompt_weight, sftkey_example_weight_field, message weights) need the "
                "records (messages or prompt/completion): pre-tokenised rows no longer hold the messages and the "
                "prompt they weigh. Pass the records, or unset the data weights."
            )
        if args.loss_type == "chunked_nll":
            raise ValueError(
                "SFTKey: data weights weigh tokens, which needs per-token losses, and trl's chunked_nll does not "
                "return them: set loss_type='nll'."
            )
        sample = dataset[0] if len(dataset) else {}
        form = "text" if conversation_of(sample) is None and "prompt" not in sample else "records"
        messages = "messages" in sample
        completion_only = getattr(self, "completion_only_loss", args.completion_only_loss) is not False
        if scan.options.prompt_weight > 0:
            if form == "text":
                raise ValueError(
                    "SFTKey: sftkey_prompt_weight needs prompt/completion or messages records: a text record is "
                    "trained whole, so it has no prompt tokens to weigh."
                )
            if messages and not args.assistant_only_loss:
                raise ValueError(
                    "SFTKey: sftkey_prompt_weight with messages records needs assistant_only_loss=True: without it TRL "
                    "trains every token of the conversation at weight 1, so no prompt token is left to weigh."
                )
            if not messages and not completion_only:
                raise ValueError(
                    "SFTKey: sftkey_prompt_weight with completion_only_loss=False contradicts itself: TRL already "
                    "trains the prompt at weight 1. Leave completion_only_loss at its default (True) to weigh the "
                    "prompt with sftkey_prompt_weight, or set sftkey_prompt_weight to 0."
                )
        if scan.message_weights and messages and not args.assistant_only_loss:
            raise ValueError(
                "SFTKey: message weights with messages records need assistant_only_loss=True: without it TRL trains "
                "the user messages in the same run as the assistant's, which a message weight cannot tell apart."
            )
        if scan.message_weights and not messages and not completion_only:
            raise ValueError(
                "SFTKey: message weights with completion_only_loss=False: TRL trains the prompt messages too, which a "
                "message weight cannot tell apart; leave completion_only_loss at its default (True)."
            )

    def _sftkey_tokenize(self, dataset, tokenizer, args, arguments, dataset_name, map_kwargs, scan):  # type: ignore[no-untyped-def]
        """Raw records (formatted, ShareGPT converted) to ``input_ids`` + TRL's masks + ``sftkey_mask``, in one
        tokenisation with offsets (and each token's message x example weight where data weights are on)."""
        if dataset_name == "train" and len(dataset):
            marking = MarkingOptions.from_arguments(arguments)
            self._sftkey_data_form = describe_data_form(dataset[0], marking, args.dataset_text_field)
            warn_if_reasoning_dropped(dataset[0], tokenizer, marking, self.chat_template)
        return dataset.map(
            tokenize_with_key_mask,
            fn_kwargs={
                "tokenizer": tokenizer,
                "marking": MarkingOptions.from_arguments(arguments),
                "text_field": args.dataset_text_field,
                "assistant_only_loss": args.assistant_only_loss,
                "chat_template": self.chat_template,
                "weights": scan.options if scan.active else None,
            },
            remove_columns=dataset.column_names,
            desc=f"SFTKey tokenizing {dataset_name}",
            **map_kwargs,
        )

    @staticmethod
    def _sftkey_apply_policy(
        dataset: Dataset, arguments: SFTKeyArguments, dataset_name: str, map_kwargs: dict[str, Any]
    ) -> tuple[Dataset, KeyDataStats]:
        """Apply ``sftkey_on_missing`` (and TRL's rule that an example with no trained token left is dropped)."""
        columns = dataset.select_columns(list(_STAT_COLUMNS)).to_dict()
        stats = KeyDataStats.from_columns(
            dataset_name,
            columns["sftkey_status"],
            columns["sftkey_finder"],
            columns["sftkey_key_tokens"],
            columns["sftkey_completion_tokens"],
            zip(columns["sftkey_turns"], columns["sftkey_turns_found"]),
        )
        if _WEIGHT_STAT_COLUMNS[0] in dataset.column_names:
            weights = dataset.select_columns(list(_WEIGHT_STAT_COLUMNS)).to_dict()
            stats.count_weights(*(weights[name] for name in _WEIGHT_STAT_COLUMNS))
        bad = [i for i, status in enumerate(columns["sftkey_status"]) if status != FOUND]
        policy = arguments.sftkey_on_missing
        if bad and policy == "error":
            raise missing_keys_error(stats, bad)
        if bad and policy == "drop":
            stats.dropped = len(bad)
            dataset = dataset.filter(lambda status: status == FOUND, input_columns="sftkey_status", **map_kwargs)
        elif bad:
            stats.kept_without_key = len(bad)
            if stats.cut:  # a partly cut answer is not trained in stage 2: its mask is emptied
                dataset = dataset.map(
                    lambda example: (
                        {SFTKEY_MASK: [0] * len(example[SFTKEY_MASK])} if example["sftkey_status"] == CUT else {}
                    ),
                    **map_kwargs,
                )
        before = len(dataset)
        dataset = dataset.filter(lambda n: n > 0, input_columns="sftkey_completion_tokens", **map_kwargs)
        stats.emptied = before - len(dataset)
        return dataset, stats


class SFTKeyTrainer(SFTKeyMixin, SFTTrainer):
    """``trl.SFTTrainer`` with SFTKey: pass an ``SFTKeyConfig`` with ``sftkey=True``."""
