"""Conformance records with their answers known by construction, and an independent reference for the key mask.

Each case is a record in one data form plus the key text of every trained assistant answer, written down as the
finders document it (``tags``: everything after ``</Thinking>``; ``answer_is``: "答案是 A" without the stop;
``reasoning_content``: the whole content without surrounding whitespace), and as the family's template renders it
(a template that trims content drops trailing whitespace).

The reference shares no code with the plugin: it turns each token back into its bytes from the token string
(byte-level BPE), checks that they spell the rendered text, finds each key text by string search (it must occur
exactly once), and marks every token whose bytes overlap a key (the documented ``edge_tokens: include``; ``exclude``:
every token wholly inside it) plus the EOS that ends the answer with only whitespace tokens before it
(``sftkey_include_eos``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from real_tokenizers import Family

IGNORE_INDEX = -100

# answers that stress tokenisation: non-ASCII, full-width, emoji, several lines, digits that BPE splits
ANSWERS = ("42", "北京", "café ≈ 3.5 €", "🙂 7", "x = 3\ny = -4", "1234567")
QUESTIONS = (
    "What is 6 × 7?",
    "中国的首都是哪里？",
    "Price of a café?",
    "Emoji sum?",
    "Solve the system.",
    "Big number?",
)
CHOICES = ("A", "B", "C", "D")


@dataclass
class Case:
    """A record and the key text of each answer that SFTKey must mark, in the order they are rendered."""

    record: dict[str, Any]
    keys: list[str]
    name: str = ""
    notes: list[str] = field(default_factory=list)


def _tags(cot: str, answer: str, trailing: str = "") -> tuple[str, str]:
    """Paper-format content and its key: the finder ``tags`` keys everything after the last ``</Thinking>``."""
    key = f"\n<Answer>{answer}</Answer>{trailing}"
    return f"<Thinking>{cot}</Thinking>{key}", key


def _rendered_key(key: str, family: Family | None) -> str:
    """The key as the template renders it: trailing whitespace is gone when the template trims the content."""
    return key.rstrip() if family is not None and family.trims_content else key


def messages_cases(family: Family) -> list[Case]:
    """One question, one answer in the paper's tags; awkward answers and whitespace before the end of turn."""
    cases = []
    for i, (question, answer) in enumerate(zip(QUESTIONS, ANSWERS)):
        trailing = ("", "\n", "  ", "", " \n\n", "")[i]
        content, key = _tags(f"Think about {question!r} in step {i}.", answer, trailing)
        record = {
            "messages": [
                {"role": "system", "content": "Reason inside <Thinking> tags, then answer."},
                {"role": "user", "content": question},
                {"role": "assistant", "content": content},
            ]
        }
        cases.append(Case(record, [_rendered_key(key, family)], f"tags {answer!r}{' + ws' if trailing else ''}"))
    for letter in CHOICES[:2]:  # a Chinese answer phrase without tags: 答案是 A, the full stop not key
        content = f"先算出结果，再对照选项。所以答案是 {letter}。"
        record = {"messages": [{"role": "user", "content": "选哪一个？"}, {"role": "assistant", "content": content}]}
        cases.append(Case(record, [f"答案是 {letter}"], f"answer_is zh {letter}"))
    return cases


def reasoning_cases(family: Family) -> list[Case]:
    """Qwen3/DeepSeek-R1 style: the reasoning in ``reasoning_content``, the answer alone in ``content``."""
    contents = ("The answer is 42.", "所以答案是 北京。", "\n**café ≈ 3.5 €**", "🙂 7  \n", "x = 3\ny = -4")
    cases = []
    for i, content in enumerate(contents):
        assistant = {"role": "assistant", "reasoning_content": f"Step {i}: think it over.", "content": content}
        record = {"messages": [{"role": "user", "content": QUESTIONS[i]}, assistant]}
        cases.append(Case(record, [content.strip()], f"reasoning_content {content.strip()!r}"))
    return cases


def multi_turn_cases(family: Family, reasoning: bool = False) -> list[Case]:
    """Two questions, two answers: each trained assistant turn has its own key (``sftkey_turns: all``)."""
    cases = []
    for i in range(4):
        first, second = ANSWERS[i], ANSWERS[(i + 3) % len(ANSWERS)]
        turns: list[dict[str, Any]] = [{"role": "user", "content": QUESTIONS[i]}]
        keys = []
        for j, answer in enumerate((first, second)):
            if reasoning:
                content = f"The answer is {answer}."
                turns.append({"role": "assistant", "reasoning_content": f"Turn {j}: reason.", "content": content})
                keys.append(content)
            else:
                content, key = _tags(f"Turn {j} of case {i}.", answer, "\n" if j == 0 else "")
                turns.append({"role": "assistant", "content": content})
                keys.append(_rendered_key(key, family))
            if j == 0:
                turns.append({"role": "user", "content": f"And now {QUESTIONS[(i + 3) % len(QUESTIONS)]}"})
        cases.append(Case({"messages": turns}, keys, f"two turns {first!r}, {second!r}"))
    return cases


def chat_prompt_completion_cases(family: Family) -> list[Case]:
    """Conversational prompt/completion (TRL); ``enable_thinking: false`` as a chat_template_kwargs switch."""
    cases = []
    for i, (question, answer) in enumerate(zip(QUESTIONS[:4], ANSWERS[:4])):
        content, key = _tags(f"Case {i}.", answer, "\n" if i % 2 else "")
        record = {
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": content}],
            "chat_template_kwargs": {"enable_thinking": False},
        }
        cases.append(Case(record, [_rendered_key(key, family)], f"chat prompt/completion {answer!r}"))
    return cases


def prompt_completion_cases() -> list[Case]:
    """Plain-string prompt/completion; the prompt ends in a space the completion's first token merges with."""
    cases = []
    for i, (question, answer) in enumerate(zip(QUESTIONS, ANSWERS)):
        prompt = f"Question: {question}\nAnswer: "
        if i % 2:  # the whole completion is the answer: its first token " <" starts in the prompt
            completion = key = f"<Answer>{answer}</Answer>" + ("\n" if i == 3 else "")
        else:
            completion, key = _tags(f"Plain {i}.", answer, " " if i == 2 else "")
        cases.append(Case({"prompt": prompt, "completion": completion}, [key], f"prompt/completion {answer!r}"))
    return cases


def text_cases() -> list[Case]:
    """Plain text (TRL appends EOS): the key is the answer block at its end, trailing whitespace before EOS."""
    cases = []
    for i, (question, answer) in enumerate(zip(QUESTIONS, ANSWERS)):
        content, key = _tags(f"Text {i}.", answer, ("", "\n", "")[i % 3])
        cases.append(Case({"text": f"Question: {question}\n{content}"}, [key], f"text {answer!r}"))
    return cases


# ---- the reference ------------------------------------------------------------------------------------------


def token_bytes(tokenizer: Any, ids: Sequence[int]) -> list[bytes]:
    """Each token's bytes, from its token string through the byte-level alphabet (added tokens: their content)."""
    from transformers.convert_slow_tokenizer import bytes_to_unicode

    unicode_to_byte = {char: byte for byte, char in bytes_to_unicode().items()}
    added = {index: token.content for index, token in tokenizer.added_tokens_decoder.items()}
    return [
        added[i].encode("utf-8")
        if i in added
        else bytes(unicode_to_byte[c] for c in tokenizer.convert_ids_to_tokens(i))
        for i in ids
    ]


def reference_key_mask(
    tokenizer: Any, input_ids: Sequence[int], keys: Sequence[str], text: str, edge_tokens: str = "include"
) -> list[int]:
    """Tokens overlapping each key's bytes (``exclude``: wholly inside them), plus the EOS after the last of them with
    only whitespace tokens in between."""
    pieces = token_bytes(tokenizer, input_ids)
    spelled = b"".join(pieces)
    assert spelled == text.encode("utf-8"), f"the tokens do not spell the rendered text: {spelled!r} != {text!r}"
    ends = []
    position = 0
    for piece in pieces:
        position += len(piece)
        ends.append(position)
    starts = [end - len(piece) for end, piece in zip(ends, pieces)]
    mask = [0] * len(pieces)
    for key in keys:
        assert text.count(key) == 1, f"key {key!r} must occur exactly once in the rendered text {text!r}"
        key_start = len(text[: text.index(key)].encode("utf-8"))
        key_end = key_start + len(key.encode("utf-8"))
        if edge_tokens == "include":
            hits = [i for i in range(len(pieces)) if starts[i] < key_end and ends[i] > key_start and pieces[i]]
        else:
            hits = [i for i in range(len(pieces)) if starts[i] >= key_start and ends[i] <= key_end and pieces[i]]
        for i in hits:
            mask[i] = 1
        for i in range(hits[-1] + 1, len(pieces)):
            if input_ids[i] == tokenizer.eos_token_id:
                mask[hits[-1] + 1 : i + 1] = [1] * (i - hits[-1])
                break
            if pieces[i].strip():
                break
    return mask


def describe(tokenizer: Any, input_ids: Sequence[int], mask: Sequence[int]) -> str:
    """The marked tokens as text, one run per ``|``: what a failing assertion shows."""
    runs: list[list[int]] = []
    for index, (token, marked) in enumerate(zip(input_ids, mask)):
        if marked:
            if index and mask[index - 1]:
                runs[-1].append(token)
            else:
                runs.append([token])
    return " | ".join(repr(b"".join(token_bytes(tokenizer, run)).decode("utf-8", "replace")) for run in runs)
