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

``answer_is`` knows English ("The answer is (B)", "Final Answer: 42", "**Answer:** 42") and Chinese ("答案是 A。",
"答案为：42", "最终答案：（B）") answer phrases, and does not guess: it reads every phrase as a statement, a remark, a
denial or a question, and keys the last statement only when, from the last one labelled final on, all statements
and remarks agree (``answer_statement``). Otherwise it raises ``AmbiguousAnswer``: ``match_key_spans`` returns
``AMBIGUOUS`` and no span, ``auto`` stops there, and the example is counted as ambiguous (docs/data.md states the
rule, how corrections are treated, and its figures on tests/answer_endings.jsonl). Another language is one
``regex`` away, e.g. Japanese ``sftkey_finder: regex``
with ``sftkey_finder_options: {pattern: "(?P<key>答えは\\s*[^。\\n]+)"}``; a finder that should also take part in
``auto`` is a third-party finder (``sftkey_plugin.hookspecs``) listed in the ``auto_order`` option, e.g.
``{auto_order: [tags, think, gsm8k, boxed, answer_is, answer_ja]}``.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from .hookspecs import AMBIGUOUS, AmbiguousAnswer, Finder, Span, get_finder, hookimpl, registered_finders

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


# answer_is: every answer phrase of a text is read as one statement of a kind. FINAL ("Final Answer: X", "The final
# answer is X", "最终答案是 X") and STATED ("The answer is X", "Answer: X", "答案：X") state the answer; a REMARK
# ("this answer is X", "这个答案是 X") speaks of an answer already given, so it must agree but is never the key; a
# DENIAL ("the answer is not 8") rules a value out; ASKED ("the answer is 7?", "答案是 8 吗") only asks.
# Conditionals and indirect questions ("if the answer is", "whether the answer is", "如果答案是", "答案是否") say
# nothing and are left out.
FINAL, STATED, REMARK, DENIAL, ASKED = "final", "stated", "remark", "denial", "asked"

_EN_PHRASE = re.compile(
    r"""(?imx)
    (?P<final_heading>^[ \t]*(?:\*\*|\#{1,6}[ \t]*)?final[ \t]+answer[ \t]*:?[ \t]*(?:\*\*)?[ \t]*:?[ \t]*$)
    | (?P<final>(?:\*\*)?\bfinal\s+answer\s*(?:\*\*\s*)?[:：](?:[ \t]*\*\*)?[ \t]*(?:the\s+final\s+answer\s+is\b\s*:?)?
        | \b(?:the|my|our)\s+final\s+answer\s+(?:is|should\s+be)\b\s*:?)
    | (?P<remark>\b(?:this|that|my|our|your|such\s+an?|the\s+above)\s+answer(?:\s+(?:is|should\s+be)\b|\s*:)\s*:?)
    | (?P<denial>\b(?:the\s+)?(?:correct\s+|right\s+)?answer\s+(?:is\s+not\b|isn't\b|is\s+n't\b))
    | (?P<stated>(?:\*\*)?\banswer\s*(?:\*\*\s*)?[:：](?:[ \t]*\*\*)?
        | \b(?:the\s+)?(?:correct\s+|right\s+)?answer\s+(?:to\s+(?:this|the)\s+(?:question|problem)\s+)?
          (?:is|should\s+be)\b\s*:?)
    """
)
_ZH_PHRASE = re.compile(
    r"(?:\*\*)?(?P<final>最[终終后後])?答案(?:\*\*)?\s*(?:应该|应|應該|應)?\s*"
    r"(?:(?P<denial>(?:并|並)?不是)|(?:是|为|為)\s*[:：]?|[:：])"
)
# a phrase right after these is a condition or an indirect question (left out) ...
_CONDITIONAL = re.compile(
    r"(?i)(?:\b(?:if|whether|what|which|unless|suppose|supposing|assume|assuming|when|once)\s+"
    r"|(?:如果|假如|假设|假設|假定|若|要是|倘若)\s*)$"
)
# ... or (Chinese) speaks of an answer already given: a remark
_ZH_REMARK = re.compile(r"(?:这个|這個|那个|那個|该|該|(?<![因如彼])此|这|這|我的|我们的|我們的|你的|上述|上面的)$")
_ZH_INTERROGATIVE = re.compile(r"^(?:什么|什麼|多少|几|幾|哪|谁|誰|怎)")
# "the answer is not 3 but 4", "答案不是 3，而是 4": the answer after "but"
_BUT = re.compile(
    r"(?i)(?:[^\n.;!?。；！？]|\.(?=\d))*?"
    r"(?:(?:[ \t]*[,，])?[ \t]+but(?:[ \t]+rather)?(?:[ \t]+it(?:'s|[ \t]+is))?[ \t]+"
    r"|[,，]?[ \t]*而是[ \t]*|[,，][ \t]*是[ \t]*)(?=\S)"
)

# where a value stops: the line's end, a sentence stop, a comma (unless the list goes on), or a word that starts the
# reasoning after it ("because", "因为")
_REASON_WORD = re.compile(
    r"(?i)\s+(?:because|since|given\s+that|which|so\s+that)\b|\s*(?:因为|因為|由于|由於|因此|所以)"
)
# an abbreviation that a name or number follows: its dot never ends the answer
_TITLES = frozenset(("mr", "mrs", "ms", "dr", "st", "mt", "ft", "prof", "gen", "sen", "gov", "lt", "col", "capt", "vs"))
_ACRONYM = re.compile(r"(?:\b|^)(?:[A-Za-z]\.)+[A-Za-z]$")  # U.S, e.g, D.C (the dot being read comes next)
_ITEM = (
    r"(?:(?:and|or)\s+|和|或)?"
    r"(?:[-+]?\$?\d[\d,]*(?:\.\d+)?(?:[ \t]*(?:%|°|[A-Za-z]{1,4}\b))?"  # a number, maybe with a unit
    r"|[(（\[](?:[A-Za-z0-9]|[-+\d., \t/]+)[)）\]]|\$[^$\n]+\$"  # an option letter, a point, inline math
    r"|[A-Za-z][ \t]*=[ \t]*[-+]?[\w\\/^{}]+(?:\.\d+)*"  # y = 3
    r"|(?:[A-Z]\.)+|[A-Z][\w'’-]*(?:[ \t]+(?:(?:[A-Z]\.)+|[A-Z][\w'’-]*|of|de|la|the))*"  # Paris, France; D.C.
    r")"
)
# another item of the same answer after a comma: "2, 3, and 5", "(A), (C)", "Paris, France", "x = 2, y = 3"
_MORE = re.compile(
    rf"[ \t]*{_ITEM}(?=[ \t]*(?:$|[,，、]|[。！？；]|[.;!?](?:\s|$)|\*\*|(?:和|或|及|and\b|or\b)))", re.M
)
_DISPLAY_MATH = re.compile(r"\\\[.*?\\\]|\$\$.*?\$\$", re.S)


@dataclass(frozen=True)
class AnswerStatement:
    """One answer phrase: where it starts, where its value lies, where the key span ends, and its kind."""

    start: int
    value_start: int
    value_end: int
    end: int  # the value's end, or past a closing "**" that the phrase opened
    kind: str
    value: str  # normalised, to compare statements

    @property
    def span(self) -> Span:
        return (self.start, self.end)


def _inline_end(text: str, index: int) -> int | None:
    """Past the closing of the math, box or bracket opening at ``index`` on the same line (None: it does not)."""
    char = text[index]
    if char == "$":
        close = text.find("$", index + 1)
        line_end = text.find("\n", index)
        if close > index + 1 and (line_end < 0 or close < line_end) and not text[close + 1 : close + 2].isdigit():
            return close + 1  # a "$5 and $3" pair is money, not math
        return None
    if char == "{":
        end = _balanced_end(text, index)
        return end if end is not None and "\n" not in text[index:end] else None
    closing = {"(": ")", "（": "）", "[": "]"}[char]
    close = text.find(closing, index + 1)
    return close + 1 if close > 0 and "\n" not in text[index:close] else None


def _dot_goes_on(text: str, start: int, index: int) -> bool:
    """Whether the ASCII ``.`` at ``index`` is inside the answer: a decimal, an abbreviation, an initial."""
    after = text[index + 1 : index + 2]
    if after.isdigit() or (after.isascii() and after.isalpha()):
        return True  # 3.5; the dots inside U.S. and e.g.
    word = _word_before(text, start, index)
    following = text[index + 1 :].lstrip(" \t")
    if word.lower() in _TITLES or word.lower() in ("e.g", "i.e"):
        return following[:1] not in ("", "\n")  # Mr. Smith, St. Louis, e.g. 4
    if len(word) == 1 and word.isupper():  # an initial: J. K. Rowling, John F. Kennedy (not "B. Because")
        named = text[start:index].strip() != word and re.match(r"[A-Z][a-z]", following) is not None
        return named or re.match(r"[A-Z]\.", following) is not None
    return _ACRONYM.search(word) is not None and re.match(r"[a-z0-9]", following) is not None  # U.S. dollars


def _word_before(text: str, start: int, index: int) -> str:
    """The letters and dots of the value right before ``index`` (an abbreviation is short: the last 16 characters)."""
    return re.search(r"[A-Za-z.]*$", text[max(start, index - 16) : index]).group()  # type: ignore[union-attr]


def _value_end(text: str, start: int) -> int:
    """Where the answer value that begins at ``start`` ends (trailing spaces left out)."""
    index = start
    while index < len(text):
        char = text[index]
        if (
            char == "\n"
            or char in "。！？；：…"
            or (char == ":" and text[index + 1 : index + 2] == " ")
            or (_REASON_WORD.match(text, index) and index > start)
        ):
            break
        if char in "${([（" and (inline := _inline_end(text, index)) is not None:
            index = inline
            continue
        if char in ".!?;" and not (char == "." and _dot_goes_on(text, start, index)):
            following = text[index + 1 : index + 2]
            if following in ("", " ", "\t", "\n", "*", ")", "）", ".") or not following.isascii():
                if char == "." and _ACRONYM.search(_word_before(text, start, index)):
                    index += 1  # the U.S.: the stop is the acronym's own dot
                break
        if char in "，、" or (char == "," and text[index + 1 : index + 2] in (" ", "\t")):
            more = _MORE.match(text, index + 1)
            if more is None:
                break
            index = more.end()
            continue
        index += 1
    return len(text[start:index].rstrip()) + start


def _normalised(value: str) -> str:
    """The value as statements are compared: no markdown, math delimiters, box, option brackets, trailing stop,
    case, spaces, thousands commas, ``x =`` or "option"."""
    value = re.sub(r"\\(?:boxed|fbox)\s*\{(.*)\}", r"\1", value, flags=re.S)
    value = re.sub(r"\\[\[\]()]|\*\*|\$", "", value).strip().rstrip(".,;:!?。，；：！？吗嗎呢吧 ").strip()
    value = re.sub(r"(?i)^(?:option|choice)\s+", "", value)
    value = re.sub(r"^[(（\[]\s*([A-Za-z0-9])\s*[)）\]]$", r"\1", value)
    value = re.sub(r"^[A-Za-z]\s*=\s*(?=\S)", "", value)
    value = re.sub(r"(?<=\d),(?=\d{3}(?!\d))", "", value)
    return "".join(value.casefold().split())


def _statement(text: str, start: int, marker_end: int, kind: str) -> AnswerStatement | None:
    """The statement whose phrase spans ``start``–``marker_end``; None when it says nothing (no value, a condition)."""
    before = text[max(0, start - 24) : start]
    if _CONDITIONAL.search(before):
        return None
    if kind != FINAL and _ZH_REMARK.search(before) and text[start] == "答":
        kind = REMARK
    value_start = marker_end + len(text[marker_end:]) - len(text[marker_end:].lstrip(" \t"))
    if kind == FINAL and text[value_start : value_start + 1] in ("\n", ""):  # a heading: the answer on the next line
        value_start += len(text[value_start:]) - len(text[value_start:].lstrip())
        display = _DISPLAY_MATH.match(text, value_start)
        value_end = display.end() if display else _value_end(text, value_start)
    else:
        value_end = _value_end(text, value_start)
    value = text[value_start:value_end]
    asks = text[start] in "答最" and (
        _ZH_INTERROGATIVE.match(value) or (text[marker_end - 1] == "是" and re.match("否(?!定)", value))
    )
    if not value.strip() or asks:
        return None  # "what the answer is.", "答案是什么", "答案是否正确" (whether), not "答案是否定的"
    after = text[value_end:].lstrip(" \t*")
    if after.startswith(("?", "？")) or value.rstrip().endswith(("吗", "嗎", "呢")):
        kind = ASKED
    if kind == DENIAL:
        but = _BUT.match(text, value_start)
        if but:  # "the answer is not 3 but 4" states 4
            kind, value_start = STATED, but.end()
            value_end = _value_end(text, value_start)
        elif not re.fullmatch(_ITEM, value.strip(" *")):  # "not enough information" is an answer; "not 8" a denial
            kind, value_start = STATED, _negation_start(text, start, value_start)
        value = text[value_start:value_end]
    if value.count("**") % 2 and value.endswith("**"):
        value_end -= 2  # "**Final Answer: 42**": the bold that closes the phrase is not the value's
        value = text[value_start:value_end].rstrip()
        value_end = value_start + len(value)
    closes_bold = text[start:value_start].count("**") % 2 and text.startswith("**", value_end)
    end = value_end + 2 if closes_bold else value_end
    return AnswerStatement(start, value_start, value_end, end, kind, _normalised(value))


def _negation_start(text: str, start: int, value_start: int) -> int:
    """Where the "not" of a negative answer begins (``isn't`` / ``is not`` / ``不是``), so the answer keeps it."""
    match = re.search(r"(?i)(?:not|n't|isn't|(?:并|並)?不是)\s*$", text[start:value_start])
    return start + match.start() if match else value_start


def answer_statements(text: str) -> list[AnswerStatement]:
    """Every answer phrase of ``text`` that says something, in order (conditions and indirect questions left out)."""
    found = []
    for match in _EN_PHRASE.finditer(text):
        kind = FINAL if match.lastgroup in ("final", "final_heading") else str(match.lastgroup)
        found.append(_statement(text, match.start(), match.end(), kind))
    for match in _ZH_PHRASE.finditer(text):
        kind = DENIAL if match.group("denial") else FINAL if match.group("final") else STATED
        found.append(_statement(text, match.start(), match.end(), kind))
    return sorted((s for s in found if s is not None), key=lambda s: s.start)


_NEGATED = re.compile(
    r"(?i)(?:\bnot\b|(?:并|並)?不是)[ \t]*(?P<value>\$[^$\n]+\$|[(（]?[^\s,.;!?，。；！？()（）]+[)）]?)"
)


def answer_statement(text: str) -> AnswerStatement | None:
    """The answer statement ``answer_is`` keys, None when there is none; ``AmbiguousAnswer`` when they disagree.

    The key is the last statement that states an answer. From the last FINAL one on (or over the whole text when
    none is labelled final), every statement and remark must give the same value, no denial may rule that value out,
    no question after the key may ask about another value, and no "not <value>" after it may deny it."""
    statements = answer_statements(text)
    finals = [index for index, s in enumerate(statements) if s.kind == FINAL]
    scope = statements[finals[-1] :] if finals else statements
    keyable = [s for s in scope if s.kind in (FINAL, STATED)]
    if not keyable:
        return None
    key = keyable[-1]
    values = {s.value for s in scope if s.kind in (FINAL, STATED, REMARK)}
    denied = any(s.kind == DENIAL and s.value == key.value for s in scope)
    asked = {s.value for s in scope if s.kind == ASKED and s.start > key.start} - {key.value}
    negated = any(_normalised(m.group("value")) == key.value for m in _NEGATED.finditer(text, key.end))
    if len(values) > 1 or denied or asked or negated:
        raise AmbiguousAnswer(
            f"answer statements disagree: {sorted(values | asked)}"
            + (f"; {key.value!r} is denied after it is stated" if denied or negated else "")
        )
    return key


def answer_is(text: str, *, example: Mapping[str, Any] | None = None) -> list[Span]:
    """The answer the text states in answer phrases ("The answer is (B)", "Final Answer: 42", "**Answer:** 42",
    "答案是 A", "最终答案：（B）"), from its phrase to the answer's end; ``AmbiguousAnswer`` when the statements
    disagree (``answer_statement``)."""
    key = answer_statement(text)
    return [key.span] if key else []


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
    """The key spans and the name of the finder that produced them (``None`` and ``[]`` when none did;
    ``AMBIGUOUS`` and ``[]`` when a finder raised ``AmbiguousAnswer``: ``auto`` stops there).

    ``answer_only``: ``text`` is an answer whose reasoning is in a separate field, so ``auto`` keeps all of it.
    """
    options = dict(options or {})
    for name in finder_chain(finder, options, answer_only):
        impl = get_finder(name)
        accepted = _accepted_options(impl)
        kwargs = options if accepted is None else {k: v for k, v in options.items() if k in accepted}
        try:
            found = impl(text, example=example, **kwargs)
        except AmbiguousAnswer:
            return AMBIGUOUS, []  # a later finder would key something the text does not settle either
        spans = _normalise(found, len(text), name)
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
