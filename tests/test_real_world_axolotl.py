"""Axolotl with data as users bring it: Qwen3 reasoning (``split_thinking`` and ``reasoning_content``) over several
turns through Axolotl's own ``qwen3`` template, and ``axolotl train`` refusing keyless data before the first step."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from sftkey_plugin.examples import arithmetic_records

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


def test_on_missing_drop_counts_before_it_drops(tiny_dir, tmp_path) -> None:
    """sftkey_on_missing: drop with half the rows keyless: sftkey_min_found counts them before they are dropped, as
    TRL does (the rows used to be dropped while tokenising, so the share was always 100% and the refusal never
    fired); below the threshold the run trains on the rest, with the drop counted in the log, for a chat dataset and
    for a non-chat type (alpaca, which drop used to refuse)."""
    records = arithmetic_records(8, seed=3, form="prompt_completion_text")
    chats, alpaca = tmp_path / "half.jsonl", tmp_path / "half_alpaca.jsonl"
    chat_rows = [{"messages": [_user(r["prompt"]), _assistant(r["completion"])]} for r in records]
    chats.write_text("".join(json.dumps(r) + "\n" for r in keyless_records(8) + chat_rows), encoding="utf-8")
    keyless = [{"instruction": "Say hi.", "input": "", "output": "Hello" + " there" * i + "."} for i in range(8)]
    keyed = [{"instruction": r["prompt"], "input": "", "output": r["completion"]} for r in records]
    alpaca.write_text("".join(json.dumps(r) + "\n" for r in keyless + keyed), encoding="utf-8")

    def train(name: str, dataset: dict[str, Any], min_found: float) -> str:
        config = _config(tmp_path / name, tiny_dir, dataset, chat_template="chatml", max_steps=2,
                         sftkey_on_missing="drop", sftkey_min_found=min_found)  # fmt: skip
        command = [sys.executable, "-m", "axolotl.cli.train", str(_write(tmp_path / f"{name}.yml", config))]
        done = subprocess.run(command, cwd=tmp_path, env=_env(), capture_output=True, text=True, timeout=600)
        assert (done.returncode == 0) == (min_found < 0.5), done.stdout[-2000:] + done.stderr[-3000:]
        return done.stdout + done.stderr

    refused = train("strict", {"path": str(chats)}, 0.6)
    assert (
        "SFTKey will not train: 8 of 16 train examples (50.0%) keep a key span, below sftkey_min_found=0.6" in refused
    )
    assert "'loss':" not in refused
    trained = train("lenient", {"path": str(alpaca), "type": "alpaca"}, 0.4)
    assert "SFTKey: dropped 8 of 16 train examples without a key span (sftkey_on_missing: drop)." in trained
    assert "SFTKey train data: 16 examples, key span found in 8 (50.0%)" in trained and "8 dropped" in trained


def test_preview_shows_turns_and_marks_pretokenised_rows(tiny_dir, tmp_path) -> None:
    """``axolotl sftkey-preview``: multi-turn reasoning data shows its turns; pre-tokenised rows and rows of a non-chat
    type (alpaca) are marked from their tokens, as the trainer marks them."""
    from axolotl.cli.main import cli
    from axolotl.cli.plugins import PluginCommand
    from click.testing import CliRunner
    from transformers import AutoTokenizer

    from sftkey_plugin.examples import arithmetic_records
    from sftkey_plugin.tokenize import MarkingOptions, tokenize_with_key_mask

    commands = cli.plugin_commands()
    commands.setdefault("sftkey-preview", PluginCommand(target="sftkey_plugin.axolotl.preview:sftkey_preview"))
    chats = tmp_path / "r1.jsonl"
    chats.write_text("".join(json.dumps(reasoning_record(n, turns=2)) + "\n" for n in range(4)), encoding="utf-8")
    tokenizer = AutoTokenizer.from_pretrained(tiny_dir)
    tokenised = tmp_path / "tokenised.jsonl"
    with tokenised.open("w", encoding="utf-8") as handle:
        for record in arithmetic_records(3, seed=2, form="prompt_completion_text"):
            encoded = tokenize_with_key_mask(record, tokenizer, MarkingOptions())
            labels = [t if c else -100 for t, c in zip(encoded["input_ids"], encoded["completion_mask"])]
            row = {"input_ids": encoded["input_ids"], "labels": labels, "attention_mask": [1] * len(labels)}
            handle.write(json.dumps(row) + "\n")
    # a non-chat type, tokenised one record at a time (its strategy is not batched): it could not be loaded
    alpaca = tmp_path / "alpaca.jsonl"
    records = arithmetic_records(3, seed=4, form="prompt_completion_text")
    rows = [{"instruction": r["prompt"], "input": "", "output": r["completion"]} for r in records]
    alpaca.write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    config = _config(tmp_path, tiny_dir, {"path": str(chats)})
    config["datasets"].append({"path": str(tokenised), "ds_type": "json"})
    config["datasets"].append({"path": str(alpaca), "ds_type": "json", "type": "alpaca"})
    result = CliRunner().invoke(cli, ["sftkey-preview", str(_write(tmp_path / "p.yml", config)), "-n", "1"])
    assert result.exit_code == 0, result.output
    assert f"datasets[0] {chats} data: 4 examples, key span found in 4 (100.0%) [content 4]" in result.output
    assert "key span in 8 of 8 assistant turns" in result.output and "key in 2 of 2 turns" in result.output
    assert f"datasets[1] {tokenised} data: 3 examples, key span found in 3 (100.0%) [tags 3]" in result.output
    assert f"datasets[2] {alpaca} data: 3 examples, key span found in 3 (100.0%) [tags 3]" in result.output


def test_fallback_marking_keeps_the_reasoning_field_rule_and_warns(axolotl_env, tiny_dir, tmp_path, caplog) -> None:
    """Where Axolotl's tokens differ from the render, its own tokens are marked; a message whose reasoning is in
    reasoning_content still has all of its content as key (it used to go through the ordinary auto chain, which
    finds no answer phrase in "The result is 8."). A template that renders none of the reasoning is warned about."""
    record = reasoning_record(5, turns=2)
    data = tmp_path / "data.jsonl"
    data.write_text(json.dumps(record) + "\n", encoding="utf-8")
    config = _config(tmp_path, tiny_dir, {"path": str(data)}, chat_template="chatml")
    _, tokenizer, strategy = _strategy(axolotl_env, config)
    with caplog.at_level("WARNING", logger="sftkey_plugin"):
        row = _tokenize(strategy, [record, record])[0]
    warned = "SFTKey: the chat template does not render the assistant messages' reasoning_content (first record)"
    # once, not once per record (Axolotl's log routing may copy it to axolotl.sftkey_plugin: counted at the source)
    assert len([r for r in caplog.records if r.name == "sftkey_plugin" and r.getMessage().startswith(warned)]) == 1
    assert key_runs(tokenizer, row) == [f"The result is 8.{EOS}", f"The result is 10.{EOS}"]
    # Axolotl's tokens and the render disagree (one more token): the fallback marks Axolotl's own tokens
    ids, labels = [*row["input_ids"], tokenizer.eos_token_id], [*row["labels"], -100]
    fallback = strategy.key_mask(record, ids, labels)
    assert key_runs(tokenizer, {"input_ids": ids, **fallback}) == key_runs(tokenizer, row)
    assert (fallback["sftkey_finder"], fallback["sftkey_turns"], fallback["sftkey_turns_found"]) == ("content", 2, 2)
