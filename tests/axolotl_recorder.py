"""Test-only Axolotl plugins (``plugins: [axolotl_recorder.TrainingRecorder, ...]``, with ``tests/`` on the path).

``TrainingRecorder`` records an Axolotl run the way ``multiprocess_worker.run_mode`` records a TRL run, so both go
through the same comparison; each process saves ``<output_dir>/record-rank<RANK>.pt`` when training ends.
``BatchRecorder`` also keeps the tensors of every training micro-batch as the loss received them (``batches``).
``StallAfterCheckpointPlugin`` makes a run hang after a checkpoint, to be killed. ``AllowFSDPOnCPU`` lets an
``fsdp_config`` run really shard on CPU processes (``sharded_worker.allow_fsdp_on_cpu``). Each of them gives its
process the tests' clean exit (``process_exit``), which the tests check for every process of the run.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import process_exit
import torch
from axolotl.integrations.base import BasePlugin
from multiprocess_worker import GradientRecorder, StallAfterCheckpoint, record_micro_batches, training_record
from sharded_worker import allow_fsdp_on_cpu
from transformers import TrainerCallback


class _SaveRecord(TrainerCallback):
    def __init__(self, trainer: Any, gradients: GradientRecorder) -> None:
        self.trainer, self.gradients = trainer, gradients

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        rank = os.environ.get("RANK", "0")
        record = {**training_record(self.trainer, self.gradients), "batches": getattr(self.trainer, "batches", None)}
        torch.save(record, Path(args.output_dir) / f"record-rank{rank}.pt")


class CleanExitPlugin(BasePlugin):
    """Installs ``process_exit`` in every process of the run (Axolotl's own ``cleanup_distributed`` destroys the group,
    which DeepSpeed's captured default argument keeps alive)."""

    def register(self, cfg: Any) -> None:
        process_exit.install()


class TrainingRecorder(CleanExitPlugin):
    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[TrainerCallback]:
        record_micro_batches(trainer)
        gradients = GradientRecorder()
        return [gradients, _SaveRecord(trainer, gradients)]


class BatchRecorder(TrainingRecorder):
    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[TrainerCallback]:
        callbacks = super().add_callbacks_post_trainer(cfg, trainer)
        compute_loss = trainer.compute_loss
        trainer.batches = []

        def recording(model, inputs, return_outputs=False, num_items_in_batch=None):  # type: ignore[no-untyped-def]
            if trainer.model.training:  # copied before the loss takes the SFTKey columns out
                trainer.batches.append({k: v.detach().clone() for k, v in inputs.items() if torch.is_tensor(v)})
            return compute_loss(model, inputs, return_outputs, num_items_in_batch)

        trainer.compute_loss = recording
        return callbacks


class StallAfterCheckpointPlugin(CleanExitPlugin):
    """With ``SFTKEY_STALL_AFTER_CHECKPOINT=STEP:READY_FILE`` set: once checkpoint-STEP is written, write READY_FILE
    and hang, so a test can kill the run with a real signal (``multiprocess_worker.StallAfterCheckpoint``). Without
    it, nothing: the killed run and its reruns share one config."""

    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[TrainerCallback]:
        if "SFTKEY_STALL_AFTER_CHECKPOINT" not in os.environ:
            return []
        step, ready_file = os.environ["SFTKEY_STALL_AFTER_CHECKPOINT"].split(":", 1)
        return [StallAfterCheckpoint(int(step), ready_file)]


class AllowFSDPOnCPU(CleanExitPlugin):
    """Applies the test-only accelerate patch in every process, before the trainer builds its ``Accelerator``."""

    def register(self, cfg: Any) -> None:
        super().register(cfg)
        allow_fsdp_on_cpu()
