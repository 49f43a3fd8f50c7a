"""Seed-level statistics for a multi-seed comparison of two training arms scored on the same questions.

A small model learns a task in one seed and stays at chance in another, so a comparison pooled over questions
understates the uncertainty: these resample seeds first, then questions within each seed, and count the seeds
that learn the task.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

from .evaluate import paired_bootstrap


def fisher_exact(a_yes: int, a_no: int, b_yes: int, b_no: int) -> float:
    """Two-sided exact p-value of the 2x2 table ``[[a_yes, a_no], [b_yes, b_no]]`` with its margins fixed: the summed
    probability of every table no more likely than the observed one."""
    row_a, yes, total = a_yes + a_no, a_yes + b_yes, a_yes + a_no + b_yes + b_no

    def probability(k: int) -> float:
        return math.comb(row_a, k) * math.comb(total - row_a, yes - k) / math.comb(total, yes)

    observed = probability(a_yes)
    tables = range(max(0, yes - (total - row_a)), min(row_a, yes) + 1)
    return min(1.0, sum(p for p in map(probability, tables) if p <= observed * (1 + 1e-9)))


def hierarchical_bootstrap(
    base: Sequence[Sequence[float]],
    other: Sequence[Sequence[float]],
    resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> tuple[float, float, float]:
    """Mean over seeds of ``other - base`` (each seed's mean over its paired questions) and its percentile interval
    from a two-level bootstrap: draw the seeds with replacement, then each drawn seed's questions with replacement."""
    import numpy as np

    diffs = [np.asarray(b, dtype=float) - np.asarray(a, dtype=float) for a, b in zip(base, other, strict=True)]
    if not diffs or any(d.size == 0 for d in diffs):
        raise ValueError("every seed needs at least one paired question")
    rng = np.random.default_rng(seed)
    seeds, estimates = len(diffs), []
    for done in range(0, resamples, 1000):  # chunks bound the index arrays' memory
        chunk = min(1000, resamples - done)
        drawn = rng.integers(0, seeds, size=(chunk, seeds))
        # every drawn seed gets its own draw of questions, as if it were a new run of that seed
        means = np.stack([diffs[s][rng.integers(0, diffs[s].size, size=(chunk, seeds, diffs[s].size))].mean(-1)
                          for s in range(seeds)])  # fmt: skip
        estimates.append(np.take_along_axis(means, drawn[None], axis=0)[0].mean(axis=1))
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(np.concatenate(estimates), [tail, 1.0 - tail])
    return float(np.mean([d.mean() for d in diffs])), float(low), float(high)


def seed_level_comparison(
    base: Mapping[int, Sequence[float]],
    other: Mapping[int, Sequence[float]],
    threshold: float | None = None,
    resamples: int = 10000,
) -> dict[str, Any]:
    """Compare two arms over the seeds both have (per-question correctness, paired by position): accuracy per seed,
    the seeds at or above ``threshold`` ("learnt the task", when given) and Fisher's exact test on them, the
    hierarchical interval on the mean difference and, for contrast, the interval over pooled questions that ignores
    the seeds."""
    seeds = sorted(set(base) & set(other))
    if not seeds:
        raise ValueError("the two arms share no seed")
    for s in seeds:
        if len(base[s]) != len(other[s]):
            raise ValueError(f"seed {s}: {len(base[s])} and {len(other[s])} questions: not the same evaluation set")
    accuracy = {name: [sum(arm[s]) / len(arm[s]) for s in seeds] for name, arm in (("base", base), ("other", other))}
    n, fisher = len(seeds), None
    learnt: dict[str, int | None] = {"base": None, "other": None}
    if threshold is not None:
        base_learnt, other_learnt = (sum(value >= threshold for value in accuracy[k]) for k in ("base", "other"))
        learnt = {"base": base_learnt, "other": other_learnt}
        fisher = fisher_exact(other_learnt, n - other_learnt, base_learnt, n - base_learnt)
    return {
        "seeds": seeds,
        "base_by_seed": accuracy["base"],
        "other_by_seed": accuracy["other"],
        "threshold": threshold,
        "base_learnt": learnt["base"],
        "other_learnt": learnt["other"],
        "fisher_p": fisher,
        "difference": hierarchical_bootstrap([base[s] for s in seeds], [other[s] for s in seeds], resamples),
        "pooled_questions": paired_bootstrap(
            [c for s in seeds for c in base[s]], [c for s in seeds for c in other[s]], resamples
        ),
    }
