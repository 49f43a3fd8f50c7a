"""From character spans to a per-token key mask, through a fast tokenizer's offset mapping.

A token is *key* when its characters overlap a key span (``edge_tokens="include"``, so a BPE token such as
``" ####"`` or ``">\\n"`` that straddles the span edge counts) or lie wholly inside one (``"exclude"``).
Zero-width tokens (special tokens a tokenizer adds with offsets ``(0, 0)``) are never key, except the EOS
token that ends the answer when ``include_eos`` is set.
"""

from __future__ import annotations

import bisect
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .finders import match_key_spans
from .hookspecs import AMBIGUOUS, Span

IGNORE_INDEX = -100  # the label of a token without loss


def spans_to_token_mask(
    offsets: Sequence[Sequence[int]], spans: Sequence[Span], edge_tokens: str = "include"
) -> list[int]:
    """1 for each token (given by its ``(start, end)`` character offsets) that belongs to a key span, else 0.

    Offsets of one tokenised text never decrease, so each span's first and last token are found by bisection
    (``O(log n)`` per span rather than a Python loop over every token). Special tokens a post-processor appends
    with offsets ``(0, 0)`` (an EOS after the text) would break that order, so they are left out of the search.
    """
    mask = [0] * len(offsets)
    hi = len(offsets)
    while hi > 0 and offsets[hi - 1][0] == offsets[hi - 1][1] == 0:
        hi -= 1
    for span_start, span_end in spans:
        if edge_tokens == "include":  # tokens ending after the span starts and starting before it ends
            first = bisect.bisect_right(offsets, span_start, hi=hi, key=lambda o: o[1])
            last = bisect.bisect_left(offsets, span_end, hi=hi, key=lambda o: o[0])
        else:  # tokens wholly inside the span
            first = bisect.bisect_left(offsets, span_start, hi=hi, key=lambda o: o[0])
            last = bisect.bisect_right(offsets, span_end, hi=hi, key=lambda o: o[1])
        for index in range(first, last):
            token_start, token_end = offsets[index]
            mask[index] = int(token_end > token_start)  # zero-width (special) tokens are never key
    return mask


def extend_mask_to_eos(
    mask: list[int],
    input_ids: Sequence[int],
    offsets: Sequence[Sequence[int]],
    text: str,
    eos_token_ids: Collection[int],
) -> list[int]:
    """Mark the EOS token that ends the answer (and any whitespace-only tokens before it) as key."""
    if 1 not in mask:
        return mask
    last = len(mask) - 1 - mask[::-1].index(1)
    for index in range(last + 1, len(mask)):
        if input_ids[index] in eos_token_ids:
            return [*mask[: last + 1], *([1] * (index - last)), *mask[index + 1 :]]
        start, end = offsets[index]
        if text[start:end].strip():
            break
    return mask


@dataclass
class KeyMask:
    """A key mask for one tokenised example and how it was found."""

    mask: list[int]
    finder: str | None  # the finder that found the key (None: no key span; AMBIGUOUS: answers that disagree)

    @property
    def found(self) -> bool:
        return self.finder not in (None, AMBIGUOUS)

    @property
    def ambiguous(self) -> bool:
        """The finder saw answer statements it cannot tell apart, so there is no key."""
        return self.finder == AMBIGUOUS


def key_mask_for_completion(
    *,
    text: str,
    input_ids: Sequence[int],
    offsets: Sequence[Sequence[int]],
    completion: str,
    completion_start: int,
    finder: str = "auto",
    finder_options: Mapping[str, Any] | None = None,
    example: Mapping[str, Any] | None = None,
    edge_tokens: str = "include",
    eos_token_ids: Collection[int] = (),
    answer_only: bool = False,
) -> KeyMask:
    """Find the key in ``completion`` (at ``completion_start`` in the tokenised ``text``) and mark its tokens.

    ``eos_token_ids`` empty means the EOS after the answer is not a key token; ``answer_only``: the completion is an
    answer whose reasoning is in a separate field (``match_key_spans``).
    """
    if text[completion_start : completion_start + len(completion)] != completion:
        raise ValueError("The completion does not sit at the given position of the tokenised text.")
    name, spans = match_key_spans(completion, finder, example, finder_options, answer_only)
    shifted = [(start + completion_start, end + completion_start) for start, end in spans]
    mask = spans_to_token_mask(offsets, shifted, edge_tokens)
    if eos_token_ids:
        mask = extend_mask_to_eos(mask, input_ids, offsets, text, eos_token_ids)
    return KeyMask(mask=mask, finder=name)


def truncation_slice(max_length: int | None, mode: str = "keep_start") -> slice:
    """The part of a token sequence kept by truncation to ``max_length`` (TRL's two modes); shorter ones are kept."""
    if max_length is None:
        return slice(None)
    if mode == "keep_start":
        return slice(None, max_length)
    if mode == "keep_end":
        return slice(-max_length, None)
    raise ValueError(f"Unsupported truncation mode {mode!r}: expected 'keep_start' or 'keep_end'.")
