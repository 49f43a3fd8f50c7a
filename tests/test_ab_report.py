"""``sftkey ab report``: an ``sftkey ab`` folder built by hand whose answer is known (3 arms, seeds 0-2 finished, seed 3
with a missing, a failed and a step-mismatched unit)."""

from __future__ import annotations

import json
from pathlib import Path

import pytest

from sftkey_plugin.cli.ab_report import build_report, format_report, seeds_to_resolve, verdict, write_report

pytest.importorskip("numpy")

QUESTIONS, STEPS = 20, 4
ARMS = {"sft": {"sftkey": False}, "weighted_x2": {"sftkey_mode": "weighted", "sftkey_key_weight": 2.0}, "two_stage": {}}
# the questions each finished unit answers right, by (arm, seed); seeds 0-2 of every arm finish
BASE = {0: set(range(10)), 1: set(range(11)), 2: set(range(9))}  # accuracy 0.50, 0.55, 0.45
RIGHT = {
    "sft": BASE,
    # everything the baseline gets, and 6, 4, 5 more: +30, +20, +25 points
    "weighted_x2": {0: BASE[0] | set(range(10, 16)), 1: BASE[1] | set(range(11, 15)), 2: BASE[2] | set(range(9, 14))},
    # loses one and gains two (+5), loses two and gains one (-5), loses one and gains three (+10)
    "two_stage": {
        0: (BASE[0] - {0}) | {10, 11},
        1: (BASE[1] - {0, 1}) | {11},
        2: (BASE[2] - {0}) | {9, 10, 11},
    },
}
FAILED_TAIL = "Traceback (most recent call last):\nRuntimeError: CUDA out of memory"


def _history(seed: int, stage2_from: int | None = None) -> list[dict]:
    """A log history whose loss at step k is 2 - 0.1 k + 0.01 seed (key loss 3 - 0.2 k)."""
    return [
        {
            "step": k,
            "loss": 2.0 - 0.1 * k + 0.01 * seed,
            "sftkey/key_loss": 3.0 - 0.2 * k,
            "sftkey/stage": 2 if stage2_from is not None and k >= stage2_from else 1,
        }
        for k in range(1, STEPS + 1)
    ] + [{"step": STEPS, "train_runtime": 1.0}]


def _dump(path: Path, data) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(data), encoding="utf-8")


def _finish(folder: Path, right: set[int], steps: int, history: list[dict], format_wrong: set[int] = frozenset()):
    _dump(folder / "trained.json", {"steps": steps, "seconds": 1.0, "log_history": history})
    rows = [
        {"index": i, "prompt": f"q{i}", "correct": i in right, "format_ok": i not in format_wrong}
        for i in range(QUESTIONS)
    ]
    (folder / "eval.jsonl").write_text("".join(json.dumps(row) + "\n" for row in rows), encoding="utf-8")
    summary = {"accuracy": len(right) / QUESTIONS, "format_accuracy": 1 - len(format_wrong) / QUESTIONS}
    _dump(folder / "eval.summary.json", summary)


@pytest.fixture(scope="module")
def out(tmp_path_factory) -> Path:
    """The folder: plan.json and every unit's files."""
    out = tmp_path_factory.mktemp("ab")
    units = [
        {"name": f"{arm}-seed{seed}", "arm": arm, "seed": seed, "dir": f"runs/{arm}-seed{seed}"}
        for arm in ARMS
        for seed in range(4)
    ]
    for unit in units:
        unit.update(config=f"{unit['dir']}/config.yaml", command=["sftkey", "train", "--config", "config.yaml"])
    plan = {
        "version": 1,
        "framework": "trl",
        "config": "/abs/cfg.yaml",
        "config_sha256": "0",
        "eval": "/abs/eval.jsonl",
        "eval_sha256": "0",
        "arms": ARMS,
        "baseline": "sft",
        "seeds": [0, 1, 2, 3],
        "max_steps": STEPS,
        "launcher": [],
        "eval_options": {},
        "learnt": 0.6,
        "units": units,
    }
    _dump(out / "plan.json", plan)
    for arm, by_seed in RIGHT.items():
        for seed, right in by_seed.items():
            stage2 = 3 if arm == "two_stage" else None
            _finish(
                out / f"runs/{arm}-seed{seed}",
                right,
                STEPS,
                _history(seed, stage2),
                {0} if arm == "two_stage" else set(),
            )
    # seed 3: sft never ran, weighted_x2 failed to train, two_stage trained one step short (and was evaluated)
    (out / "runs/sft-seed3").mkdir(parents=True)
    _dump(out / "runs/weighted_x2-seed3/failed.json", {"stage": "train", "returncode": 1, "log_tail": FAILED_TAIL})
    _finish(out / "runs/two_stage-seed3", set(range(20)), STEPS - 1, _history(3)[: STEPS - 1])
    return out


@pytest.fixture(scope="module")
def report(out) -> dict:
    return build_report(out, resamples=2000)


def test_per_seed_numbers_and_mcnemar(report):
    better = report["comparisons"]["weighted_x2"]
    assert better["seeds"] == [0, 1, 2]
    seed0 = better["per_seed"][0]
    assert seed0["accuracy"]["a"] == 0.5 and seed0["accuracy"]["b"] == 0.8
    assert seed0["accuracy"]["difference"] == pytest.approx(0.3)
    assert (seed0["a_right_b_wrong"], seed0["b_right_a_wrong"]) == (0, 6)
    assert seed0["mcnemar_p"] == pytest.approx(2 / 2**6)  # 6 discordant pairs, all one way
    assert seed0["accuracy"]["ci"][0] > 0
    mixed = report["comparisons"]["two_stage"]["per_seed"]
    assert [row["accuracy"]["difference"] for row in mixed] == pytest.approx([0.05, -0.05, 0.10])
    assert mixed[0]["mcnemar_p"] == 1.0  # 1 against 2 discordant: (1 + 3) / 8, doubled
    assert mixed[0]["format_accuracy"]["b"] == 0.95
    assert report["scores"]["sft"]["accuracy"] == {"0": 0.5, "1": 0.55, "2": 0.45}
    assert report["scores"]["two_stage"]["format_accuracy"]["0"] == 0.95


def test_over_seeds_interval_learnt_share_and_verdicts(report):
    better = report["comparisons"]["weighted_x2"]["over_seeds"]
    mean, low, high = better["difference"]
    assert mean == pytest.approx(0.25) and low > 0  # every question moves one way
    assert (better["base_learnt"], better["other_learnt"], better["fisher_p"]) == (0, 3, pytest.approx(0.1))
    assert report["verdicts"]["weighted_x2"] == "Over 3 seeds weighted_x2 beat sft by 25.0 accuracy points."

    mixed = report["comparisons"]["two_stage"]
    mean, low, high = mixed["over_seeds"]["difference"]
    assert mean == pytest.approx(0.1 / 3) and low < 0 < high
    # d = 3.33 points, s = 7.64 points: ((1.960 + 0.842) * 7.64 / 3.33)^2 = 41.2
    assert mixed["seeds_to_resolve"] == 42
    assert report["verdicts"]["two_stage"] == (
        "Over 3 seeds two_stage and sft are not distinguishable with 3 seeds. About 42 seeds would resolve a "
        "difference of this size (s = 7.6 points, |d| = 3.3 points)."
    )


def test_units_left_out_are_named(report, out):
    status = {unit["name"]: unit["status"] for unit in report["units"]}
    assert status["sft-seed3"] == "missing" and status["weighted_x2-seed3"] == "failed"
    assert status["two_stage-seed3"] == "steps"
    assert "3" not in report["scores"]["two_stage"]["accuracy"]  # equal compute broken: not in the statistics
    text = format_report(report)
    assert "MISSING sft-seed3: not trained; left out" in text
    assert "FAILED weighted_x2-seed3: train stage, exit status 1; left out" in text
    assert "ERROR two_stage-seed3: trained 3 optimizer steps, the plan says 4: equal compute is broken" in text

    paths = write_report(out, report)
    markdown = (out / "report.md").read_text()
    assert "RuntimeError: CUDA out of memory" in markdown  # the failed unit's log tail
    assert "ERROR two_stage-seed3" in markdown and "About 42 seeds" in markdown
    saved = json.loads((out / "report.json").read_text())
    assert saved["verdicts"] == report["verdicts"] and "rows" not in saved["units"][0]
    if report["plot"]:
        assert (out / "report.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and out / "report.png" in paths
        assert "![loss curves and accuracies](report.png)" in markdown
    else:
        assert "no plot: matplotlib is not installed" in markdown


def test_curves_are_the_mean_over_seeds(report):
    curve = report["curves"]["weighted_x2"]
    assert curve["steps"] == [1, 2, 3, 4] and curve["seeds"] == 3
    assert curve["loss"] == pytest.approx([2.0 - 0.1 * k + 0.01 for k in range(1, 5)])  # mean of seeds 0, 1, 2
    assert curve["key_loss"] == pytest.approx([3.0 - 0.2 * k for k in range(1, 5)])
    assert curve["stage2_from"] is None and report["curves"]["two_stage"]["stage2_from"] == 3


def test_seeds_to_resolve_guards():
    assert seeds_to_resolve([0.1]) == (None, "one seed gives no spread")
    assert seeds_to_resolve([0.1, -0.1]) == (None, "the observed difference is 0")
    assert seeds_to_resolve([0.1, 0.1]) == (None, "the seeds' differences do not vary")
    assert seeds_to_resolve([0.3, 0.2, 0.25])[0] == 2  # a large effect: the floor of 2


def test_verdict_keeps_the_demos_wording():
    assert verdict(0.0, (-0.05, 0.05), "two_stage", "sft_equal") == (
        "  On this run two_stage and sft_equal are not distinguishable; try more --steps or another --seed."
    )
    assert verdict(-0.06, (-0.1, -0.025), "two_stage", "sft_equal") == (
        "  On this run two_stage was worse than sft_equal by 6.0 accuracy points."
    )
