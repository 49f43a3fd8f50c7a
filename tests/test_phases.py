"""``sftkey_mode: phases``: the schedule itself, its presets against the modes they generalise, and its losses
computed by hand, through the real ``SFTKeyTrainer`` (both environments)."""

from __future__ import annotations

import json
import logging

import pytest
import torch
import trl
from test_trl import (
    GRAD_RTOL,
    PER_TOKEN,
    assert_gradients_close,
    config,
    hand_weighted_loss,
    logged,
    losses,
    trainer_for,
)
from transformers import HfArgumentParser, TrainerCallback

from sftkey_plugin import SFTKeyConfig
from sftkey_plugin.config import SFTKeyArguments, validate_sftkey_arguments, weighs_tokens
from sftkey_plugin.examples import arithmetic_records
from sftkey_plugin.schedule import Phase, PhaseSchedule, epoch_after, unreached_phases

# run in every test environment, on its trl (the Axolotl stacks pin 1.9 and 1.14.1): scripts/test.sh
pytestmark = pytest.mark.stack


def phases(*rows: tuple[float, float, float]) -> list[dict[str, float]]:
    return [{"start": start, "key_weight": key, "other_weight": other} for start, key, other in rows]


# ---------------------------------------------------------------------------------------------------------------
# The schedule and its validation (no trainer)
# ---------------------------------------------------------------------------------------------------------------


def test_step_schedule_holds_each_phase_until_the_next():
    schedule = PhaseSchedule((Phase(0, 1, 1), Phase(2, 1, 0.1), Phase(5, 3, 0)))
    points = [schedule.at(step) for step in range(7)]
    assert [(p.phase, p.key_weight, p.other_weight) for p in points] == [
        (1, 1, 1), (1, 1, 1), (2, 1, 0.1), (2, 1, 0.1), (2, 1, 0.1), (3, 3, 0), (3, 3, 0),
    ]  # fmt: skip
    assert [p.stage for p in points] == [1, 1, 1, 1, 1, 2, 2]


def test_linear_schedule_interpolates_between_starts_and_holds_after_the_last():
    schedule = PhaseSchedule((Phase(0, 1, 1), Phase(4, 3, 0)), linear=True)
    assert [schedule.at(step).key_weight for step in range(6)] == [1, 1.5, 2, 2.5, 3, 3]
    assert [schedule.at(step).other_weight for step in range(6)] == [1, 0.75, 0.5, 0.25, 0, 0]


def test_epoch_schedule_reads_the_epoch_counter():
    schedule = PhaseSchedule((Phase(0, 1, 1), Phase(1, 1, 0)), in_epochs=True)
    assert [schedule.stage(step, epoch) for step, epoch in [(3, 0.75), (4, 0.9999999), (4, 1.0), (7, 1.75)]] == [
        1, 2, 2, 2,
    ]  # fmt: skip


def test_epoch_after_counts_as_the_trainer_does():
    """5 batches an epoch, 2 to a step: 3 steps an epoch, the third taking the fifth batch alone."""
    assert [epoch_after(steps, 5, 2) for steps in range(7)] == [0, 0.4, 0.8, 1, 1.4, 1.8, 2]
    assert [epoch_after(steps, 4, 1) for steps in range(5)] == [0, 0.25, 0.5, 0.75, 1]


@pytest.mark.parametrize(
    ("start", "max_steps", "unreached"),
    [
        (1, 8, []),  # 2 epochs of 4 steps: starts with step 5
        (1.75, 8, []),  # with step 8, the last
        (1.8, 8, [2]),
        (2, 8, [2]),  # after the last epoch
        (1.25, 6, []),  # max_steps 6 ends the run inside the second epoch: step 6 begins after 1.25 epochs
        (1.5, 6, [2]),
    ],
)
def test_an_epoch_start_after_the_last_step_is_unreached(start, max_steps, unreached):
    schedule = PhaseSchedule((Phase(0, 1, 1), Phase(start, 1, 0)), in_epochs=True)
    assert unreached_phases(schedule, max_steps, 2, epoch_after(max_steps - 1, 4, 1)) == unreached


def test_without_the_batches_per_epoch_an_epoch_start_is_checked_against_the_epochs_begun():
    """A stock SFTTrainer tells the callback no batches per epoch: a start inside the last epoch passes unwarned."""
    starts = (1.8, 2, 3)
    schedules = [PhaseSchedule((Phase(0, 1, 1), Phase(start, 1, 0)), in_epochs=True) for start in starts]
    assert [unreached_phases(schedule, 8, 2, None) for schedule in schedules] == [[], [2], [2]]


def test_a_step_start_after_the_last_step_is_unreached():
    schedule = PhaseSchedule((Phase(0, 1, 1), Phase(4, 1, 0.1), Phase(6, 1, 0)))
    assert [unreached_phases(schedule, max_steps, 1, None) for max_steps in (5, 6, 7)] == [[3], [3], []]


@pytest.mark.parametrize(
    ("values", "message"),
    [
        ({"sftkey_mode": "phases"}, "needs sftkey_phases"),
        ({"sftkey_mode": "phases", "sftkey_phases": "[{"}, "not valid JSON"),
        ({"sftkey_mode": "phases", "sftkey_phases": [{"start": 0, "key_weight": 2}]}, "exactly the keys"),
        ({"sftkey_mode": "phases", "sftkey_phases": phases((0.1, 1, 1))}, "must start at 0"),
        ({"sftkey_mode": "phases", "sftkey_phases": phases((0, 1, 1), (0.5, 1, 0), (0.5, 2, 0))}, "increasing"),
        ({"sftkey_mode": "phases", "sftkey_phases": phases((0, 1, 1), (3, 1, 0))}, "past the end of training"),
        ({"sftkey_mode": "phases", "sftkey_phase_unit": "steps", "sftkey_phases": phases((0, 1, 1), (2.5, 1, 0))},
         "whole optimizer steps"),
        ({"sftkey_mode": "phases", "sftkey_phases": phases((0, 1, 1), (0.5, 0, 0))}, "cannot both be 0"),
        ({"sftkey_mode": "phases", "sftkey_phases": phases((0, 1, -1))}, "must be >= 0"),
        ({"sftkey_mode": "phases", "sftkey_phases": [{"start": 0, "key_weight": True, "other_weight": 1}]},
         "must be numbers"),
        ({"sftkey_mode": "two_stage", "sftkey_phases": phases((0, 1, 1))}, "sftkey_mode: phases only"),
        ({"sftkey_mode": "phases", "sftkey_phases": phases((0, 1, 1)), "sftkey_phase_unit": "minutes"},
         "sftkey_phase_unit must be one of"),
        ({"sftkey_mode": "phases", "sftkey_phases": phases((0, 1, 1)), "sftkey_stage2_steps": 5},
         "sftkey_stage2_steps is not read in sftkey_mode: phases"),
        ({"sftkey_mode": "phases", "sftkey_phases": phases((0, 1, 1)), "sftkey_stage2_ratio": 0.8},
         "sftkey_stage2_ratio is not read"),
        ({"sftkey_mode": "phases", "sftkey_phases": phases((0, 1, 1)), "sftkey_stage2_epoch": 1},
         "sftkey_stage2_epoch is not read"),
        ({"sftkey_mode": "phases", "sftkey_phases": phases((0, 1, 1)), "sftkey_key_weight": 3.0},
         "sftkey_key_weight is not read"),
        ({"sftkey_mode": "phases", "sftkey_phases": phases((0, 1, 1)), "sftkey_other_weight": 0.5},
         "sftkey_other_weight is not read"),
    ],
)  # fmt: skip
def test_invalid_phases_are_refused_with_what_to_change(values, message):
    with pytest.raises(ValueError, match=message):
        validate_sftkey_arguments(SFTKeyArguments(sftkey=True, **values))


@pytest.mark.parametrize(
    ("values", "weighs"),
    [
        ({"sftkey_mode": "two_stage"}, False),
        ({"sftkey_mode": "weighted", "sftkey_key_weight": 3.0}, True),
        ({"sftkey_phases": phases((0, 1, 1), (0.5, 1, 0))}, False),  # held weights of 0 and 1: labels masked only
        ({"sftkey_phases": phases((0, 1, 1), (0.5, 1, 0)), "sftkey_phase_interpolation": "linear"}, True),
        ({"sftkey_phases": phases((0, 1, 1), (0.5, 1, 0.1))}, True),
    ],
)
def test_weighs_tokens_tells_when_per_token_losses_are_needed(values, weighs):
    arguments = SFTKeyArguments(sftkey=True, **{"sftkey_mode": "phases", **values})
    validate_sftkey_arguments(arguments)
    assert weighs_tokens(arguments) is weighs


def test_ratio_starts_that_fall_on_one_step_are_refused_with_the_steps():
    """0, 0.3 and 0.4 of 4 steps are steps 0, 2 and 2: phase 2 would never run (the log read "steps 3-2")."""
    from sftkey_plugin.callback import SFTKeyCallback

    arguments = SFTKeyArguments(
        sftkey=True, sftkey_mode="phases", sftkey_phases=phases((0, 1, 1), (0.3, 2, 1), (0.4, 3, 1))
    )
    validate_sftkey_arguments(arguments)
    with pytest.raises(ValueError, match=r"optimizer steps \[0, 2, 2\] of 4: phase 2 would get no step"):
        SFTKeyCallback(arguments).resolve(max_steps=4, num_train_epochs=1)
    assert len(SFTKeyCallback(arguments).resolve(max_steps=10, num_train_epochs=1).phases) == 3  # steps 0, 3, 4


def test_phases_from_a_command_line_json_string():
    (config,) = HfArgumentParser(SFTKeyConfig).parse_args_into_dataclasses(
        ["--output_dir", "unused", "--bf16", "false", "--sftkey", "true", "--sftkey_mode", "phases",
         "--sftkey_phase_unit", "steps", "--sftkey_phases", json.dumps(phases((0, 1, 1), (2, 1, 0.1)))]
    )  # fmt: skip
    assert config.sftkey_phases == phases((0, 1, 1), (2, 1, 0.1))


# ---------------------------------------------------------------------------------------------------------------
# Real training: presets, hand-computed losses, resume
# ---------------------------------------------------------------------------------------------------------------


def final_weights(trainer) -> dict[str, torch.Tensor]:
    return {name: p.detach().clone() for name, p in trainer.model.named_parameters()}


@pytest.mark.parametrize(
    ("mode", "preset"),
    [
        ({"sftkey_mode": "two_stage", "sftkey_stage2_steps": 2},
         {"sftkey_phase_unit": "steps", "sftkey_phases": phases((0, 1, 1), (2, 1, 0))}),
        ({"sftkey_mode": "two_stage", "sftkey_stage2_ratio": 0.5}, {"sftkey_phases": phases((0, 1, 1), (0.5, 1, 0))}),
        ({"sftkey_mode": "two_stage", "sftkey_stage2_epoch": 1, "max_steps": -1, "num_train_epochs": 2},
         {"sftkey_phase_unit": "epoch", "sftkey_phases": phases((0, 1, 1), (1, 1, 0)), "max_steps": -1,
          "num_train_epochs": 2}),
        ({"sftkey_mode": "key_only"}, {"sftkey_phases": phases((0, 1, 0))}),
        ({"sftkey_mode": "weighted", "sftkey_key_weight": 3.0, "sftkey_other_weight": 0.5, **PER_TOKEN},
         {"sftkey_phases": phases((0, 3.0, 0.5)), **PER_TOKEN}),
    ],
    ids=["two_stage_steps", "two_stage_ratio", "two_stage_epoch", "key_only", "weighted"],
)  # fmt: skip
def test_each_preset_trains_exactly_as_its_mode(tiny_dir, tmp_path, mode, preset):
    """The same computation either way: every logged value and every final weight bit-identical."""
    records = arithmetic_records(16, seed=6, form="prompt_completion")
    runs = []
    for name, values in (("mode", mode), ("phases", {"sftkey_mode": "phases", **preset})):
        trainer = trainer_for(tiny_dir, records, tmp_path / name, sftkey=True, **{"max_steps": 4, **values})
        trainer.train()
        runs.append(trainer)
    by_mode, by_phases = runs
    compared = ("loss", "grad_norm", "sftkey/stage", "sftkey/key_loss", "sftkey/reasoning_loss", "sftkey/key_weight",
                "sftkey/other_weight")  # fmt: skip
    for one, other in zip(by_mode.state.log_history, by_phases.state.log_history, strict=True):
        assert {k: one.get(k) for k in compared} == {k: other.get(k) for k in compared}
    assert len(set(logged(by_mode, "sftkey/stage"))) == (2 if mode["sftkey_mode"] == "two_stage" else 1)
    weights_one, weights_other = final_weights(by_mode), final_weights(by_phases)
    assert all(torch.equal(weights_one[n], weights_other[n]) for n in weights_one)


class StepTwoByHand(TrainerCallback):
    """Before the second optimizer step: that step's loss and gradients computed by hand on a copy of the model."""

    def __init__(self, rows: list[dict], key_weight: float, other_weight: float, normalize: str) -> None:
        self.rows, self.weights, self.normalize = rows, (key_weight, other_weight), normalize
        self.expected: tuple[float, dict[str, torch.Tensor]] | None = None
        self.grads: dict[str, torch.Tensor] = {}

    def on_step_begin(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1 and self.expected is None:
            from transformers import AutoModelForCausalLM

            twin = AutoModelForCausalLM.from_config(model.config)  # a copy (deepcopy would take the trainer's hooks)
            twin.load_state_dict(model.state_dict())
            loss = hand_weighted_loss(twin, self.rows, *self.weights, normalize=self.normalize)
            loss.backward()
            self.expected = float(loss.detach()), {n: p.grad for n, p in twin.named_parameters() if p.grad is not None}

    def on_pre_optimizer_step(self, args, state, control, model=None, **kwargs):
        if state.global_step == 1:
            self.grads = {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize(
    ("schedule", "step2_weights", "normalize"),
    [
        ({"sftkey_phases": phases((0, 1, 1), (1, 1, 0.1))}, (1.0, 0.1), "tokens"),  # soft stage 2
        ({"sftkey_phases": phases((0, 1, 1), (1, 1, 0.1))}, (1.0, 0.1), "weights"),
        ({"sftkey_phases": phases((0, 1, 1), (2, 3, 1)), "sftkey_phase_interpolation": "linear"}, (2.0, 1.0), "tokens"),
        ({"sftkey_phases": phases((0, 1, 1), (1, 0, 1))}, (0.0, 1.0), "tokens"),  # the reasoning alone
    ],
    ids=["soft_stage2", "soft_stage2_weight_mean", "ramp", "key_weight_0"],
)
def test_a_phase_step_is_the_hand_computed_weighted_loss(tiny_dir, tmp_path, schedule, step2_weights, normalize):
    """Step 2 (in its phase's weights) has loss ``sum(w * NLL) / n`` written out from the model's logits, with 2
    accumulated micro-batches; zero-weight tokens leave the count (``n`` = tokens of weight > 0). No clipping, so the
    gradients seen before the optimizer step are the loss's own."""
    records = arithmetic_records(16, seed=7, form="prompt_completion")
    trainer = trainer_for(
        tiny_dir, records, tmp_path, sftkey=True, sftkey_mode="phases", sftkey_phase_unit="steps",
        sftkey_normalize=normalize, max_steps=2, per_device_train_batch_size=2, gradient_accumulation_steps=2,
        max_grad_norm=0.0, **schedule, **PER_TOKEN,
    )  # fmt: skip
    rows = [trainer.train_dataset[i] for i in range(4, 8)]  # the second step's rows (sequential sampling)
    key_weight, other_weight = step2_weights
    if key_weight == 0:  # the hand computation counts every trained token; weight-0 tokens are masked instead
        rows = [{**row, "labels": [lab if not key else -100 for lab, key in zip(row["labels"], row["sftkey_mask"])]}
                for row in rows]  # fmt: skip
    by_hand = StepTwoByHand(rows, key_weight, other_weight, normalize)
    trainer.add_callback(by_hand)
    trainer.train()
    expected_loss, expected_grads = by_hand.expected
    assert losses(trainer)[1] == pytest.approx(expected_loss, rel=GRAD_RTOL)
    assert_gradients_close(by_hand.grads, expected_grads)
    assert logged(trainer, "sftkey/key_weight")[1] == key_weight
    assert logged(trainer, "sftkey/other_weight")[1] == other_weight
    assert logged(trainer, "sftkey/phase")[0] == 1


def test_linear_phases_resume_to_the_same_run(tiny_dir, tmp_path):
    """A ramp is a function of the saved step count: resuming from step 2 gives the same weights and losses."""
    records = arithmetic_records(48, seed=5, form="prompt_completion")
    common = dict(
        sftkey=True, sftkey_mode="phases", sftkey_phase_interpolation="linear",
        sftkey_phases=phases((0, 1, 1), (0.5, 3, 0.2)), max_steps=6, **PER_TOKEN,
    )  # fmt: skip
    full = trainer_for(tiny_dir, records, tmp_path / "full", **common)
    full.train()
    assert logged(full, "sftkey/key_weight") == pytest.approx([1, 5 / 3, 7 / 3, 3, 3, 3])
    saved = trainer_for(tiny_dir, records, tmp_path / "run", save_strategy="steps", save_steps=2, **common)
    saved.train()
    resumed = trainer_for(tiny_dir, records, tmp_path / "run", **common)
    resumed.train(resume_from_checkpoint=str(tmp_path / "run" / "checkpoint-2"))
    assert logged(resumed, "sftkey/key_weight") == logged(full, "sftkey/key_weight")
    assert logged(resumed, "sftkey/other_weight") == logged(full, "sftkey/other_weight")
    assert losses(resumed) == pytest.approx(losses(full), rel=GRAD_RTOL)


@pytest.mark.parametrize(
    ("values", "warning"),
    [
        ({"sftkey_stage2_epoch": 2, "num_train_epochs": 2, "max_steps": -1},
         "SFTKey: stage 2 starts once 2 epochs are done, but the last optimizer step begins after 1.75 epochs: it "
         "never runs. Set it to start earlier (sftkey_stage2_epoch) or train longer (num_train_epochs, max_steps)."),
        ({"sftkey_mode": "phases", "sftkey_phase_unit": "epoch", "sftkey_phases": phases((0, 1, 1), (1, 1, 0.5),
          (1.5, 1, 0)), "num_train_epochs": 3, "max_steps": 6, **PER_TOKEN},
         "SFTKey: phase 3 starts once 1.5 epochs are done, but the last optimizer step begins after 1.25 epochs: it "
         "never runs. Set it to start earlier (sftkey_phases) or train longer (num_train_epochs, max_steps)."),
        ({"sftkey_stage2_steps": 2, "max_steps": 2},
         "SFTKey: stage 2 starts at optimizer step 3, but the run has 2: it never runs. Set it to start earlier "
         "(sftkey_stage2_steps) or train longer (num_train_epochs, max_steps)."),
        ({"stock": SFTKeyArguments(sftkey=True, sftkey_stage2_epoch=2), "num_train_epochs": 2, "max_steps": -1},
         "SFTKey: stage 2 starts once 2 epochs are done, but the run trains 2: it never runs. Set it to start earlier "
         "(sftkey_stage2_epoch) or train longer (num_train_epochs, max_steps)."),
    ],
    ids=["stage2_epoch", "epoch_phases_cut_by_max_steps", "stage2_steps", "callback_on_stock_trainer"],
)  # fmt: skip
def test_a_phase_that_starts_after_the_last_step_is_warned_of(tiny_dir, tmp_path, caplog, values, warning):
    """16 rows of 4: 4 optimizer steps an epoch. The run trains, and the log says which phase never runs and why.
    ``stock``: an ``SFTKeyCallback`` with these arguments on a stock ``trl.SFTTrainer``."""
    from sftkey_plugin import SFTKeyCallback

    records = arithmetic_records(16, seed=4, form="prompt_completion")
    stock, values = values.get("stock"), {key: value for key, value in values.items() if key != "stock"}
    if stock is None:
        trainer = trainer_for(tiny_dir, records, tmp_path, sftkey=True, **values)
    else:
        trainer = trainer_for(tiny_dir, records, tmp_path, trl.SFTTrainer, callbacks=[SFTKeyCallback(stock)], **values)
    logger = logging.getLogger("sftkey_plugin")
    logger.addHandler(caplog.handler)  # directly: once the Axolotl plugin has run, this logger does not propagate
    try:
        with caplog.at_level(logging.WARNING, logger="sftkey_plugin"):
            trainer.train()
    finally:
        logger.removeHandler(caplog.handler)
    # a set: with Axolotl's log routing installed by an earlier test, each record shows twice
    assert {r.getMessage() for r in caplog.records if "never runs" in r.getMessage()} == {warning}
    assert set(logged(trainer, "sftkey/stage")) == {1}


def test_a_stage_two_callback_override_is_refused_with_phases(tiny_dir, tmp_path):
    from sftkey_plugin import SFTKeyCallback

    records = arithmetic_records(8, seed=3, form="prompt_completion")
    trainer = trainer_for(
        tiny_dir, records, tmp_path, callbacks=[SFTKeyCallback(stage2_steps=1)], sftkey=True, sftkey_mode="phases",
        sftkey_phases=phases((0, 1, 1), (0.5, 1, 0)), max_steps=2,
    )  # fmt: skip
    with pytest.raises(ValueError, match="set the starts in sftkey_phases"):
        trainer.train()


def test_weights_other_than_zero_and_one_need_per_token_losses(tiny_dir, tmp_path):
    """trl 1.9's chunked_nll returns only a total (trl 1.16 reads it as nll, which has per-token losses)."""
    if config(tmp_path, loss_type="chunked_nll").loss_type != "chunked_nll":
        pytest.skip(f"trl {trl.__version__} reads chunked_nll as nll")
    records = arithmetic_records(4, seed=3, form="prompt_completion")
    with pytest.raises(ValueError, match="chunked_nll"):
        trainer_for(
            tiny_dir, records, tmp_path, sftkey=True, sftkey_mode="phases", loss_type="chunked_nll",
            sftkey_phases=phases((0, 1, 1), (0.5, 1, 0.1)),
        )  # fmt: skip


def test_the_docs_examples_are_valid_schedules():
    """The docs' phases block (its soft stage 2, and the ramp in its comments) passes validation as written."""
    import re
    from pathlib import Path

    import yaml

    page = (Path(__file__).resolve().parents[1] / "docs" / "configuration.md").read_text(encoding="utf-8")
    section = page[page.index("## Phases") :]
    block = re.search(r"```yaml\n(.*?)```", section, re.S).group(1)
    soft = yaml.safe_load(block)
    ramp = yaml.safe_load("\n".join(line[2:] for line in block.splitlines() if line.startswith("# sftkey")))
    schedules = []
    for values in (soft, {**soft, **ramp}):
        arguments = SFTKeyArguments(sftkey=True, **values)
        validate_sftkey_arguments(arguments)
        schedules.append((arguments.sftkey_phase_interpolation, arguments.sftkey_phases))
    assert schedules == [
        ("step", phases((0, 1, 1), (0.5, 1, 0.1))),
        ("linear", phases((0, 1, 1), (0.5, 3, 1))),
    ]
