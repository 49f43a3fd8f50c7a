"""Which weights an optimizer step gives the key and the other completion tokens.

Every mode is a list of phases, each starting at a point of training with its own key and other weight:
``two_stage`` is ``[(0, 1, 1), (stage-2 start, 1, 0)]``, ``key_only`` ``[(0, 1, 0)]``, ``weighted``
``[(0, key, other)]``, and ``phases`` is the user's own list, held or linearly interpolated between starts. The
weights are a pure function of the trainer's progress (completed optimizer steps, and the epoch counter for
epoch starts), so they are exact per step, the same on every process, and survive ``resume_from_checkpoint``
(both are saved in the checkpoint's trainer state).

A step whose other weight is 0 is in stage 2 (key tokens only), any other in stage 1, as the paper numbers them.
"""

from __future__ import annotations

import bisect
import math
from dataclasses import dataclass

STAGE_ALL_TOKENS = 1
STAGE_KEY_ONLY = 2


def weighs(key_weight: float, other_weight: float) -> bool:
    """Whether these weights weigh a trained token other than 1 (a weight of 0 masks the label instead), which needs
    the loss path's per-token losses."""
    return any(w not in (0.0, 1.0) for w in (key_weight, other_weight))


@dataclass(frozen=True)
class Phase:
    """From ``start`` on (completed optimizer steps, or epochs done in an epoch schedule) until the next phase,
    key tokens weigh ``key_weight`` and the other completion tokens ``other_weight``."""

    start: float
    key_weight: float
    other_weight: float


@dataclass(frozen=True)
class PhasePoint:
    """The weights of one optimizer step and the phase it is in (1-based)."""

    phase: int
    key_weight: float
    other_weight: float

    @property
    def stage(self) -> int:
        return STAGE_KEY_ONLY if self.other_weight == 0 else STAGE_ALL_TOKENS

    @property
    def weights(self) -> tuple[float, float]:
        return self.key_weight, self.other_weight


@dataclass(frozen=True)
class PhaseSchedule:
    """The phases in order of ``start`` (the first at 0); ``in_epochs``: starts are epochs done, not optimizer
    steps; ``linear``: weights move linearly from one phase's start to the next instead of jumping there."""

    phases: tuple[Phase, ...]
    in_epochs: bool = False
    linear: bool = False

    def at(self, global_step: int, epoch: float = 0.0) -> PhasePoint:
        """The weights of the optimizer step that starts after ``global_step`` completed steps, at ``epoch`` (the
        trainer's ``state.epoch``: completed epochs plus the done fraction of the current one)."""
        # state.epoch is exactly k.0 after the last step of epoch k; rounding absorbs the sum of fractions
        position = round(epoch, 6) if self.in_epochs else float(global_step)
        index = max(bisect.bisect_right([phase.start for phase in self.phases], position) - 1, 0)
        phase = self.phases[index]
        if not self.linear or index + 1 == len(self.phases):
            return PhasePoint(index + 1, phase.key_weight, phase.other_weight)
        following = self.phases[index + 1]
        done = (position - phase.start) / (following.start - phase.start)
        return PhasePoint(
            index + 1,
            phase.key_weight + done * (following.key_weight - phase.key_weight),
            phase.other_weight + done * (following.other_weight - phase.other_weight),
        )

    def stage(self, global_step: int, epoch: float = 0.0) -> int:
        return self.at(global_step, epoch).stage


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
    for the log; the switch itself follows the trainer's real epoch counter (``PhaseSchedule.in_epochs``).
    """
    if steps is not None:
        return steps
    if epoch is not None:
        return math.ceil(round(epoch * max_steps / num_train_epochs, 6))
    return math.ceil(round(ratio * max_steps, 6))


def describe(schedule: PhaseSchedule, max_steps: int, num_train_epochs: float) -> str:
    """The weights of each part of training, in one line for the log."""
    parts = []
    for index, phase in enumerate(schedule.phases):
        if schedule.in_epochs:
            step = stage2_start_step(max_steps=max_steps, num_train_epochs=num_train_epochs, ratio=0, epoch=phase.start)
            when = f"once {phase.start:g} epochs are done (about step {step + 1})" if phase.start else "from step 1"
        else:
            end = schedule.phases[index + 1].start if index + 1 < len(schedule.phases) else max_steps
            when = f"steps {int(phase.start) + 1}-{min(int(end), max_steps)}"
        only_key = " (key answer tokens only)" if phase.other_weight == 0 else ""
        parts.append(f"{when}: key tokens x{phase.key_weight:g}, other tokens x{phase.other_weight:g}{only_key}")
    return ("; then linearly to " if schedule.linear else "; ").join(parts)


def epoch_after(steps: int, batches_per_epoch: int, accumulation: int) -> float:
    """The trainer's epoch counter (``state.epoch``) after ``steps`` optimizer steps, as transformers counts it: each
    epoch has ``batches_per_epoch`` batches, ``accumulation`` to a step, its last step taking the batches left."""
    steps_per_epoch = math.ceil(batches_per_epoch / accumulation)
    epochs, within = divmod(steps, steps_per_epoch)
    return epochs + min(within * accumulation, batches_per_epoch) / batches_per_epoch


def unreached_phases(
    schedule: PhaseSchedule, max_steps: int, num_train_epochs: float, last_step_epoch: float | None
) -> list[int]:
    """The (1-based) phases that start after the last optimizer step has begun: at step ``max_steps`` or later, or in
    an epoch schedule past ``last_step_epoch``, the epoch counter when the last step begins (``epoch_after(max_steps -
    1, ...)``: below ``num_train_epochs`` where ``max_steps`` ends the run first); where that is not known, at
    ``num_train_epochs`` (the epochs the trainer begins) or later."""
    if not schedule.in_epochs:
        return [index + 1 for index, phase in enumerate(schedule.phases) if phase.start >= max_steps]
    if last_step_epoch is None:
        return [index + 1 for index, phase in enumerate(schedule.phases) if phase.start >= num_train_epochs]
    return [index + 1 for index, phase in enumerate(schedule.phases) if phase.start > round(last_step_epoch, 6)]
