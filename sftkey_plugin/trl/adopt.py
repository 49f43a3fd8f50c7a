"""``SFTKeyCallback`` on a stock ``trl.SFTTrainer``: the trainer becomes an SFTKey trainer before its first step.

transformers hands a callback the model and the data loader but not the trainer, and the loss needs the trainer:
the callback finds the trainer that called it (``calling_trainer``) and this module gives it ``SFTKeyLossMixin``'s
loss, schedule and metrics, with the key mask made from each row's own tokens by the data collator (the prepared
dataset cannot be re-mapped once its data loader exists). What that cannot do exactly, it refuses.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Sequence
from typing import Any

from jinja2 import TemplateError

from ..collator import SFTKEY_MASK, KeyMarkingCollator
from ..config import SFTKeyArguments, validate_sftkey_arguments
from ..hf_trainer import SFTKeyLossMixin
from ..stats import KeyDataStats, check_key_share, marked_rows_stats, missing_keys_error
from ..tokenize import MarkingOptions, require_fast_tokenizer, trained_segments
from ..weights import DEFAULT_MESSAGE_FIELD, DataWeightOptions, features_hold, message_features
from .trainer import preview_command, reject_unsupported

logger = logging.getLogger("sftkey_plugin")

DATA_FORM = "rows tokenised by a stock SFTTrainer (SFTKeyCallback marks their tokens)"


USE_SFTKEY_TRAINER = (
    "use SFTKeyTrainer (SFTKeyConfig(sftkey=True, ...)), which marks the records before they are prepared"
)
_SFTKEY_CLASSES: dict[type, type] = {}


def sftkey_class_of(trainer_class: type) -> type:
    """``trainer_class`` with ``SFTKeyLossMixin`` in front (one class per trainer class)."""
    if trainer_class not in _SFTKEY_CLASSES:
        name = f"SFTKey{trainer_class.__name__}"
        _SFTKEY_CLASSES[trainer_class] = type(name, (SFTKeyLossMixin, trainer_class), {})
    return _SFTKEY_CLASSES[trainer_class]


def _refuse_unmarkable(trainer: Any, arguments: SFTKeyArguments) -> None:
    """What the marking of already prepared rows cannot reproduce of ``SFTKeyTrainer``: refused with what to use."""
    options = DataWeightOptions.from_arguments(arguments)
    dataset = trainer.train_dataset
    records = message_features(dataset.features)  # empty when packing or remove_unused_columns took them away
    if (
        options.prompt_weight > 0
        or options.example_field is not None
        or features_hold(records, options.message_field)
        or (not records and options.message_field != DEFAULT_MESSAGE_FIELD)
    ):
        raise ValueError(
            "SFTKeyCallback cannot weigh tokens by the data (sftkey_prompt_weight, sftkey_example_weight_field or "
            f"the messages' {options.message_field!r}): a stock SFTTrainer's prepared rows no longer tell the "
            f"prompt and each message apart: {USE_SFTKEY_TRAINER}."
        )
    if not records:
        logger.warning(
            "SFTKey: SFTKeyCallback does not apply data weights, and the prepared training rows no longer hold the "
            "messages, so it cannot check them: any message %r field is not read (every token weighs 1). To weigh "
            "tokens by the data, %s.",
            options.message_field,
            USE_SFTKEY_TRAINER,
        )
    if arguments.sftkey_on_missing == "drop":
        raise ValueError(
            f"SFTKeyCallback on a stock SFTTrainer cannot drop rows from a built data loader: {USE_SFTKEY_TRAINER}."
        )
    if arguments.sftkey_turns == "last" and trainer.args.packing:
        raise ValueError(
            "SFTKeyCallback cannot tell the examples of a packed row apart for sftkey_turns='last': "
            f"{USE_SFTKEY_TRAINER}."
        )
    limit = trainer.args.max_length
    if SFTKEY_MASK in dataset.column_names:
        raise ValueError(f"SFTKeyCallback: the training rows already hold {SFTKEY_MASK!r}: {USE_SFTKEY_TRAINER}.")
    packed = "seq_lengths" in dataset.column_names  # a packed row holds several sequences, each cut on its own
    lengths = (max(row) for row in dataset["seq_lengths"]) if packed else map(len, dataset["input_ids"])
    if limit is not None and any(length >= limit for length in lengths):
        raise ValueError(
            f"SFTKeyCallback: some training rows reach max_length={limit}, so SFTTrainer may have cut their answers "
            f"before the callback sees them: raise max_length, or {USE_SFTKEY_TRAINER} (it counts and handles cut "
            "answers)."
        )


def _count_rows_as_trained(collator: KeyMarkingCollator, dataset: Any, rows: Any) -> KeyDataStats:
    """The key counts of the rows as the collator will get them (``rows``: ``dataset`` as the data loader holds it),
    refusing before the first step what cannot be marked there: a finder that reads a column packing or
    ``remove_unused_columns`` took away, and conversations trained whole."""
    boundary = _turn_boundary(collator.tokenizer)
    marked = []
    for row in rows:
        try:
            marked.append(collator.mark_row(row))
        except (KeyError, ValueError) as error:
            if str(error).startswith("SFTKey"):  # the collator's own refusal: it says what to change
                raise
            raise ValueError(
                f"SFTKeyCallback cannot mark the training rows: {error} The callback marks the rows the trainer "
                f"prepared ({', '.join(rows.column_names)}); packing and remove_unused_columns=True leave out the "
                f"record's other columns ({', '.join(dataset.column_names)} before the data loader), which a finder "
                f"may read: set remove_unused_columns=False without packing, or {USE_SFTKEY_TRAINER}."
            ) from error
        if boundary and _trains_across_turns(row["input_ids"], marked[-1]["labels"], collator.tokenizer, boundary):
            raise ValueError(
                "SFTKeyCallback: the training rows train whole conversations (a user message and the assistant "
                "message after it in one run), so it cannot tell each assistant message's answer apart: set "
                "assistant_only_loss=True (with a chat template that has {% generation %} markers), or "
                f"{USE_SFTKEY_TRAINER}."
            )
    return marked_rows_stats("train", marked)


def _turn_boundary(tokenizer: Any) -> str | None:
    """The text the chat template puts between a user message and the assistant message after it (None without a
    template, or where it is only whitespace): the part shared by a first turn and a last one, as templates such as
    Qwen3's add an empty thinking block to the last assistant message only."""
    if not getattr(tokenizer, "chat_template", None):
        return None
    boundaries = []
    for turns in (1, 2):
        conversation = [
            message
            for turn in range(turns)
            for message in (
                {"role": "user", "content": f"\x00U{turn}"},
                {"role": "assistant", "content": f"\x00A{turn}"},
            )
        ]
        try:
            rendered = str(tokenizer.apply_chat_template(conversation, tokenize=False))
        except TemplateError:  # it renders no plain conversation, so the rows were not conversations it rendered
            return None
        start, end = rendered.find("\x00U0") + 3, rendered.find("\x00A0")
        if not 3 <= start <= end:
            return None
        boundaries.append(rendered[start:end])
    first, last = boundaries
    shared = next((first[:i] for i, (a, b) in enumerate(zip(first, last)) if a != b), first[: len(last)])
    return shared if shared.strip() else None


def _trains_across_turns(input_ids: Sequence[int], labels: Sequence[int], tokenizer: Any, boundary: str) -> bool:
    """Whether a run of trained tokens holds the template's user-to-assistant boundary."""
    return any(
        boundary in tokenizer.decode(list(input_ids[start:end]), skip_special_tokens=False)
        for start, end in trained_segments(labels)
    )


def adopt_stock_trainer(trainer: Any, callback: Any, train_dataloader: Any) -> None:
    """Make ``trainer`` (a stock ``trl.SFTTrainer`` that holds ``callback``) train SFTKey with the callback's
    arguments, or raise ``ValueError`` before the first step saying what to change."""
    arguments = dataclasses.replace(callback.arguments, sftkey=True)
    validate_sftkey_arguments(arguments)
    reject_unsupported(trainer, arguments)
    _refuse_unmarkable(trainer, arguments)
    tokenizer = getattr(trainer.processing_class, "tokenizer", trainer.processing_class)
    require_fast_tokenizer(tokenizer)
    collator = KeyMarkingCollator(trainer.data_collator, tokenizer, MarkingOptions.from_arguments(arguments))
    loader = getattr(train_dataloader, "base_dataloader", train_dataloader)
    stats = _count_rows_as_trained(collator, trainer.train_dataset, loader.dataset)
    if stats.missing and arguments.sftkey_on_missing == "error":
        raise missing_keys_error(stats)
    check_key_share(stats, arguments, DATA_FORM, preview_command(trainer.processing_class, trainer.args, arguments))
    stock = type(trainer).__name__
    trainer.__class__ = sftkey_class_of(type(trainer))
    trainer.data_collator = collator  # evaluation loaders are built later, from this
    # built already: set on the torch DataLoader that accelerate's wrapper delegates to (skip_first_batches, on
    # resume, copies it from there)
    loader.collate_fn = collator
    trainer._sftkey_setup(arguments, trainer.model)
    callback.data_stats = [stats]
    logger.info("SFTKey: SFTKeyCallback trains the stock %s with SFTKey's loss, schedule and metrics.", stock)
