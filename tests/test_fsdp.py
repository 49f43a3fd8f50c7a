"""FSDP2 through the real Trainer on 2 CPU processes (gloo): every SFTKey mode and LoRA against 1 process, and a run
killed mid-stage-2 resumed from its sharded checkpoint.

accelerate never chooses FSDP for CPU processes (the Trainer then silently trains DDP), so the worker applies a
test-only patch (``fsdp_worker.allow_fsdp_on_cpu``) and every test asserts that the parameters really were sharded.
The Axolotl side is in ``test_axolotl.py``.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import pytest
import torch
from fsdp_worker import SGD, lora_config
from multiprocess_worker import GLOBAL_BATCH, INTERRUPT_ARGS, INTERRUPT_AT, MODES, interrupt_records, run_mode
from test_reliability import (
    assert_same_training,
    kill_when_ready,
    max_abs_diff,
    one_thread,  # noqa: F401  (autouse: one intra-op thread, as there)
    subprocess_env,
)
from test_trl import logged, losses, trainer_for

WORKER = Path(__file__).parent / "fsdp_worker.py"
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]


@pytest.fixture(scope="module")
def fsdp_runs(tiny_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two launches of 2 processes: the two_stage run killed with SIGKILL after its checkpoint-4, then every mode,
    LoRA and the resumed run (``fsdp_worker.py``). A hang fails here after 300 s."""
    out = tmp_path_factory.mktemp("fsdp")
    killed, ready, log = out / "killed", out / "ready", out / "killed.log"
    started = time.monotonic()
    code = kill_when_ready([*TORCHRUN, "interrupt", tiny_dir, str(killed), str(ready)], subprocess_env(), log, ready)
    assert ready.exists(), log.read_text()[-3000:]
    for pid in ready.read_text().split():  # torchrun's workers run in their own sessions: kill them too
        os.kill(int(pid), signal.SIGKILL)
    assert code == -signal.SIGKILL
    command = [*TORCHRUN, "modes", tiny_dir, str(out), str(killed)]
    done = subprocess.run(command, env=subprocess_env(), capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-5000:]
    print(f"\nFSDP2 launches (killed run; all modes, LoRA, resume): {time.monotonic() - started:.1f} s")
    return out


def load_sharded(runs: Path, name: str) -> tuple[dict[str, Any], list[list[dict]]]:
    """A 2-process record, checked to come from a Trainer with FSDP on and every parameter a DTensor."""
    multi = torch.load(runs / f"{name}.pt")
    assert multi["fsdp"] and multi["sharded"], "the 2-process run was not sharded (FSDP fell back to DDP)"
    return multi, [torch.load(runs / f"{name}-rank{rank}.pt") for rank in (0, 1)]


@pytest.mark.parametrize("mode", list(MODES))
def test_fsdp_two_processes_equal_one_process(tiny_dir: str, tmp_path: Path, fsdp_runs: Path, mode: str) -> None:
    """FSDP2 on 2 processes: the 1-process losses, metrics, gradients after reduction and final (gathered) weights;
    process 1 has steps without any key token."""
    multi, ranks = load_sharded(fsdp_runs, mode)
    single = run_mode(tiny_dir, str(tmp_path), mode, GLOBAL_BATCH, **SGD)
    print(f"\nFSDP2, 2 processes vs 1 (SGD lr {SGD['learning_rate']}):", end="")
    assert_same_training(mode, multi, single, ranks)


def test_fsdp_lora_two_processes_equal_one_process(tiny_dir: str, tmp_path: Path, fsdp_runs: Path) -> None:
    """LoRA (peft) under FSDP2, two_stage: the same comparison; only the adapters get gradients."""
    multi, ranks = load_sharded(fsdp_runs, "lora")
    torch.manual_seed(0)  # the worker's seed before the LoRA init
    single = run_mode(tiny_dir, str(tmp_path), "two_stage", GLOBAL_BATCH, **SGD, peft_config=lora_config())
    assert multi["grads"][0].keys() == single["grads"][0].keys()
    assert multi["grads"][0] and all("lora_" in name for name in multi["grads"][0])
    print("\nFSDP2 + LoRA, 2 processes vs 1:", end="")
    assert_same_training("two_stage", multi, single, ranks)


def test_fsdp_killed_mid_stage_two_resumes_from_sharded_checkpoint(tiny_dir: str, tmp_path: Path,
                                                                   fsdp_runs: Path) -> None:  # fmt: skip
    """Both processes killed during step 5 (stage 2 from step 3); checkpoint-4 holds one model and one optimizer
    shard per process; resumed on 2 processes, the run ends as an uninterrupted 1-process run."""
    checkpoint = fsdp_runs / "killed" / f"checkpoint-{INTERRUPT_AT}"
    for folder in ("pytorch_model_fsdp_0", "optimizer_0"):
        assert sorted(p.name for p in (checkpoint / folder).glob("*.distcp")) == ["__0_0.distcp", "__1_0.distcp"]
    saved = json.loads((checkpoint / "trainer_state.json").read_text())
    assert [h["sftkey/stage"] for h in saved["log_history"] if "loss" in h] == [1, 1, 2, 2]

    resumed = torch.load(fsdp_runs / "resumed.pt")
    full = trainer_for(tiny_dir, interrupt_records(), tmp_path, **INTERRUPT_ARGS, **SGD)
    full.train()
    resumed_logs = [h for h in resumed["logs"] if "loss" in h]
    assert [h["sftkey/stage"] for h in resumed_logs] == logged(full, "sftkey/stage") == [1, 1, 2, 2, 2, 2]
    assert [h["loss"] for h in resumed_logs] == pytest.approx(losses(full), rel=1e-5)
    diff = max_abs_diff(resumed["weights"], {n: p.detach() for n, p in full.model.named_parameters()})
    print(f"\nFSDP2 resume after SIGKILL (2 processes vs 1 uninterrupted): max |weight diff| {diff:.2e}")
    assert diff < 1e-6
