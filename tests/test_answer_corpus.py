"""``answer_is`` over a corpus of answer endings written as reasoning models write them (tests/answer_endings.jsonl).

Each row holds ``text``, ``expected`` (the exact key a careful reader would mark, ``ambiguous`` where the text gives
several answers, ``none`` where it gives none), a ``tag`` and, for rows that pin the rule, ``must``: ``key`` (keyed
on ``expected``), ``ambiguous``, ``none``, or ``limit`` (a known limit of reading phrases, keyed on a remark: the
test says so when a change lifts it). Precision must be 100%: no row is keyed on anything but its expected key.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from sftkey_plugin import AmbiguousAnswer, match_key_spans
from sftkey_plugin.cli.answers import answers_match, extract_answer
from sftkey_plugin.cli.main import main
from sftkey_plugin.finders import answer_is

CORPUS = Path(__file__).with_name("answer_endings.jsonl")
RECALL_FLOOR = 0.85  # docs/data.md states the measured figure
NO_KEY = ("ambiguous", "none")

# framework-free, and cheap: run in every environment (scripts/test.sh selects "stack" in the Axolotl ones)
pytestmark = pytest.mark.stack


def _rows() -> list[dict[str, Any]]:
    return [json.loads(line) for line in CORPUS.read_text(encoding="utf-8").splitlines() if line.strip()]


def outcome(text: str) -> str:
    """What ``answer_is`` does with a text: the keyed substring, ``ambiguous`` or ``none``."""
    try:
        spans = answer_is(text)
    except AmbiguousAnswer:
        return "ambiguous"
    return text[spans[0][0] : spans[0][1]] if spans else "none"


def test_corpus_is_large_and_varied() -> None:
    rows = _rows()
    assert len(rows) >= 300
    assert len({row["text"] for row in rows}) == len(rows)
    assert len({row["tag"] for row in rows}) >= 100
    for row in rows:
        assert row["expected"] in NO_KEY or row["expected"] in row["text"], row


def test_precision_is_total_and_recall_above_the_floor() -> None:
    """No row is keyed on anything but its expected key (the last occurrence of it); recall is stated."""
    rows = [row for row in _rows() if row.get("must") != "limit"]
    wrong = []
    keyed = 0
    for row in rows:
        got, expected = outcome(row["text"]), row["expected"]
        if got in NO_KEY:
            continue
        if got != expected or answer_is(row["text"])[0][0] != row["text"].rfind(expected):
            wrong.append((row["text"], expected, got))
        keyed += 1
    answered = sum(row["expected"] not in NO_KEY for row in rows)
    recall = (keyed - len(wrong)) / answered
    print(f"answer_is corpus: {len(rows)} rows, {answered} with an answer, {keyed} keyed, recall {recall:.1%}")
    assert wrong == []
    assert recall >= RECALL_FLOOR


@pytest.mark.parametrize("row", [row for row in _rows() if "must" in row], ids=lambda row: row["tag"])
def test_pinned_rows(row: dict[str, Any]) -> None:
    """The issue's rows and the rule's own cases give exactly their outcome, through ``match_key_spans`` too."""
    text, must = row["text"], row["must"]
    got = outcome(text)
    if must == "limit":  # a remark read as the answer: if this starts failing, the limit is lifted (update docs)
        assert got not in NO_KEY
        return
    assert got == (row["expected"] if must == "key" else must)
    name, spans = match_key_spans(text, "auto")
    assert (name, [text[a:b] for a, b in spans]) == {
        "key": ("answer_is", [got]),
        "ambiguous": ("ambiguous", []),
        "none": (None, []),
    }[must]


def test_preview_counts_and_shows_ambiguous_examples(tiny_dir: str, tmp_path: Path, capsys: Any) -> None:
    """``sftkey preview`` counts the ambiguous rows among those without a key span, in JSON and in its table, and
    names the reason on each shown example."""
    rows = [r for r in _rows() if r.get("must") in ("key", "ambiguous")][:12]
    data = tmp_path / "endings.jsonl"
    data.write_text("".join(json.dumps({"prompt": "Q: ", "completion": r["text"]}) + "\n" for r in rows))
    ambiguous = sum(r["must"] == "ambiguous" for r in rows)
    assert 0 < ambiguous < len(rows)
    assert main(["preview", str(data), "--tokenizer", tiny_dir, "--finder", "answer_is", "-n", "12", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = report["summary"]
    assert (summary["missing"], summary["ambiguous"], summary["found"]) == (ambiguous, ambiguous, len(rows) - ambiguous)
    assert {e["finder"] for e in report["examples"] if e["status"] == "missing"} == {"ambiguous"}
    assert main(["preview", str(data), "--tokenizer", tiny_dir, "--finder", "answer_is", "--color", "never"]) == 0
    table = capsys.readouterr().out
    assert re.search(rf"ambiguous \(answers disagree\) +{ambiguous} ", table)
    assert "finder ambiguous (answer statements disagree: no key)" in table


@pytest.mark.parametrize(
    ("output", "bare", "gold"),
    [
        ("Step 1: 6 * 7 = 42.\n\nFinal Answer: 42", "42", "42"),
        ("**Answer:** 42", "42", "42"),
        ("Only B works.\n\nAnswer: (B)", "(B)", "B"),
        ("**Final Answer: 42**", "42", "42"),
        ("所以答案是 A。", "A", "A"),
        ("最终答案：（B）", "（B）", "B"),
        ("The answer is Mr. Smith.", "Mr. Smith", "Mr. Smith"),
        ("Checking both: the answer is not 3 but 4.", "4", "4"),
        ("The answer is 12.\n\nVerification: 5 + 7 = 12, so the answer is consistent.", None, "12"),
    ],
)
def test_eval_extracts_the_bare_answer_with_the_training_rule(output: str, bare: str | None, gold: str) -> None:
    """``sftkey eval`` reads the answer the training finder keys, without its marker; an ambiguous output has none
    (and is named so), rather than a verification word."""
    extraction = extract_answer(output)
    assert extraction.answer == bare
    assert extraction.finder == ("answer_is" if bare is not None else "ambiguous")
    assert answers_match(extraction.answer, gold) is (bare is not None)
