"""Data as users bring it: Chinese answer phrases, ``reasoning_content`` messages rendered by Qwen3-style templates,
multi-turn conversations where every trained assistant turn has its key, token-id marking with the text options,
and the ``sftkey_min_found`` refusal before the first step."""

from __future__ import annotations

import pytest

from sftkey_plugin import find_key_spans


def keys(text: str, finder: str = "auto", **options) -> list[str]:
    return [text[start:end] for start, end in find_key_spans(text, finder, **options)]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("先算 2+3=5，再减 1。所以答案是 A。", "答案是 A"),
        ("因此，答案为：42。", "答案为：42"),
        ("综上，最终答案：（B）", "最终答案：（B）"),
        ("故答案为 $\\frac{1}{2}$。", "答案为 $\\frac{1}{2}$"),
        ("答案是3.5。", "答案是3.5"),
        ("最終答案為 7", "最終答案為 7"),
        ("答案: 12\n以上。", "答案: 12"),
        ("The answer is 4. 不对，所以答案是 5。", "答案是 5"),
        ("先问答案是什么。答案是 9，检查无误。", "答案是 9"),
        ("答案是 (C). Done.", "答案是 (C)"),
    ],
)
def test_chinese_answer_phrases(text: str, expected: str) -> None:
    """answer_is (and so auto) finds the last Chinese answer phrase, up to a full-width or ASCII stop."""
    assert keys(text, "answer_is") == [expected]
    assert keys(text) == [expected]


def test_no_answer_phrase_means_no_key() -> None:
    assert keys("我不知道。答案", "answer_is") == []
    assert keys("这是一个关于答案的问题", "answer_is") == []


def test_another_language_through_regex_as_the_readme_says() -> None:
    """The README's Japanese pattern (sftkey_finder: regex) finds the answer phrase."""
    text = "まず 2+3 を計算します。答えは 5 です。"
    assert keys(text, "regex", pattern=r"(?P<key>答えは\s*[^。\n]+)") == ["答えは 5 です"]


def test_content_finder_is_the_whole_stripped_completion() -> None:
    assert keys("\n\nThe result is 5.\n", "content") == ["The result is 5."]
    assert keys("  \n", "content") == []
