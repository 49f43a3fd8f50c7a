"""Axolotl with data as users bring it: Qwen3 reasoning (``split_thinking`` and ``reasoning_content``) over several
turns through Axolotl's own ``qwen3`` template, and ``axolotl train`` refusing keyless data before the first step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

pytest.importorskip("axolotl")

from test_axolotl import SFTKEY_ON, _base_config, _env, _strategy, _tokenize, _write, axolotl_env
from test_real_world_data import EOS, _assistant, _user, key_runs, keyless_records, reasoning_record

pytestmark = pytest.mark.axolotl

__all__ = ["axolotl_env"]  # the fixture, used by name

THINK_INSIDE = {
    "messages": [
        _user("What is 5 + 3?"),
        _assistant("<think>\n5 + 3 = 8.\n</think>\n\nThe result is 8."),
        _user("And 6 + 4?"),
        _assistant("<think>6 + 4 = 10.</think>The result is 10."),
    ]
}


def _config(root: Path, tiny_dir: str, dataset: dict[str, Any], **overrides: Any) -> dict[str, Any]:
    config = _base_config(tiny_dir, "", str(root / "prepared"), str(root / "out"))
    config.update({**SFTKEY_ON, "chat_template": "qwen3", **overrides})
    config["datasets"] = [{"ds_type": "json", "type": "chat_template", **dataset}]
    return config


@pytest.mark.parametrize(
    ("record", "dataset"),
    [(THINK_INSIDE, {"split_thinking": True}), (reasoning_record(5, turns=2), {})],
    ids=["split_thinking", "reasoning_content"],
)
def test_qwen3_reasoning_every_turn_answer_is_key(axolotl_env, tiny_dir, tmp_path, record, dataset) -> None:
    """Axolotl's qwen3 template drops the first turn's reasoning; each trained answer is key with its end of turn."""
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    config = _config(tmp_path, tiny_dir, {"path": str(data), **dataset})
    _, tokenizer, strategy = _strategy(axolotl_env, config)
    row = _tokenize(strategy, [record])[0]
    rendered = tokenizer.decode(row["input_ids"])
    assert "<think>" in rendered and rendered.count("<think>") == 1  # the past turn's reasoning is not rendered
    answers = [m["content"].split("</think>")[-1].lstrip() for m in record["messages"][1::2]]
    assert key_runs(tokenizer, row) == [f"{answer}{EOS}" for answer in answers]
    assert all(label != -100 for label, key in zip(row["labels"], row["sftkey_mask"]) if key)
    assert (row["sftkey_turns"], row["sftkey_turns_found"], row["sftkey_finder"]) == (2, 2, "content")


def test_axolotl_train_refuses_keyless_data_before_the_first_step(tiny_dir, tmp_path) -> None:
    data = tmp_path / "keyless.jsonl"
    data.write_text("".join(json.dumps(r) + "\n" for r in keyless_records(16)), encoding="utf-8")
    config = _config(tmp_path, tiny_dir, {"path": str(data)}, chat_template="chatml", max_steps=2)
    path = _write(tmp_path / "keyless.yml", config)
    run = subprocess.run(
        [sys.executable, "-m", "axolotl.cli.train", str(path)],
        cwd=tmp_path,
        env=_env(),
        capture_output=True,
        text=True,
        timeout=600,
    )
    output = run.stdout + run.stderr
    assert run.returncode != 0
    assert "SFTKey will not train: 0 of 16 train examples (0.0%) keep a key span" in output
    assert f"Data form: Axolotl datasets {data} (type sftkey_plugin.axolotl.strategy)" in output
    assert f"axolotl sftkey-preview {path}" in output
    assert not (tmp_path / "out" / "checkpoint-2").exists() and "'loss':" not in output
