"""Which stage an optimizer step is in.

Stage 1 trains every completion token (ordinary SFT, or the weighted loss in ``weighted`` mode); stage 2 trains
only the key answer tokens. The stage is a pure function of the optimizer step, so it is exact per step, the
same on every process, and survives ``resume_from_checkpoint``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

STAGE_ALL_TOKENS = 1
STAGE_KEY_ONLY = 2


@dataclass(frozen=True)
class StageSchedule:
    """``mode`` plus the first optimizer step (0-based) of stage 2."""

    mode: str
    stage2_start: int

    def stage(self, global_step: int) -> int:
        """The stage of the optimizer step that starts after ``global_step`` completed steps."""
        if self.mode == "key_only":
            return STAGE_KEY_ONLY
        if self.mode == "weighted":
            return STAGE_ALL_TOKENS
        return STAGE_KEY_ONLY if global_step >= self.stage2_start else STAGE_ALL_TOKENS


def stage2_start_step(
    *,
    max_steps: int,
    num_train_epochs: float,
    ratio: float,
    steps: int | None = None,
    epoch: float | None = None,
) -> int:
    """First optimizer step of stage 2: ``steps`` if given, else ``epoch`` converted to steps, else ``ratio``.

    Epochs convert through ``max_steps / num_train_epochs`` steps per epoch, exact when the run is set by epochs.
    """
    if steps is not None:
        return steps
    if epoch is not None:
        return math.ceil(round(epoch * max_steps / num_train_epochs, 6))
    return math.ceil(round(ratio * max_steps, 6))
