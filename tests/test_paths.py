"""Every way into TRL trains the same tokens: ``SFTKeyCallback`` on a stock ``trl.SFTTrainer`` against
``SFTKeyTrainer`` over a grid of settings (padding side, layout, finder, data form, ``remove_unused_columns``, mode).

The grid is every pair of values of any two settings (a greedy pairwise cover of the full product): in each cell the
two trainers give the same batches (tokens, labels and key mask) and the same per-step losses, or the callback
refuses before the first step naming ``SFTKeyTrainer``. No cell may fail after step 0.
"""

from __future__ import annotations

import itertools
import types
from collections.abc import Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
import trl
from datasets import Dataset
from test_trl import PER_TOKEN, config, losses
from transformers import AutoModelForCausalLM, AutoTokenizer

from sftkey_plugin import SFTKeyArguments, SFTKeyCallback, SFTKeyTrainer, hookimpl
from sftkey_plugin.hookspecs import get_plugin_manager, registered_finders
from sftkey_plugin.trl.adopt import _turn_boundary

pytestmark = pytest.mark.stack

GOLD = "gold"  # the record column the third-party finder reads


def gold_finder(text: str, *, example: Mapping[str, Any] | None = None) -> list[tuple[int, int]]:
    """A third-party finder that reads the record: the last occurrence of its ``gold`` column in the text."""
    if example is None or GOLD not in example:
        raise ValueError(f"The 'gold' finder needs each record to have the column {GOLD!r}.")
    index = text.rfind(example[GOLD])
    return [(index, index + len(example[GOLD]))] if index >= 0 else []


@pytest.fixture(scope="module", autouse=True)
def third_party_finder() -> Iterator[None]:
    """Register ``gold`` through pluggy as an installed package's finder would be, for this module only."""
    plugin = types.SimpleNamespace(sftkey_finders=hookimpl(lambda: {"gold": gold_finder}))
    manager = get_plugin_manager()
    manager.register(plugin, name="test-gold-finder")
    registered_finders.cache_clear()
    yield
    manager.unregister(plugin)
    registered_finders.cache_clear()


# Each finder and the way an answer is written for it; "auto" gets a different style per row
STYLES = {
    "tags": "<Thinking>{reasoning}</Thinking><Answer>{answer}</Answer>",
    "think": "<think>{reasoning}</think>{answer}",
    "gsm8k": "{reasoning}\n#### {answer}",
    "boxed": "{reasoning} So the result is \\boxed{{{answer}}}.",
    "answer_is": "{reasoning} The answer is {answer}.",
    "regex": "{reasoning} RESULT={answer}",
    "field": "{reasoning} so we get {answer} in the end.",
    "gold": "{reasoning} so we get {answer} in the end.",
    "content": "{reasoning} {answer}",
}
AUTO_STYLES = ("tags", "think", "gsm8k", "boxed", "answer_is")
FINDER_OPTIONS: dict[str, dict[str, Any]] = {"regex": {"pattern": r"RESULT=(?P<key>\S+)"}}
# awkward rows: a multi-digit answer, non-ASCII, whitespace before the end; lengths differ so rows are padded
PROBLEMS = [
    ("What is 3 + 4?", "3 plus 4 is 7", "7"),
    ("Combien font 12 × 12 ?", "douze fois douze égale cent quarante-quatre, donc", "144"),
    ("Name the capital of Japan.", "The capital is Tōkyō ", "Tōkyō"),
    ("What is 10 - 1?", "ten minus one: nine", "9"),
    ("Give 2 * 21.", "two times twenty-one is forty-two; checking: 21 + 21 = 42", "42"),
    ("What is 100 / 4?", "a quarter of a hundred", "25"),
]


def completion(finder: str, index: int) -> tuple[str, str, str]:
    """``(prompt, completion, answer)`` of problem ``index`` written for ``finder``."""
    prompt, reasoning, answer = PROBLEMS[index % len(PROBLEMS)]
    style = AUTO_STYLES[index % len(AUTO_STYLES)] if finder == "auto" else finder
    return prompt, STYLES[style].format(reasoning=reasoning, answer=answer), answer


def records(finder: str, form: str) -> list[dict[str, Any]]:
    """Twelve records for ``finder`` in data ``form``, each with the answer columns the reading finders use; in the
    conversational form two records have two assistant turns (so a key is not at the row's end)."""
    rows = []
    for index in range(12):
        prompt, text, answer = completion(finder, index)
        extra = {"answer": answer, GOLD: answer}
        if form == "text":
            rows.append({"text": f"{prompt}\n{text}", **extra})
        elif form == "prompt_completion":
            rows.append({"prompt": f"{prompt}\n", "completion": text, **extra})
        else:
            messages = [{"role": "user", "content": prompt}, {"role": "assistant", "content": text}]
            if index % 6 == 1:
                follow, follow_text, _ = completion(finder, index)
                messages += [
                    {"role": "user", "content": "Again: " + follow},
                    {"role": "assistant", "content": follow_text},
                ]
            rows.append({"messages": messages, **extra})
    return rows


DIMENSIONS: dict[str, Sequence[Any]] = {
    "finder": ["auto", "tags", "think", "gsm8k", "boxed", "answer_is", "regex", "field", "content", "gold"],
    "mode": ["two_stage", "key_only", "weighted", "phases"],
    "layout": ["padded", "padding_free", "packing"],
    "form": ["conversational", "prompt_completion", "text"],
    "padding_side": ["left", "right"],
    "remove_unused_columns": [True, False],
}
MODES: dict[str, dict[str, Any]] = {
    "two_stage": {"sftkey_mode": "two_stage", "sftkey_stage2_steps": 1},
    "key_only": {"sftkey_mode": "key_only"},
    "weighted": {"sftkey_mode": "weighted", "sftkey_key_weight": 2.0},
    "phases": {
        "sftkey_mode": "phases",
        "sftkey_phases": [
            {"start": 0, "key_weight": 1.0, "other_weight": 1.0},
            {"start": 0.5, "key_weight": 3.0, "other_weight": 0.5},
        ],
    },
}
LAYOUTS: dict[str, dict[str, Any]] = {
    "padded": {"max_length": 512},
    "padding_free": {"padding_free": True, "max_length": None},
    "packing": {"packing": True, "packing_strategy": "bfd_split", "max_length": 256},
}


# ChatML with the {% generation %} markers assistant_only_loss needs
CHATML_GENERATION = (
    "{% for message in messages %}{% if message['role'] == 'assistant' %}{{ '<|im_start|>assistant\\n' }}"
    "{% generation %}{{ message['content'] + '<|im_end|>' }}{% endgeneration %}{{ '\\n' }}"
    "{% else %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}{% endif %}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)


def pairwise(dimensions: Mapping[str, Sequence[Any]]) -> list[dict[str, Any]]:
    """A small set of cells holding every pair of values of any two dimensions (greedy: each next cell is the one of
    the full product that covers the most pairs not yet covered; deterministic)."""
    names = list(dimensions)
    product = [dict(zip(names, values)) for values in itertools.product(*dimensions.values())]

    def pairs(cell: Mapping[str, Any]) -> set[tuple[str, Any, str, Any]]:
        return {(a, repr(cell[a]), b, repr(cell[b])) for a, b in itertools.combinations(names, 2)}

    uncovered = set().union(*(pairs(cell) for cell in product))
    cells = []
    while uncovered:
        best = max(product, key=lambda cell: len(pairs(cell) & uncovered))
        cells.append(best)
        uncovered -= pairs(best)
    return cells


CELLS = pairwise(DIMENSIONS)


def cell_id(cell: Mapping[str, Any]) -> str:
    return "-".join(f"{value}" if not isinstance(value, bool) else f"ruc{int(value)}" for value in cell.values())


def build(tiny_dir: str, out: str, cell: Mapping[str, Any], sftkey: bool, **overrides: Any) -> Any:
    """``SFTKeyTrainer`` (``sftkey``) or a stock ``trl.SFTTrainer`` holding an ``SFTKeyCallback``, for ``cell``."""
    settings = {**MODES[cell["mode"]], "sftkey_finder": cell["finder"]}
    if cell["finder"] in FINDER_OPTIONS:
        settings["sftkey_finder_options"] = FINDER_OPTIONS[cell["finder"]]
    common = dict(
        max_steps=2,
        per_device_train_batch_size=4,
        remove_unused_columns=cell["remove_unused_columns"],
        **LAYOUTS[cell["layout"]],
        **PER_TOKEN,
    )
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    if cell["form"] == "conversational":  # each assistant message its own trained run (refused otherwise: below)
        common["assistant_only_loss"] = True
        tokenizer.chat_template = CHATML_GENERATION
    common.update(overrides)
    tokenizer.padding_side = cell["padding_side"]
    if sftkey:
        args, callbacks = config(out, sftkey=True, **settings, **common), None
    else:
        args = config(out, config_cls=trl.SFTConfig, **common)
        callbacks = [SFTKeyCallback(SFTKeyArguments(sftkey=True, **settings))]
    trainer = (SFTKeyTrainer if sftkey else trl.SFTTrainer)(
        model=AutoModelForCausalLM.from_pretrained(tiny_dir),
        args=args,
        train_dataset=Dataset.from_list(records(cell["finder"], cell["form"])),
        processing_class=tokenizer,
        callbacks=callbacks,
    )
    trainer._get_train_sampler = lambda *a, **k: torch.utils.data.SequentialSampler(trainer.train_dataset)
    return trainer


def batches(trainer: Any) -> list[dict[str, torch.Tensor]]:
    """The training batches the trainer's collator makes now (after the callback adopted a stock trainer)."""
    return [dict(batch) for batch in trainer.get_train_dataloader()]


def trained_key(batch: Mapping[str, torch.Tensor]) -> torch.Tensor:
    """The key mask on the trained tokens (a key mask on a token no loss reads, such as the first of a packed
    sequence, weighs nothing)."""
    return batch["sftkey_mask"] * batch["labels"].ne(-100)


def key_text(trainer: Any, batch: Mapping[str, torch.Tensor]) -> list[str]:
    """Per batch row, the decoded trained tokens under the key mask (what the row trains as its answer)."""
    return [
        trainer.processing_class.decode(ids[mask.bool()]) for ids, mask in zip(batch["input_ids"], trained_key(batch))
    ]


@pytest.mark.parametrize("cell", CELLS, ids=[cell_id(cell) for cell in CELLS])
def test_callback_trains_what_sftkey_trainer_trains(tiny_dir: str, tmp_path: Any, cell: dict[str, Any]) -> None:
    reference = build(tiny_dir, str(tmp_path / "reference"), cell, sftkey=True)
    reference.train()
    stock = build(tiny_dir, str(tmp_path / "callback"), cell, sftkey=False)
    if cell["finder"] in ("field", "gold") and (cell["remove_unused_columns"] or cell["layout"] == "packing"):
        # the finder reads a column TRL removes before the collator: refused before the first step
        with pytest.raises(ValueError, match="remove_unused_columns=False without packing, or use SFTKeyTrainer"):
            stock.train()
        assert stock.state.global_step == 0
        return
    stock.train()
    expected, actual = batches(reference), batches(stock)
    assert len(actual) == len(expected)
    for mine, theirs in zip(actual, expected):
        assert mine.keys() >= {"input_ids", "labels", "sftkey_mask"}
        assert key_text(stock, mine) == key_text(reference, theirs)
        for column in ("input_ids", "labels", "position_ids", "attention_mask"):
            if column in theirs:
                assert torch.equal(mine[column], theirs[column]), column
        assert torch.equal(trained_key(mine), trained_key(theirs))
        assert int(trained_key(mine).sum()) > 0
    assert losses(stock) == losses(reference) and len(losses(stock)) == 2


def test_the_grid_covers_every_pair() -> None:
    """The cover is complete (every pair of values appears in some cell) and much smaller than the product."""
    names = list(DIMENSIONS)
    for a, b in itertools.combinations(names, 2):
        seen = {(repr(cell[a]), repr(cell[b])) for cell in CELLS}
        assert seen == {(repr(x), repr(y)) for x in DIMENSIONS[a] for y in DIMENSIONS[b]}, (a, b)
    assert len(CELLS) < 60


def test_left_padding_tokenizer_the_collator_pads_right(tiny_dir: str, tmp_path: Any) -> None:
    """The regression of 0.2.0: a tokenizer saved with ``padding_side="left"``; TRL's collator pads on the right all
    the same, and the key mask of each shorter row must sit on that row's answer, not on padding."""
    cell = {
        "finder": "answer_is",
        "mode": "key_only",
        "layout": "padded",
        "form": "prompt_completion",
        "padding_side": "left",
        "remove_unused_columns": True,
    }
    stock = build(tiny_dir, str(tmp_path), cell, sftkey=False)
    stock.train()
    first = batches(stock)[0]
    assert first["attention_mask"][:, -1].eq(0).any()  # some row is padded, on the right
    assert all(text.startswith("The answer is") for text in key_text(stock, first))
    assert torch.equal(first["sftkey_mask"] & first["attention_mask"], first["sftkey_mask"])


@pytest.mark.parametrize("layout", ["padded", "packing"])
def test_callback_refuses_conversations_trained_whole(tiny_dir: str, tmp_path: Any, layout: str) -> None:
    """Conversations trained whole (``assistant_only_loss=False``, TRL's default): one trained run spans every
    message, so the callback cannot find each assistant message's answer as ``SFTKeyTrainer`` does (it would key the
    last one only): refused before the first step, also where packing took the records' columns away."""
    cell = {**CELLS[0], "form": "conversational", "layout": layout, "finder": "tags", "remove_unused_columns": True}
    stock = build(tiny_dir, str(tmp_path), cell, sftkey=False, assistant_only_loss=False)
    with pytest.raises(ValueError, match=r"train whole conversations.*assistant_only_loss=True.*SFTKeyTrainer"):
        stock.train()
    assert stock.state.global_step == 0


@pytest.mark.parametrize(
    "template", sorted(path.stem for path in (Path(__file__).parent / "templates").glob("*.jinja"))
)
def test_the_turn_boundary_is_found_in_conversations_rendered_whole(tiny_dir: str, template: str) -> None:
    """The user-to-assistant boundary the callback looks for in a trained run appears at every assistant turn of
    a real template's rendering, also where the template adds a thinking block to the last turn only (Qwen3)."""
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = (Path(__file__).parent / "templates" / f"{template}.jinja").read_text()
    boundary = _turn_boundary(tokenizer)
    if template == "llama3":  # it needs a bos_token, which the tiny tokenizer has not: no plain conversation renders
        assert boundary is None
        return
    conversation = [
        {"role": "user", "content": "What is 3 + 4?"},
        {"role": "assistant", "content": "<think>3 plus 4</think>The answer is 7."},
        {"role": "user", "content": "And 2 + 2?"},
        {"role": "assistant", "content": "<think>2 plus 2</think>The answer is 4."},
    ]
    rendered = str(tokenizer.apply_chat_template(conversation, tokenize=False))
    assert boundary and rendered.count(boundary) == 2, (boundary, rendered)
