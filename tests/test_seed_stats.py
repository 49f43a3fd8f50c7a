"""Seed-level statistics of the multi-seed study, on constructed cases whose answers are known by hand."""

import json
import math
import subprocess
import sys
from pathlib import Path

import pytest

from sftkey_plugin.cli.evaluate import paired_bootstrap
from sftkey_plugin.cli.seed_stats import fisher_exact, hierarchical_bootstrap, seed_level_comparison


def test_fisher_exact_matches_hand_computed_tables():
    # the lady tasting tea: 3 of 4 right each way, two-sided p = (1 + 16 + 16 + 1) / 70 = 34/70
    assert fisher_exact(3, 1, 1, 3) == pytest.approx(34 / 70)
    # 8 of 8 against 0 of 8: only the two extreme tables, each 1 / C(16, 8)
    assert fisher_exact(8, 0, 0, 8) == pytest.approx(2 / math.comb(16, 8))
    # 5 of 8 against 2 of 8: tables with k = 0, 1, 2 and 5, 6, 7 are as unlikely or less (C(8,k)C(8,7-k)/C(16,7))
    tail = sum(math.comb(8, k) * math.comb(8, 7 - k) for k in (0, 1, 2, 5, 6, 7)) / math.comb(16, 7)
    assert fisher_exact(5, 3, 2, 6) == pytest.approx(tail)
    assert fisher_exact(2, 2, 2, 2) == pytest.approx(1.0) and fisher_exact(0, 3, 0, 3) == pytest.approx(1.0)


def test_hierarchical_bootstrap_constant_difference_has_no_width():
    base = [[0, 1] * 50 for _ in range(5)]
    other = [[1, 2] * 50 for _ in range(5)]  # every question of every seed gains exactly 1
    assert hierarchical_bootstrap(base, other, resamples=2000) == (1.0, 1.0, 1.0)


def test_hierarchical_bootstrap_redraws_questions_within_a_seed():
    # one seed: only the question draw varies, so the interval is the question-level bootstrap's, give or take
    # the resampling noise of two different random streams
    base, other = [0] * 100, [1] * 30 + [0] * 70
    mean, low, high = hierarchical_bootstrap([base], [other])
    reference = paired_bootstrap(base, other)
    assert mean == pytest.approx(0.3) and reference[0] == pytest.approx(0.3)
    assert low == pytest.approx(reference[1], abs=0.02) and high == pytest.approx(reference[2], abs=0.02)


def test_hierarchical_bootstrap_spans_the_seed_to_seed_spread():
    # 4 seeds gain a whole point on every question and 4 lose one: the mean over seeds is 0, and resampling 8 seeds
    # gives means (2k - 8) / 8 with k ~ Binomial(8, 1/2); its 2.5% quantile is k = 1 (P(k <= 0) = 0.4%, P(k <= 1) =
    # 3.5%), so the interval is [-0.75, +0.75], however the questions are redrawn
    up, down = ([0] * 200, [1] * 200), ([1] * 200, [0] * 200)
    seeds = [up] * 4 + [down] * 4
    mean, low, high = hierarchical_bootstrap([a for a, _ in seeds], [b for _, b in seeds])
    assert (mean, low, high) == (0.0, -0.75, 0.75)
    # pooled over questions the same data looks certain: the interval seeds ignore is far narrower
    pooled = paired_bootstrap([c for a, _ in seeds for c in a], [c for _, b in seeds for c in b])
    assert pooled[2] - pooled[1] < 0.1


def test_hierarchical_bootstrap_refuses_unpaired_input():
    with pytest.raises(ValueError):
        hierarchical_bootstrap([[1, 0]], [[1, 0], [0, 1]])
    with pytest.raises(ValueError):
        hierarchical_bootstrap([[]], [[]])


def test_seed_level_comparison_counts_seeds_that_learnt():
    base = {0: [1] * 8 + [0] * 2, 1: [1] * 5 + [0] * 5, 2: [1] * 5 + [0] * 5, 9: [1] * 10}
    other = {0: [1] * 8 + [0] * 2, 1: [1] * 7 + [0] * 3, 2: [1] * 9 + [0] * 1}  # seed 9 is not shared
    result = seed_level_comparison(base, other, threshold=0.65, resamples=2000)
    assert result["seeds"] == [0, 1, 2]
    assert result["base_by_seed"] == [0.8, 0.5, 0.5] and result["other_by_seed"] == [0.8, 0.7, 0.9]
    assert (result["base_learnt"], result["other_learnt"]) == (1, 3)
    assert result["fisher_p"] == pytest.approx(fisher_exact(3, 0, 1, 2)) and result["fisher_p"] == pytest.approx(0.4)
    assert result["difference"][0] == pytest.approx((0 + 0.2 + 0.4) / 3)
    assert seed_level_comparison(base, other)["fisher_p"] is None  # no threshold: no count of seeds
    with pytest.raises(ValueError, match="not the same evaluation set"):
        seed_level_comparison({0: [1, 0]}, {0: [1]})


def _unit(seed: int, arm: str, correct: list[int], **extra: object) -> dict[str, object]:
    """A result file as ``benchmarks/reproduce.py --out-dir`` writes one (settings shortened to what it compares)."""
    settings = {"steps": 10, "hidden_size": 128}
    return {"task": "parity", "seed": seed, "arm": arm, "settings": settings, "correct": correct, "steps": 10,
            "learning_rate": 0.003, "grad_norm_mean": 0.5, **extra}  # fmt: skip


def test_reproduce_summarises_unit_files_seed_by_seed(tmp_path):
    """``reproduce.py --summarise`` on files whose answer is known: per-seed accuracy, seeds that learnt, Fisher's p
    and the mean of the per-seed differences, against the baseline it is told."""
    base = {0: [1] * 8 + [0] * 2, 1: [1] * 5 + [0] * 5, 2: [1] * 5 + [0] * 5}
    other = {0: [1] * 8 + [0] * 2, 1: [1] * 7 + [0] * 3, 2: [1] * 9 + [0] * 1}
    files = []
    for arm, arm_correct in (("sft_equal", base), ("weighted_x3", other)):
        for seed, correct in arm_correct.items():
            files.append(tmp_path / f"parity-seed{seed}-{arm}.json")
            files[-1].write_text(json.dumps(_unit(seed, arm, correct)))
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "reproduce.py"
    out = tmp_path / "summary.json"
    run = subprocess.run([sys.executable, str(script), "--summarise", *map(str, files), "--json", str(out),
                          "--baseline", "sft_equal"], capture_output=True, text=True)  # fmt: skip
    assert run.returncode == 0, run.stderr
    summary = json.loads(out.read_text())
    assert summary["settings"]["baseline"] == "sft_equal" and "hidden_size" not in summary["settings"]
    rows = {row["arm"]: row for row in summary["summary"]}
    assert rows["sft_equal"]["accuracy_by_seed"] == [0.8, 0.5, 0.5] and rows["sft_equal"]["learnt"] == 1
    assert rows["weighted_x3"]["accuracy_by_seed"] == [0.8, 0.7, 0.9] and rows["weighted_x3"]["learnt"] == 3
    versus = rows["weighted_x3"]["vs_baseline"]
    assert versus["fisher_p"] == pytest.approx(0.4) and versus["difference"][0] == pytest.approx(0.2)
    assert "learnt 3/3 vs 1/3 (>= 0.650), p = 0.400" in run.stdout

    # units made with other settings are not comparable: refused, not pooled
    files[0].write_text(json.dumps({**_unit(0, "sft_equal", base[0]), "settings": {"steps": 20, "hidden_size": 128}}))
    run = subprocess.run([sys.executable, str(script), "--summarise", *map(str, files)], capture_output=True, text=True)
    assert run.returncode != 0 and "different settings, not comparable" in run.stderr
