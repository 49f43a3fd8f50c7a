"""Data as users bring it: Chinese answer phrases, ``reasoning_content`` messages rendered by Qwen3-style templates,
multi-turn conversations where every trained assistant turn has its key, token-id marking with the text options,
and the ``sftkey_min_found`` refusal before the first step."""

from __future__ import annotations

import json
import logging
import math
import shutil
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
from test_trl import PER_TOKEN, trainer_for

from sftkey_plugin import find_key_spans, match_key_spans
from sftkey_plugin.cli.main import main
from sftkey_plugin.examples import arithmetic_records
from sftkey_plugin.masking import IGNORE_INDEX
from sftkey_plugin.stats import marked_rows_stats
from sftkey_plugin.tokenize import MarkingOptions, key_mask_from_token_ids, mark_token_ids, tokenize_with_key_mask

# run in every test environment, on its trl (the Axolotl stacks pin 1.9 and 1.14.1): scripts/test.sh
pytestmark = pytest.mark.stack


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
        ("先问答案是什么。答案是 9，检查无误。", "答案是 9"),
        ("答案是 (C). Done.", "答案是 (C)"),
        # a check ("whether", 是否) or a question before the answer is none; a restatement agrees
        ("所以答案是 7。我们再检查答案是否正确：3+4=7，没错。", "答案是 7"),
        ("答案为什么是 7？因为 3+4=7。所以答案是 7。", "答案是 7"),
        ("答案是 8 吗？不是。答案是 7。", "答案是 7"),
        ("答案是 7。再写一遍：答案是 7。", "答案是 7"),
        ("答案是 7。这个答案是 7，没错。", "答案是 7"),
        # an ASCII or full-width comma ends the answer unless another value of it follows
        ("答案是 x = 2, y = 3。", "答案是 x = 2, y = 3"),
        ("答案是 7，因为 3+4=7。", "答案是 7"),
        ("答案是 2，3。", "答案是 2，3"),
    ],
)
def test_chinese_answer_phrases(text: str, expected: str) -> None:
    """answer_is (and so auto) finds the last Chinese answer phrase, up to a full-width or ASCII stop."""
    assert keys(text, "answer_is") == [expected]
    assert keys(text) == [expected]


@pytest.mark.parametrize(
    "text",
    [
        "The answer is 4. 不对，所以答案是 5。",  # a correction not labelled final (最终答案) could be a remark
        "答案是 7。答案是对的。",
        "答案是 7。答案是 8 吗？不是。",  # a question after the answer reopens it
        "答案是 12。代入检验：3 × 4 = 12，答案是合理的。",
    ],
)
def test_chinese_answers_that_disagree_have_no_key(text: str) -> None:
    assert keys(text, "answer_is") == []
    assert match_key_spans(text) == ("ambiguous", [])


def test_no_answer_phrase_means_no_key() -> None:
    assert keys("我不知道。答案", "answer_is") == []
    assert keys("这是一个关于答案的问题", "answer_is") == []


def test_another_language_through_regex_as_the_readme_says() -> None:
    """The Japanese pattern of docs/data.md (sftkey_finder: regex) finds the answer phrase."""
    text = "まず 2+3 を計算します。答えは 5 です。"
    assert keys(text, "regex", pattern=r"(?P<key>答えは\s*[^。\n]+)") == ["答えは 5 です"]


def test_content_finder_is_the_whole_stripped_completion() -> None:
    assert keys("\n\nThe result is 5.\n", "content") == ["The result is 5."]
    assert keys("  \n", "content") == []


# --- reasoning_content and multi-turn, through a Qwen3-style template ----------------------------------------------

# Qwen3's logic in small: reasoning from `reasoning_content` or from `<think>…</think>` inside the content, shown only
# for assistant turns after the last user message (earlier reasoning is dropped), and an `enable_thinking` switch.
QWEN3_STYLE = (
    "{%- set ns = namespace(searching=true, last_query=messages|length - 1) -%}"
    "{%- for message in messages[::-1] -%}"
    "{%- if ns.searching and message.role == 'user' -%}"
    "{%- set ns.searching = false -%}{%- set ns.last_query = (messages|length - 1) - loop.index0 -%}"
    "{%- endif -%}{%- endfor -%}"
    "{%- set thinking = not (enable_thinking is defined and enable_thinking is false) -%}"
    "{%- for message in messages -%}"
    "{%- if message.role == 'assistant' -%}"
    "{%- set content = message.content -%}{%- set reasoning = '' -%}"
    "{%- if message.reasoning_content is string -%}{%- set reasoning = message.reasoning_content -%}"
    "{%- elif '</think>' in content -%}"
    "{%- set reasoning = content.split('</think>')[0].rstrip('\\n').split('<think>')[-1].lstrip('\\n') -%}"
    "{%- set content = content.split('</think>')[-1].lstrip('\\n') -%}"
    "{%- endif -%}"
    "{%- if thinking and loop.index0 > ns.last_query and (loop.last or reasoning) -%}"
    "{{- '<|im_start|>assistant\\n<think>\\n' + reasoning.strip('\\n') + '\\n</think>\\n\\n' -}}"
    "{{- content.lstrip('\\n') -}}"
    "{%- else -%}{{- '<|im_start|>assistant\\n' + content -}}{%- endif -%}"
    "{{- '<|im_end|>\\n' -}}"
    "{%- else -%}{{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' -}}{%- endif -%}"
    "{%- endfor -%}"
    "{%- if add_generation_prompt -%}{{- '<|im_start|>assistant\\n' -}}"
    "{%- if not thinking -%}{{- '<think>\\n\\n</think>\\n\\n' -}}{%- endif -%}{%- endif -%}"
)
EOS = "<|im_end|>"


def _user(text: str) -> dict[str, str]:
    return {"role": "user", "content": text}


def _assistant(answer: str, reasoning: str | None = None, field: str = "reasoning_content") -> dict[str, str]:
    message = {"role": "assistant", "content": answer}
    if reasoning is not None:
        message[field] = reasoning
    return message


def reasoning_record(number: int = 5, turns: int = 1) -> dict[str, Any]:
    """A DeepSeek-R1/Qwen3-style conversation: the reasoning in reasoning_content, the answer in content."""
    messages: list[dict[str, str]] = []
    for turn in range(turns):
        a, b = number + turn, 3 + turn
        messages += [_user(f"What is {a} + {b}?"), _assistant(f"The result is {a + b}.", f"{a} + {b} = {a + b}.")]
    return {"messages": messages}


def key_text(tokenizer: Any, encoded: Mapping[str, Any]) -> str:
    return tokenizer.decode([t for t, m in zip(encoded["input_ids"], encoded["sftkey_mask"]) if m])


def key_runs(tokenizer: Any, encoded: Mapping[str, Any]) -> list[str]:
    """The key text of each run of consecutive key tokens."""
    runs: list[list[int]] = []
    previous = 0
    for token, marked in zip(encoded["input_ids"], encoded["sftkey_mask"]):
        if marked and not previous:
            runs.append([])
        if marked:
            runs[-1].append(token)
        previous = marked
    return [tokenizer.decode(run) for run in runs]


def test_reasoning_content_answer_is_the_key(tokenizer: Any) -> None:
    """auto, without options: the key is the message content, after the <think> block the template placed."""
    record = reasoning_record()
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions(), chat_template=QWEN3_STYLE)
    rendered = tokenizer.apply_chat_template(record["messages"], tokenize=False, chat_template=QWEN3_STYLE)
    assert "<think>\n5 + 3 = 8.\n</think>\n\nThe result is 8." in rendered
    assert encoded["input_ids"] == tokenizer(rendered, add_special_tokens=False)["input_ids"]
    assert key_text(tokenizer, encoded) == f"The result is 8.{EOS}"
    assert (encoded["sftkey_finder"], encoded["sftkey_turns"], encoded["sftkey_turns_found"]) == ("content", 1, 1)
    # an explicit finder reads the content: nothing there to match for `boxed`
    assert (
        tokenize_with_key_mask(record, tokenizer, MarkingOptions("boxed"), chat_template=QWEN3_STYLE)["sftkey_finder"]
        == ""
    )


@pytest.mark.parametrize("field", ["thinking", "reasoning"])
def test_other_reasoning_field_names(tokenizer: Any, field: str) -> None:
    template = QWEN3_STYLE.replace("message.reasoning_content", f"message.{field}")
    record = {"messages": [_user("What is 1 + 1?"), _assistant("It is 2.", "1 + 1 = 2.", field)]}
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions(), chat_template=template)
    assert key_text(tokenizer, encoded) == f"It is 2.{EOS}" and encoded["sftkey_finder"] == "content"
    elsewhere = MarkingOptions(reasoning_field="rationale")  # the configured name only: this one is not it
    assert tokenize_with_key_mask(record, tokenizer, elsewhere, chat_template=template)["sftkey_finder"] == ""


def test_multi_turn_reasoning_every_answer_is_key(tokenizer: Any) -> None:
    """The template drops the first turn's reasoning; both answers are key, each with its end of turn."""
    record = reasoning_record(turns=2)
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions(), chat_template=QWEN3_STYLE)
    rendered = tokenizer.decode(encoded["input_ids"])
    assert "5 + 3 = 8." not in rendered and "<think>\n6 + 4 = 10.\n</think>" in rendered
    assert key_runs(tokenizer, encoded) == [f"The result is 8.{EOS}", f"The result is 10.{EOS}"]
    assert (encoded["sftkey_turns"], encoded["sftkey_turns_found"]) == (2, 2)
    last = tokenize_with_key_mask(record, tokenizer, MarkingOptions(turns="last"), chat_template=QWEN3_STYLE)
    assert key_runs(tokenizer, last) == [f"The result is 10.{EOS}"]
    assert (last["sftkey_turns"], last["sftkey_turns_found"]) == (1, 1)


def test_think_inside_the_content_with_a_template_that_moves_it(tokenizer: Any) -> None:
    """<think>…</think> inside the content: the template re-renders the last turn's and drops the earlier one's; each
    answer is still found (as the think finder would find it in the content)."""
    record = {
        "messages": [
            _user("What is 5 + 3?"),
            _assistant("<think>\n5 + 3 = 8.\n</think>\n\nThe result is 8."),
            _user("And 6 + 4?"),
            _assistant("<think>6 + 4 = 10.</think>The result is 10."),
        ]
    }
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions(), chat_template=QWEN3_STYLE)
    assert key_runs(tokenizer, encoded) == [f"The result is 8.{EOS}", f"The result is 10.{EOS}"]
    assert encoded["sftkey_finder"] == "content"
    # a template that keeps the content as it is: the think finder reads the whole content, as before
    plain = tokenize_with_key_mask(record, tokenizer, MarkingOptions())
    assert key_runs(tokenizer, plain) == [f"\n\nThe result is 8.{EOS}", f"The result is 10.{EOS}"]
    assert plain["sftkey_finder"] == "think"


def test_enable_thinking_is_passed_as_trl_passes_chat_template_kwargs(tokenizer: Any) -> None:
    """chat_template_kwargs of the record reach the template: here they hide the reasoning; the key stays the answer."""
    record = {**reasoning_record(), "chat_template_kwargs": {"enable_thinking": False}}
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions(), chat_template=QWEN3_STYLE)
    expected = tokenizer.apply_chat_template(
        record["messages"], tokenize=False, chat_template=QWEN3_STYLE, enable_thinking=False
    )
    assert "<think>" not in expected
    assert tokenizer.decode(encoded["input_ids"]) == expected
    assert key_text(tokenizer, encoded) == f"The result is 8.{EOS}"
    # prompt/completion: the prompt's generation prompt closes an empty think block; the completion still starts after
    split = {
        "prompt": record["messages"][:1],
        "completion": record["messages"][1:],
        "chat_template_kwargs": {"enable_thinking": True},
    }
    marked = tokenize_with_key_mask(split, tokenizer, MarkingOptions(), chat_template=QWEN3_STYLE)
    trained = tokenizer.decode([t for t, c in zip(marked["input_ids"], marked["completion_mask"]) if c])
    assert trained.startswith("<think>\n5 + 3 = 8.") and key_text(tokenizer, marked) == f"The result is 8.{EOS}"


def test_chinese_answers_and_multi_turn_in_a_chat(tokenizer: Any) -> None:
    record = {
        "messages": [
            _user("2 + 3 等于多少？"),
            _assistant("先算 2 + 3 = 5。所以答案是 5。"),
            _user("再减 1 呢？"),
            _assistant("5 - 1 = 4，最终答案：4"),
            _user("谢谢"),
            _assistant("不客气。"),  # no answer in this turn: counted, not marked
        ]
    }
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions())
    assert key_runs(tokenizer, encoded) == ["答案是 5", f"最终答案：4{EOS}"]
    assert (encoded["sftkey_turns"], encoded["sftkey_turns_found"], encoded["sftkey_finder"]) == (3, 2, "answer_is")


def test_ambiguous_turns_are_counted_and_named(tokenizer: Any) -> None:
    """A turn whose answer statements disagree gets no key; the example keeps its other turns' keys, and one with
    no key at all has the finder value ``ambiguous`` (counted as missing, and as ambiguous)."""
    disagree = _assistant("The answer is 12.\n\nVerification: 5 + 7 = 12, so the answer is consistent.")
    record = {"messages": [_user("5 + 7?"), disagree, _user("And 2 + 2?"), _assistant("So the answer is 4.")]}
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions())
    assert key_runs(tokenizer, encoded) == ["the answer is 4"]
    assert (encoded["sftkey_turns"], encoded["sftkey_turns_found"], encoded["sftkey_finder"]) == (2, 1, "answer_is")
    alone = tokenize_with_key_mask({"messages": record["messages"][:2]}, tokenizer, MarkingOptions())
    assert (alone["sftkey_turns_found"], alone["sftkey_finder"], 1 in alone["sftkey_mask"]) == (0, "ambiguous", False)
    trained = [1] * len(alone["input_ids"])
    stats = marked_rows_stats("train", [{**alone, "labels": trained}, {**encoded, "labels": trained}])
    assert (stats.found, stats.missing, stats.ambiguous, dict(stats.by_finder)) == (1, 1, 1, {"answer_is": 1})


def test_tool_call_turns_without_text_are_not_turns(tokenizer: Any) -> None:
    record = {
        "messages": [
            _user("Add 2 and 3."),
            {"role": "assistant", "content": "", "tool_calls": [{"function": {"name": "add", "arguments": "{}"}}]},
            {"role": "tool", "content": "5"},
            _assistant("The answer is 5."),
        ]
    }
    template = "{% for m in messages %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endfor %}"
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions(), chat_template=template)
    assert (encoded["sftkey_turns"], encoded["sftkey_turns_found"]) == (1, 1)
    assert key_text(tokenizer, encoded) == "The answer is 5"  # the stop after it is not whitespace: no EOS


# --- token-id marking: the same options, through the same per-turn step ----------------------------------------------


def _labels(encoded: Mapping[str, Any], mask_name: str) -> list[int]:
    return [t if m else IGNORE_INDEX for t, m in zip(encoded["input_ids"], encoded[mask_name])]


@pytest.mark.parametrize("edge_tokens", ["include", "exclude"])
@pytest.mark.parametrize("include_eos", [True, False])
def test_token_id_marking_equals_text_marking(tokenizer: Any, edge_tokens: str, include_eos: bool) -> None:
    """Rows that arrive tokenised get the very mask text marking gives, for both edge and EOS policies."""
    straddling = {
        "finder": "regex",
        "finder_options": {"pattern": r"ans(?P<key>wer is \d+)"},
    }  # starts inside " answer"
    cases = [
        ({"prompt": "Q: 2 + 3?\n", "completion": "2 + 3 = 5.\n#### 5\n\n"}, {}),  # EOS after whitespace
        ({"prompt": "Q: 7 - 2?\n", "completion": "<Thinking>7 - 2 = 5.</Thinking>\n<Answer>5</Answer>"}, {}),
        # a chat template closes the turn with <|im_end|>\n: neither is answer text (the newline was key, and the
        # end of turn key even with include_eos off, when token-id marking read them as part of the message)
        ({"prompt": [_user("7 - 2?")], "completion": [_assistant("7 - 2 = 5.\n#### 5 ")]}, {}),
        ({"prompt": "Q: 9 + 9?\n", "completion": "9 + 9 = 18, so the answer is 18"}, straddling),
    ]
    for record, options in cases:
        marking = MarkingOptions(edge_tokens=edge_tokens, include_eos=include_eos, **options)
        encoded = tokenize_with_key_mask(record, tokenizer, marking)
        labels = _labels(encoded, "completion_mask")
        from_ids = key_mask_from_token_ids(encoded["input_ids"], labels, tokenizer, marking)
        assert from_ids.mask == encoded["sftkey_mask"] and 1 in from_ids.mask
        assert from_ids.finder == encoded["sftkey_finder"]
        if "messages" in record or isinstance(record["prompt"], list):
            expected = f"#### 5 {EOS}" if include_eos else "#### 5"  # whitespace is key only up to the EOS
            assert key_runs(tokenizer, {**encoded, "sftkey_mask": from_ids.mask}) == [expected]
    eos = EOS if include_eos else ""
    plain = MarkingOptions(edge_tokens=edge_tokens, include_eos=include_eos)
    trailing = key_text(tokenizer, tokenize_with_key_mask(cases[0][0], tokenizer, plain))
    assert trailing == (f"#### 5\n\n{EOS}" if include_eos else "#### 5")  # whitespace is key only up to the EOS
    assert key_text(tokenizer, encoded) == (" answer is 18" if edge_tokens == "include" else " is 18") + eos


def test_token_id_marking_field_finder_reads_the_record(tokenizer: Any) -> None:
    record = {"prompt": "Q: 3 + 4?\n", "completion": "3 + 4 = 7. Seven it is: 7", "answer": "7"}
    marking = MarkingOptions(finder="field", include_eos=False)
    encoded = tokenize_with_key_mask(record, tokenizer, marking)
    labels = _labels(encoded, "completion_mask")
    row = {"input_ids": encoded["input_ids"], "labels": labels, "answer": "7"}
    assert mark_token_ids(row, tokenizer, marking)["sftkey_mask"] == encoded["sftkey_mask"]
    assert tokenizer.decode([t for t, m in zip(row["input_ids"], encoded["sftkey_mask"]) if m]).strip() == "7"
    with pytest.raises(ValueError, match="answer field 'answer'"):
        mark_token_ids({"input_ids": encoded["input_ids"], "labels": labels}, tokenizer, marking)


def test_token_id_marking_every_trained_turn(tokenizer: Any) -> None:
    """Each run of trained tokens is a turn (assistant_only_loss-style labels of a multi-turn chat)."""
    record = {
        "messages": [
            _user("2 + 3?"),
            _assistant("2 + 3 = 5.\n#### 5"),
            _user("5 - 1?"),
            _assistant("5 - 1 = 4.\n#### 4"),
        ]
    }
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions())
    text = tokenizer.decode(encoded["input_ids"])
    # labels on the assistant turns' content and end of turn, as Axolotl and assistant_only_loss train them
    offsets = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)["offset_mapping"]
    spans = [
        (text.index(m["content"]), text.index(m["content"]) + len(m["content"]) + len(EOS))
        for m in record["messages"][1::2]
    ]
    labels = [
        t if any(s <= start and end <= e for s, e in spans) else IGNORE_INDEX
        for t, (start, end) in zip(encoded["input_ids"], offsets)
    ]
    marked = key_mask_from_token_ids(encoded["input_ids"], labels, tokenizer, MarkingOptions())
    assert marked.mask == encoded["sftkey_mask"] and (marked.turns, len(marked.finders)) == (2, 2)
    last = key_mask_from_token_ids(encoded["input_ids"], labels, tokenizer, MarkingOptions(turns="last"))
    assert key_runs(tokenizer, {"input_ids": encoded["input_ids"], "sftkey_mask": last.mask}) == [f"#### 4{EOS}"]
    # an EOS trained on its own after the last turn (a template's closing token, a packer's separator) is no turn:
    # "last" is still the last assistant message
    ids = [*encoded["input_ids"], tokenizer.eos_token_id]
    separate = key_mask_from_token_ids(ids, [*labels, tokenizer.eos_token_id], tokenizer, MarkingOptions(turns="last"))
    assert key_runs(tokenizer, {"input_ids": ids, "sftkey_mask": separate.mask}) == [f"#### 4{EOS}"]


# --- the trainers: no silent no-op, and reasoning/multi-turn data end to end ---------------------------------------


def keyless_records(n: int = 8) -> list[dict[str, Any]]:
    return [{"messages": [_user(f"Hi {i}"), _assistant("Hello there.")]} for i in range(n)]


@pytest.mark.parametrize(
    ("mode", "weights"),
    [("two_stage", {}), ("key_only", {}), ("weighted", {"sftkey_key_weight": 2.0, **PER_TOKEN})],
)
def test_trl_refuses_to_start_without_key_spans(tiny_dir: str, tmp_path: Path, mode: str, weights: dict) -> None:
    """Nothing to key on: the trainer stops while it is built, before any step, and says what to look at."""
    with pytest.raises(ValueError) as refused:
        trainer_for(tiny_dir, keyless_records(), tmp_path, sftkey=True, sftkey_mode=mode, **weights)
    message = str(refused.value)
    assert "SFTKey will not train: 0 of 8 train examples (0.0%) keep a key span, below sftkey_min_found=0.5" in message
    assert f"sftkey_mode={mode} needs key tokens" in message
    assert "Data form: messages." in message
    assert (
        "Finders tried: tags, think, gsm8k, boxed, answer_is; for assistant messages with separate reasoning:"
        in message
    )
    assert f"sftkey preview YOUR_DATA.jsonl --tokenizer {tiny_dir} --max-length 128" in message
    assert "8 examples have no key span" in message


def test_trl_min_found_threshold_and_off_switches(tiny_dir: str, tmp_path: Path) -> None:
    half = [*arithmetic_records(4, seed=3), *keyless_records(4)]
    trainer = trainer_for(tiny_dir, half, tmp_path / "half", sftkey=True)  # 4 of 8 = 0.5: enough
    assert trainer.sftkey_callback.data_stats[0].found == 4
    with pytest.raises(
        ValueError, match=r"4 of 8 train examples \(50.0%\) keep a key span, below sftkey_min_found=0.6"
    ):
        trainer_for(tiny_dir, half, tmp_path / "strict", sftkey=True, sftkey_min_found=0.6)
    # 0 turns the check off; weighted 1:1 is plain SFT and needs no key token
    trainer_for(tiny_dir, keyless_records(), tmp_path / "off", sftkey=True, sftkey_min_found=0)
    trainer_for(tiny_dir, keyless_records(), tmp_path / "w11", sftkey=True, sftkey_mode="weighted", **PER_TOKEN)
    with pytest.raises(ValueError, match="sftkey_min_found must be in"):
        trainer_for(tiny_dir, half, tmp_path / "bad", sftkey=True, sftkey_min_found=1.5)
    # phases: refused when a phase weighs key tokens apart, not when every phase weighs all tokens alike
    soft = [{"start": 0, "key_weight": 1, "other_weight": 1}, {"start": 0.5, "key_weight": 1, "other_weight": 0.1}]
    with pytest.raises(ValueError, match="sftkey_mode=phases needs key tokens"):
        trainer_for(tiny_dir, keyless_records(), tmp_path / "p", sftkey=True, sftkey_mode="phases", sftkey_phases=soft,
                    **PER_TOKEN)  # fmt: skip
    alike = [{"start": 0, "key_weight": 1, "other_weight": 1}, {"start": 0.5, "key_weight": 0.5, "other_weight": 0.5}]
    trainer_for(tiny_dir, keyless_records(), tmp_path / "pa", sftkey=True, sftkey_mode="phases", sftkey_phases=alike,
                **PER_TOKEN)  # fmt: skip
    # leaving the answers out (key weight 0) needs to find them: refused, and the message says why
    without = [{"start": 0, "key_weight": 0, "other_weight": 1}]
    with pytest.raises(ValueError, match=r"the answers it leaves out \(key weight 0\) could not be told apart"):
        trainer_for(tiny_dir, keyless_records(), tmp_path / "p0", sftkey=True, sftkey_mode="phases",
                    sftkey_phases=without)  # fmt: skip


def test_trl_refuses_when_truncation_cut_every_key(tiny_dir: str, tmp_path: Path) -> None:
    records = arithmetic_records(4, seed=38, form="prompt_completion", terms=12)
    with pytest.raises(ValueError, match="4 had their key cut by truncation \\(every key span found was cut"):
        trainer_for(tiny_dir, records, tmp_path, sftkey=True, max_length=64)


@pytest.fixture(scope="module")
def qwen3_style_dir(tiny_dir: str, tmp_path_factory: pytest.TempPathFactory) -> str:
    """The tiny model and tokenizer with the Qwen3-style template."""
    from transformers import AutoTokenizer

    path = tmp_path_factory.mktemp("qwen3_style")
    shutil.copytree(tiny_dir, path, dirs_exist_ok=True)
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = QWEN3_STYLE
    tokenizer.save_pretrained(path)
    return str(path)


def test_trl_trains_reasoning_content_multi_turn_data(qwen3_style_dir: str, tmp_path: Path) -> None:
    """reasoning_content conversations of two turns: every answer is key, the counts show turns, stage 2 trains."""
    from transformers import AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(qwen3_style_dir)
    records = [reasoning_record(number, turns=2) for number in range(1, 9)]
    trainer = trainer_for(
        qwen3_style_dir, records, tmp_path, sftkey=True, sftkey_stage2_steps=1, max_steps=2, max_length=None
    )
    stats = trainer.sftkey_callback.data_stats[0]
    assert (stats.examples, stats.found, stats.turns, stats.turns_found) == (8, 8, 16, 16)
    assert stats.by_finder == {"content": 8} and "key span in 16 of 16 assistant turns" in stats.summary_line()
    first = trainer.train_dataset[0]
    assert key_runs(tokenizer, first) == [f"The result is 4.{EOS}", f"The result is 6.{EOS}"]
    trainer.train()
    stage2 = [h for h in trainer.state.log_history if h.get("sftkey/stage") == 2]
    assert stage2 and all(h["sftkey/key_fraction"] > 0 and math.isfinite(h["loss"]) for h in stage2)


# --- the sftkey command ---------------------------------------------------------------------------------------------


def write_jsonl(path: Path, records: list[dict[str, Any]]) -> str:
    path.write_text("".join(json.dumps(record, ensure_ascii=False) + "\n" for record in records), encoding="utf-8")
    return str(path)


def test_preview_finds_every_reasoning_content_answer(qwen3_style_dir: str, tmp_path: Path, capsys) -> None:
    data = write_jsonl(tmp_path / "r1.jsonl", [reasoning_record(n, turns=1 + n % 2) for n in range(1, 7)])
    assert main(["preview", data, "--tokenizer", qwen3_style_dir, "--json", "--min-found", "1.0", "-n", "2"]) == 0
    report = json.loads(capsys.readouterr().out)
    summary = report["summary"]
    assert (summary["found_share"], summary["turns"], summary["turns_found"]) == (1.0, 9, 9)
    assert summary["by_finder"]["content"]["examples"] == 6
    first, second = report["examples"]
    assert first["key_text"] == f"The result is 4.{EOS}The result is 6.{EOS}"  # only the final content of each turn
    assert (first["turns"], first["turns_found"]) == (2, 2)
    assert second["key_text"] == f"The result is 5.{EOS}" and (second["turns"], second["turns_found"]) == (1, 1)
    assert main(["preview", data, "--tokenizer", qwen3_style_dir, "--turns", "last", "-n", "1"]) == 0
    text = capsys.readouterr().out
    assert "assistant turns (with a key span)" in text and "      6  (6)" in text


def test_convert_reasoning_content_conversations_to_tags(tmp_path: Path, capsys) -> None:
    records = [reasoning_record(1, turns=2), {"messages": [_user("Hi"), _assistant("Hello.", "", "thinking")]}]
    source = write_jsonl(tmp_path / "r1.jsonl", records)
    output = tmp_path / "tagged.jsonl"
    assert main(["convert", source, str(output), "--from", "think", "--json"]) == 0
    report = json.loads(capsys.readouterr().out)
    assert (report["converted"], report["rejected"]) == (1, 1)  # blank reasoning: nothing to convert, rejected
    converted = json.loads(output.read_text(encoding="utf-8").splitlines()[0])
    answers = [m for m in converted["messages"] if m["role"] == "assistant"]
    assert [m["content"] for m in answers] == [
        "<Thinking>1 + 3 = 4.</Thinking>\n<Answer>The result is 4.</Answer>",
        "<Thinking>2 + 4 = 6.</Thinking>\n<Answer>The result is 6.</Answer>",
    ]
    assert all("reasoning_content" not in m for m in answers)


def test_trl_warns_when_the_template_ignores_reasoning_content(
    tiny_dir: str, qwen3_style_dir: str, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    """A ChatML template never renders reasoning_content: the run says that only the answers would be trained."""
    records = [reasoning_record(number) for number in range(4)]
    logger = logging.getLogger("sftkey_plugin")
    logger.addHandler(caplog.handler)  # directly: once the Axolotl plugin has run, this logger does not propagate
    try:
        with caplog.at_level(logging.WARNING, logger="sftkey_plugin"):
            trainer_for(tiny_dir, records, tmp_path / "chatml", sftkey=True)
            assert "does not render the assistant messages' reasoning_content" in caplog.text
            caplog.clear()
            trainer_for(qwen3_style_dir, records, tmp_path / "qwen3", sftkey=True)
            assert "does not render" not in caplog.text
    finally:
        logger.removeHandler(caplog.handler)
