"""Weights read from the data: one per assistant message, one per example, and a weight for the prompt tokens.

A token's *data weight* is its assistant message's weight times its example's weight (the prompt weight times the
example weight for a prompt token); the loss multiplies it with the step's key or other weight (prompt tokens: 1).
Two per-token columns carry it next to ``sftkey_mask`` when data weights are on, and only then (so a run without
them is unchanged): ``sftkey_weight`` (float, 0 for every token nothing trains) and ``sftkey_prompt`` (1 on the
prompt tokens the prompt weight trains, whose labels are kept for it).

This module imports no framework.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .config import SFTKeyArguments
from .masking import IGNORE_INDEX

SFTKEY_WEIGHT = "sftkey_weight"
SFTKEY_PROMPT = "sftkey_prompt"
SFTKEY_EXAMPLE_WEIGHT = "sftkey_example_weight"  # a row's example weight, until its tokens are composed
DEFAULT_MESSAGE_FIELD = "weight"
NOT_UNLIKELIHOOD = "negative weights are not unlikelihood training: use 0 to leave tokens out"


@dataclass(frozen=True)
class DataWeightOptions:
    """Where the data keeps its weights (``sftkey_message_weight_field``, ``sftkey_example_weight_field``) and the
    prompt weight (``sftkey_prompt_weight``)."""

    message_field: str = DEFAULT_MESSAGE_FIELD
    example_field: str | None = None
    prompt_weight: float = 0.0

    @classmethod
    def from_arguments(cls, arguments: SFTKeyArguments) -> DataWeightOptions:
        return cls(
            arguments.sftkey_message_weight_field,
            arguments.sftkey_example_weight_field,
            float(arguments.sftkey_prompt_weight),
        )


@dataclass(frozen=True)
class RecordWeights:
    """The weights one record carries: by conversation index of the assistant message, and the example's (None:
    absent, so 1)."""

    messages: Mapping[int, float]
    example: float | None = None

    @property
    def example_weight(self) -> float:
        return 1.0 if self.example is None else self.example


def describe_record(example: Mapping[str, Any]) -> str:
    """A short excerpt that identifies a record in an error message."""
    text = repr(dict(example))
    return text if len(text) <= 120 else text[:117] + "..."


def _weight(value: Any, what: str, index: int | None, example: Mapping[str, Any]) -> float:
    """``value`` as a weight, or a ``ValueError`` naming the record."""
    where = f"SFTKey: record {index}" if index is not None else "SFTKey: a record"
    problem = None
    if isinstance(value, bool) or not isinstance(value, int | float):
        problem = f"is not a number ({value!r})"
    elif not math.isfinite(value):
        problem = f"is {value} (weights must be finite)"
    elif value < 0:
        problem = f"is negative ({value}); {NOT_UNLIKELIHOOD}"
    if problem is not None:
        raise ValueError(f"{where}: {what} {problem}. The record: {describe_record(example)}")
    return float(value)


def conversation_of(example: Mapping[str, Any]) -> tuple[list[Mapping[str, Any]], int] | None:
    """The messages of a conversational record and how many of them are its prompt (prompt/completion message
    lists), or None for a record without messages."""
    messages = example.get("messages")
    if isinstance(messages, list):
        return list(messages), 0
    prompt, completion = example.get("prompt"), example.get("completion")
    if isinstance(prompt, list) and isinstance(completion, list):
        return [*prompt, *completion], len(prompt)
    return None


def record_weights(example: Mapping[str, Any], options: DataWeightOptions, index: int | None = None) -> RecordWeights:
    """The weights of one record, checked: a number >= 0 on an assistant message the record trains (with text
    content) and on the record; anything else is a ``ValueError`` naming the record."""
    example_weight = None
    if options.example_field is not None and example.get(options.example_field) is not None:
        example_weight = _weight(example[options.example_field], f"'{options.example_field}'", index, example)
    messages: dict[int, float] = {}
    conversation = conversation_of(example)
    for number, message in enumerate(conversation[0] if conversation else ()):
        value = message.get(options.message_field) if isinstance(message, Mapping) else None
        if value is None:
            continue
        what = f"message {number} ({message.get('role')}) '{options.message_field}'"
        weight = _weight(value, what, index, example)
        where = f"SFTKey: record {index}" if index is not None else "SFTKey: a record"
        if message.get("role") != "assistant":
            raise ValueError(
                f"{where}: {what}: only assistant messages are trained, so only they take a weight (the prompt "
                f"tokens weigh sftkey_prompt_weight). The record: {describe_record(example)}"
            )
        assert conversation is not None
        if number < conversation[1]:
            raise ValueError(
                f"{where}: {what} is on a message of the prompt, which is not trained: move it into the completion. "
                f"The record: {describe_record(example)}"
            )
        content = message.get("content")
        if not isinstance(content, str) or not content.strip():
            raise ValueError(
                f"{where}: {what} is on an assistant message without text content, which SFTKey cannot place. "
                f"The record: {describe_record(example)}"
            )
        messages[number] = weight
    return RecordWeights(messages, example_weight)


@dataclass
class DataWeightScan:
    """What the data holds of weights (one dataset), and whether they are on."""

    options: DataWeightOptions
    records: int = 0
    weighted_records: int = 0  # records with a message or an example weight
    message_weights: int = 0
    example_weights: int = 0

    @property
    def active(self) -> bool:
        """Whether the data-weight columns are made: a prompt weight, an example field, or a message weight found."""
        options = self.options
        return options.prompt_weight > 0 or options.example_field is not None or self.message_weights > 0


def features_hold(features: Any, name: str) -> bool:
    """Whether a (nested) ``datasets`` feature description has a field ``name`` anywhere: when it has none, no
    record has it, and the records need not be read."""
    if isinstance(features, Mapping):
        return name in features or any(features_hold(value, name) for value in features.values())
    if isinstance(features, list | tuple):
        return any(features_hold(value, name) for value in features)
    if type(features).__name__ == "Json":  # free-form JSON (datasets' type for dicts whose keys differ): may hold it
        return True
    inner = getattr(features, "feature", None)
    return inner is not None and features_hold(inner, name)


def message_features(features: Mapping[str, Any]) -> dict[str, Any]:
    """The part of a dataset's features that holds messages (``messages``, or ``prompt`` and ``completion``)."""
    return {name: features[name] for name in ("messages", "prompt", "completion") if name in features}


def scan_data_weights(
    records: Iterable[Mapping[str, Any]], options: DataWeightOptions, name: str = "train"
) -> DataWeightScan:
    """Check every record's weights (``record_weights``) and count them. For the training data, a weight field set
    by name that no record has is an error, not a silent 1."""
    scan = DataWeightScan(options)
    for index, example in enumerate(records):
        weights = record_weights(example, options, index)
        scan.records += 1
        scan.weighted_records += bool(weights.messages) or weights.example is not None
        scan.message_weights += len(weights.messages)
        scan.example_weights += weights.example is not None
    if name == "train":
        check_weight_fields(scan, name)
    return scan


def check_weight_fields(scan: DataWeightScan, name: str = "train") -> None:
    """A weight field set by name that no record of the data has is an error, not a silent 1 (the default message
    field ``weight`` absent everywhere means no message weights)."""
    options = scan.options
    if options.example_field is not None and not scan.example_weights:
        raise ValueError(
            f"SFTKey: sftkey_example_weight_field={options.example_field!r}, but no {name} record has that field: "
            "check the column name, or unset it."
        )
    if options.message_field != DEFAULT_MESSAGE_FIELD and not scan.message_weights:
        raise ValueError(
            f"SFTKey: sftkey_message_weight_field={options.message_field!r}, but no assistant message of the {name} "
            "records has that field: check the field name."
        )


def message_token_weights(
    token_starts: Sequence[int], content_ends: Sequence[int], weights: Sequence[float]
) -> list[float]:
    """Each token's assistant-message weight: a token belongs to the first message whose content ends at or after
    the token starts (so the end of turn right after it is the message's), one after the last to the last.
    ``content_ends``: each assistant message's content end in the render, in order; ``weights`` theirs."""
    last = len(content_ends) - 1
    return [weights[min(bisect.bisect_left(content_ends, start), last)] for start in token_starts]


def compose_data_weights(
    input_ids: Sequence[int],
    labels: Sequence[int],
    completion_weights: Sequence[float],
    example_weight: float,
    prompt_weight: float,
    prompt_tokens: Sequence[int] | None = None,
) -> dict[str, list[Any]]:
    """The final ``labels``, ``sftkey_weight`` and ``sftkey_prompt`` of one row, from the framework's ``labels``
    and each token's message x example weight. With a prompt weight, every token the labels leave out gets its label
    back and weighs ``prompt_weight x example_weight``, except the row's first token: it is no target in a row of its
    own, and in a packed row it would be predicted from the sequence before it. ``prompt_tokens`` (1/0 per token)
    narrows the prompt to those tokens (say, not an assistant message the data leaves out)."""
    if not len(input_ids) == len(labels) == len(completion_weights):
        raise ValueError("SFTKey: input_ids, labels and the data weights of a row differ in length.")
    out_labels, weights, prompt = [], [], []
    for position, (token, label, weight) in enumerate(zip(input_ids, labels, completion_weights)):
        if label != IGNORE_INDEX:
            out_labels.append(label)
            weights.append(float(weight))
            prompt.append(0)
        elif prompt_weight > 0 and position > 0 and (prompt_tokens is None or prompt_tokens[position]):
            out_labels.append(token)
            weights.append(prompt_weight * example_weight)
            prompt.append(1)
        else:
            out_labels.append(IGNORE_INDEX)
            weights.append(0.0)
            prompt.append(0)
    return {"labels": out_labels, SFTKEY_WEIGHT: weights, SFTKEY_PROMPT: prompt}
