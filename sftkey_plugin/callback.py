"""``SFTKeyCallback``: owns the stage schedule and reports it (and the data counts) in the training log."""

from __future__ import annotations

import itertools
import logging
import sys
from types import FrameType
from typing import Any

from transformers import Trainer, TrainerCallback, TrainerState

from .config import SFTKeyArguments, mode_weights, parse_phases
from .schedule import (
    STAGE_KEY_ONLY,
    Phase,
    PhasePoint,
    PhaseSchedule,
    describe,
    epoch_after,
    stage2_start_step,
    unreached_phases,
)
from .stats import KeyDataStats

logger = logging.getLogger("sftkey_plugin")


class SFTKeyCallback(TrainerCallback):
    """Decides the weights (and so the stage) of each optimizer step from the trainer state alone (``global_step``,
    and ``epoch`` for epoch starts; so they are exact per step and survive ``resume_from_checkpoint``), and logs the
    data counts, the schedule and the stage switch.

    The SFTKey trainers add one built from their ``sftkey_*`` arguments; pass your own in ``callbacks=[...]`` to
    override the ``two_stage`` stage-2 start without touching the config. Only the arguments given override: with
    none, the config's ``sftkey_stage2_*`` values apply.

    Passed to a stock ``trl.SFTTrainer``, it makes that trainer train SFTKey with ``arguments`` (default: the
    paper's ``two_stage``) when training begins: the key mask is made from each row's own tokens and the trainer
    gets ``SFTKeyTrainer``'s loss, schedule and metrics. What it cannot do that way it refuses before the first
    step (``sftkey_on_missing='drop'``, rows that reach ``max_length``), naming ``SFTKeyTrainer``; on any other
    trainer it refuses too. It never lets a run go on as plain SFT.

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
        self.schedule: PhaseSchedule | None = None
        self.data_stats: list[KeyDataStats] = []
        self._step_stage: int | None = None  # the stage of the optimizer step in progress
        # the batches of an epoch as the trainer counts them, set by the SFTKey trainers when training begins
        self.batches_per_epoch: int | None = None
        self.bound = False  # set by the SFTKey trainer that adopts this callback

    def _stage2_start(self) -> tuple[int | None, float, float | None]:
        """``(steps, ratio, epoch)`` of the stage-2 start: the callback's own if any was given, else the config's."""
        steps, ratio, epoch = self.overrides
        arguments = self.arguments
        if steps is None and ratio is None and epoch is None:
            return arguments.sftkey_stage2_steps, arguments.sftkey_stage2_ratio, arguments.sftkey_stage2_epoch
        return steps, arguments.sftkey_stage2_ratio if ratio is None else ratio, epoch

    def resolve(self, max_steps: int, num_train_epochs: float) -> PhaseSchedule:
        """Fix the phase starts once the run length is known."""
        arguments = self.arguments
        weights = mode_weights(arguments)
        if arguments.sftkey_mode == "phases":
            if any(value is not None for value in self.overrides):
                raise ValueError(
                    "SFTKeyCallback(stage2_steps/stage2_ratio/stage2_epoch) moves the two_stage switch; with "
                    "sftkey_mode='phases' set the starts in sftkey_phases instead."
                )
            unit = arguments.sftkey_phase_unit
            starts = [phase["start"] for phase in parse_phases(arguments.sftkey_phases)]
            if unit == "ratio":
                ratios, starts = (
                    starts,
                    [stage2_start_step(max_steps=max_steps, num_train_epochs=1, ratio=s) for s in starts],
                )
                idle = [number for number, (start, end) in enumerate(itertools.pairwise(starts), 1) if end <= start]
                if idle:
                    raise ValueError(
                        f"sftkey_phases start at {[f'{r:g}' for r in ratios]} of the run, which are optimizer steps "
                        f"{starts} of {max_steps}: phase {', '.join(map(str, idle))} would get no step. Space the "
                        "starts further apart, train for more steps, or give whole steps with sftkey_phase_unit: steps."
                    )
            in_epochs, linear = unit == "epoch", arguments.sftkey_phase_interpolation == "linear"
        else:
            steps, ratio, epoch = self._stage2_start()
            epoch = None if steps is not None else epoch  # steps take precedence, as in the config
            start = stage2_start_step(
                max_steps=max_steps, num_train_epochs=num_train_epochs, ratio=ratio, steps=steps, epoch=epoch
            )
            starts, in_epochs, linear = [0, start if epoch is None else epoch], epoch is not None, False
        phases = tuple(Phase(start, *pair) for start, pair in zip(starts, weights))  # two_stage alone has 2 presets
        self.schedule = PhaseSchedule(phases, in_epochs, linear)
        return self.schedule

    def point(self, state: TrainerState) -> PhasePoint:
        """The phase and weights of the optimizer step that follows ``state.global_step`` completed steps."""
        if self.schedule is None:  # before training (e.g. an evaluation first): the weights of the first phase
            return PhasePoint(1, *mode_weights(self.arguments)[0])
        return self.schedule.at(state.global_step, state.epoch or 0.0)

    def stage(self, state: TrainerState) -> int:
        """The stage of the optimizer step that follows ``state.global_step`` completed steps."""
        return self.point(state).stage

    def _adopt_calling_trainer(self, train_dataloader: Any) -> None:
        """A trainer without SFTKey was given this callback: extend it (a ``trl.SFTTrainer``) or refuse."""
        trainer = calling_trainer(self)
        if trainer is not None and hasattr(trainer, "_sftkey_setup"):
            raise ValueError("An SFTKeyCallback was passed to an SFTKey trainer with sftkey off: set sftkey=True.")
        if trainer is None or not any(
            cls.__name__ == "SFTTrainer" and cls.__module__.startswith("trl.") for cls in type(trainer).__mro__
        ):
            raise ValueError(
                f"SFTKeyCallback trains SFTKey on a trl.SFTTrainer, not on {type(trainer).__name__}: use SFTKeyTrainer "
                "(or mix SFTKeyMixin into your SFTTrainer subclass) so that the run is not plain SFT."
            )
        from .trl.adopt import adopt_stock_trainer  # reached with a TRL trainer in hand only: the core stays trl-free

        adopt_stock_trainer(trainer, self, train_dataloader)

    def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        if not self.bound:
            self._adopt_calling_trainer(kwargs.get("train_dataloader"))
        schedule = self.resolve(state.max_steps, state.num_train_epochs)
        if state.is_world_process_zero:
            for stats in self.data_stats:
                logger.info(stats.summary_line())
            logger.info(
                "SFTKey %s: %s.",
                self.arguments.sftkey_mode,
                describe(schedule, state.max_steps, state.num_train_epochs),
            )
            self._warn_unreached(schedule, state, args.gradient_accumulation_steps)
        return control

    def _warn_unreached(self, schedule: PhaseSchedule, state: TrainerState, accumulation: int) -> None:
        """Warn of each phase that starts after the last optimizer step has begun, naming the setting to change."""
        # the trainer's own count, not len(train_dataloader): Axolotl's packing sampler repacks, drawing from the
        # global RNG, on each len(); without it (a stock SFTTrainer) only the planned epochs are known
        last_step_epoch = None
        if self.batches_per_epoch:
            last_step_epoch = epoch_after(state.max_steps - 1, self.batches_per_epoch, accumulation)
        for phase in unreached_phases(schedule, state.max_steps, state.num_train_epochs, last_step_epoch):
            name = "stage 2" if self.arguments.sftkey_mode == "two_stage" else f"phase {phase}"
            start = schedule.phases[phase - 1].start
            if not schedule.in_epochs:
                when = f"at optimizer step {int(start) + 1}, but the run has {state.max_steps}"
            elif last_step_epoch is None:
                when = f"once {start:g} epochs are done, but the run trains {state.num_train_epochs:g}"
            else:
                when = (
                    f"once {start:g} epochs are done, but the last optimizer step begins after "
                    f"{last_step_epoch:g} epochs"
                )
            logger.warning(
                "SFTKey: %s starts %s: it never runs. Set it to start earlier (%s) or train longer (num_train_epochs, "
                "max_steps).",
                name,
                when,
                self._start_setting(),
            )

    def _start_setting(self) -> str:
        """Where the phase starts were set: the config key, or this callback's argument that overrides it."""
        if self.arguments.sftkey_mode == "phases":
            return "sftkey_phases"
        steps, _, epoch = self._stage2_start()
        unit = "steps" if steps is not None else "epoch" if epoch is not None else "ratio"
        overridden = any(value is not None for value in self.overrides)
        return f"SFTKeyCallback(stage2_{unit}=...)" if overridden else f"sftkey_stage2_{unit}"

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


def calling_trainer(callback: TrainerCallback) -> Trainer | None:
    """The ``transformers.Trainer`` whose callback handler is calling ``callback`` (transformers passes callbacks the
    model and data loaders, not the trainer): the nearest caller frame's ``self`` that holds the callback."""
    frame: FrameType | None = sys._getframe(1)
    while frame is not None:
        candidate = frame.f_locals.get("self")
        if isinstance(candidate, Trainer) and callback in candidate.callback_handler.callbacks:
            return candidate
        frame = frame.f_back
    return None
