"""Golden cases for every built-in finder, ``auto``'s order, option checks, and a third-party entry-point finder."""

from __future__ import annotations

import subprocess
import sys
import textwrap

import pytest

from sftkey_plugin import AmbiguousAnswer, find_key_spans, finder_names, match_key_spans
from sftkey_plugin.config import SFTKeyArguments, validate_sftkey_arguments
from sftkey_plugin.finders import answer_is
from sftkey_plugin.stats import AMBIGUOUS, KeyDataStats


def keys(text: str, finder: str = "auto", **options) -> list[str]:
    return [text[start:end] for start, end in find_key_spans(text, finder, **options)]


@pytest.mark.parametrize(
    ("text", "finder", "expected"),
    [
        # tags: from right after the last </Thinking> to the end (newline, <Answer>, answer, </Answer>)
        ("<Thinking>2+2=4</Thinking>\n<Answer>4</Answer>", "tags", ["\n<Answer>4</Answer>"]),
        ("<Thinking>a</Thinking> b </Thinking><Answer>x</Answer>", "tags", ["<Answer>x</Answer>"]),
        ("no closing tag <Answer>7</Answer>", "tags", ["<Answer>7</Answer>"]),
        ("<Thinking>only reasoning</Thinking>  \n", "tags", []),
        (
            "<Thinking>π ≈ 3.14159</Thinking><Answer>π≈3.14 🙂</Answer>",
            "tags",
            ["<Answer>π≈3.14 🙂</Answer>"],
        ),
        # think: after the last </think>
        ("<think>hmm</think>\n\nThe result is 5.", "think", ["\n\nThe result is 5."]),
        ("<think>\n\n</think>\n\n42", "think", ["\n\n42"]),
        ("<think>no close", "think", []),
        # gsm8k: the last '#### N' line, marker included; several #### and a markdown heading
        ("Janet has 3.\n#### 3", "gsm8k", ["#### 3"]),
        ("first #### 1\nthen\n#### 1,000\n", "gsm8k", ["#### 1,000"]),
        ("#### Step 1\nwork\n#### -7.5", "gsm8k", ["#### -7.5"]),
        ("#### Heading only", "gsm8k", []),
        ("##### 5", "gsm8k", []),
        # boxed: the last balanced \boxed{...}, nested braces, escaped braces, \fbox, bare form
        ("so \\boxed{1} and \\boxed{\\frac{1}{2}}.", "boxed", ["\\boxed{\\frac{1}{2}}"]),
        ("\\boxed{\\{a\\}} end", "boxed", ["\\boxed{\\{a\\}}"]),
        ("\\boxed{2} then \\boxed{3", "boxed", ["\\boxed{2}"]),
        ("\\fbox{x^{2}}", "boxed", ["\\fbox{x^{2}}"]),
        ("$\\boxed 5$", "boxed", ["\\boxed 5"]),
        ("\\boxedx{1}", "boxed", []),
        # answer_is: multiple choice, numbers with dots, Minerva
        ("Blah. So the answer is (B).", "answer_is", ["the answer is (B)"]),
        ("The answer is 3.5.", "answer_is", ["The answer is 3.5"]),
        (
            "Final Answer: The final answer is $\\frac{1}{2}$. I hope it is correct.",
            "answer_is",
            ["Final Answer: The final answer is $\\frac{1}{2}$"],
        ),
        ("no answer here", "answer_is", []),
        # the last statement of the answer: a check or a question is none, "not 8" rules out a value
        ("The answer is 7. Let me check whether the answer is right: 3+4=7.", "answer_is", ["The answer is 7"]),
        ("Maybe the answer is 6? No: the answer is 7.", "answer_is", ["the answer is 7"]),
        ("The answer is 7, not 8. So the answer is not 8.", "answer_is", ["The answer is 7"]),
        ("The answer is 2. Wait, 1 + 3 = 4.\n\nFinal Answer: 4", "answer_is", ["Final Answer: 4"]),
        ("If the answer is 6, then 6 + 1 = 7. So the answer is 7.", "answer_is", ["the answer is 7"]),
        ("So the answer is 7?", "answer_is", []),
        # a comma ends the answer unless another value of it follows
        ("The answer is x = 2, y = 3.", "answer_is", ["The answer is x = 2, y = 3"]),
        ("The answer is 12, since 5 + 7 = 12.", "answer_is", ["The answer is 12"]),
        ("The answer is (A), (C).", "answer_is", ["The answer is (A), (C)"]),
    ],
)
def test_builtin_finders_golden(text, finder, expected):
    assert keys(text, finder) == expected


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 2. Wait, the answer is 4",  # a correction not labelled final: it could be a remark
        "The answer is 7. Is the answer correct? Yes, the answer is correct.",
        "The answer is 12.\n\nVerification: 5 + 7 = 12, so the answer is consistent.",
        "The answer is 8. Hmm, no, the answer is not 8.",
        "Final Answer: 12. The answer is confirmed.",
    ],
)
def test_answer_is_refuses_statements_that_disagree(text):
    """No key, and the finder value ``ambiguous``: ``auto`` stops there rather than try the next finder."""
    with pytest.raises(AmbiguousAnswer, match="disagree"):
        answer_is(text)
    assert match_key_spans(text) == (AMBIGUOUS, [])
    assert match_key_spans(text, "auto", None, {"auto_order": ["answer_is"]}, answer_only=True) == (AMBIGUOUS, [])
    assert find_key_spans(text, "answer_is") == []


def test_regex_finder_uses_named_group_and_match_option():
    text = "ans=1; ans=22; ans=333"
    assert keys(text, "regex", pattern=r"ans=(?P<key>\d+)") == ["333"]
    assert keys(text, "regex", pattern=r"ans=(?P<key>\d+)", regex_match="first") == ["1"]
    assert keys(text, "regex", pattern=r"ans=(?P<key>\d+)", regex_match="all") == ["1", "22", "333"]
    with pytest.raises(ValueError, match="named group 'key'"):
        find_key_spans(text, "regex", pattern=r"ans=\d+")
    with pytest.raises(ValueError, match="needs the option 'pattern'"):
        find_key_spans(text, "regex")


def test_field_finder_finds_the_answer_field_last_occurrence():
    text = "3 apples and 4 pears make 7. Answer: 7"
    assert find_key_spans(text, "field", example={"answer": " 7 "}) == [(len(text) - 1, len(text))]
    assert find_key_spans(text, "field", example={"answer": "9"}) == []
    with pytest.raises(ValueError, match="answer field 'final'"):
        find_key_spans(text, "field", example={"answer": "7"}, answer_field="final")


def test_auto_order_is_honoured_for_answers_whose_reasoning_is_apart():
    """An answer-only message (reasoning in reasoning_content): all of it by default; with the user's auto_order,
    that order first, then all of it."""
    assert match_key_spans("So 7.", "auto", None, {}, answer_only=True) == ("content", [(0, 5)])
    order = {"auto_order": ["answer_is"]}
    assert match_key_spans("The answer is 7. Done", "auto", None, order, answer_only=True) == ("answer_is", [(0, 15)])
    assert match_key_spans("So 7.", "auto", None, order, answer_only=True) == ("content", [(0, 5)])


def test_auto_order_and_which_finder_matched():
    assert match_key_spans("<Thinking>x #### 3</Thinking><Answer>3</Answer>")[0] == "tags"
    assert match_key_spans("<think>a</think>\\boxed{1}")[0] == "think"
    assert match_key_spans("x\n#### 3 and \\boxed{4}")[0] == "gsm8k"
    assert match_key_spans("so \\boxed{4}. The answer is 4")[0] == "boxed"
    assert match_key_spans("The answer is (C).")[0] == "answer_is"
    assert match_key_spans("the last number is 12") == (None, [])
    # regex joins auto only when given its pattern, and then goes first
    assert match_key_spans("#### 3 KEY=9", "auto", None, {"pattern": r"KEY=(?P<key>\d)"}) == (
        "regex",
        [(11, 12)],
    )
    assert match_key_spans("#### 3", "auto", None, {"auto_order": ["boxed"]}) == (None, [])


def test_options_are_checked_against_the_finders_in_play():
    validate_sftkey_arguments(
        SFTKeyArguments(sftkey=True, sftkey_finder="tags", sftkey_finder_options={"thinking_close": "</r>"})
    )
    with pytest.raises(ValueError, match="not options of finder 'gsm8k'"):
        validate_sftkey_arguments(
            SFTKeyArguments(sftkey=True, sftkey_finder="gsm8k", sftkey_finder_options={"thinking_close": "</r>"})
        )
    with pytest.raises(ValueError, match="Unknown sftkey_finder 'nope'"):
        validate_sftkey_arguments(SFTKeyArguments(sftkey=True, sftkey_finder="nope"))
    with pytest.raises(ValueError, match="sftkey_mode must be one of"):
        validate_sftkey_arguments(SFTKeyArguments(sftkey=True, sftkey_mode="three_stage"))
    assert {"auto", "tags", "think", "gsm8k", "boxed", "answer_is", "regex", "field"} <= set(finder_names())


def _run_with_installed_finder(tmp_path, source: str, script: str) -> str:
    """Run ``script`` in a fresh interpreter beside a separately 'installed' distribution (a dist-info on sys.path)
    whose ``sftkey_plugin.finders`` entry point is the module ``source``; its standard output."""
    (tmp_path / "shout_finder.py").write_text(textwrap.dedent(source))
    dist = tmp_path / "shout_finder-0.1.dist-info"
    dist.mkdir()
    (dist / "METADATA").write_text("Metadata-Version: 2.1\nName: shout-finder\nVersion: 0.1\n")
    (dist / "entry_points.txt").write_text("[sftkey_plugin.finders]\nshout = shout_finder\n")
    result = subprocess.run(
        [sys.executable, "-c", script],
        capture_output=True,
        text=True,
        cwd=tmp_path,
        env={"PYTHONPATH": str(tmp_path), "PATH": ""},
        check=True,
    )
    return result.stdout.strip()


def test_third_party_finder_registered_through_an_entry_point(tmp_path):
    """A separately 'installed' distribution adds a finder picked by name."""
    source = """
        from sftkey_plugin import hookimpl

        def shout(text, *, example=None, marker="!!"):
            start = text.find(marker)
            return [(start, len(text))] if start >= 0 else []

        @hookimpl
        def sftkey_finders():
            return {"shout": shout}
    """
    script = (
        "from sftkey_plugin import find_key_spans, finder_names\n"
        "print('shout' in finder_names(), find_key_spans('reason !!ANSWER', 'shout'),"
        " find_key_spans('x ##B', 'shout', marker='##'))\n"
    )
    assert _run_with_installed_finder(tmp_path, source, script) == "True [(7, 15)] [(2, 5)]"


def test_third_party_finder_raises_ambiguous(tmp_path):
    """A third-party finder that cannot tell two answers apart raises ``AmbiguousAnswer``: no key, the finder value
    ``ambiguous``, counted as ambiguous (a kind of missing), and ``auto`` tries no later finder."""
    source = """
        from sftkey_plugin import AmbiguousAnswer, hookimpl

        def shout(text, *, example=None):
            if text.count("!!") > 1:
                raise AmbiguousAnswer("two answers marked !!")
            start = text.find("!!")
            return [(start, len(text))] if start >= 0 else []

        @hookimpl
        def sftkey_finders():
            return {"shout": shout}
    """
    script = (
        "from sftkey_plugin import match_key_spans\n"
        "order = {'auto_order': ['shout', 'answer_is']}\n"
        "print(match_key_spans('!!3 !!4', 'shout'), match_key_spans('!!3 !!4 The answer is 4.', 'auto', None, order),"
        " match_key_spans('!!4', 'auto', None, order))\n"
    )
    assert (
        _run_with_installed_finder(tmp_path, source, script)
        == "('ambiguous', []) ('ambiguous', []) ('shout', [(0, 3)])"
    )


def test_ambiguous_is_counted_as_missing_and_named_in_the_summary_line():
    """``ambiguous`` is a finder value, never a finder that found something: counted in ``missing`` and apart."""
    stats = KeyDataStats.from_columns(
        "train", ["found", "missing", "missing"], ["answer_is", AMBIGUOUS, ""], [2, 0, 0], [9, 9, 9]
    )
    assert (stats.found, stats.missing, stats.ambiguous, dict(stats.by_finder)) == (1, 2, 1, {"answer_is": 1})
    assert "2 without a key span (1 ambiguous: answer statements disagree)" in stats.summary_line()
