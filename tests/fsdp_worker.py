"""FSDP2 runs on CPU processes, launched by ``test_fsdp.py`` (and, for ``allow_fsdp_on_cpu``, by Axolotl runs).

``torchrun --nproc_per_node 2 tests/fsdp_worker.py interrupt TINY_DIR OUT_DIR READY_FILE``: a two-stage FSDP2 run with
sharded checkpoints that stalls after writing checkpoint-4 (mid-stage-2), for the test to kill.
``torchrun --nproc_per_node 2 tests/fsdp_worker.py modes TINY_DIR OUT_DIR RESUME_DIR``: every SFTKey mode, then LoRA,
under FSDP2 (saved to ``OUT_DIR/<name>.pt`` as ``multiprocess_worker`` saves its DDP runs), then the killed run
resumed from its sharded checkpoint (``OUT_DIR/resumed.pt``). One launch for all: each costs ~20 s of imports.
"""

from __future__ import annotations

import os
import sys
import time
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from multiprocess_worker import (
    GLOBAL_BATCH,
    INTERRUPT_ARGS,
    INTERRUPT_AT,
    MODES,
    full,
    interrupt_records,
    run_mode,
)
from test_trl import trainer_for
from transformers import TrainerCallback

# Plain SGD: the update is linear in the gradient, so weights compare to lr x the gradient difference (AdamW moves a
# near-zero gradient's parameter by ~lr whichever way a 1e-7 rounding difference points). lr large enough that the
# 4 steps change the losses measurably.
SGD = {"optim": "sgd", "learning_rate": 0.1}
FSDP_CONFIG = {
    # the recipes' FSDP2 block (recipes/trl/accelerate/fsdp2_8gpu.yaml), on the tiny Llama's decoder layers
    "version": 2,
    "auto_wrap_policy": "TRANSFORMER_BASED_WRAP",
    "transformer_layer_cls_to_wrap": ["LlamaDecoderLayer"],
    "reshard_after_forward": True,
    "cpu_ram_efficient_loading": False,
    "state_dict_type": "SHARDED_STATE_DICT",
}
FSDP = {"fsdp": "full_shard", "fsdp_config": FSDP_CONFIG}
LORA = {"r": 4, "lora_alpha": 8, "lora_dropout": 0.0, "target_modules": "all-linear", "task_type": "CAUSAL_LM"}


def allow_fsdp_on_cpu() -> None:
    """Let accelerate choose FSDP for CPU processes when an FSDP plugin is given (test-only).

    accelerate never does by itself: on CPU the Trainer silently trains DDP with ``fsdp`` set. torch's FSDP2 runs on
    gloo, so with this the Trainer's real FSDP2 path (``fully_shard``, DTensor parameters, sharded checkpoints)
    runs on CPU; callers assert that the model really was sharded."""
    import accelerate.state as state
    from accelerate.utils import DistributedType

    init = state.AcceleratorState.__init__
    if getattr(init, "allows_fsdp_on_cpu", False):
        return

    def patched(self: Any, *args: Any, **kwargs: Any) -> None:
        init(self, *args, **kwargs)
        if kwargs.get("fsdp_plugin") is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type, self.fsdp_plugin = DistributedType.FSDP, kwargs["fsdp_plugin"]

    patched.allows_fsdp_on_cpu = True  # type: ignore[attr-defined]
    state.AcceleratorState.__init__ = patched


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
                       **INTERRUPT_ARGS, **SGD, **FSDP, **overrides)  # fmt: skip


def main_interrupt(tiny_dir: str, out_dir: str, ready_file: str) -> None:
    """The run that gets killed, stalling after checkpoint-4."""
    allow_fsdp_on_cpu()
    trainer = interrupted_trainer(tiny_dir, out_dir)
    trainer.add_callback(StallAllAfterCheckpoint(INTERRUPT_AT, ready_file))
    trainer.train()


def main_modes(tiny_dir: str, out_dir: str, resume_dir: str) -> None:
    """Every mode and LoRA under FSDP2, then the resumed run; rank 0 saves the records, each rank its micro-batches."""
    allow_fsdp_on_cpu()
    rank = int(os.environ["RANK"])
    runs: dict[str, tuple[str, dict[str, Any]]] = {mode: (mode, {}) for mode in MODES}
    runs["lora"] = ("two_stage", {"peft_config": lora_config()})
    for name, (mode, options) in runs.items():
        torch.manual_seed(0)  # the LoRA init (TRL wraps the model before the Trainer seeds anything)
        out = str(Path(out_dir) / f"run-{name}")
        result = run_mode(tiny_dir, out, mode, GLOBAL_BATCH // 2, **SGD, **FSDP, **options)
        if rank == 0:
            torch.save(result, Path(out_dir) / f"{name}.pt")
        torch.save(result["micro_batches"], Path(out_dir) / f"{name}-rank{rank}.pt")
    resumed = interrupted_trainer(tiny_dir, resume_dir)
    resumed.train(resume_from_checkpoint=True)
    weights = full({n: p.detach() for n, p in resumed.model.named_parameters()})
    if rank == 0:
        torch.save({"logs": resumed.state.log_history, "weights": weights}, Path(out_dir) / "resumed.pt")


if __name__ == "__main__":
    command, *arguments = sys.argv[1:]
    {"modes": main_modes, "interrupt": main_interrupt}[command](*arguments)
