"""Tokenise one record the way TRL's ``SFTTrainer`` does, and add the key mask in the same pass.

Supported record forms (as TRL): conversational ``messages``; ``prompt``/``completion`` (conversational or
plain strings); plain ``text`` (the whole text is the completion). The finder reads the *completion*: the
content of the last assistant message, the completion string, or the text. Its character spans are mapped into
the tokenised text through the fast tokenizer's offset mapping, so the mask is exact through the chat template.

The tokenizer is passed in (any ``transformers`` fast tokenizer); this module imports no framework.
"""

from __future__ import annotations

import functools
import importlib.metadata
import json
import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import SFTKeyArguments
from .masking import IGNORE_INDEX, KeyMask, key_mask_for_completion
from .stats import NOT_LOCATED


@dataclass
class MarkingOptions:
    """How key tokens are marked: the finder and the token-level policies of ``SFTKeyArguments``."""

    finder: str = "auto"
    finder_options: Mapping[str, Any] = field(default_factory=dict)
    edge_tokens: str = "include"
    include_eos: bool = True

    @classmethod
    def from_arguments(cls, arguments: SFTKeyArguments) -> MarkingOptions:
        """The marking part of validated ``sftkey_*`` arguments."""
        options = arguments.sftkey_finder_options
        return cls(
            finder=arguments.sftkey_finder,
            finder_options=dict(options) if isinstance(options, dict) else {},
            edge_tokens=arguments.sftkey_edge_tokens,
            include_eos=arguments.sftkey_include_eos,
        )


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


def _last_assistant_index(messages: list[Mapping[str, Any]]) -> int:
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "assistant":
            content = messages[index].get("content")
            if isinstance(content, str):
                return index
            raise ValueError(
                f"SFTKey expects the assistant message content to be a string, not {type(content).__name__}."
            )
    raise ValueError("SFTKey found no assistant message in a conversational record: there is no answer to mark.")


def _render_with_probe(
    tokenizer: Any, conversation: list[Mapping[str, Any]], index: int, template_kwargs: dict[str, Any]
) -> tuple[str, str]:
    """The rendered conversation, and the same with message ``index``'s content replaced by the sentinel (one call)."""
    probe = [*conversation[:index], {**conversation[index], "content": SENTINEL}, *conversation[index + 1 :]]
    rendered, probe_text = tokenizer.apply_chat_template([conversation, probe], tokenize=False, **template_kwargs)
    return rendered, probe_text


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
) -> dict[str, Any]:
    """``input_ids`` (+ ``completion_mask`` / ``assistant_masks`` as TRL makes them), ``sftkey_mask`` and
    ``sftkey_finder`` (the finder that matched; ``""`` none, ``"not_located"`` content not found after templating).

    ``completion_start_rule``: where a prompt/completion record's completion starts (``COMPLETION_STARTS``); by
    default the installed TRL's rule, so the trained tokens are the ones stock ``SFTTrainer`` trains."""
    eos = tokenizer.eos_token
    template_kwargs: dict[str, Any] = {}
    output: dict[str, Any] = {}
    if "prompt" in example or "messages" in example:
        tools = example.get("tools")
        template_kwargs = {
            "chat_template": chat_template,
            "tools": json.loads(tools) if isinstance(tools, str) else tools,
            **(example.get("chat_template_kwargs") or {}),
        }
    form = _record_form(example, text_field)
    conversation: list[Mapping[str, Any]] | None = None
    prompt_text: str | None = None
    if form == "messages":
        conversation = example["messages"]
        answer_index = _last_assistant_index(conversation)
    elif form == "chat_prompt_completion":
        conversation = example["prompt"] + example["completion"]
        answer_index = len(example["prompt"]) + _last_assistant_index(example["completion"])
        prompt_text = tokenizer.apply_chat_template(
            example["prompt"], tokenize=False, add_generation_prompt=True, **template_kwargs
        )
    elif form == "prompt_completion":
        prompt_text, completion = example["prompt"], example["completion"]
    else:
        completion = example[text_field]

    if conversation is not None:
        text, probe_text = _render_with_probe(tokenizer, conversation, answer_index, template_kwargs)
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
        located = _locate(conversation[answer_index]["content"], text, probe_text)
    else:
        # TRL appends EOS to non-conversational completions (or texts) that lack it
        prefix = prompt_text or ""
        text = prefix + completion + ("" if completion.endswith(eos) else eos)
        encoded = tokenizer(text, return_offsets_mapping=True)
        located = (completion, len(prefix))
    input_ids = list(encoded["input_ids"])
    output["input_ids"] = input_ids

    if prompt_text is not None:
        add_special = conversation is None  # TRL tokenises chat renders without special tokens, plain text with
        prompt_ids = tokenizer(prompt_text, add_special_tokens=add_special)["input_ids"]
        prompt_length = completion_start(prompt_ids, input_ids, completion_start_rule)
        output["completion_mask"] = [0] * prompt_length + [1] * (len(input_ids) - prompt_length)

    if located is None:
        key = KeyMask(mask=[0] * len(input_ids), finder=None)
        output["sftkey_finder"] = NOT_LOCATED
    else:
        key = key_mask_for_completion(
            text=text,
            input_ids=input_ids,
            offsets=encoded["offset_mapping"],
            completion=located[0],
            completion_start=located[1],
            finder=marking.finder,
            finder_options=marking.finder_options,
            example=example,
            edge_tokens=marking.edge_tokens,
            eos_token_ids={tokenizer.eos_token_id} if marking.include_eos else (),
        )
        output["sftkey_finder"] = key.finder or ""
    output["sftkey_mask"] = key.mask
    return output


def _last_trained_segment(labels: list[int]) -> tuple[int, int] | None:
    """``[start, end)`` of the last run of trained tokens (the final answer turn), or None when nothing is trained."""
    end = len(labels)
    while end > 0 and labels[end - 1] == IGNORE_INDEX:
        end -= 1
    if end == 0:
        return None
    start = end
    while start > 0 and labels[start - 1] != IGNORE_INDEX:
        start -= 1
    return start, end


def key_mask_from_token_ids(
    input_ids: list[int], labels: list[int], tokenizer: Any, marking: MarkingOptions
) -> tuple[list[int], str]:
    """The key mask of an already tokenised example (any prompt format), and the finder that matched.

    The completion is the last run of trained tokens, without trailing special tokens. It is decoded, and the text
    re-tokenised with offsets: only when that gives back the same ids is the mask placed (exactly); otherwise the
    status is ``not_located``. Returns ``("", ...)`` status when no finder matched.
    """
    mask = [0] * len(input_ids)
    segment = _last_trained_segment(labels)
    special = set(tokenizer.all_special_ids)
    if segment is None:
        return mask, ""
    start, end = segment
    while end > start and input_ids[end - 1] in special:
        end -= 1
    ids = list(input_ids[start:end])
    text = tokenizer.decode(ids, skip_special_tokens=False)
    encoded = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    if list(encoded["input_ids"]) != ids:
        return mask, NOT_LOCATED
    key = key_mask_for_completion(
        text=text,
        input_ids=ids,
        offsets=encoded["offset_mapping"],
        completion=text,
        completion_start=0,
        finder=marking.finder,
        finder_options=marking.finder_options,
    )
    mask[start:end] = key.mask
    if marking.include_eos and 1 in key.mask and end < len(input_ids) and input_ids[end] == tokenizer.eos_token_id:
        mask[end] = 1
    return mask, key.finder or ""


def mark_token_ids(example: Mapping[str, Any], tokenizer: Any, marking: MarkingOptions) -> dict[str, Any]:
    """``Dataset.map`` form of ``key_mask_from_token_ids``: adds ``sftkey_mask`` and ``sftkey_finder``."""
    mask, finder = key_mask_from_token_ids(list(example["input_ids"]), list(example["labels"]), tokenizer, marking)
    return {"sftkey_mask": mask, "sftkey_finder": finder}
