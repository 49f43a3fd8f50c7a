"""``SFTKeyAxolotlTrainer``: Axolotl's ``AxolotlTrainer`` with the core's SFTKey loss mixin.

Axolotl's trainer keeps everything it does (multipack sampler, checkpointing, its metrics, CCE/Liger forwards);
``SFTKeyLossMixin`` adds the stage schedule, the stage-2 label masking with the step's key-token count, the
``weighted`` correction and the ``sftkey/*`` metrics. This class only moves the column: it wraps the train and
eval collators in ``SFTKeyDataCollator`` (multipack bins included), keeps ``sftkey_mask`` through
``remove_unused_columns``, counts the prepared data and removes the string ``sftkey_finder`` column.
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Iterator
from typing import Any

from axolotl.core.trainers.base import AxolotlTrainer

from ..collator import SFTKEY_COLUMNS, SFTKEY_MASK, SFTKeyDataCollator
from ..config import SFTKeyArguments, sftkey_arguments_from, validate_sftkey_arguments
from ..hf_trainer import SFTKeyLossMixin, main_process_first
from ..stats import KeyDataStats, check_key_share, marked_rows_stats, missing_keys_error
from ..tokenize import TURN_COLUMNS, MarkingOptions, mark_token_ids
from ..weights import (
    SFTKEY_PROMPT,
    SFTKEY_WEIGHT,
    DataWeightOptions,
    DataWeightScan,
    check_weight_fields,
    compose_data_weights,
)
from .args import fused_loss
from .strategy import EXAMPLE_WEIGHTED, MESSAGE_WEIGHTS

logger = logging.getLogger("sftkey_plugin")

WEIGHT_COLUMNS = (SFTKEY_WEIGHT, SFTKEY_PROMPT, MESSAGE_WEIGHTS, EXAMPLE_WEIGHTED)


def dataset_stats(dataset: Any, name: str, options: DataWeightOptions) -> tuple[KeyDataStats, DataWeightScan]:
    """Counts of one prepared Axolotl dataset (rows with ``labels`` and ``sftkey_mask``, and the data-weight columns
    unless they were found off and removed), and what its rows hold of data weights."""
    columns = [c for c in ("labels", *TURN_COLUMNS, *WEIGHT_COLUMNS) if c in dataset.column_names]
    batches = dataset.select_columns(columns).iter(batch_size=1000)
    scan = DataWeightScan(options)
    counted = MESSAGE_WEIGHTS in columns

    def rows() -> Iterator[dict[str, Any]]:
        for row in (dict(zip(batch, values)) for batch in batches for values in zip(*batch.values())):
            scan.records += 1
            if counted:
                scan.weighted_records += row[MESSAGE_WEIGHTS] > 0 or row[EXAMPLE_WEIGHTED] > 0
                scan.message_weights += row[MESSAGE_WEIGHTS]
                scan.example_weights += row[EXAMPLE_WEIGHTED]
            yield row

    stats = marked_rows_stats(name, rows())
    stats.weighted_records = scan.weighted_records if scan.active else None  # off: the summary says nothing of them
    return stats, scan


def mark_fallback_row(
    example: dict[str, Any], tokenizer: Any, marking: MarkingOptions, prompt_weight: float
) -> dict[str, Any]:
    """A row of a type other than chat_template, marked from its own tokens: its record is gone, so it has no message
    or example weight (the validators refuse those fields), and the prompt weight goes where its labels are -100."""
    marked = mark_token_ids(example, tokenizer, marking)
    ids = example["input_ids"]
    composed = compose_data_weights(ids, example["labels"], [1.0] * len(ids), 1.0, prompt_weight)
    return {**marked, **composed, MESSAGE_WEIGHTS: 0, EXAMPLE_WEIGHTED: 0}


PRE_DROP_STATS = "_sftkey_pre_drop_stats"  # a cfg entry: the counts of each dataset before its rows were dropped


def data_form(cfg: Any) -> str:
    """The configured datasets in words (path and type), for the refusal message."""
    datasets = cfg.get("datasets") or []
    described = [f"{d.get('path')} (type {d.get('type')})" for d in datasets if hasattr(d, "get")]
    return "Axolotl datasets " + ", ".join(described) if described else "the Axolotl training dataset"


def preview_command(cfg: Any) -> str:
    return f"axolotl sftkey-preview {cfg.get('axolotl_config_path') or 'YOUR_CONFIG.yml'}"


def mark_count_and_apply_policy(
    dataset: Any, name: str, tokenizer: Any, arguments: SFTKeyArguments, cfg: Any
) -> tuple[Any, KeyDataStats]:
    """Mark the rows that came without a mask (types other than chat_template: from their own tokens, since only
    Axolotl's prompt strategy knew the text), count them, refuse what ``sftkey_on_missing: error`` and (for the
    training data) ``sftkey_min_found`` refuse, then drop the rows without a key under ``sftkey_on_missing: drop``:
    counted before anything is dropped, as on the TRL side."""
    options = DataWeightOptions.from_arguments(arguments)
    if SFTKEY_MASK not in dataset.column_names:
        marking = MarkingOptions.from_arguments(arguments)
        dataset = dataset.map(
            mark_fallback_row,
            fn_kwargs={"tokenizer": tokenizer, "marking": marking, "prompt_weight": options.prompt_weight},
            desc=f"SFTKey marking {name} rows",
        )
    stats, scan = dataset_stats(dataset, name, options)
    if name == "train":
        check_weight_fields(scan, name)
    fused = fused_loss(cfg)
    if scan.message_weights and fused:  # the keys that need per-token losses are refused by the config
        raise ValueError(
            f"SFTKey: {scan.message_weights} messages of the {name} data carry a weight ('{options.message_field}'), "
            f"which needs per-token losses, and {fused}: true returns only a total. Set {fused}: false (or drop its "
            f"plugin), or remove the '{options.message_field}' field from the messages."
        )
    if not scan.active and SFTKEY_WEIGHT in dataset.column_names:
        # data weights off: the rows are those of a run without them
        dataset = dataset.remove_columns([SFTKEY_WEIGHT, SFTKEY_PROMPT])
    if stats.missing and arguments.sftkey_on_missing == "error":
        raise missing_keys_error(stats)
    if name == "train":  # before the first step
        check_key_share(stats, arguments, data_form(cfg), preview_command(cfg))
    stats.count_policy(arguments.sftkey_on_missing)
    if stats.dropped:
        dataset = dataset.filter(lambda mask: 1 in mask, input_columns=SFTKEY_MASK, desc=f"SFTKey dropping {name} rows")
        logger.warning(
            "SFTKey: dropped %d of %d %s examples without a key span (sftkey_on_missing: drop).",
            stats.dropped,
            stats.examples,
            name,
        )
    return dataset, stats


def model_accepts_loss_kwargs(model: Any) -> bool:
    """Whether the trainer may hand ``num_items_in_batch`` to the model: transformers' rule (``Trainer.__init__``:
    ``accepts_loss_kwargs``, else a ``forward`` that takes it or ``**kwargs``) and Axolotl 0.21's
    (``model_loss_accepts_num_items_in_batch``: the model's ``loss_function`` names it). A ``**kwargs`` forward passes
    the count on to a loss that may ignore it, and such a loss is a mean per micro-batch, which the trainer must then
    divide by the accumulation steps itself."""
    unwrapped = model.get_base_model() if hasattr(model, "get_base_model") else model
    if hasattr(unwrapped, "accepts_loss_kwargs"):
        forward_takes_it = bool(unwrapped.accepts_loss_kwargs)
    else:
        parameters = inspect.signature(unwrapped.forward).parameters.values()
        forward_takes_it = any(p.kind == p.VAR_KEYWORD or p.name == "num_items_in_batch" for p in parameters)
    loss_function = getattr(unwrapped, "loss_function", None)
    if not forward_takes_it or loss_function is None:
        return forward_takes_it
    try:
        return "num_items_in_batch" in inspect.signature(loss_function).parameters
    except (TypeError, ValueError):  # a callable without a signature: transformers' rule alone, as Axolotl 0.21 does
        return True


class SFTKeyAxolotlTrainer(SFTKeyLossMixin, AxolotlTrainer):
    """``AxolotlTrainer`` + SFTKey. Built by ``SFTKeyPlugin.get_trainer_cls``; configured from the Axolotl cfg in
    ``SFTKeyPlugin.post_trainer_create`` (or pass ``sftkey_arguments=`` when building it yourself)."""

    def __init__(self, *args: Any, sftkey_arguments: SFTKeyArguments | None = None, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._sftkey_configured = False
        self._sftkey_wrap_collators()
        # Axolotl 0.19 switches num_items_in_batch off for every model whose *inner* model lacks the parameter (so
        # for nearly all): the loss is then a mean per micro-batch (not exact under gradient accumulation, and NaN for
        # a stage-2 micro-batch without key tokens). 0.21 decides by the model's loss function, which is right: the
        # same rule turns 0.19's off back on where 0.21 would have left it on, and agrees with 0.21's decision.
        if not self.model_accepts_loss_kwargs and model_accepts_loss_kwargs(self.accelerator.unwrap_model(self.model)):
            self.model_accepts_loss_kwargs = True
        if sftkey_arguments is not None:
            self.sftkey_configure(sftkey_arguments)

    def _sftkey_prepare_dataset(self, attribute: str, arguments: SFTKeyArguments) -> KeyDataStats:
        name = "train" if attribute == "train_dataset" else "eval"
        dataset, stats = mark_count_and_apply_policy(
            getattr(self, attribute), name, self.processing_class, arguments, self._sftkey_cfg
        )
        # the counts from before the rows without a key were dropped, where SFTKeyPlugin.load_datasets dropped them
        stats = (self._sftkey_cfg.get(PRE_DROP_STATS) or {}).get(name, stats)
        counts = (*TURN_COLUMNS[1:], MESSAGE_WEIGHTS, EXAMPLE_WEIGHTED)
        setattr(self, attribute, dataset.remove_columns([c for c in counts if c in dataset.column_names]))
        return stats

    def _sftkey_wrap_collators(self) -> None:
        from transformers import DataCollatorWithFlattening

        for attribute in ("data_collator", "eval_data_collator"):
            inner = getattr(self, attribute, None)
            if inner is None or isinstance(inner, SFTKeyDataCollator):
                continue
            if isinstance(inner, DataCollatorWithFlattening):
                raise ValueError("SFTKey is not tested with batch_flattening: set batch_flattening: false.")
            setattr(self, attribute, SFTKeyDataCollator(inner))
        self.train_data_collator = self.data_collator

    def sftkey_configure(self, source: Any) -> None:
        """Install the SFTKey arguments (an ``SFTKeyArguments`` or the Axolotl cfg); idempotent."""
        if self._sftkey_configured:
            return
        arguments = source if isinstance(source, SFTKeyArguments) else sftkey_arguments_from(source)
        self._sftkey_cfg = {} if isinstance(source, SFTKeyArguments) else source
        validate_sftkey_arguments(arguments)
        # The top-level module: PEFT calls the base model's ``forward`` directly, which skips its hooks
        self._sftkey_setup(arguments, self.model)
        # as Axolotl prepares data: the main process first, the others then read the cached maps
        self.sftkey_callback.data_stats = main_process_first(
            lambda: [
                self._sftkey_prepare_dataset(name, arguments)
                for name in ("train_dataset", "eval_dataset")
                if getattr(self, name, None) is not None
            ]
        )
        self._sftkey_configured = True

    def train(self, *args: Any, **kwargs: Any):  # type: ignore[no-untyped-def]
        if not self._sftkey_configured:
            if self.axolotl_cfg is None:
                raise RuntimeError("SFTKeyAxolotlTrainer: call sftkey_configure(...) or pass sftkey_arguments=.")
            self.sftkey_configure(self.axolotl_cfg)
        return super().train(*args, **kwargs)

    def _sftkey_loss_is_dft(self) -> bool:
        """Axolotl 0.21's ``use_dft: true`` sets its ``dft_loss`` as ``compute_loss_func``."""
        try:
            from axolotl.monkeypatch.loss.dft import dft_loss
        except ImportError:  # Axolotl 0.19: no use_dft
            return False
        return self.compute_loss_func is dft_loss

    def _set_signature_columns_if_needed(self) -> None:
        super()._set_signature_columns_if_needed()
        if self._signature_columns is not None:
            self._signature_columns.extend(c for c in SFTKEY_COLUMNS if c not in self._signature_columns)
