"""A test-only Axolotl plugin (``plugins: [axolotl_recorder.TrainingRecorder, ...]``, with ``tests/`` on the path).

It records an Axolotl run the way ``multiprocess_worker.run_mode`` records a TRL run, so both go through the same
comparison. Each process saves ``<output_dir>/record-rank<RANK>.pt`` when training ends.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch
from axolotl.integrations.base import BasePlugin
from multiprocess_worker import GradientRecorder, record_micro_batches, training_record
from transformers import TrainerCallback


class _SaveRecord(TrainerCallback):
    def __init__(self, trainer: Any, gradients: GradientRecorder) -> None:
        self.trainer, self.gradients = trainer, gradients

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        rank = os.environ.get("RANK", "0")
        torch.save(training_record(self.trainer, self.gradients), Path(args.output_dir) / f"record-rank{rank}.pt")


class TrainingRecorder(BasePlugin):
    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[TrainerCallback]:
        record_micro_batches(trainer)
        gradients = GradientRecorder()
        return [gradients, _SaveRecord(trainer, gradients)]
