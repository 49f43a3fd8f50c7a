"""``sftkey ab report OUT``: each arm of an ``sftkey ab`` folder against its baseline, per seed and over seeds.

Reads ``OUT/plan.json`` and each unit's ``trained.json``, ``eval.jsonl``/``eval.summary.json`` or ``failed.json``
(the layout ``sftkey ab`` writes) and writes ``OUT/report.md``, ``OUT/report.json`` and ``OUT/report.png``. Per
seed: each arm's accuracy and format accuracy, the paired bootstrap interval and exact McNemar p on the questions
(``evaluate.compare_results``); over seeds: the hierarchical-bootstrap interval and the seeds at or above ``learnt``
(``seed_stats.seed_level_comparison``), a verdict worded as the demo words it, and how many seeds would resolve a
difference of the observed size. Units that failed or are missing are named and left out; a unit that trained
another number of steps than the plan breaks equal compute: it is reported as an error and left out.
"""

from __future__ import annotations

import json
import math
import statistics
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .data import CLIError
from .evaluate import compare_results, read_results
from .seed_stats import seed_level_comparison

POWER = 0.8
CONFIDENCE = 0.95
SEEDS_RULE = (
    "seeds needed = ceil(((z(0.975) + z(0.8)) * s / |d|)^2), at least 2: a normal approximation at 80% power and a "
    "two-sided 5% level, where d is the mean and s the standard deviation (n - 1) of the per-seed accuracy "
    "differences; not given with one seed (no spread), when the seeds' differences do not vary, or when d is 0"
)


# ---------------------------------------------------------------- pieces shared with the demo


def verdict(
    difference: float,
    ci: Sequence[float],
    arm: str,
    baseline: str,
    where: str = "On this run",
    undecided: str = "; try more --steps or another --seed",
) -> str:
    """One honest sentence on what the interval shows: beat, worse, or not distinguishable."""
    low, high = ci
    if low > 0:
        return f"  {where} {arm} beat {baseline} by {100 * difference:.1f} accuracy points."
    if high < 0:
        return f"  {where} {arm} was worse than {baseline} by {-100 * difference:.1f} accuracy points."
    return f"  {where} {arm} and {baseline} are not distinguishable{undecided}."


def loss_curves(history: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """The training loss and key-token loss by step from a Trainer's ``log_history``, and the first step logged in
    stage 2 (``sftkey/stage``), None without one."""
    logged = [entry for entry in history if "loss" in entry]
    keyed = [entry for entry in history if "sftkey/key_loss" in entry]
    stage2 = [entry["step"] for entry in history if entry.get("sftkey/stage") == 2]
    return {
        "steps": [entry["step"] for entry in logged],
        "loss": [entry["loss"] for entry in logged],
        "key_steps": [entry["step"] for entry in keyed],
        "key_loss": [entry["sftkey/key_loss"] for entry in keyed],
        "stage2_from": min(stage2) if stage2 else None,
    }


def mean_curves(histories: Sequence[Sequence[Mapping[str, Any]]]) -> dict[str, Any]:
    """``loss_curves`` averaged over seeds, at the steps every seed logged."""
    curves = [loss_curves(history) for history in histories]

    def mean(steps_key: str, values_key: str) -> tuple[list[int], list[float]]:
        by_seed = [dict(zip(curve[steps_key], curve[values_key])) for curve in curves]
        common = sorted(set.intersection(*(set(values) for values in by_seed))) if by_seed else []
        return common, [statistics.fmean(values[step] for values in by_seed) for step in common]

    steps, loss = mean("steps", "loss")
    key_steps, key_loss = mean("key_steps", "key_loss")
    starts = [curve["stage2_from"] for curve in curves if curve["stage2_from"] is not None]
    return {
        "steps": steps,
        "loss": loss,
        "key_steps": key_steps,
        "key_loss": key_loss,
        "stage2_from": min(starts) if starts else None,
        "seeds": len(curves),
    }


def write_plot(
    path: Path, curves: Mapping[str, Mapping[str, Any]], scores: Mapping[str, Mapping[str, Sequence[float]]], title: str
) -> str | None:
    """Loss curves per arm (``loss_curves``/``mean_curves``) and accuracy bars (the mean of each arm's seeds, every
    seed a dot) as a PNG; None when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (axes, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, curve in curves.items():
        seeds = f", mean of {curve['seeds']} seeds" if curve.get("seeds", 1) > 1 else ""
        note = " (stage 2: key tokens only)" if curve["stage2_from"] is not None else ""
        (line,) = axes.plot(curve["steps"], curve["loss"], label=f"{arm} training loss{note}{seeds}")
        if curve["key_loss"]:
            axes.plot(
                curve["key_steps"], curve["key_loss"], "--", color=line.get_color(), label=f"{arm} key-token loss"
            )
        if curve["stage2_from"] is not None:
            axes.axvline(curve["stage2_from"], color="grey", linestyle=":", label=f"{arm}: first step in stage 2")
    axes.set(xlabel="optimizer step", ylabel="loss", yscale="log", title="training loss")
    axes.legend(fontsize=8)
    names = list(scores)
    for offset, (metric, label) in enumerate((("accuracy", "accuracy"), ("format_accuracy", "format accuracy"))):
        means = [statistics.fmean(scores[name][metric]) for name in names]
        positions = [i + offset * 0.4 for i in range(len(names))]
        bars.bar(positions, means, width=0.4, label=label)
        for x, name, value in zip(positions, names, means):
            bars.text(x, value + 0.01, f"{value:.2f}", ha="center", fontsize=8)
            if len(scores[name][metric]) > 1:
                bars.plot([x] * len(scores[name][metric]), scores[name][metric], "k.", markersize=4)
    bars.set_xticks([i + 0.2 for i in range(len(names))], names)
    bars.set(ylim=(0, 1.1), title=title)
    bars.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)


# ---------------------------------------------------------------- reading the folder


def read_unit(out: Path, plan: Mapping[str, Any], unit: Mapping[str, Any]) -> dict[str, Any]:
    """A unit's state: ``ok`` (trained the planned steps and evaluated), ``steps`` (trained another number of steps),
    ``failed`` (its ``failed.json``) or ``missing`` (not run, or stopped before it finished)."""
    folder = out / unit["dir"]
    entry: dict[str, Any] = {"name": unit["name"], "arm": unit["arm"], "seed": unit["seed"]}
    trained_file, summary_file, rows_file = (
        folder / name for name in ("trained.json", "eval.summary.json", "eval.jsonl")
    )
    trained = json.loads(trained_file.read_text(encoding="utf-8")) if trained_file.exists() else None
    if trained is not None and trained["steps"] != plan["max_steps"]:
        return {**entry, "status": "steps", "steps": trained["steps"]}
    if trained is not None and summary_file.exists() and rows_file.exists():
        summary = json.loads(summary_file.read_text(encoding="utf-8"))
        return {
            **entry,
            "status": "ok",
            "steps": trained["steps"],
            "seconds": trained.get("seconds"),
            "accuracy": summary["accuracy"],
            "format_accuracy": summary["format_accuracy"],
            "history": trained["log_history"],
            "rows": read_results(rows_file),
        }
    if (folder / "failed.json").exists():
        failed = json.loads((folder / "failed.json").read_text(encoding="utf-8"))
        return {**entry, "status": "failed", **failed}
    return {**entry, "status": "missing", "detail": "trained, not evaluated" if trained else "not trained"}


def correctness(rows: Sequence[Mapping[str, Any]], indices: Sequence[Any]) -> list[float]:
    """Each question's correctness (1.0 or 0.0), in the order of ``indices``."""
    by_index = {row["index"]: row["correct"] for row in rows}
    return [float(by_index[index]) for index in indices]


def graded_indices(*runs: Sequence[Mapping[str, Any]]) -> list[Any]:
    """The questions every run graded (gold answer known), in the first run's order."""
    graded = [{row["index"] for row in rows if row["correct"] is not None} for rows in runs]
    return [row["index"] for row in runs[0] if all(row["index"] in seen for seen in graded)]


def seeds_to_resolve(differences: Sequence[float]) -> tuple[int | None, str]:
    """``SEEDS_RULE``: the seeds that would resolve the mean difference at 80% power, or None and why not."""
    if len(differences) < 2:
        return None, "one seed gives no spread"
    mean, spread = statistics.fmean(differences), statistics.stdev(differences)
    if mean == 0:
        return None, "the observed difference is 0"
    if spread == 0:
        return None, "the seeds' differences do not vary"
    z = statistics.NormalDist().inv_cdf
    needed = math.ceil(((z(1 - (1 - CONFIDENCE) / 2) + z(POWER)) * spread / abs(mean)) ** 2)
    return max(2, needed), f"s = {100 * spread:.1f} points, |d| = {100 * abs(mean):.1f} points"


def compare_arm(
    baseline: Mapping[int, Mapping[str, Any]],
    arm: Mapping[int, Mapping[str, Any]],
    learnt: float | None,
    resamples: int,
) -> dict[str, Any] | None:
    """One arm against the baseline over the seeds both finished: per seed and over seeds; None without such seeds."""
    seeds = sorted(set(baseline) & set(arm))
    if not seeds:
        return None
    per_seed, base_correct, arm_correct = [], {}, {}
    for seed in seeds:
        comparison = compare_results(baseline[seed]["rows"], arm[seed]["rows"], resamples=resamples, seed=seed)
        per_seed.append({"seed": seed, **comparison})
        indices = graded_indices(baseline[seed]["rows"], arm[seed]["rows"])
        base_correct[seed] = correctness(baseline[seed]["rows"], indices)
        arm_correct[seed] = correctness(arm[seed]["rows"], indices)
    over = seed_level_comparison(base_correct, arm_correct, threshold=learnt, resamples=resamples)
    differences = [b - a for a, b in zip(over["base_by_seed"], over["other_by_seed"])]
    needed, basis = seeds_to_resolve(differences)
    return {"seeds": seeds, "per_seed": per_seed, "over_seeds": over, "seeds_to_resolve": needed, "basis": basis}


def arm_verdict(arm: str, baseline: str, comparison: Mapping[str, Any] | None) -> str:
    """``verdict`` over seeds, with the seeds that would resolve an undecided difference."""
    if comparison is None:
        return f"  {arm}: no seed where both {arm} and {baseline} finished: nothing to compare."
    n = len(comparison["seeds"])
    mean, low, high = comparison["over_seeds"]["difference"]
    seeds = "seed" if n == 1 else "seeds"
    sentence = verdict(mean, (low, high), arm, baseline, where=f"Over {n} {seeds}", undecided=f" with {n} {seeds}")
    if low <= 0 <= high:
        needed = comparison["seeds_to_resolve"]
        if needed is None:
            sentence += f" No seed count estimated: {comparison['basis']}."
        else:
            sentence += f" About {needed} seeds would resolve a difference of this size ({comparison['basis']})."
    return sentence


def build_report(out: Path, resamples: int = 10000) -> dict[str, Any]:
    """Everything the report says, as one JSON-able dict (the units' rows and histories left out)."""
    plan_file = Path(out) / "plan.json"
    if not plan_file.exists():
        raise CLIError(f"{plan_file}: no plan (is {out} an `sftkey ab` folder?)")
    plan = json.loads(plan_file.read_text(encoding="utf-8"))
    units = [read_unit(Path(out), plan, unit) for unit in plan["units"]]
    done: dict[str, dict[int, dict[str, Any]]] = {arm: {} for arm in plan["arms"]}
    for unit in units:
        if unit["status"] == "ok":
            done[unit["arm"]][unit["seed"]] = unit
    baseline = plan["baseline"]
    comparisons = {
        arm: compare_arm(done[baseline], done[arm], plan.get("learnt"), resamples)
        for arm in plan["arms"]
        if arm != baseline
    }
    return {
        "out": str(out),
        "framework": plan["framework"],
        "config": plan["config"],
        "eval": plan["eval"],
        "baseline": baseline,
        "arms": {arm: plan["arms"][arm] for arm in plan["arms"]},
        "seeds": plan["seeds"],
        "max_steps": plan["max_steps"],
        "learnt": plan.get("learnt"),
        "confidence": CONFIDENCE,
        "seeds_rule": SEEDS_RULE,
        "units": [{k: v for k, v in unit.items() if k not in ("rows", "history")} for unit in units],
        "scores": {
            arm: {
                metric: {str(seed): unit[metric] for seed, unit in sorted(by_seed.items())}
                for metric in ("accuracy", "format_accuracy")
            }
            for arm, by_seed in done.items()
        },
        "curves": {
            arm: mean_curves([u["history"] for u in by_seed.values()]) for arm, by_seed in done.items() if by_seed
        },
        "comparisons": comparisons,
        "verdicts": {arm: arm_verdict(arm, baseline, comparison).strip() for arm, comparison in comparisons.items()},
    }


# ---------------------------------------------------------------- writing it


def _points(value: float) -> str:
    return f"{100 * value:+.1f}"


def _interval(low: float, high: float) -> str:
    return f"[{_points(low)}, {_points(high)}]"


def left_out(report: Mapping[str, Any]) -> list[tuple[str, Mapping[str, Any]]]:
    """The units left out of the statistics, each with one line on why (a step mismatch is an error: equal compute
    is broken)."""
    lines = []
    for unit in report["units"]:
        if unit["status"] == "steps":
            why = (
                f"ERROR {unit['name']}: trained {unit['steps']} optimizer steps, the plan says {report['max_steps']}: "
                "equal compute is broken"
            )
        elif unit["status"] == "failed":
            why = f"FAILED {unit['name']}: {unit['stage']} stage, exit status {unit['returncode']}"
        elif unit["status"] == "missing":
            why = f"MISSING {unit['name']}: {unit['detail']}"
        else:
            continue
        lines.append((f"{why}; left out", unit))
    return lines


def format_report(report: Mapping[str, Any]) -> str:
    """The report for the terminal: per arm the seeds' accuracies and intervals, the interval over seeds, the
    verdict; then the units left out."""
    baseline, level = report["baseline"], f"{report['confidence']:.0%}"
    lines = [
        f"sftkey ab report {report['out']}: {len(report['arms'])} arms x {len(report['seeds'])} seeds, "
        f"{report['max_steps']} optimizer steps each; baseline {baseline}; accuracy differences in points"
    ]
    for arm, comparison in report["comparisons"].items():
        lines.append(f"{arm} - {baseline}:")
        if comparison is not None:
            for seed in comparison["per_seed"]:
                acc, fmt = seed["accuracy"], seed["format_accuracy"]
                lines.append(
                    f"  seed {seed['seed']}: accuracy {acc['a']:.3f} -> {acc['b']:.3f} {_points(acc['difference'])} "
                    f"{_interval(*acc['ci'])}, McNemar p = {seed['mcnemar_p']:.3g}; "
                    f"format accuracy {fmt['a']:.3f} -> {fmt['b']:.3f}"
                )
            mean, low, high = comparison["over_seeds"]["difference"]
            lines.append(f"  over seeds: {_points(mean)} {_interval(low, high)} ({level} hierarchical bootstrap)")
            over = comparison["over_seeds"]
            if over["threshold"] is not None:
                n = len(comparison["seeds"])
                lines.append(
                    f"  seeds at or above {over['threshold']:g}: {baseline} {over['base_learnt']}/{n}, "
                    f"{arm} {over['other_learnt']}/{n} (Fisher p = {over['fisher_p']:.3g})"
                )
        lines.append(arm_verdict(arm, baseline, comparison))
    lines.extend(line for line, _ in left_out(report))
    return "\n".join(lines)


def format_markdown(report: Mapping[str, Any], plot: str | None, asked: bool = True) -> str:
    """``report.md``: the settings, the verdicts, the per-seed and over-seed tables, the curves, the left-out units
    (``asked``: a plot was wanted, so its absence is explained)."""
    baseline, level = report["baseline"], f"{report['confidence']:.0%}"
    lines = [
        "# sftkey ab report",
        "",
        f"- config: `{report['config']}` ({report['framework']}); eval set: `{report['eval']}`",
        f"- arms: {', '.join(f'`{arm}`' for arm in report['arms'])} (baseline `{baseline}`); seeds "
        f"{', '.join(map(str, report['seeds']))}; every unit {report['max_steps']} optimizer steps",
        f"- differences are the arm's accuracy minus the baseline's, in points; intervals are {level}",
        "",
        "## Verdicts",
        "",
        *[f"- {sentence}" for sentence in report["verdicts"].values()],
        "",
        f"How many seeds would resolve a difference: {report['seeds_rule']}.",
        "",
    ]
    missing = left_out(report)
    if missing:
        lines += ["## Units left out", ""]
        for line, unit in missing:
            lines.append(f"- {line}")
            if unit.get("log_tail"):
                lines += [
                    "",
                    "  ```text",
                    *[f"  {row}" for row in unit["log_tail"].rstrip().splitlines()[-20:]],
                    "  ```",
                ]
        lines.append("")
    lines += [
        "## Per seed",
        "",
        "| arm | seed | accuracy | format accuracy | difference | paired bootstrap | McNemar p |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, scores in report["scores"].items():
        for seed, accuracy in scores["accuracy"].items():
            comparison = report["comparisons"].get(arm)
            row = next((s for s in comparison["per_seed"] if str(s["seed"]) == seed), None) if comparison else None
            paired = "(baseline) | | " if arm == baseline else " | | "
            if row:
                acc = row["accuracy"]
                paired = f"{_points(acc['difference'])} | {_interval(*acc['ci'])} | {row['mcnemar_p']:.3g}"
            lines.append(f"| {arm} | {seed} | {accuracy:.3f} | {scores['format_accuracy'][seed]:.3f} | {paired} |")
    lines += [
        "",
        "## Over seeds",
        "",
        "| arm | seeds | difference | hierarchical bootstrap | pooled questions | seeds at or above learnt "
        "| seeds to resolve |",
        "|---|---|---|---|---|---|---|",
    ]
    for arm, comparison in report["comparisons"].items():
        if comparison is None:
            lines.append(f"| {arm} | 0 | | | | | |")
            continue
        over, n = comparison["over_seeds"], len(comparison["seeds"])
        mean, low, high = over["difference"]
        pooled = _interval(*over["pooled_questions"][1:])
        learnt = (
            f"{baseline} {over['base_learnt']}/{n}, {arm} {over['other_learnt']}/{n} (Fisher p {over['fisher_p']:.3g})"
            if over["threshold"] is not None
            else "(no --learnt)"
        )
        needed = comparison["seeds_to_resolve"] or f"({comparison['basis']})"
        lines.append(f"| {arm} | {n} | {_points(mean)} | {_interval(low, high)} | {pooled} | {learnt} | {needed} |")
    lines += ["", "## Training curves", ""]
    if plot:
        lines.append(f"![loss curves and accuracies]({Path(plot).name})")
    elif asked:
        lines.append("(no plot: matplotlib is not installed; pip install matplotlib to get report.png)")
    for arm, curve in report["curves"].items():
        if curve["loss"]:
            key = f", key-token loss {curve['key_loss'][-1]:.4f}" if curve["key_loss"] else ""
            lines.append(
                f"- {arm} (mean of {curve['seeds']} seeds): training loss {curve['loss'][0]:.4f} at step "
                f"{curve['steps'][0]} to {curve['loss'][-1]:.4f} at step {curve['steps'][-1]}{key}"
            )
    return "\n".join(lines) + "\n"


def write_report(out: Path, report: dict[str, Any], plot: bool = True) -> list[Path]:
    """``report.png`` (with ``plot``, when matplotlib is importable), ``report.md`` and ``report.json`` in ``out``;
    the paths."""
    out = Path(out)
    scores = {
        arm: {metric: list(values.values()) for metric, values in by_metric.items()}
        for arm, by_metric in report["scores"].items()
        if by_metric["accuracy"]
    }
    title = f"{Path(report['eval']).name}: accuracy per arm (dots: seeds)"
    drawn = write_plot(out / "report.png", report["curves"], scores, title) if plot and scores else None
    report["plot"] = drawn
    (out / "report.md").write_text(format_markdown(report, drawn, plot), encoding="utf-8")
    (out / "report.json").write_text(json.dumps(report, indent=1) + "\n", encoding="utf-8")
    return [Path(path) for path in (drawn, out / "report.md", out / "report.json") if path]
