"""Sharded training through the real Trainer on 2 CPU processes (gloo) against 1 process, with plain SGD: FSDP2 in
every SFTKey mode and with weights from the data (weighted), with LoRA, and a run killed mid-stage-2 resumed from its
sharded checkpoint; DeepSpeed ZeRO-2 and ZeRO-3 in every mode.

accelerate chooses neither FSDP nor DeepSpeed for CPU processes by itself (FSDP silently becomes DDP), so the worker
applies test-only patches (``sharded_worker.allow_fsdp_on_cpu``, ``allow_deepspeed_on_cpu``) and every test asserts
that the run really was sharded. The Axolotl FSDP2 run is in ``test_axolotl.py``.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
import torch
from multiprocess_worker import GLOBAL_BATCH, INTERRUPT_ARGS, INTERRUPT_AT, MODES, interrupt_records, run_mode
from process_exit import run_processes
from sharded_worker import FSDP_RUNS, SGD, lora_config
from test_reliability import (
    assert_same_training,
    kill_when_ready,
    max_abs_diff,
    one_thread,  # noqa: F401  (autouse: one intra-op thread, as there)
    subprocess_env,
)
from test_trl import logged, losses, trainer_for

WORKER = Path(__file__).parent / "sharded_worker.py"
pytestmark = pytest.mark.multiprocess
TORCHRUN = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", str(WORKER)]


@pytest.fixture(scope="module")
def fsdp_runs(tiny_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Two launches of 2 processes: the two_stage run killed with SIGKILL after its checkpoint-4, then every mode,
    data weights, LoRA and the resumed run (``sharded_worker.py``). A hang fails here after 300 s."""
    out = tmp_path_factory.mktemp("fsdp")
    killed, ready, log = out / "killed", out / "ready", out / "killed.log"
    started = time.monotonic()
    code = kill_when_ready([*TORCHRUN, "interrupt", tiny_dir, str(killed), str(ready)], subprocess_env(), log, ready)
    assert ready.exists(), log.read_text()[-3000:]
    for pid in ready.read_text().split():  # torchrun's workers run in their own sessions: kill them too
        os.kill(int(pid), signal.SIGKILL)
    assert code == -signal.SIGKILL
    run_processes([*TORCHRUN, "modes", tiny_dir, str(out), str(killed)], 2, env=subprocess_env(), timeout=300)
    print(f"\nFSDP2 launches (killed run; all modes, data weights, LoRA, resume): {time.monotonic() - started:.1f} s")
    return out


@pytest.fixture(scope="module")
def deepspeed_runs(tiny_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """One launch of 2 processes training every mode under ZeRO-2 and ZeRO-3 (DeepSpeed's CPU accelerator; without
    ``ACCELERATE_USE_CPU``, which would turn DeepSpeed off)."""
    pytest.importorskip("deepspeed")
    out = tmp_path_factory.mktemp("deepspeed")
    env = {k: v for k, v in subprocess_env().items() if k != "ACCELERATE_USE_CPU"}
    env.update(DS_ACCELERATOR="cpu", DS_BUILD_OPS="0")
    started = time.monotonic()
    run_processes([*TORCHRUN, "deepspeed", tiny_dir, str(out)], 2, group_freed=False, env=env, timeout=300)
    print(f"\nDeepSpeed launch (ZeRO-2, ZeRO-3, all modes): {time.monotonic() - started:.1f} s")
    return out


@pytest.fixture(scope="module")
def one_process(tiny_dir: str, tmp_path_factory: pytest.TempPathFactory) -> Callable[[str], dict[str, Any]]:
    """The 1-process run of a mode (SGD, 4 rows per step), trained once and shared by the FSDP and ZeRO tests."""
    runs: dict[str, dict[str, Any]] = {}

    def run(mode: str) -> dict[str, Any]:
        if mode not in runs:
            runs[mode] = run_mode(tiny_dir, str(tmp_path_factory.mktemp(mode)), mode, GLOBAL_BATCH, **SGD)
        return runs[mode]

    return run


def load_record(runs: Path, name: str) -> tuple[dict[str, Any], list[list[dict]]]:
    """A 2-process record and each process's micro-batches."""
    return torch.load(runs / f"{name}.pt"), [torch.load(runs / f"{name}-rank{rank}.pt") for rank in (0, 1)]


def load_sharded(runs: Path, name: str) -> tuple[dict[str, Any], list[list[dict]]]:
    """A 2-process record, checked to come from a Trainer with FSDP on and every parameter a DTensor."""
    multi, ranks = load_record(runs, name)
    assert multi["fsdp"] and multi["sharded"], "FSDP fell back to DDP"
    return multi, ranks


@pytest.mark.parametrize("mode", FSDP_RUNS)
def test_fsdp_two_processes_equal_one_process(fsdp_runs: Path, one_process: Callable, mode: str) -> None:
    """FSDP2 on 2 processes: the 1-process losses, metrics, gradients after reduction and final (gathered) weights;
    process 1 has steps without any key token. ``weighted_data``: message, example and prompt weights."""
    multi, ranks = load_sharded(fsdp_runs, mode)
    print(f"\nFSDP2, 2 processes vs 1 (SGD lr {SGD['learning_rate']}):", end="")
    assert_same_training(mode, multi, one_process(mode), ranks)


@pytest.mark.parametrize("zero", ["zero2", "zero3"])
@pytest.mark.parametrize("mode", list(MODES))
def test_deepspeed_two_processes_equal_one_process(deepspeed_runs: Path, one_process: Callable, mode: str,
                                                   zero: str) -> None:  # fmt: skip
    """The recipes' ZeRO-3 config (and its ZeRO-2 twin) in float32 on 2 processes: the same comparison, with the
    gradients and weights DeepSpeed keeps partitioned gathered at each step (``sharded_worker.DeepSpeedSteps``)."""
    multi, ranks = load_record(deepspeed_runs, f"{zero}-{mode}")
    assert multi["distributed_type"] == "DEEPSPEED" and len(multi["grads"]) == 4
    assert multi["partitioned"] == (zero == "zero3")  # ZeRO-3 splits the parameters themselves
    print(f"\nDeepSpeed {zero}, 2 processes vs 1 (SGD lr {SGD['learning_rate']}):", end="")
    assert_same_training(mode, multi, one_process(mode), ranks)


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
    # SGD: the weights differ by lr x the summed gradient differences, 0.1 x 6 steps x ~1e-7 (float32 rounding of a
    # 2-process reduction) = 6e-8; 1e-6 leaves a margin of 16 while a wrong step (~lr x 1e-2) is far above it
    assert diff < 1e-6
