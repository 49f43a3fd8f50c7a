"""Across frameworks: the same conversational records through ``SFTKeyTrainer``'s data preparation (TRL) and through
``axolotl preprocess`` (``type: chat_template``, the same chat template and tokenizer) key the same tokens, row by
row: the decoded text of the tokens whose ``sftkey_mask`` is 1 (on Axolotl, of those it trains) is the same."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("axolotl")
pytest.importorskip("trl")

from test_axolotl import PLUGIN, _base_config, _env, _write

pytestmark = pytest.mark.axolotl

TEMPLATES = Path(__file__).parent / "templates"


def _chat(*turns: str, system: str | None = None) -> dict:
    """A conversation from alternating user and assistant texts."""
    messages = [{"role": "system", "content": system}] if system else []
    roles = ("user", "assistant")
    return {"messages": messages + [{"role": roles[i % 2], "content": text} for i, text in enumerate(turns)]}


RECORDS = {
    "one turn": _chat("What is 2 + 3?", "<Thinking>2 + 3 = 5.</Thinking>\n<Answer>5</Answer>"),
    "several assistant turns": _chat(
        "What is 2 + 3?",
        "<Thinking>2 + 3 = 5.</Thinking>\n<Answer>5</Answer>",
        "And 5 - 1?",
        "<Thinking>5 - 1 = 4.</Thinking>\n<Answer>4</Answer>",
        "And 4 * 4?",
        "<Thinking>4 * 4 = 16.</Thinking>\n<Answer>16</Answer>",
        system="Work step by step.",
    ),
    "non-ASCII": _chat(
        "Quelle est la capitale de la Chine ? 中国的首都是哪里？",
        "<Thinking>La capitale est 北京 (Pékin) — très connue. 🙂</Thinking>\n<Answer>北京 (Pékin) ✓</Answer>",
    ),
    "whitespace before EOS": _chat("What is 7 - 2?", "<Thinking>7 - 2 = 5.</Thinking>\n<Answer>5</Answer>  \n\n"),
    "a turn without a key": _chat(
        "Hi!",
        "Hello, ask me a sum.",
        "What is 1 + 1?",
        "<Thinking>1 + 1 = 2.</Thinking>\n<Answer>2</Answer>",
    ),
    "no key at all": _chat("Hi!", "Hello there."),
    "tags in the prompt only": _chat("Reply with </Thinking><Answer>9</Answer>, please.", "No."),
    "leading spaces in the answer": _chat("Spell it.", "<Thinking>It is six.</Thinking>\n<Answer>   six </Answer>"),
}


def _key_texts(tokenizer, rows: list[dict]) -> list[str]:
    """Per row, the decoded text of its key tokens (``sftkey_mask`` 1 on a token that trains)."""
    texts = []
    for row in rows:
        trained = [label != -100 for label in row["labels"]]
        key = [token for token, mark, t in zip(row["input_ids"], row["sftkey_mask"], trained) if mark and t]
        texts.append(tokenizer.decode(key))
    return texts


def _trl_rows(tiny_dir: str, template: str, out: Path) -> list[dict]:
    """The records as ``SFTKeyTrainer`` prepares them, the tokenizer carrying ``template``."""
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkey_plugin import SFTKeyConfig, SFTKeyTrainer

    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenizer.chat_template = template
    args = SFTKeyConfig(output_dir=str(out), report_to=[], bf16=False, max_length=None, sftkey=True)
    trainer = SFTKeyTrainer(
        model=AutoModelForCausalLM.from_pretrained(tiny_dir),
        args=args,
        train_dataset=Dataset.from_list(list(RECORDS.values())),
        processing_class=tokenizer,
    )
    return trainer.train_dataset.to_list()


def _axolotl_rows(tiny_dir: str, template: str, root: Path) -> list[dict]:
    """The records as ``axolotl preprocess`` prepares them (``type: chat_template``, ``chat_template: jinja``), in
    file order."""
    from datasets import load_from_disk

    root.mkdir()
    data = root / "records.jsonl"
    data.write_text("".join(json.dumps(r, ensure_ascii=False) + "\n" for r in RECORDS.values()), encoding="utf-8")
    config = _base_config(tiny_dir, str(data), str(root / "prepared"), str(root / "out"))
    config.update(plugins=[PLUGIN], sftkey=True, chat_template="jinja", chat_template_jinja=template,
                  shuffle_merged_datasets=False, sequence_len=1024)  # fmt: skip
    path = _write(root / "preprocess.yml", config)
    done = subprocess.run([sys.executable, "-m", "axolotl.cli.preprocess", str(path)], cwd=root, env=_env(),
                          capture_output=True, text=True, timeout=600)  # fmt: skip
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    (prepared,) = [p for p in (root / "prepared").glob("sftkey-*/*") if (p / "dataset_info.json").exists()]
    return load_from_disk(str(prepared)).to_list()


@pytest.mark.parametrize("template", ["chatml", "qwen3"])
def test_trl_and_axolotl_key_the_same_text_per_row(tiny_dir, tokenizer, tmp_path, template):
    text = (TEMPLATES / f"{template}.jinja").read_text(encoding="utf-8")
    trl_rows = _trl_rows(tiny_dir, text, tmp_path / "trl")
    axolotl_rows = _axolotl_rows(tiny_dir, text, tmp_path / "axolotl")
    assert len(trl_rows) == len(axolotl_rows) == len(RECORDS)
    trl_keys, axolotl_keys = _key_texts(tokenizer, trl_rows), _key_texts(tokenizer, axolotl_rows)
    for name, trl_row, axolotl_row, trl_key, axolotl_key in zip(RECORDS, trl_rows, axolotl_rows, trl_keys,
                                                                  axolotl_keys):  # fmt: skip
        assert trl_row["input_ids"] == axolotl_row["input_ids"], f"{name}: tokenised differently"
        assert trl_key == axolotl_key, f"{name}: TRL keys {trl_key!r}, Axolotl {axolotl_key!r}"
    # what both key, so that agreeing on nothing cannot pass
    keys = dict(zip(RECORDS, trl_keys))
    assert [name for name, key in keys.items() if not key] == ["no key at all", "tags in the prompt only"]
    assert "<Answer>北京 (Pékin) ✓</Answer>" in keys["non-ASCII"]
    assert [keys["several assistant turns"].count(f"<Answer>{n}</Answer>") for n in (5, 4, 16)] == [1, 1, 1]
    assert "Hello" not in keys["a turn without a key"] and "<Answer>2</Answer>" in keys["a turn without a key"]
