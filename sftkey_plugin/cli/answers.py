"""Answer extraction (with the training finders), normalisation, equality and the paper's format check.

Extraction runs the same finder as training (``match_key_spans``), then strips the span's markers
(``<Answer>…</Answer>``, ``####``, ``\\boxed{}``, "The answer is") to the bare answer. Normalisation makes
``1,000`` = ``1000``, ``$5`` = ``5``, ``0.50`` = ``1/2``, ``(B)`` = ``B.`` = ``B``; mathematical equality beyond
that (LaTeX, radicals, sets, intervals, percentages) is decided by math-verify, as TRL's accuracy reward and
open-r1 decide it. Option letters keep their own rule: ``B`` is never equal to a number.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass
from fractions import Fraction
from typing import Any

from ..finders import AnswerStatement, answer_statement, boxed, gsm8k, match_key_spans
from ..hookspecs import AmbiguousAnswer

_FREE = r"(?:(?!</?Thinking>|</?Answer>).)*"
# The paper's Fmt: exactly one thinking block, then one answer block, nothing else (each non-blank)
FORMAT_PATTERN = rf"\s*<Thinking>(?P<reasoning>{_FREE})</Thinking>\s*<Answer>(?P<answer>{_FREE})</Answer>\s*"

_MATH_WRAP = re.compile(r"(?s)^(?:\$(.*)\$|\\\((.*)\\\)|\\\[(.*)\\\])$")
_THOUSANDS = re.compile(r"(?<=\d),(?=\d{3}(?!\d))")
_NUMBER = re.compile(r"([-+]?)(\d+(?:\.\d*)?|\.\d+)(?:\s*/\s*(\d+(?:\.\d*)?))?\s*(?:%|[A-Za-z][A-Za-z .]*)?")
_FULL_WIDTH = str.maketrans("（）：", "():")  # "（B）" is "(B)"
_MATH = re.compile(r"[\d\\]")  # a digit or a LaTeX command: an answer math-verify can read
_LETTER = re.compile(r"\(?([A-Z])\)?[.:)]?|\(([a-z])\)|\(([A-Z])\)\s.*|([A-Z])[.:)]\s.*", re.S)


@dataclass
class Extraction:
    """What was read from one output: the finder that matched (``ambiguous``: its answers disagree), the raw key
    span, the bare answer."""

    finder: str | None
    span: str | None
    answer: str | None


def _inside_answer_tags(text: str) -> str:
    """The content of the last ``<Answer>`` block (to ``</Answer>`` or the end), else the text unchanged."""
    start = text.rfind("<Answer>")
    if start >= 0:
        text = text[start + len("<Answer>") :]
        end = text.find("</Answer>")
        return text[:end] if end >= 0 else text
    end = text.rfind("</Answer>")
    return text[:end] if end >= 0 else text


def _unbox(span: str) -> str:
    """``\\boxed{X}`` / ``\\fbox{X}`` / ``\\boxed X`` to ``X``."""
    brace = span.find("{")
    if brace >= 0 and span.endswith("}"):
        return span[brace + 1 : -1]
    return span.split(None, 1)[1] if " " in span else span


def strip_markers(text: str) -> str:
    """The bare answer in a key span: inside the answer tags, narrowed to a box / answer phrase / ``####`` line."""
    answer = _inside_answer_tags(text.strip()).strip()
    spans = boxed(answer)
    if spans:
        answer = _unbox(answer[spans[0][0] : spans[0][1]])
    elif statement := _stated(answer):
        answer = answer[statement.value_start : statement.value_end]
    elif spans := gsm8k(answer):
        answer = answer[spans[0][0] : spans[0][1]].lstrip("#")
    answer = answer.strip().rstrip(".").strip()
    wrapped = _MATH_WRAP.match(answer)
    if wrapped:
        answer = next(group for group in wrapped.groups() if group is not None).strip()
    return answer


def _stated(text: str) -> AnswerStatement | None:
    """The answer statement ``answer_is`` keys in ``text`` (None: none, or statements that disagree)."""
    try:
        return answer_statement(text)
    except AmbiguousAnswer:
        return None


def extract_answer(
    text: str,
    finder: str = "auto",
    options: Mapping[str, Any] | None = None,
    example: Mapping[str, Any] | None = None,
) -> Extraction:
    """Find the key span with the training finder and reduce it to the bare answer (None: no span, or blank)."""
    name, spans = match_key_spans(text, finder, example, options)
    if not spans:
        return Extraction(name, None, None)  # None, or AMBIGUOUS: counted apart by sftkey eval
    span = text[spans[-1][0] : spans[-1][1]]
    answer = strip_markers(span)
    return Extraction(name, span, answer or None)


def _as_number(text: str) -> str | None:
    """Canonical exact value of a number, fraction or percentage (units after it ignored), else None."""
    text = _THOUSANDS.sub("", text.replace("$", "").replace("\u2212", "-")).strip()
    match = _NUMBER.fullmatch(text)
    if not match:
        return None
    sign, numerator, denominator = match.groups()
    value = Fraction(numerator)
    if denominator is not None:
        if Fraction(denominator) == 0:
            return None
        value /= Fraction(denominator)
    return str(-value if sign == "-" else value)


def _as_letter(text: str) -> str | None:
    """A multiple-choice letter: ``B``, ``(B)``, ``B.``, ``B)``, ``(b)``, ``(B) 42``."""
    match = _LETTER.fullmatch(text)
    return next((group.upper() for group in match.groups() if group), None) if match else None


def normalize_answer(text: str | None) -> str | None:
    """One canonical string per answer, so equal answers compare equal (None stays None)."""
    if text is None:
        return None
    answer = strip_markers(text).strip().rstrip(".").strip().translate(_FULL_WIDTH)
    answer = re.sub(r"^[A-Za-z]\s*=\s*(?=\S)", "", answer)  # "x = 5" answers the question "x?" with 5
    if not answer:
        return None
    return _as_letter(answer) or _as_number(answer) or " ".join(answer.casefold().split())


def _is_letter(normalized: str) -> bool:
    return len(normalized) == 1 and normalized.isupper()  # text answers are casefolded: only letters stay upper


def math_equal(prediction: str, gold: str) -> bool:
    """Whether two bare answers are mathematically equal as math-verify decides it (TRL's accuracy reward and
    open-r1 use it): LaTeX, radicals, fractions, sets, intervals, equations, percentages, units."""
    from math_verify import parse, verify  # sympy and the LaTeX grammar load in about a second: only when needed

    parsed_gold, parsed_prediction = parse(f"${gold}$"), parse(f"${prediction}$")
    return bool(parsed_gold) and bool(parsed_prediction) and verify(parsed_gold, parsed_prediction)


def answers_match(prediction: str | None, gold: str | None) -> bool:
    """Whether a predicted answer equals the gold one (no prediction is wrong): option letters only as letters, words
    as words; anything else when equal after normalisation or, for a gold answer with a digit or LaTeX,
    mathematically equal (``math_equal``)."""
    predicted, expected = normalize_answer(prediction), normalize_answer(gold)
    if predicted is None or expected is None:
        return False
    if predicted == expected:
        return True
    if _is_letter(predicted) or _is_letter(expected) or not _MATH.search(gold or ""):
        return False  # math-verify reads words as products of symbols: "even" would equal its anagram "neve"
    return math_equal(strip_markers(prediction or ""), strip_markers(gold or ""))


def format_ok(text: str, pattern: str | None = None) -> bool:
    """The paper's format accuracy: the whole output has the tag structure, every named part non-blank."""
    match = re.fullmatch(pattern or FORMAT_PATTERN, text, re.S)
    return match is not None and all(part is not None and part.strip() for part in match.groupdict().values())
