"""Which stage an optimizer step is in.

Stage 1 trains every completion token (ordinary SFT, or the weighted loss in ``weighted`` mode); stage 2 trains
only the key answer tokens. The stage is a pure function of the trainer's progress (completed optimizer steps, and
the epoch counter for an epoch-based switch), so it is exact per step, the same on every process, and survives
``resume_from_checkpoint`` (both are saved in the checkpoint's trainer state).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STAGE_ALL_TOKENS = 1
STAGE_KEY_ONLY = 2


@dataclass(frozen=True)
class StageSchedule:
    """``mode`` plus when stage 2 starts: after ``stage2_start`` optimizer steps, or, when ``stage2_epoch`` is set,
    with the first optimizer step that begins once ``stage2_epoch`` epochs are done."""

    mode: str
    stage2_start: int
    stage2_epoch: float | None = None

    def stage(self, global_step: int, epoch: float = 0.0) -> int:
        """The stage of the optimizer step that starts after ``global_step`` completed steps, at ``epoch`` (the
        trainer's ``state.epoch``: completed epochs plus the done fraction of the current one)."""
        if self.mode == "key_only":
            return STAGE_KEY_ONLY
        if self.mode == "weighted":
            return STAGE_ALL_TOKENS
        if self.stage2_epoch is not None:
            # state.epoch is exactly k.0 after the last step of epoch k; rounding absorbs the sum of fractions
            return STAGE_KEY_ONLY if round(epoch, 6) >= self.stage2_epoch else STAGE_ALL_TOKENS
        return STAGE_KEY_ONLY if global_step >= self.stage2_start else STAGE_ALL_TOKENS


def stage2_start_step(
    *,
    max_steps: int,
    num_train_epochs: float,
    ratio: float,
    steps: int | None = None,
    epoch: float | None = None,
) -> int:
    """The number of stage-1 optimizer steps: ``steps`` if given, else ``epoch`` or ``ratio`` converted to steps.

    An epoch converts through ``max_steps / num_train_epochs`` steps per epoch: that is only the planned start,
    for the log; the switch itself follows the trainer's real epoch counter (``StageSchedule.stage2_epoch``).
    """
    if steps is not None:
        return steps
    if epoch is not None:
        return math.ceil(round(epoch * max_steps / num_train_epochs, 6))
    return math.ceil(round(ratio * max_steps, 6))
