"""Sharded runs on CPU processes (FSDP2, DeepSpeed ZeRO), launched by ``test_sharded.py``; ``allow_fsdp_on_cpu`` also
serves the Axolotl runs (``axolotl_recorder.AllowFSDPOnCPU``).

``torchrun --nproc_per_node 2 tests/sharded_worker.py interrupt TINY_DIR OUT_DIR READY_FILE``: a two-stage FSDP2 run
with sharded checkpoints that stalls after writing checkpoint-4 (mid-stage-2), for the test to kill.
``torchrun --nproc_per_node 2 tests/sharded_worker.py modes TINY_DIR OUT_DIR RESUME_DIR``: every SFTKey mode and
weighted with data weights (``FSDP_RUNS``), then LoRA, under FSDP2 (saved to ``OUT_DIR/<name>.pt`` as
``multiprocess_worker`` saves its DDP runs), then the killed run resumed from its sharded checkpoint
(``OUT_DIR/resumed.pt``). One launch for all: each costs ~20 s of imports.
``torchrun --nproc_per_node 2 tests/sharded_worker.py deepspeed TINY_DIR OUT_DIR`` (with ``DS_ACCELERATOR=cpu``): every
mode under ZeRO-2 and ZeRO-3.
"""

from __future__ import annotations

import json
import os
import sys
import time
from pathlib import Path
from typing import Any

import process_exit
import torch
import torch.distributed as dist
from multiprocess_worker import (
    GLOBAL_BATCH,
    INTERRUPT_ARGS,
    INTERRUPT_AT,
    MODES,
    comparable,
    interrupt_records,
    run_mode,
)
from test_trl import trainer_for
from transformers import TrainerCallback

# Plain SGD: the update is linear in the gradient, so weights compare to lr x the gradient difference (AdamW moves a
# near-zero gradient's parameter by ~lr whichever way a 1e-7 rounding difference points). lr large enough that the
# 4 steps change the losses measurably.
SGD = {"optim": "sgd", "learning_rate": 0.1}
RECIPES = Path(__file__).resolve().parents[1] / "recipes"
# the FSDP2 runs: every mode, and weighted with weights from the data (multiprocess_worker.RUNS; not under ZeRO)
FSDP_RUNS = [*MODES, "weighted_data"]


def recipe_fsdp_config() -> dict[str, Any]:
    """The FSDP2 block of the TRL recipes' accelerate config (``fsdp_*`` keys, as the Trainer's ``fsdp_config``
    accepts them) with sharded checkpoints: saving a FULL_STATE_DICT checkpoint fails on CPU processes in the stock
    Trainer ("Attempted to access the data pointer on an invalid python storage", see the README)."""
    import yaml

    config = yaml.safe_load((RECIPES / "trl" / "accelerate" / "fsdp2_8gpu.yaml").read_text(encoding="utf-8"))
    block = dict(config["fsdp_config"])
    assert block["fsdp_version"] == 2 and block["fsdp_state_dict_type"] == "FULL_STATE_DICT"
    return {**block, "fsdp_state_dict_type": "SHARDED_STATE_DICT"}


def recipe_zero_configs() -> dict[str, dict[str, Any]]:
    """ZeRO-3: the recipes' DeepSpeed config in float32 (the CPU processes compare with a float32 run); ZeRO-2: the
    same with stage 2 and without the stage-3 keys."""
    zero3 = json.loads((RECIPES / "axolotl" / "deepspeed" / "zero3_bf16.json").read_text(encoding="utf-8"))
    assert zero3.pop("bf16") == {"enabled": True}
    optimization = {k: v for k, v in zero3["zero_optimization"].items() if k in ZERO2_KEYS}
    return {"zero2": {**zero3, "zero_optimization": {**optimization, "stage": 2}}, "zero3": zero3}


ZERO2_KEYS = ("overlap_comm", "contiguous_gradients", "reduce_bucket_size")
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}


def allow_fsdp_on_cpu() -> None:
    """Let accelerate choose FSDP for CPU processes when an FSDP plugin is given (test-only).

    accelerate never does by itself: on CPU the Trainer silently trains DDP with ``fsdp`` set. torch's FSDP2 runs on
    gloo, so with this the Trainer's real FSDP2 path (``fully_shard``, DTensor parameters, sharded checkpoints)
    runs on CPU; callers assert that the model really was sharded. Axolotl 0.19 also builds its device mesh on
    "cuda" whatever the machine has: without CUDA it is built on "cpu" here."""
    import accelerate.state as state
    from accelerate.parallelism_config import ParallelismConfig
    from accelerate.utils import DistributedType

    init, build_mesh = state.AcceleratorState.__init__, ParallelismConfig.build_device_mesh
    if getattr(init, "allows_fsdp_on_cpu", False):
        return

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if kwargs.get("fsdp_plugin") is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, kwargs["fsdp_plugin"]

    def mesh_on_cpu(self: Any, device_type: str) -> Any:
        return build_mesh(self, device_type if torch.cuda.is_available() else "cpu")

    patched.allows_fsdp_on_cpu = True  # type: ignore[attr-defined]
    state.AcceleratorState.__init__ = patched
    ParallelismConfig.build_device_mesh = mesh_on_cpu


def allow_deepspeed_on_cpu() -> None:
    """Give DeepSpeed on CPU processes a gloo process group of every process (test-only).

    Without CUDA accelerate finds no backend for a DeepSpeed launch and counts 1 process (each process then trains
    alone and DeepSpeed's batch check fails); ``ACCELERATE_USE_CPU`` instead turns DeepSpeed off (plain DDP). With
    ``DS_ACCELERATOR=cpu`` DeepSpeed itself runs on gloo. Its CPU accelerator would also compile a C++ shared-memory
    all-reduce on first use (minutes on 2 cores, and a compiler): plain gloo collectives serve here."""
    import importlib

    import accelerate.state as state
    from accelerate.utils import DistributedType

    # by module path: the attribute deepspeed.comm.torch is the torch library (re-exported by deepspeed.comm)
    importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None

    prepare = state.PartialState._prepare_backend
    if getattr(prepare, "allows_deepspeed_on_cpu", False):
        return

    def patched(self: Any, cpu: bool = False, sagemaker_dp: bool = False, backend: str | None = None) -> Any:
        chosen = prepare(self, cpu, sagemaker_dp, backend)
        if chosen[0] is None and os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true" and "LOCAL_RANK" in os.environ:
            return "gloo", DistributedType.MULTI_CPU
        return chosen

    patched.allows_deepspeed_on_cpu = True  # type: ignore[attr-defined]
    state.PartialState._prepare_backend = patched


class DeepSpeedSteps:
    """Each optimizer step's full gradients and the full weights after it, from every DeepSpeed engine once installed;
    ``partitioned``: whether ZeRO-3 had split the parameters.

    The engine steps inside ``backward`` and ZeRO keeps gradients (and under ZeRO-3 weights) partitioned, so
    ``GradientRecorder`` sees none: they are gathered just before and after ``DeepSpeedEngine.step``."""

    def __init__(self) -> None:
        self.gradients: list[dict[str, torch.Tensor]] = []
        self.weights: dict[str, torch.Tensor] = {}
        self.partitioned = False

    def install(self) -> None:
        from deepspeed.runtime.engine import DeepSpeedEngine
        from deepspeed.utils import safe_get_full_fp32_param, safe_get_full_grad

        step = DeepSpeedEngine.step

        def recording(engine: Any, *args: Any, **kwargs: Any) -> Any:
            parameters = list(engine.module.named_parameters())
            # ZeRO-3 parameters (ds_id), the large ones split away (parameters under the persistence threshold stay)
            self.partitioned = all(hasattr(p, "ds_id") for _, p in parameters) and any(
                p.numel() == 0 for _, p in parameters
            )
            if engine.is_gradient_accumulation_boundary():
                self.gradients.append({n: safe_get_full_grad(p).clone() for n, p in parameters if p.requires_grad})
            result = step(engine, *args, **kwargs)
            self.weights = {n: safe_get_full_fp32_param(p).clone() for n, p in parameters}
            return result

        DeepSpeedEngine.step = recording


def fsdp_arguments() -> dict[str, Any]:
    """The Trainer arguments of the FSDP2 runs."""
    return {"fsdp": True, "fsdp_config": recipe_fsdp_config()}


def lora_config() -> Any:
    """The LoRA adapter of the LoRA comparison (peft imported late: the DDP worker does not need it)."""
    from peft import LoraConfig

    return LoraConfig(**LORA)


class StallAllAfterCheckpoint(TrainerCallback):
    """Once checkpoint-``step`` is complete on every process, rank 0 writes all their process ids to ``ready_file``
    and every process hangs in the next step until the test kills them (``StallAfterCheckpoint`` for a group)."""

    def __init__(self, step: int, ready_file: str) -> None:
        self.step, self.ready_file = step, ready_file

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if state.global_step == self.step:
            pids: list[Any] = [None] * dist.get_world_size()
            dist.all_gather_object(pids, os.getpid())  # also the barrier: every process has saved its shard
            if dist.get_rank() == 0:
                Path(self.ready_file).write_text(" ".join(map(str, pids)))
            time.sleep(600)
        return control


def interrupted_trainer(tiny_dir: str, out_dir: str, **overrides: Any) -> Any:
    """The two_stage FSDP2 run of the interruption test (2 rows per process, sharded checkpoint every 2 steps)."""
    return trainer_for(tiny_dir, interrupt_records(), out_dir, save_strategy="steps", per_device_train_batch_size=2,
                       **INTERRUPT_ARGS, **SGD, **fsdp_arguments(), **overrides)  # fmt: skip


def main_interrupt(tiny_dir: str, out_dir: str, ready_file: str) -> None:
    """The run that gets killed, stalling after checkpoint-4."""
    allow_fsdp_on_cpu()
    trainer = interrupted_trainer(tiny_dir, out_dir)
    trainer.add_callback(StallAllAfterCheckpoint(INTERRUPT_AT, ready_file))
    trainer.train()


def main_modes(tiny_dir: str, out_dir: str, resume_dir: str) -> None:
    """Every run of ``FSDP_RUNS`` and LoRA under FSDP2, then the resumed run; rank 0 saves the records, each rank its
    micro-batches."""
    allow_fsdp_on_cpu()
    rank = int(os.environ["RANK"])
    runs: dict[str, tuple[str, dict[str, Any]]] = {mode: (mode, {}) for mode in FSDP_RUNS}
    runs["lora"] = ("two_stage", {"peft_config": lora_config()})
    for name, (mode, options) in runs.items():
        torch.manual_seed(0)  # the LoRA init (TRL wraps the model before the Trainer seeds anything)
        out = str(Path(out_dir) / f"run-{name}")
        result = run_mode(tiny_dir, out, mode, GLOBAL_BATCH // 2, **SGD, **fsdp_arguments(), **options)
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{name}.pt")
        torch.save(result["micro_batches"], Path(out_dir) / f"{name}-rank{rank}.pt")
    resumed = interrupted_trainer(tiny_dir, resume_dir)
    resumed.train(resume_from_checkpoint=True)
    weights = comparable({n: p.detach() for n, p in resumed.model.named_parameters()})
    if rank == 0:
        torch.save({"logs": resumed.state.log_history, "weights": weights}, Path(out_dir) / "resumed.pt")


def main_deepspeed(tiny_dir: str, out_dir: str) -> None:
    """Every mode under ZeRO-2 and ZeRO-3 (``OUT_DIR/<zero>-<mode>.pt``, micro-batches per rank as ``main_modes``)."""
    allow_deepspeed_on_cpu()
    steps = DeepSpeedSteps()
    steps.install()
    rank = int(os.environ["RANK"])
    for zero, config in recipe_zero_configs().items():
        for mode in MODES:
            steps.gradients = []
            out = str(Path(out_dir) / f"run-{zero}-{mode}")
            result = run_mode(tiny_dir, out, mode, GLOBAL_BATCH // 2, **SGD, deepspeed=config)
            result.update(grads=steps.gradients, weights=steps.weights, partitioned=steps.partitioned)
            if rank == 0:
                torch.save(result, Path(out_dir) / f"{zero}-{mode}.pt")
            torch.save(result["micro_batches"], Path(out_dir) / f"{zero}-{mode}-rank{rank}.pt")


if __name__ == "__main__":
    process_exit.install()
    command, *arguments = sys.argv[1:]
    {"modes": main_modes, "interrupt": main_interrupt, "deepspeed": main_deepspeed}[command](*arguments)
    process_exit.end_process_group()
