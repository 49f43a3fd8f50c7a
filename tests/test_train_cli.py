"""``sftkey train``: TRL's ``trl sft`` with the ``sftkey_*`` keys. The same YAML through the installed ``trl sft`` and
through ``sftkey train`` with ``sftkey: false`` trains the same losses; with ``sftkey: true`` it trains SFTKey."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

from sftkey_plugin.cli.main import main as sftkey
from sftkey_plugin.examples import arithmetic_records

yaml = pytest.importorskip("yaml")
pytest.importorskip("trl")

# run in every test environment, on its trl (the Axolotl stacks pin 1.9 and 1.14.1): scripts/test.sh
pytestmark = pytest.mark.stack

STEPS = 3


@pytest.fixture(scope="module")
def config(tiny_dir, tmp_path_factory) -> dict:
    """A TRL YAML's keys: the tiny model, a folder holding train.jsonl (what `trl sft` can load; `sftkey train` also
    takes the file), plain SGD, STEPS steps, a loss per step, a checkpoint at the end (the only place `trl sft` leaves
    its log history)."""
    folder = tmp_path_factory.mktemp("train_cli")
    data = folder / "train.jsonl"
    data.write_text("".join(json.dumps(record) + "\n" for record in arithmetic_records(16, seed=3)), encoding="utf-8")
    return {
        "model_name_or_path": tiny_dir,
        "dataset_name": str(folder),
        "dtype": "float32",
        "bf16": False,
        "max_steps": STEPS,
        "per_device_train_batch_size": 4,
        "optim": "sgd",
        "learning_rate": 0.5,
        "lr_scheduler_type": "constant",
        "max_length": 128,
        "logging_steps": 1,
        "save_strategy": "steps",
        "save_steps": STEPS,
        "report_to": "none",
        "dataset_num_proc": 1,
        "dataloader_num_workers": 0,
        "seed": 0,
    }


def _write(config: dict, folder: Path, **keys) -> Path:
    path = folder / "config.yaml"
    path.write_text(yaml.safe_dump({**config, "output_dir": str(folder / "out"), **keys}), encoding="utf-8")
    return path


def _losses(state_file: Path) -> list[float]:
    history = json.loads(state_file.read_text())["log_history"]
    return [entry["loss"] for entry in history if "loss" in entry]


def test_sftkey_false_trains_what_trl_sft_trains(config, tmp_path):
    """`trl sft --config` (TRL's console script, launched as it launches: `accelerate launch` of its own script) and
    `sftkey train --config` with `sftkey: false` on the same YAML: the same loss at every step."""
    trl_run, ours = tmp_path / "trl", tmp_path / "sftkey"
    trl_run.mkdir(), ours.mkdir()
    command = [str(Path(sys.executable).with_name("trl")), "sft", "--config", str(_write(config, trl_run))]
    # `--num_processes` is an `accelerate launch` flag: `trl sft` passes it on
    result = subprocess.run([*command, "--num_processes", "1"], capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, (result.stdout + result.stderr)[-4000:]
    expected = _losses(trl_run / "out" / f"checkpoint-{STEPS}" / "trainer_state.json")

    assert sftkey(["train", "--config", str(_write(config, ours, sftkey=False))]) == 0
    state = ours / "out" / "trainer_state.json"  # saved after training, for `sftkey ab`
    assert json.loads(state.read_text())["global_step"] == STEPS
    assert len(expected) == STEPS
    assert _losses(state) == pytest.approx(expected, rel=1e-6)
    assert expected[-1] < expected[0]  # it trained


def test_sftkey_true_trains_sftkey_with_command_line_overrides(config, tmp_path):
    """`sftkey: true` from the file, a local jsonl as `dataset_name`, the step count and a key overridden on the command
    line: SFTKey's two stages and metrics."""
    from sftkey_plugin.trl.trainer import FUSED_HEAD

    data = Path(config["dataset_name"]) / "train.jsonl"
    path = _write(config, tmp_path, dataset_name=str(data), sftkey=True, sftkey_mode="two_stage")
    # trl < 1.15 splits the key and the reasoning loss only with per-token losses (tests/test_trl.py)
    per_token = [] if FUSED_HEAD else ["--loss_type", "nll"]
    assert sftkey(["train", "--config", str(path), "--max_steps", "4", "--sftkey_stage2_ratio", "0.5", *per_token]) == 0
    history = json.loads((tmp_path / "out" / "trainer_state.json").read_text())["log_history"]
    logs = [entry for entry in history if "loss" in entry]
    assert [entry["sftkey/stage"] for entry in logs] == [1, 1, 2, 2]
    assert all("sftkey/key_loss" in entry for entry in logs)


def test_help_is_trl_parsers_and_unknown_keys_are_named(config, tmp_path, capsys):
    """`sftkey train --help` lists TrlParser's keys, the sftkey_* ones among them; a misspelt key fails by name before
    anything loads."""
    with pytest.raises(SystemExit) as exit_info:
        sftkey(["train", "--help"])
    assert exit_info.value.code == 0
    out = capsys.readouterr().out
    assert "usage: sftkey train" in out
    assert all(flag in out for flag in ("--sftkey_mode", "--model_name_or_path", "--dataset_name", "--use_peft"))

    assert sftkey(["train", "--config", str(_write(config, tmp_path, sftkey_mod="weighted"))]) == 2
    assert "unknown keys ['sftkey_mod']" in capsys.readouterr().err
    assert not (tmp_path / "out").exists()
