"""``SFTKeyCallback``: owns the stage schedule and reports it (and the data counts) in the training log."""

from __future__ import annotations

import logging

from transformers import TrainerCallback

from .config import SFTKeyArguments
from .schedule import STAGE_KEY_ONLY, StageSchedule, stage2_start_step
from .stats import KeyDataStats

logger = logging.getLogger("sftkey_plugin")


class SFTKeyCallback(TrainerCallback):
    """Decides which stage each optimizer step is in, from ``state.global_step`` alone (so it is exact per step and
    survives ``resume_from_checkpoint``), and logs the data counts and the stage switch.

    The SFTKey trainers add one built from their ``sftkey_*`` arguments; pass your own in ``callbacks=[...]`` to
    override the stage-2 start (``stage2_steps``/``stage2_ratio``/``stage2_epoch``) without touching the config.
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
        self.stage2_steps = stage2_steps if stage2_steps is not None else self.arguments.sftkey_stage2_steps
        self.stage2_ratio = stage2_ratio if stage2_ratio is not None else self.arguments.sftkey_stage2_ratio
        self.stage2_epoch = stage2_epoch if stage2_epoch is not None else self.arguments.sftkey_stage2_epoch
        self.schedule: StageSchedule | None = None
        self.data_stats: list[KeyDataStats] = []

    def resolve(self, max_steps: int, num_train_epochs: float) -> StageSchedule:
        """Fix the stage-2 start once the run length is known."""
        start = stage2_start_step(
            max_steps=max_steps,
            num_train_epochs=num_train_epochs,
            ratio=self.stage2_ratio,
            steps=self.stage2_steps,
            epoch=self.stage2_epoch,
        )
        self.schedule = StageSchedule(self.arguments.sftkey_mode, start)
        return self.schedule

    def stage(self, global_step: int) -> int:
        """The stage of the optimizer step that follows ``global_step`` completed steps."""
        if self.schedule is None:  # before training (e.g. an evaluation first): only key_only is in stage 2
            return StageSchedule(self.arguments.sftkey_mode, 1 << 62).stage(global_step)
        return self.schedule.stage(global_step)

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        schedule = self.resolve(state.max_steps, state.num_train_epochs)
        if state.is_world_process_zero:
            for stats in self.data_stats:
                logger.info(stats.summary_line())
            if schedule.mode == "two_stage":
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

    def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if (
            self.schedule is not None
            and self.schedule.mode == "two_stage"
            and state.global_step == self.schedule.stage2_start
            and state.global_step < state.max_steps
            and state.is_world_process_zero
        ):
            logger.info(
                "SFTKey: stage %d (key answer tokens only) from optimizer step %d.",
                STAGE_KEY_ONLY,
                state.global_step + 1,
            )
        return control
