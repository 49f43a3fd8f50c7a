"""Tokenise one record the way TRL's ``SFTTrainer`` does, and add the key mask in the same pass.

Supported record forms (as TRL): conversational ``messages``; ``prompt``/``completion`` (conversational or
plain strings); plain ``text`` (the whole text is the completion). The finder reads the *completion*: the
content of each trained assistant message (``turns="last"``: the last one), the completion string, or the text.
Each assistant content is located in the render by a sentinel probe, after the template has placed its reasoning
(``reasoning_content``: then the content is the answer alone). The character spans are mapped into the tokenised
text through the fast tokenizer's offset mapping, so the mask is exact through the chat template. Rows that arrive
tokenised are marked turn by turn through the same step (``TurnsMarked.mark``).

The tokenizer is passed in (any ``transformers`` fast tokenizer); this module imports no framework.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import logging
import re
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from .config import SFTKeyArguments
from .masking import IGNORE_INDEX, key_mask_for_completion
from .stats import AMBIGUOUS, NOT_LOCATED
from .weights import (
    SFTKEY_EXAMPLE_WEIGHT,
    SFTKEY_WEIGHT,
    DataWeightOptions,
    RecordWeights,
    describe_record,
    message_token_weights,
    record_weights,
)

logger = logging.getLogger("sftkey_plugin")

REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")  # names chat templates read
# the columns marking adds to each example
TURN_COLUMNS = ("sftkey_mask", "sftkey_finder", "sftkey_turns", "sftkey_turns_found")


@dataclass
class MarkingOptions:
    """How key tokens are marked: the finder and the token-level policies of ``SFTKeyArguments``."""

    finder: str = "auto"
    finder_options: Mapping[str, Any] = field(default_factory=dict)
    edge_tokens: str = "include"
    include_eos: bool = True
    turns: str = "all"
    reasoning_field: str | None = None

    @classmethod
    def from_arguments(cls, arguments: SFTKeyArguments) -> MarkingOptions:
        """The marking part of validated ``sftkey_*`` arguments."""
        options = arguments.sftkey_finder_options
        return cls(
            finder=arguments.sftkey_finder,
            finder_options=dict(options) if isinstance(options, dict) else {},
            edge_tokens=arguments.sftkey_edge_tokens,
            include_eos=arguments.sftkey_include_eos,
            turns=arguments.sftkey_turns,
            reasoning_field=arguments.sftkey_reasoning_field,
        )

    def reasoning_of(self, message: Mapping[str, Any]) -> str | None:
        """The field name under which an assistant message keeps its reasoning apart from the answer, or None."""
        names = (self.reasoning_field,) if self.reasoning_field else REASONING_FIELDS
        return next((name for name in names if isinstance(message.get(name), str) and message[name].strip()), None)

    def has_reasoning(self, message: Mapping[str, Any]) -> bool:
        """Whether an assistant message carries its reasoning in a separate field (so its content is the answer)."""
        return self.reasoning_of(message) is not None


@dataclass
class TurnsMarked:
    """The key mask of one example over all its marked assistant turns, and the counts the statistics need."""

    mask: list[int]
    finders: list[str] = field(default_factory=list)  # the finder that found each turn's key, in turn order
    turns: int = 0  # assistant turns searched
    not_located: int = 0  # turns whose content the chat template altered
    ambiguous: int = 0  # turns whose answer statements disagree (AmbiguousAnswer)

    def mark(
        self,
        located: tuple[str, int] | None,
        text: str,
        input_ids: Sequence[int],
        offsets: Sequence[Sequence[int]],
        marking: MarkingOptions,
        tokenizer: Any,
        example: Mapping[str, Any] | None,
        *,
        answer_only: bool = False,
        token_start: int = 0,
    ) -> None:
        """Find one turn's key in ``located`` (its text and where it sits in ``text``) and OR its tokens, which start
        at ``token_start`` of the example, into the mask: the one marking step of text and token-id marking."""
        self.turns += 1
        if located is None:
            self.not_located += 1
            return
        key = key_mask_for_completion(
            text=text,
            input_ids=input_ids,
            offsets=offsets,
            completion=located[0],
            completion_start=located[1],
            finder=marking.finder,
            finder_options=marking.finder_options,
            example=example,
            edge_tokens=marking.edge_tokens,
            eos_token_ids={tokenizer.eos_token_id} if marking.include_eos else (),
            answer_only=answer_only,
        )
        self.ambiguous += key.ambiguous
        if key.found:
            self.finders.append(key.finder or "")
            end = token_start + len(key.mask)
            self.mask[token_start:end] = [a | b for a, b in zip(self.mask[token_start:end], key.mask)]

    @property
    def finder(self) -> str:
        """The finders that matched (``+``-joined when turns differ); without a key, ``ambiguous`` (a turn's answer
        statements disagree), ``not_located`` or ``""``: a plain string, so the column stays one type."""
        if self.finders:
            return "+".join(dict.fromkeys(self.finders))
        return AMBIGUOUS if self.ambiguous else NOT_LOCATED if self.not_located else ""

    def columns(self) -> dict[str, Any]:
        """The per-example columns (``TURN_COLUMNS``)."""
        return {
            "sftkey_mask": self.mask,
            "sftkey_finder": self.finder,
            "sftkey_turns": self.turns,
            "sftkey_turns_found": len(self.finders),
        }


def require_fast_tokenizer(tokenizer: Any) -> None:
    """Offsets are what make the mask exact; a tokenizer without them gets a clear error, not a guess."""
    if not getattr(tokenizer, "is_fast", False):
        raise ValueError(
            f"SFTKey needs a fast tokenizer with offset mapping to place the key answer tokens; "
            f"{type(tokenizer).__name__} has none. Load it with AutoTokenizer.from_pretrained(..., use_fast=True) or "
            "convert it to a PreTrainedTokenizerFast."
        )


# Private-use characters: never in real data, and no chat template has a reason to touch them
SENTINEL = "\ue000SFTKEY\ue001"


def _record_form(example: Mapping[str, Any], text_field: str) -> str:
    """``messages``, ``chat_prompt_completion``, ``prompt_completion`` or ``text``; a clear error for anything else."""
    accepted = (
        f"SFTKey reads records with 'messages' (a list of chat messages), 'prompt' and 'completion' (both strings or "
        f"both message lists), or a string '{text_field}' field."
    )
    if "messages" in example:
        messages = example["messages"]
        if isinstance(messages, list) and all(isinstance(m, Mapping) for m in messages):
            return "messages"
        raise ValueError(
            f"'messages' must be a list of {{role, content}} messages, not {type(messages).__name__}. {accepted}"
        )
    if "prompt" in example or "completion" in example:
        prompt, completion = example.get("prompt"), example.get("completion")
        if isinstance(prompt, list) and isinstance(completion, list):
            return "chat_prompt_completion"
        if isinstance(prompt, str) and isinstance(completion, str):
            return "prompt_completion"
        raise ValueError(
            f"'prompt' and 'completion' must both be strings or both message lists, got {type(prompt).__name__} "
            f"and {type(completion).__name__}. {accepted}"
        )
    if isinstance(example.get(text_field), str):
        return "text"
    raise ValueError(f"SFTKey cannot read a record with columns {sorted(example)}. {accepted}")


_FORM_NAMES = {
    "messages": "messages",
    "chat_prompt_completion": "prompt/completion message lists",
    "prompt_completion": "prompt/completion strings",
}


def _conversation(example: Mapping[str, Any], form: str) -> list[Mapping[str, Any]]:
    """The messages of a ``messages`` or ``chat_prompt_completion`` record, prompt and completion together."""
    return list(example["messages"]) if form == "messages" else [*example["prompt"], *example["completion"]]


def describe_data_form(example: Mapping[str, Any], marking: MarkingOptions, text_field: str = "text") -> str:
    """The form of a record in words, for messages about the data (e.g. "messages, multi-turn, reasoning in
    reasoning_content")."""
    try:
        form = _record_form(example, text_field)
    except ValueError:
        return f"records with columns {sorted(example)}"
    if form == "text":
        return f"plain text in '{text_field}'"
    if form == "prompt_completion":
        return _FORM_NAMES[form]
    answers = [m for m in _conversation(example, form) if m.get("role") == "assistant"]
    words = [_FORM_NAMES[form]] + (["multi-turn"] if len(answers) > 1 else [])
    words += [f"reasoning in {name}" for name in dict.fromkeys(filter(None, map(marking.reasoning_of, answers)))]
    return ", ".join(words)


def _template_kwargs(example: Mapping[str, Any], chat_template: str | None) -> dict[str, Any]:
    """``apply_chat_template`` arguments for a conversational record, as TRL passes them."""
    tools = example.get("tools")
    return {
        "chat_template": chat_template,
        "tools": json.loads(tools) if isinstance(tools, str) else tools,
        **(example.get("chat_template_kwargs") or {}),
    }


def reasoning_dropped(
    example: Mapping[str, Any], tokenizer: Any, marking: MarkingOptions, chat_template: str | None = None
) -> str | None:
    """The reasoning field of the record's last assistant message when the chat template renders none of it (a
    template without reasoning support: only the answers would be trained), else None."""
    form = _record_form(example, "text")
    if form not in ("messages", "chat_prompt_completion"):
        return None
    conversation = _conversation(example, form)
    answers = [m for m in conversation if m.get("role") == "assistant" and marking.has_reasoning(m)]
    if not answers:
        return None
    name = marking.reasoning_of(answers[-1])
    rendered = tokenizer.apply_chat_template(conversation, tokenize=False, **_template_kwargs(example, chat_template))
    return name if name and answers[-1][name].strip() not in rendered else None


def warn_if_reasoning_dropped(
    example: Mapping[str, Any], tokenizer: Any, marking: MarkingOptions, chat_template: str | None = None
) -> None:
    """Warn when the chat template renders none of the record's assistant reasoning (then every trained token of
    such a message is its answer, so two_stage trains plain SFT on the answers alone)."""
    dropped = reasoning_dropped(example, tokenizer, marking, chat_template)
    if dropped:
        logger.warning(
            "SFTKey: the chat template does not render the assistant messages' %s (first record): only the answers "
            "are trained, in both stages. Use a template that renders it (Qwen3's, for example) or put it into the "
            "content with `sftkey convert`.",
            dropped,
        )


def answer_turns(messages: Sequence[Mapping[str, Any]], first: int, turns: str) -> list[int]:
    """Indices of the assistant messages from ``first`` on whose content is marked: every one, or the last.

    A tool-call message without text (``tool_calls`` and a None or blank content) has no answer and is not a turn.
    """
    indices = []
    for index in range(first, len(messages)):
        message = messages[index]
        if message.get("role") != "assistant":
            continue
        content = message.get("content")
        if message.get("tool_calls") and (content is None or (isinstance(content, str) and not content.strip())):
            continue
        if not isinstance(content, str):
            raise ValueError(
                f"SFTKey expects the assistant message content to be a string, not {type(content).__name__}."
            )
        indices.append(index)
    if not indices:
        raise ValueError("SFTKey found no assistant message in a conversational record: there is no answer to mark.")
    return indices if turns == "all" else indices[-1:]


def _with_content(conversation: list[Mapping[str, Any]], index: int, content: str) -> list[Mapping[str, Any]]:
    return [*conversation[:index], {**conversation[index], "content": content}, *conversation[index + 1 :]]


@dataclass
class _Turn:
    """An assistant message to locate in the render: ``answer`` is what the probe replaces by the sentinel."""

    index: int
    answer: str
    head: str = ""  # the part of the content the probe keeps (reasoning embedded before </think>)
    answer_only: bool = False  # the answer's reasoning is elsewhere: auto keeps all of it


def _locate_turns(
    tokenizer: Any, conversation: list[Mapping[str, Any]], turns: list[_Turn], template_kwargs: dict[str, Any]
) -> tuple[str, list[tuple[str, int] | None]]:
    """The rendered conversation and, for each turn, where the template put its answer (one batched render)."""
    probes = [_with_content(conversation, turn.index, turn.head + SENTINEL) for turn in turns]
    rendered, *probe_texts = tokenizer.apply_chat_template([conversation, *probes], tokenize=False, **template_kwargs)
    return rendered, [_locate(turn.answer, rendered, probe) for turn, probe in zip(turns, probe_texts)]


def _split_think(turn: _Turn, think_close: str) -> _Turn | None:
    """A message with ``<think>…</think>`` inside its content, as templates that move or drop that reasoning see it:
    the probe keeps the reasoning and replaces only the answer after ``</think>``."""
    cut = turn.answer.rfind(think_close)
    if turn.head or turn.answer_only or cut < 0:
        return None
    cut += len(think_close)
    return _Turn(turn.index, turn.answer[cut:], turn.answer[:cut], answer_only=True)


def _render_turns(
    tokenizer: Any,
    conversation: list[Mapping[str, Any]],
    indices: list[int],
    marking: MarkingOptions,
    template_kwargs: dict[str, Any],
) -> tuple[str, list[tuple[_Turn, tuple[str, int] | None]]]:
    """The render and each turn with where its answer sits (``None``: the template altered it)."""
    turns = [_Turn(i, conversation[i]["content"], answer_only=marking.has_reasoning(conversation[i])) for i in indices]
    rendered, located = _locate_turns(tokenizer, conversation, turns, template_kwargs)
    think_close = str(marking.finder_options.get("think_close", "</think>"))
    retry = {}
    for number, turn in enumerate(turns):
        split = _split_think(turn, think_close) if located[number] is None else None
        if split is not None:
            retry[number] = split
    if retry:  # Qwen3-style templates move the reasoning found inside the content, or drop it from past turns
        _, again = _locate_turns(tokenizer, conversation, list(retry.values()), template_kwargs)
        for number, place in zip(retry, again):
            if place is not None:
                turns[number], located[number] = retry[number], place
    return rendered, list(zip(turns, located))


def _locate(content: str, rendered: str, probe_text: str) -> tuple[str, int] | None:
    """Where the chat template put ``content``: where the probe render has the sentinel, so a short answer is never
    matched inside other text. Templates that trim the content are allowed."""
    candidates = {content, content.strip(), content.rstrip(), content.lstrip()} - {""}
    position = probe_text.find(SENTINEL)
    while position >= 0:  # the occurrence with the real render's text before and after it (data may hold one too)
        tail = probe_text[position + len(SENTINEL) :]
        if probe_text[:position] == rendered[:position] and rendered.endswith(tail):
            middle = rendered[position : len(rendered) - len(tail)]
            if middle in candidates:
                return middle, position
        position = probe_text.find(SENTINEL, position + 1)
    return None


def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    length = 0
    for token, other_token in zip(ids, other):
        if token != other_token:
            break
        length += 1
    return length


# Where TRL starts the completion of a prompt/completion record. They differ when the prompt's last token merges with
# the completion's first (a prompt ending in a space, a completion starting without one): trl < 1.15 starts after as
# many tokens as the prompt has alone (the merged token is not trained), trl >= 1.15 where the two tokenisations
# diverge (it is).
PROMPT_LENGTH = "prompt_length"
COMMON_PREFIX = "common_prefix"
COMPLETION_STARTS = (PROMPT_LENGTH, COMMON_PREFIX)


@functools.cache
def installed_trl_completion_start() -> str:
    """The rule of the installed TRL (read from its metadata: trl is not imported); the newest one without TRL."""
    try:
        version = importlib.metadata.version("trl")
    except importlib.metadata.PackageNotFoundError:
        return COMMON_PREFIX
    major, minor = (int(part) for part in re.findall(r"\d+", version)[:2])
    return COMMON_PREFIX if (major, minor) >= (1, 15) else PROMPT_LENGTH


def completion_start(prompt_ids: list[int], input_ids: list[int], rule: str | None = None) -> int:
    """The index of the first completion token of ``input_ids`` under TRL's ``rule`` (see ``COMPLETION_STARTS``;
    None: the installed TRL's)."""
    rule = rule or installed_trl_completion_start()
    if rule == PROMPT_LENGTH:
        return min(len(prompt_ids), len(input_ids))
    if rule == COMMON_PREFIX:
        return _common_prefix_length(prompt_ids, input_ids)
    raise ValueError(f"Unknown completion start rule {rule!r}: expected one of {list(COMPLETION_STARTS)}.")


def tokenize_with_key_mask(
    example: Mapping[str, Any],
    tokenizer: Any,
    marking: MarkingOptions,
    *,
    text_field: str = "text",
    assistant_only_loss: bool = False,
    chat_template: str | None = None,
    completion_start_rule: str | None = None,
    weights: DataWeightOptions | None = None,
) -> dict[str, Any]:
    """``input_ids`` (+ ``completion_mask`` / ``assistant_masks`` as TRL makes them) and the ``TurnsMarked``
    columns: ``sftkey_mask``, ``sftkey_finder`` (the finder that matched; ``""`` none, ``"ambiguous"`` answer
    statements that disagree, ``"not_located"`` content not found after templating), ``sftkey_turns`` and
    ``sftkey_turns_found``.

    ``completion_start_rule``: where a prompt/completion record's completion starts (``COMPLETION_STARTS``); by
    default the installed TRL's rule, so the trained tokens are the ones stock ``SFTTrainer`` trains.
    ``weights`` (data weights on): also ``sftkey_weight``, each token's message x example weight (whatever its
    label: ``compose_data_weights`` applies the labels), and ``sftkey_example_weight``."""
    eos = tokenizer.eos_token
    output: dict[str, Any] = {}
    conversational = "prompt" in example or "messages" in example
    template_kwargs = _template_kwargs(example, chat_template) if conversational else {}
    form = _record_form(example, text_field)
    conversation: list[Mapping[str, Any]] | None = None
    prompt_text: str | None = None
    if form in ("messages", "chat_prompt_completion"):
        conversation = _conversation(example, form)
        first = len(example["prompt"]) if form == "chat_prompt_completion" else 0  # prompt messages are not trained
        indices = answer_turns(conversation, first, marking.turns)
    record = record_weights(example, weights) if weights is not None else None
    if conversation is not None and record is not None and record.messages:  # every answer placed, to weigh it
        indices = answer_turns(conversation, first, "all")
    if form == "chat_prompt_completion":
        prompt_text = tokenizer.apply_chat_template(
            example["prompt"], tokenize=False, add_generation_prompt=True, **template_kwargs
        )
    elif form == "prompt_completion":
        prompt_text, completion = example["prompt"], example["completion"]
    elif form == "text":
        completion = example[text_field]

    if conversation is not None:
        text, turns = _render_turns(tokenizer, conversation, indices, marking, template_kwargs)
        if assistant_only_loss:
            encoded = tokenizer.apply_chat_template(
                conversation,
                tokenize=True,
                return_dict=True,
                return_assistant_tokens_mask=True,
                tokenizer_kwargs={"return_offsets_mapping": True},
                **template_kwargs,
            )
            output["assistant_masks"] = list(encoded["assistant_masks"])
        else:
            encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    else:
        # TRL appends EOS to non-conversational completions (or texts) that lack it
        prefix = prompt_text or ""
        text = prefix + completion + ("" if completion.endswith(eos) else eos)
        encoded = tokenizer(text, return_offsets_mapping=True)
        turns = [(_Turn(0, completion), (completion, len(prefix)))]
    input_ids = list(encoded["input_ids"])
    output["input_ids"] = input_ids

    if prompt_text is not None:
        add_special = conversation is None  # TRL tokenises chat renders without special tokens, plain text with
        prompt_ids = tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"]
        prompt_length = completion_start(prompt_ids, input_ids, completion_start_rule)
        output["completion_mask"] = [0] * prompt_length + [1] * (len(input_ids) - prompt_length)

    if record is not None:
        if conversation is not None and record.messages and "assistant_masks" in output:
            output[SFTKEY_WEIGHT] = _generation_data_weights(output["assistant_masks"], conversation, record, example)
        else:
            if conversation is not None:
                _refuse_unplaced_answers(conversation, first, indices, record, example)
            output[SFTKEY_WEIGHT] = _token_data_weights(encoded["offset_mapping"], turns, record)
        output[SFTKEY_EXAMPLE_WEIGHT] = record.example_weight
    if marking.turns == "last":
        turns = turns[-1:]
    marked = TurnsMarked(mask=[0] * len(input_ids))
    for turn, located in turns:
        marked.mark(
            located,
            text,
            input_ids,
            encoded["offset_mapping"],
            marking,
            tokenizer,
            example,
            answer_only=turn.answer_only,
        )
    output.update(marked.columns())
    return output


def _generation_data_weights(
    assistant_masks: Sequence[int],
    conversation: list[Mapping[str, Any]],
    record: RecordWeights,
    example: Mapping[str, Any],
) -> list[float]:
    """Each token's message x example weight under ``assistant_only_loss``: each run of the template's generation
    blocks is one assistant message, in order (a tool-call message too, at its own weight, 1 when it has none), so
    the template's text after a message's content in its block is that message's."""
    assistants = [index for index, message in enumerate(conversation) if message.get("role") == "assistant"]
    labels = [1 if trained else IGNORE_INDEX for trained in assistant_masks]
    runs = len(trained_segments(labels))
    if runs != len(assistants):
        raise ValueError(
            f"SFTKey: the chat template's generation blocks make {runs} trained runs for the "
            f"{len(assistants)} assistant messages of a record whose messages carry weights, so the weights cannot "
            f"be placed on its tokens. The record: {describe_record(example)}"
        )
    turn_weights = [record.messages.get(index, 1.0) * record.example_weight for index in assistants]
    weights = message_weights_by_runs(labels, turn_weights)
    return [weight if trained else record.example_weight for weight, trained in zip(weights, assistant_masks)]


def _refuse_unplaced_answers(
    conversation: list[Mapping[str, Any]],
    first: int,
    placed: list[int],
    record: RecordWeights,
    example: Mapping[str, Any],
) -> None:
    """Message weights are placed by where each answer's content ends in the render; an assistant message of the
    trained part that is not placed (a tool call without text) would take the next answer's weight: refused."""
    unplaced = [
        index
        for index in range(first, len(conversation))
        if conversation[index].get("role") == "assistant" and index not in placed
    ]
    if record.messages and unplaced:
        raise ValueError(
            f"SFTKey: assistant message(s) {unplaced} of a record whose messages carry weights have no text (tool "
            "calls), so their tokens cannot be told apart from the next answer's: use messages records with "
            f"assistant_only_loss=True, or remove the weights. The record: {describe_record(example)}"
        )


def _token_data_weights(
    offsets: Sequence[Sequence[int]], turns: list[tuple[_Turn, tuple[str, int] | None]], record: RecordWeights
) -> list[float]:
    """Each token's message weight (``message_token_weights``) times the example weight; an assistant message
    the template altered cannot be placed, which is an error when the record weighs its messages."""
    example = record.example_weight
    if not record.messages:
        return [example] * len(offsets)
    unplaced = [turn.index for turn, located in turns if located is None]
    if unplaced:
        raise ValueError(
            f"SFTKey: the chat template altered the content of assistant message(s) {unplaced} of a record whose "
            "messages carry weights, so the weights cannot be placed on its tokens. The record's messages: "
            f"{[turn.index for turn, _ in turns]}."
        )
    ends = [located[1] + len(located[0]) for _, located in turns if located is not None]
    message = [record.messages.get(turn.index, 1.0) * example for turn, _ in turns]
    return message_token_weights([start for start, _ in offsets], ends, message)


def message_weights_by_runs(labels: Sequence[int], turn_weights: Sequence[float]) -> list[float]:
    """Each token's message weight when each run of trained tokens is one assistant turn (tokens marked from their
    own ids): run k weighs ``turn_weights[k]``, every other token 1. Runs and turns that do not pair up are an
    error."""
    segments = trained_segments(labels)
    if len(segments) != len(turn_weights):
        raise ValueError(
            f"SFTKey: {len(segments)} trained runs of tokens cannot be paired with {len(turn_weights)} weighed "
            "assistant messages."
        )
    weights = [1.0] * len(labels)
    for (start, end), weight in zip(segments, turn_weights):
        weights[start:end] = [weight] * (end - start)
    return weights


def trained_segments(labels: Sequence[int]) -> list[tuple[int, int]]:
    """``[start, end)`` of every run of trained tokens (one per trained turn)."""
    segments: list[tuple[int, int]] = []
    start: int | None = None
    for index, label in enumerate([*labels, IGNORE_INDEX]):
        if label != IGNORE_INDEX and start is None:
            start = index
        elif label == IGNORE_INDEX and start is not None:
            segments.append((start, index))
            start = None
    return segments


def _text_end(input_ids: Sequence[int], start: int, end: int, special: set[int], tokenizer: Any) -> int:
    """Where the text of the trained run ``[start, end)`` ends: before its closing special tokens and the whitespace
    around them (a chat template's ``<|im_end|>\n``), which are no part of the message, as in text marking."""
    text_end = end
    while text_end > start and (
        input_ids[text_end - 1] in special or not tokenizer.decode([input_ids[text_end - 1]]).strip()
    ):
        text_end -= 1
    # trailing whitespace without a special token is the message's own text
    return text_end if any(token in special for token in input_ids[text_end:end]) else end


def key_mask_from_token_ids(
    input_ids: Sequence[int],
    labels: Sequence[int],
    tokenizer: Any,
    marking: MarkingOptions,
    example: Mapping[str, Any] | None = None,
    answers: Sequence[str | None] | None = None,
) -> TurnsMarked:
    """The key mask of an already tokenised example (any prompt format), with the same options as text marking.

    Each run of trained tokens that holds text is a turn (``marking.turns``: every one, or the last). Its text,
    without its closing special tokens and the whitespace around them, is decoded and re-tokenised with offsets:
    only when that gives back the same ids is the mask placed (exactly), otherwise the turn is ``not_located``.
    ``example`` is the record, for the ``field`` finder. ``answers`` gives, turn by turn, the content of a message
    whose reasoning is in a separate field (None for any other): that content, found at the end of its turn, is the
    answer (``answer_only``), as in text marking; when the turns cannot be paired with it, they are ``not_located``.
    """
    marked = TurnsMarked(mask=[0] * len(input_ids))
    special = set(tokenizer.all_special_ids)
    segments = trained_segments(labels)
    # a run of only special tokens (an EOS trained apart from its turn) has no answer text: not a turn
    turns = [
        (start, end, text_end)
        for start, end in segments
        if (text_end := _text_end(input_ids, start, end, special, tokenizer)) > start
    ]
    paired = list(answers) if answers is not None and len(answers) == len(turns) else None
    chosen = range(len(turns)) if marking.turns == "all" else range(len(turns))[-1:]
    for number in chosen:
        start, end, text_end = turns[number]
        ids = list(input_ids[start:text_end])
        text = tokenizer.decode(ids, skip_special_tokens=False)
        encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
        located = (text, 0) if list(encoded["input_ids"]) == ids else None
        answer = paired[number] if paired is not None else None
        if located is not None and answer is not None:  # the answer after the reasoning the template rendered
            position = text.rfind(answer.strip())
            located = (answer.strip(), position) if answer.strip() and position >= 0 else None
        elif answers is not None and paired is None and any(a is not None for a in answers):
            located = None  # which turn is an answer alone is unknown: not marked, and counted
        # the trailing special tokens get zero-width offsets, as a tokenizer gives the ones it adds
        offsets = [*encoded["offset_mapping"], *[(0, 0)] * (end - text_end)]
        marked.mark(
            located,
            text,
            input_ids[start:end],
            offsets,
            marking,
            tokenizer,
            example,
            answer_only=answer is not None,
            token_start=start,
        )
    return marked


def mark_token_ids(example: Mapping[str, Any], tokenizer: Any, marking: MarkingOptions) -> dict[str, Any]:
    """``Dataset.map`` form of ``key_mask_from_token_ids`` (the row is the record): the ``TurnsMarked`` columns."""
    marked = key_mask_from_token_ids(example["input_ids"], example["labels"], tokenizer, marking, example)
    return marked.columns()
