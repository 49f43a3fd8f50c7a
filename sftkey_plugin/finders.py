"""Built-in key-span finders and the ``find_key_spans`` entry point.

Every finder returns the character spans ``[(start, end), ...]`` of the key answer in a completion, ``[]`` when
there is none. Spans include the answer's marker (``</Thinking>``'s answer block, ``####``, ``\\boxed{}``,
"The answer is"), so the tokens that announce the answer are trained with it.

``auto`` tries, in this order, and keeps the first finder that finds something:
``regex`` (only when a ``pattern`` option is given), ``field`` (only when an ``answer_field`` option is given),
``tags``, ``think``, ``gsm8k``, ``boxed``, ``answer_is``. It never falls back to "the last number": an example
without a recognisable answer has no key span (see ``sftkey_on_missing``). An assistant message that carries its
reasoning in a separate field (``reasoning_content``) is the answer alone: there ``auto`` tries ``regex`` and
``field`` (when their option is given), then ``content`` (the whole message content); with an ``auto_order``
option, that order, then ``content``.

``answer_is`` knows English ("The answer is (B)", "Final Answer: ...") and Chinese ("答案是 A。", "答案为：42",
"最终答案：（B）") answer phrases. Another language is one ``regex`` away, e.g. Japanese ``sftkey_finder: regex``
with ``sftkey_finder_options: {pattern: "(?P<key>答えは\\s*[^。\\n]+)"}``; a finder that should also take part in
``auto`` is a third-party finder (``sftkey_plugin.hookspecs``) listed in the ``auto_order`` option, e.g.
``{auto_order: [tags, think, gsm8k, boxed, answer_is, answer_ja]}``.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from .hookspecs import Finder, Span, get_finder, hookimpl, registered_finders

AUTO_ORDER = ("regex", "field", "tags", "think", "gsm8k", "boxed", "answer_is")
# auto for a message whose reasoning is in a separate field: its content is the answer
AUTO_ORDER_ANSWER_ONLY = ("regex", "field", "content")
# auto only tries these when the user gave the option they cannot work without
_AUTO_NEEDS_OPTION = {"regex": "pattern", "field": "answer_field"}


def _after_last(text: str, marker: str) -> list[Span]:
    """The span from right after the last ``marker`` to the end, if anything but whitespace is there."""
    index = text.rfind(marker)
    if index < 0:
        return []
    start = index + len(marker)
    return [(start, len(text))] if text[start:].strip() else []


def tags(
    text: str,
    *,
    example: Mapping[str, Any] | None = None,
    thinking_close: str = "</Thinking>",
    answer_open: str = "<Answer>",
    answer_close: str = "</Answer>",
) -> list[Span]:
    """The paper's format: everything after the last ``</Thinking>`` (or, without it, from the last ``<Answer>``).

    An answer block with nothing in it (``<Answer> </Answer>``) is no answer: training on bare tags is not SFTKey.
    """
    if thinking_close in text:
        spans = _after_last(text, thinking_close)
    else:
        index = text.rfind(answer_open)
        spans = [(index, len(text))] if index >= 0 else []
    if spans and not text[spans[0][0] :].replace(answer_open, "").replace(answer_close, "").strip():
        return []
    return spans


def think(text: str, *, example: Mapping[str, Any] | None = None, think_close: str = "</think>") -> list[Span]:
    """Reasoning models: everything after the last ``</think>``."""
    return _after_last(text, think_close)


_NUMBER_START = r"[-+]?\$?\s*[0-9.,]*[0-9]"
_GSM8K_LINE = re.compile(r"(?<!#)####(?!#)[ \t]*(?P<answer>[^\n]*\S)")


def gsm8k(text: str, *, example: Mapping[str, Any] | None = None, gsm8k_numeric: bool = True) -> list[Span]:
    """The last ``#### N`` (marker to end of line); by default N must start with a number, so headings never match."""
    number = re.compile(_NUMBER_START)
    for match in reversed(list(_GSM8K_LINE.finditer(text))):
        if not gsm8k_numeric or number.match(match.group("answer")):
            return [(match.start(), match.end())]
    return []


def _balanced_end(text: str, open_index: int) -> int | None:
    """Index just past the brace closing the one at ``open_index`` (escaped ``\\{``/``\\}`` ignored), or None."""
    depth = 0
    index = open_index
    while index < len(text):
        char = text[index]
        if char == "\\":
            index += 2
            continue
        if char == "{":
            depth += 1
        elif char == "}":
            depth -= 1
            if depth == 0:
                return index + 1
        index += 1
    return None


def boxed(
    text: str,
    *,
    example: Mapping[str, Any] | None = None,
    boxed_commands: Sequence[str] = ("\\boxed", "\\fbox"),
) -> list[Span]:
    """The last balanced ``\\boxed{...}`` (nested braces allowed; also ``\\fbox{}`` and ``\\boxed 5``)."""
    pattern = re.compile("(?:" + "|".join(re.escape(c) for c in boxed_commands) + r")(?![A-Za-z])")
    for match in reversed(list(pattern.finditer(text))):
        rest = match.end()
        if text.startswith("{", rest):
            end = _balanced_end(text, rest)
            if end is not None:
                return [(match.start(), end)]
        else:
            bare = re.compile(r" +([^\s$]+)").match(text, rest)
            if bare:
                return [(match.start(), bare.end())]
    return []


# The answer runs to the line's end, a sentence stop (full-width, or ASCII followed by a space) or a comma, except a
# comma that goes on with another value of the same answer ("x = 2, y = 3", "2, 3", "(A), (C)", "$x$, $y$")
_MORE_VALUES = r"\s*(?:[A-Za-z]\s*=|[-+]?\d|[(（]|\$)"
_ANSWER_END = rf"(?=[ \t]*(?:[。！？；]|[.;!?](?:\s|$)|$|(?:，|,(?=\s))(?!{_MORE_VALUES})))"
_ANSWER_IS = re.compile(
    r"(?im)(?:\bfinal answer:\s*)?\b(?:the\s+)?(?:final\s+)?answer\s+is\s*:?\s*"
    rf"(?P<value>\$[^$\n]+\$|\([A-Za-z0-9]\)|\S[^\n]*?){_ANSWER_END}"
)
# Chinese: 答案是 / 答案为 / 最终答案：(traditional 為/終 too): 是/为 or a full-width or ASCII colon, then the
# answer; (B) and （B） both count.
_ANSWER_IS_ZH = re.compile(
    r"(?m)(?:最[终終]|正确|正確)?答案\s*(?:应该|应|應該|應)?\s*(?:(?:是|为|為)\s*[:：]?|[:：])\s*"
    rf"(?P<value>\$[^$\n]+\$|[(（][A-Za-z0-9][)）]|[^\s。，；！？][^\n。；！？]*?){_ANSWER_END}"
)
ANSWER_PHRASES = (_ANSWER_IS, _ANSWER_IS_ZH)
# An answer phrase that states no answer: it asks for one or judges one ("whether the answer is right", "答案是否正确",
# "答案为什么是 7", "答案是对的", "the answer is not 5", "答案是 7 吗？")
_JUDGEMENT = re.compile(
    r"(?i)^(?:right|wrong|correct|incorrect|not\b|否|不|什么|什麼|何|多少|对|對|错|錯|正确|正確|错误|錯誤|怎)"
)
_ASKING = re.compile(r"(?i)\b(?:whether|if)\s+$|[吗嗎吧呢]\s*$")


def _states_an_answer(text: str, match: re.Match[str]) -> bool:
    """Whether an answer phrase gives the answer, not a question or a judgement about one."""
    value = match.group("value")
    if (
        _JUDGEMENT.match(value)
        or _ASKING.search(value)
        or _ASKING.search(text[max(0, match.start() - 12) : match.start()])
    ):
        return False
    return not text[match.end() :].lstrip(" \t").startswith(("?", "？"))


def answer_is(text: str, *, example: Mapping[str, Any] | None = None) -> list[Span]:
    """The last answer phrase that states an answer, up to the answer's end: "The answer is (B)", "Final Answer: The
    final answer is $X$", or the Chinese "答案是 A" / "答案为：42" / "最终答案：（B）". A phrase that asks or judges
    ("let me check whether the answer is right", "答案是否正确") is no answer; a later restatement or correction is."""
    matches = [m for phrase in ANSWER_PHRASES for m in phrase.finditer(text) if _states_an_answer(text, m)]
    last = max(matches, key=lambda match: match.start(), default=None)
    return [last.span()] if last else []


def content(text: str, *, example: Mapping[str, Any] | None = None) -> list[Span]:
    """The whole completion, without surrounding whitespace: the key of an assistant message whose reasoning is in a
    separate field (``reasoning_content``), so its ``content`` is the answer alone."""
    stripped = text.strip()
    if not stripped:
        return []
    start = text.index(stripped)
    return [(start, start + len(stripped))]


def regex(
    text: str,
    *,
    example: Mapping[str, Any] | None = None,
    pattern: str | None = None,
    regex_match: str = "last",
) -> list[Span]:
    """A user pattern with a named group ``key``; ``regex_match`` = ``last`` (default), ``first`` or ``all``."""
    if not pattern:
        raise ValueError("The 'regex' finder needs the option 'pattern' (a regular expression with a group 'key').")
    compiled = _compile_key_pattern(pattern)
    spans = [match.span("key") for match in compiled.finditer(text) if match.start("key") < match.end("key")]
    if regex_match == "all" or not spans:
        return spans
    if regex_match not in ("first", "last"):
        raise ValueError(f"regex_match must be 'first', 'last' or 'all', not {regex_match!r}.")
    return [spans[0] if regex_match == "first" else spans[-1]]


@functools.lru_cache(maxsize=64)
def _compile_key_pattern(pattern: str) -> re.Pattern[str]:
    compiled = re.compile(pattern)
    if "key" not in compiled.groupindex:
        raise ValueError(f"The regex finder's pattern {pattern!r} has no named group 'key', as in (?P<key>...).")
    return compiled


def field(
    text: str,
    *,
    example: Mapping[str, Any] | None = None,
    answer_field: str = "answer",
) -> list[Span]:
    """Data with a separate answer field: the last occurrence of that field's text in the completion."""
    if example is None or answer_field not in example:
        raise ValueError(
            f"The 'field' finder needs each record to have the answer field {answer_field!r} "
            "(set it with sftkey_finder_options: {answer_field: ...})."
        )
    value = example[answer_field]
    answer = "" if value is None else str(value).strip()
    index = text.rfind(answer) if answer else -1
    return [(index, index + len(answer))] if index >= 0 else []


BUILTIN_FINDERS: dict[str, Finder] = {
    "tags": tags,
    "think": think,
    "gsm8k": gsm8k,
    "boxed": boxed,
    "answer_is": answer_is,
    "regex": regex,
    "field": field,
    "content": content,
}


@hookimpl
def sftkey_finders() -> Mapping[str, Finder]:
    """The built-in finders, registered through the ``sftkey_plugin.finders`` entry point like any other."""
    return BUILTIN_FINDERS


@functools.cache
def _accepted_options(finder: Finder) -> frozenset[str] | None:
    """Keyword options a finder takes (None: it takes any, through ``**kwargs``)."""
    parameters = inspect.signature(finder).parameters.values()
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in parameters):
        return None
    return frozenset(p.name for p in parameters if p.kind is inspect.Parameter.KEYWORD_ONLY) - {"example"}


def finder_chain(finder: str, options: Mapping[str, Any], answer_only: bool = False) -> list[str]:
    """The finders tried, in order; ``answer_only``: the completion is an answer whose reasoning is elsewhere, so
    ``auto`` ends with ``content`` (after the user's ``auto_order`` when one is given)."""
    if finder != "auto":
        return [finder]
    if answer_only:
        order = [*options["auto_order"], "content"] if "auto_order" in options else AUTO_ORDER_ANSWER_ONLY
    else:
        order = options.get("auto_order", AUTO_ORDER)
    chain = [name for name in order if name not in _AUTO_NEEDS_OPTION or _AUTO_NEEDS_OPTION[name] in options]
    return list(dict.fromkeys(chain))


def validate_finder_options(finder: str, options: Mapping[str, Any]) -> None:
    """Raise ``ValueError`` for an unknown finder or an option that none of the finders in play accepts."""
    chain = finder_chain(finder, options)
    accepted: set[str] = {"auto_order"} if finder == "auto" else set()
    for name in chain:
        names = _accepted_options(get_finder(name))
        if names is None:
            return
        accepted |= names
    if finder == "auto":
        # auto may use regex/field once their option is present, so their options are valid too
        for name in _AUTO_NEEDS_OPTION:
            accepted |= _accepted_options(get_finder(name)) or set()
    unknown = sorted(set(options) - accepted)
    if unknown:
        raise ValueError(
            f"sftkey_finder_options {unknown} are not options of finder {finder!r}; it accepts {sorted(accepted)}."
        )


def _normalise(spans: Iterable[Span], length: int, name: str) -> list[Span]:
    """Sorted, merged, non-empty spans inside the text; a finder returning nonsense is a bug, so it raises."""
    cleaned = []
    for start, end in spans:
        if not (isinstance(start, int) and isinstance(end, int) and 0 <= start <= end <= length):
            raise ValueError(f"Finder {name!r} returned span {(start, end)!r} outside a text of length {length}.")
        if start < end:
            cleaned.append((start, end))
    merged: list[Span] = []
    for start, end in sorted(cleaned):
        if merged and start <= merged[-1][1]:
            merged[-1] = (merged[-1][0], max(end, merged[-1][1]))
        else:
            merged.append((start, end))
    return merged


def match_key_spans(
    text: str,
    finder: str = "auto",
    example: Mapping[str, Any] | None = None,
    options: Mapping[str, Any] | None = None,
    answer_only: bool = False,
) -> tuple[str | None, list[Span]]:
    """The key spans and the name of the finder that produced them (``None`` and ``[]`` when none did).

    ``answer_only``: ``text`` is an answer whose reasoning is in a separate field, so ``auto`` keeps all of it.
    """
    options = dict(options or {})
    for name in finder_chain(finder, options, answer_only):
        impl = get_finder(name)
        accepted = _accepted_options(impl)
        kwargs = options if accepted is None else {k: v for k, v in options.items() if k in accepted}
        spans = _normalise(impl(text, example=example, **kwargs), len(text), name)
        if spans:
            return name, spans
    return None, []


def find_key_spans(
    text: str, finder: str = "auto", *, example: Mapping[str, Any] | None = None, **options: Any
) -> list[Span]:
    """Character spans ``[(start, end), ...]`` of the key answer in a completion text; ``[]`` when there is none."""
    return match_key_spans(text, finder, example, options)[1]


def finder_names() -> list[str]:
    """Every usable ``sftkey_finder`` value: ``auto`` and the registered finders."""
    return ["auto", *sorted(registered_finders())]
