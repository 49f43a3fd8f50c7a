"""Spans to token masks: the straddling policy, EOS, and exactness through chat templates and TRL's tokenisation."""

from __future__ import annotations

import pytest

from sftkey_plugin.examples import arithmetic_records
from sftkey_plugin.masking import extend_mask_to_eos, spans_to_token_mask, truncation_slice
from sftkey_plugin.tokenize import NOT_LOCATED, MarkingOptions, tokenize_with_key_mask


def test_straddling_tokens_follow_the_edge_policy():
    offsets = [(0, 0), (0, 3), (3, 6), (6, 9), (9, 12)]  # a zero-width special token, then 3-char tokens
    spans = [(4, 9)]  # starts inside token 2, ends exactly at token 3's end
    assert spans_to_token_mask(offsets, spans, "include") == [0, 0, 1, 1, 0]
    assert spans_to_token_mask(offsets, spans, "exclude") == [0, 0, 0, 1, 0]
    assert spans_to_token_mask(offsets, [(0, 1), (10, 11)], "include") == [0, 1, 0, 0, 1]
    assert spans_to_token_mask(offsets, [], "include") == [0] * 5
    # a post-processor's EOS appended with offsets (0, 0) neither breaks the search nor becomes key
    assert spans_to_token_mask([*offsets, (0, 0)], [(9, 12)], "include") == [0, 0, 0, 0, 1, 0]
    assert spans_to_token_mask([*offsets, (0, 0)], [(0, 12)], "exclude") == [0, 1, 1, 1, 1, 0]


def test_eos_after_the_answer_and_whitespace_before_it():
    text = "ab \n<E>"
    offsets = [(0, 1), (1, 2), (2, 4), (4, 7)]
    ids = [10, 11, 12, 99]
    assert extend_mask_to_eos([0, 1, 0, 0], ids, offsets, text, {99}) == [0, 1, 1, 1]
    assert extend_mask_to_eos([1, 0, 0, 0], ids, offsets, text, {99}) == [1, 0, 0, 0]  # 'b' is not whitespace
    assert extend_mask_to_eos([0, 0, 0, 0], ids, offsets, text, {99}) == [0, 0, 0, 0]


def test_truncation_slice_modes():
    tokens = list(range(10))
    assert tokens[truncation_slice(4, "keep_start")] == [0, 1, 2, 3]
    assert tokens[truncation_slice(4, "keep_end")] == [6, 7, 8, 9]
    assert tokens[:3][truncation_slice(4, "keep_end")] == [0, 1, 2]  # a shorter sequence is kept whole
    assert truncation_slice(None, "keep_end") == slice(None)
    with pytest.raises(ValueError, match="keep_middle"):
        truncation_slice(4, "keep_middle")


def key_text(tokenizer, encoded) -> str:
    return tokenizer.decode([t for t, m in zip(encoded["input_ids"], encoded["sftkey_mask"]) if m])


@pytest.mark.parametrize("form", ["messages", "prompt_completion", "prompt_completion_text", "text"])
def test_key_tokens_are_exactly_the_answer_in_every_record_form(tokenizer, form):
    record = arithmetic_records(1, seed=5, form=form)[0]
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions())
    assert encoded["sftkey_finder"] == "tags"
    assert len(encoded["sftkey_mask"]) == len(encoded["input_ids"])
    # the key is the answer block, then the EOS (<|im_end|>) that ends it
    assert key_text(tokenizer, encoded) == f"\n<Answer>{record['answer']}</Answer><|im_end|>"
    no_eos = tokenize_with_key_mask(record, tokenizer, MarkingOptions(include_eos=False))
    assert key_text(tokenizer, no_eos) == f"\n<Answer>{record['answer']}</Answer>"


def test_conversational_ids_are_those_of_the_chat_template(tokenizer):
    """TRL tokenises `apply_chat_template(messages)`; the masked ids must be the very same sequence."""
    for form, conversation in [("messages", "messages"), ("prompt_completion", None)]:
        record = arithmetic_records(1, seed=7, form=form)[0]
        messages = record[conversation] if conversation else record["prompt"] + record["completion"]
        expected = tokenizer.apply_chat_template(messages, tokenize=True, return_dict=True)["input_ids"]
        assert tokenize_with_key_mask(record, tokenizer, MarkingOptions())["input_ids"] == list(expected)


def test_prompt_completion_mask_starts_after_the_prompt(tokenizer):
    record = arithmetic_records(1, seed=3, form="prompt_completion")[0]
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions())
    prompt_ids = tokenizer.apply_chat_template(
        record["prompt"], tokenize=True, add_generation_prompt=True, return_dict=True
    )["input_ids"]
    assert encoded["completion_mask"] == [0] * len(prompt_ids) + [1] * (len(encoded["input_ids"]) - len(prompt_ids))
    # key tokens are completion tokens
    assert all(c for c, m in zip(encoded["completion_mask"], encoded["sftkey_mask"]) if m)


def test_unicode_answer_and_a_custom_tag(tokenizer):
    record = {"prompt": "Q: ", "completion": "<r>naïve 漢字 reasoning</r>Ünïcödé 🙂 = 42"}
    encoded = tokenize_with_key_mask(
        record,
        tokenizer,
        MarkingOptions(finder="tags", finder_options={"thinking_close": "</r>"}, include_eos=False),
    )
    assert key_text(tokenizer, encoded) == "Ünïcödé 🙂 = 42"


def test_missing_key_and_template_that_rewrites_the_content(tokenizer):
    record = {"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "no answer"}]}
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions())
    assert encoded["sftkey_finder"] == "" and 1 not in encoded["sftkey_mask"]
    upper = "{% for m in messages %}{{ m['content'] | upper }}{% endfor %}"
    record = arithmetic_records(1, form="messages")[0]
    encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions(), chat_template=upper)
    assert encoded["sftkey_finder"] == NOT_LOCATED and 1 not in encoded["sftkey_mask"]


def test_assistant_only_loss_masks_come_from_the_generation_template(tokenizer):
    template = (
        "{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' }}{% if m['role'] == 'assistant' %}"
        "{% generation %}{{ m['content'] + '<|im_end|>' }}{% endgeneration %}"
        "{% else %}{{ m['content'] + '<|im_end|>' }}"
        "{% endif %}{{ '\n' }}{% endfor %}"
    )
    record = arithmetic_records(1, seed=2, form="messages")[0]
    encoded = tokenize_with_key_mask(
        record, tokenizer, MarkingOptions(), assistant_only_loss=True, chat_template=template
    )
    masks = encoded["assistant_masks"]
    assert 0 in masks and 1 in masks
    assert all(a for a, m in zip(masks, encoded["sftkey_mask"]) if m)
    assert key_text(tokenizer, encoded).startswith("\n<Answer>")


def test_wrong_field_types_get_a_clear_error(tokenizer):
    with pytest.raises(ValueError, match="string"):
        tokenize_with_key_mask({"text": 5}, tokenizer, MarkingOptions())
    with pytest.raises(ValueError, match="no assistant message"):
        tokenize_with_key_mask({"messages": [{"role": "user", "content": "x"}]}, tokenizer, MarkingOptions())
