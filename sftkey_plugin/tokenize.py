"""Tokenise one record the way TRL's ``SFTTrainer`` does, and add the key mask in the same pass.

Supported record forms (as TRL): conversational ``messages``; ``prompt``/``completion`` (conversational or
plain strings); plain ``text`` (the whole text is the completion). The finder reads the *completion*: the
content of the last assistant message, the completion string, or the text. Its character spans are mapped into
the tokenised text through the fast tokenizer's offset mapping, so the mask is exact through the chat template.

The tokenizer is passed in (any ``transformers`` fast tokenizer); this module imports no framework.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import SFTKeyArguments
from .masking import KeyMask, key_mask_for_completion

NOT_LOCATED = "not_located"  # the chat template altered the assistant content, so its spans cannot be placed


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


def _last_assistant_content(messages: list[Mapping[str, Any]]) -> str:
    for message in reversed(messages):
        if message.get("role") == "assistant":
            content = message.get("content")
            if isinstance(content, str):
                return content
            raise ValueError(
                f"SFTKey expects the assistant message content to be a string, not {type(content).__name__}."
            )
    raise ValueError("SFTKey found no assistant message in a conversational record: there is no answer to mark.")


def _locate(rendered: str, content: str) -> tuple[str, int] | None:
    """Where the chat template put the assistant content: the last verbatim occurrence (or of its stripped form)."""
    for candidate in (content, content.strip()):
        index = rendered.rfind(candidate) if candidate else -1
        if index >= 0:
            return candidate, index
    return None


def _common_prefix_length(ids: list[int], other: list[int]) -> int:
    length = 0
    for token, other_token in zip(ids, other):
        if token != other_token:
            break
        length += 1
    return length


def tokenize_with_key_mask(
    example: Mapping[str, Any],
    tokenizer: Any,
    marking: MarkingOptions,
    *,
    text_field: str = "text",
    assistant_only_loss: bool = False,
    chat_template: str | None = None,
) -> dict[str, Any]:
    """``input_ids`` (+ ``completion_mask`` / ``assistant_masks`` as TRL makes them), ``sftkey_mask`` and
    ``sftkey_finder`` (the finder that matched; ``""`` none, ``"not_located"`` content not found after templating)."""
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
    if "messages" in example and isinstance(example["messages"], list):
        conversation = example["messages"]
        completion = _last_assistant_content(conversation)
        prompt_text = None
    elif "prompt" in example and isinstance(example["prompt"], list):
        conversation = example["prompt"] + example["completion"]
        completion = _last_assistant_content(example["completion"])
        prompt_text = tokenizer.apply_chat_template(
            example["prompt"], tokenize=False, add_generation_prompt=True, **template_kwargs
        )
    else:
        conversation = None
        if "prompt" in example:
            prompt_text, completion = example["prompt"], example["completion"]
        else:
            prompt_text, completion = None, example[text_field]
        if not isinstance(completion, str) or not isinstance(prompt_text or "", str):
            raise ValueError(
                f"SFTKey expects string prompt/completion/{text_field} fields, got {type(completion).__name__}."
            )

    if conversation is not None:
        text = tokenizer.apply_chat_template(conversation, tokenize=False, **template_kwargs)
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
        located = _locate(text, completion)
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
        prompt_length = _common_prefix_length(prompt_ids, input_ids)
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
