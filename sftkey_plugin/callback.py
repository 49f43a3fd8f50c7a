"""``SFTKeyCallback``: owns the stage schedule and reports it (and the data counts) in the training log."""

from __future__ import annotations

import logging

from transformers import TrainerCallback, TrainerState

from .config import SFTKeyArguments
from .schedule import STAGE_KEY_ONLY, StageSchedule, stage2_start_step
from .stats import KeyDataStats

logger = logging.getLogger("sftkey_plugin")


class SFTKeyCallback(TrainerCallback):
    """Decides which stage each optimizer step is in, from the trainer state alone (``global_step``, and ``epoch``
    for an epoch-based switch; so it is exact per step and survives ``resume_from_checkpoint``), and logs the data
    counts and the stage switch.

    The SFTKey trainers add one built from their ``sftkey_*`` arguments; pass your own in ``callbacks=[...]`` to
    override the stage-2 start without touching the config. Only the arguments given override: with none, the
    config's ``sftkey_stage2_*`` values apply.

    Args:
        arguments (`SFTKeyArguments`, *optional*): the SFTKey options; the trainer sets its own.
        stage2_steps (`int`, *optional*): the number of stage-1 optimizer steps; stage 2 starts with the next one.
        stage2_ratio (`float`, *optional*): stage 2 starts after this fraction of the optimizer steps.
        stage2_epoch (`float`, *optional*): stage 2 starts once this many epochs are done.
    """

    def __init__(
        self,
        arguments: SFTKeyArguments | None = None,
        *,
        stage2_steps: int | None = None,
        stage2_ratio: float | None = None,
        stage2_epoch: float | None = None,
    ) -> None:
        self.arguments = arguments or SFTKeyArguments(sftkey=True)
        # Only what is given here overrides the config: the trainer replaces ``arguments`` with its own later
        self.overrides = (stage2_steps, stage2_ratio, stage2_epoch)
        self.schedule: StageSchedule | None = None
        self.data_stats: list[KeyDataStats] = []
        self._step_stage: int | None = None  # the stage of the optimizer step in progress

    def _stage2_start(self) -> tuple[int | None, float, float | None]:
        """``(steps, ratio, epoch)`` of the stage-2 start: the callback's own if any was given, else the config's."""
        steps, ratio, epoch = self.overrides
        arguments = self.arguments
        if steps is None and ratio is None and epoch is None:
            return arguments.sftkey_stage2_steps, arguments.sftkey_stage2_ratio, arguments.sftkey_stage2_epoch
        return steps, arguments.sftkey_stage2_ratio if ratio is None else ratio, epoch

    def resolve(self, max_steps: int, num_train_epochs: float) -> StageSchedule:
        """Fix the stage-2 start once the run length is known."""
        steps, ratio, epoch = self._stage2_start()
        epoch = None if steps is not None else epoch  # steps take precedence, as in the config
        start = stage2_start_step(
            max_steps=max_steps, num_train_epochs=num_train_epochs, ratio=ratio, steps=steps, epoch=epoch
        )
        self.schedule = StageSchedule(self.arguments.sftkey_mode, start, epoch)
        return self.schedule

    def stage(self, state: TrainerState) -> int:
        """The stage of the optimizer step that follows ``state.global_step`` completed steps."""
        if self.schedule is None:  # before training (e.g. an evaluation first): only key_only is in stage 2
            return StageSchedule(self.arguments.sftkey_mode, 1 << 62).stage(state.global_step)
        return self.schedule.stage(state.global_step, state.epoch or 0.0)

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        schedule = self.resolve(state.max_steps, state.num_train_epochs)
        if state.is_world_process_zero:
            for stats in self.data_stats:
                logger.info(stats.summary_line())
            if schedule.mode == "two_stage" and schedule.stage2_epoch is not None:
                logger.info(
                    "SFTKey two_stage: every completion token until epoch %g is done (about %d of %d optimizer steps), "
                    "then only the key answer tokens.",
                    schedule.stage2_epoch,
                    schedule.stage2_start,
                    state.max_steps,
                )
            elif schedule.mode == "two_stage":
                logger.info(
                    "SFTKey two_stage: optimizer steps 1-%d train every completion token, steps %d-%d only the key "
                    "answer tokens.",
                    min(schedule.stage2_start, state.max_steps),
                    schedule.stage2_start + 1,
                    state.max_steps,
                )
                if schedule.stage2_start >= state.max_steps:
                    logger.warning(
                        "SFTKey: stage 2 starts at step %d, after the last step: it never runs.",
                        schedule.stage2_start + 1,
                    )
        return control

    def on_step_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        self._step_stage = self.stage(state)
        return control

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        # announced when a stage-1 step is followed by a stage-2 one (not after resuming inside stage 2)
        switching = self._step_stage != STAGE_KEY_ONLY and self.stage(state) == STAGE_KEY_ONLY
        if switching and state.global_step < state.max_steps and state.is_world_process_zero:
            logger.info(
                "SFTKey: stage %d (key answer tokens only) from optimizer step %d.",
                STAGE_KEY_ONLY,
                state.global_step + 1,
            )
        return control
