"""``sftkey demo``: ``sftkey ab`` on its embedded default, a generated task and a tiny model trained from scratch.

The demo generates chain-of-thought questions in the paper's format (train, and held-out test questions with their
gold answers), builds a tokenizer and a tiny random Llama (``OUT/init``) and the TRL config that trains it
(``OUT/config.yaml``, as ``sftkey train`` reads it), then runs ``sftkey ab`` on them: every arm starts from the
same weights, sees the same batches in the same order and runs the same number of optimizer steps; SFTKey's stage 2
(loss on the key answer tokens only) takes the last part of those steps; each trained model answers the test
questions through ``sftkey eval``, and ab's report compares each arm with the first. The arm table below is also the
equal-compute study's (``benchmarks/reproduce.py``), whose controls change the steps or the learning rate.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import random
import sys
import time
from pathlib import Path
from typing import Any, NamedTuple

from ..examples import arithmetic_problem, tagged_response
from ..schedule import stage2_start_step
from .data import CLIError, save_records

# name: (what it trains, as the demo prints it), the study's arms and the ablation key_only
ARM_LABELS = {
    "sft_short": "plain SFT for the stage-1 steps only",
    "sft_equal": "plain SFT",
    "two_stage": "SFTKey two_stage (the paper)",
    "soft_stage2": "SFTKey soft stage 2 (other tokens x0.1)",
    "weighted_x2": "SFTKey weighted (key x2)",
    "weighted_x3": "SFTKey weighted (key x3)",
    "ramp": "SFTKey ramp (key weight 1 to 3)",
    "key_only": "SFTKey key_only",
    # the controls of the seed-level study: is weighted_x3's gain a larger loss scale, a tuned rate or more steps?
    "weighted_x3_mean": "SFTKey weighted (key x3), loss scale of plain SFT (sftkey_normalize: weights)",
    "sft_lr_low": "plain SFT, learning rate x weighted_x3's loss scale / 2",
    "sft_lr_matched": "plain SFT, learning rate x weighted_x3's loss scale",
    "sft_lr_high": "plain SFT, learning rate x weighted_x3's loss scale x 2",
    "sft_steps_1.5x": "plain SFT for 1.5x the steps",
    "sft_steps_2x": "plain SFT for 2x the steps",
}
# arms whose learning rate is set from weighted_x3's loss scale (key_loss_scale), by this factor of it
LOSS_SCALED_RATES = {"sft_lr_low": 0.5, "sft_lr_matched": 1.0, "sft_lr_high": 2.0}
DEMO_ARMS = "sft_equal,two_stage,weighted_x2"
LETTERS = "ABCD"
PARITY = ("even", "odd")


def add_parser(subparsers: Any) -> None:
    """Register ``demo`` and its options."""
    parser = subparsers.add_parser(
        "demo",
        help="`sftkey ab` on a generated task and a tiny model: plain SFT against SFTKey on this CPU (< 10 min)",
        description="Generate chain-of-thought arithmetic in the paper's <Thinking>/<Answer> format, build a tiny "
        "Llama and a TRL config that trains it from scratch, and run `sftkey ab` on them: each arm trained for the "
        "same number of optimizer steps (by default plain SFT, the paper's two_stage and a constant key weight of 2, "
        "the one variant of the equal-compute study that was not worse than plain SFT on either task), evaluated on "
        "held-out questions by `sftkey eval`, and ab's report: accuracy, format accuracy and a paired bootstrap CI "
        "on each arm's difference from the first, per seed and over seeds. Writes the data, init/, config.yaml and "
        "ab's folder (plan.json, runs/, report.md, report.json, report.png) to --output-dir.",
        epilog="Arms: sft (plain SFT) and "
        + "; ".join(f"{name}: {label}" for name, label in ARM_LABELS.items() if name in EQUAL_COMPUTE)
        + "; your own with --arms-file. Task 'arithmetic': the answer repeats the last reasoning line. Task "
        "'choice': the question lists four options and the answer is the letter of the computed value, so the "
        "answer tokens hold a step the reasoning does not. Task 'parity': the answer is whether the computed value "
        "is even or odd, likewise.",
    )
    parser.add_argument("--output-dir", default="sftkey-demo", help="where everything is written (default sftkey-demo)")
    parser.add_argument("--task", default="arithmetic", choices=TASKS)
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps per arm (default 800)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 20 steps, 64 train and 16 test questions")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=200)
    parser.add_argument("--terms", type=int, default=3, help="numbers per question (default 3)")
    parser.add_argument("--digits", type=int, default=1, help="digits per number (default 1)")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument(
        "--arms",
        default=DEMO_ARMS,
        help=f"comma-separated arms, the first is the baseline the others are compared with (default {DEMO_ARMS}; "
        f"built in: sft, {', '.join(EQUAL_COMPUTE)}; or from --arms-file)",
    )
    parser.add_argument("--arms-file", help="YAML {arm name: {sftkey_* overrides}} of your own arms, as sftkey ab")
    parser.add_argument(
        "--stage2-ratio",
        type=float,
        default=0.8,
        help="share of the steps before two_stage's stage 2, soft_stage2's soft stage 2 and the end of ramp's ramp "
        "(default 0.8: the paper starts stage 2 once stage 1 has converged, which takes this tiny model about 80%% "
        "of the run; the plugin's own default, 0.5, starts stage 2 while the reasoning is still being learnt)",
    )
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument(
        "--seed", type=int, default=0, help="the data's, the initial weights' and by default training's"
    )
    parser.add_argument(
        "--seeds",
        help="comma-separated training seeds, one unit per arm and seed (default: --seed); the data and the initial "
        "weights stay --seed's",
    )
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="CPU threads of each unit (default 1: a tiny model gains nothing from more, and loses a lot when other "
        "processes share the cores)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu"],
        help="auto: on the GPU where torch sees one (units one after another), else on the CPU (one unit per arm "
        "side by side); cpu: always on the CPU",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write report.png")
    parser.add_argument("--json", action="store_true", help="print ab's report, with the demo's settings, as JSON")
    parser.set_defaults(func=run)


X3_KEY_WEIGHT = 3.0
WEIGHTED_X3: dict[str, Any] = {"sftkey_mode": "weighted", "sftkey_key_weight": X3_KEY_WEIGHT}


def _phases(*rows: tuple[float, float, float], linear: bool = False) -> dict[str, Any]:
    phases = [{"start": start, "key_weight": key, "other_weight": other} for start, key, other in rows]
    return {
        "sftkey_mode": "phases",
        "sftkey_phases": phases,
        "sftkey_phase_interpolation": "linear" if linear else "step",
    }


class ArmPlan(NamedTuple):
    """What one arm trains: its ``sftkey_*`` settings (None: stock ``SFTTrainer``), its optimizer steps and the
    factor on the learning rate."""

    sftkey: dict[str, Any] | None
    steps: int
    learning_rate_scale: float = 1.0


def arm_settings(arm: str, steps: int, ratio: float, loss_scale: float = 1.0) -> ArmPlan:
    """The arm's plan; ``loss_scale`` (``key_loss_scale``) is read by the ``sft_lr_*`` arms only."""
    if arm in LOSS_SCALED_RATES:
        return ArmPlan(None, steps, LOSS_SCALED_RATES[arm] * loss_scale)
    return {
        "sft_short": ArmPlan(None, stage2_start_step(max_steps=steps, num_train_epochs=1, ratio=ratio)),
        "sft_equal": ArmPlan(None, steps),
        "two_stage": ArmPlan({"sftkey_mode": "two_stage", "sftkey_stage2_ratio": ratio}, steps),
        "soft_stage2": ArmPlan(_phases((0, 1, 1), (ratio, 1, 0.1)), steps),
        "weighted_x2": ArmPlan({"sftkey_mode": "weighted", "sftkey_key_weight": 2.0}, steps),
        "weighted_x3": ArmPlan(WEIGHTED_X3, steps),
        "weighted_x3_mean": ArmPlan({**WEIGHTED_X3, "sftkey_normalize": "weights"}, steps),
        "ramp": ArmPlan(_phases((0, 1, 1), (ratio, 3, 1), linear=True), steps),
        "key_only": ArmPlan({"sftkey_mode": "key_only"}, steps),
        "sft_steps_1.5x": ArmPlan(None, round(1.5 * steps)),
        "sft_steps_2x": ArmPlan(None, 2 * steps),
    }[arm]


# sftkey ab's built-in arms: those that change only sftkey_* keys (the others train, over a probe run of 1000 steps,
# another number of steps, or at another learning rate)
EQUAL_COMPUTE = [
    name for name in ARM_LABELS if name not in LOSS_SCALED_RATES and arm_settings(name, 1000, 0.5).steps == 1000
]


def choice_problem(rng: random.Random, terms: int, digits: int) -> tuple[str, str, str, str]:
    """``(question with options, reasoning, letter, value)``: the answer is the letter of the computed value."""
    question, reasoning, value = arithmetic_problem(rng, terms=terms, digits=digits)
    options = {int(value)}
    while len(options) < len(LETTERS):
        options.add(int(value) + rng.choice((-1, 1)) * rng.randint(1, 9))
    shuffled = sorted(options)
    rng.shuffle(shuffled)
    listing = " ".join(f"({letter}) {option}" for letter, option in zip(LETTERS, shuffled))
    return f"{question} {listing}", reasoning, LETTERS[shuffled.index(int(value))], value


def parity_problem(rng: random.Random, terms: int, digits: int) -> tuple[str, str, str, str]:
    """``(question, reasoning, even/odd, value)``: the answer is a fixed transformation of the computed value, not a
    copy of the last reasoning line."""
    question, reasoning, value = arithmetic_problem(rng, terms=terms, digits=digits)
    return question.replace("What is", "Is", 1).replace("?", " even or odd?"), reasoning, PARITY[int(value) % 2], value


# tasks whose answer is not a copy of the last reasoning line, as (question, reasoning, answer, value) generators
NON_COPY_TASKS = {"choice": choice_problem, "parity": parity_problem}
TASKS = ["arithmetic", *NON_COPY_TASKS]


def make_splits(task: str, train_size: int, test_size: int, terms: int, digits: int, seed: int) -> tuple[list, list]:
    """Train and test records (conversational prompt/completion) whose arithmetic never overlaps."""
    rng = random.Random(seed)
    seen: dict[str, dict[str, Any]] = {}
    needed, attempts = train_size + test_size, 0
    while len(seen) < needed:
        attempts += 1
        if attempts > 50 * needed:
            raise CLIError(
                f"only {len(seen)} distinct questions with --terms {terms} --digits {digits}; "
                f"ask for fewer than {needed} or make the questions larger"
            )
        if task in NON_COPY_TASKS:
            question, reasoning, answer, value = NON_COPY_TASKS[task](rng, terms, digits)
            expression = question.split("?")[0]
        else:
            question, reasoning, answer = arithmetic_problem(rng, terms=terms, digits=digits)
            expression, value = question, answer
        if expression in seen:  # held out by the arithmetic itself, so options never leak a test item
            continue
        seen[expression] = {
            "prompt": [{"role": "user", "content": question}],
            "completion": [{"role": "assistant", "content": tagged_response(reasoning, answer)}],
            "answer": answer,
            "value": value,
        }
    records = list(seen.values())
    return records[:train_size], records[train_size:]


def name_the_cpu_accelerator(device: str) -> None:
    """Training on the CPU, tell deepspeed so (``DS_ACCELERATOR``, inherited by the training processes): where it is
    installed (a test dependency), its accelerator detection would otherwise print a warning in every process."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


def _apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.steps = min(args.steps, 20)
        args.train_size = min(args.train_size, 64)
        args.test_size = min(args.test_size, 16)


def trl_config(args: argparse.Namespace, out: Path, use_cpu: bool) -> dict[str, Any]:
    """The TRL config (``sftkey train``'s keys) that trains the tiny model on the demo's data: ab's CONFIG."""
    return {
        "model_name_or_path": str(out / "init"),
        "dataset_name": str(out / "train.jsonl"),
        "dtype": "float32",
        "max_steps": args.steps,
        "per_device_train_batch_size": args.batch_size,
        "learning_rate": args.learning_rate,
        "lr_scheduler_type": "cosine",
        "warmup_steps": max(1, args.steps // 20),
        "weight_decay": 0.0,
        "logging_steps": max(1, args.steps // 40),
        "save_strategy": "no",
        "report_to": "none",
        "bf16": False,
        "gradient_checkpointing": False,  # TRL 1.16 turns both on by default, CPU included
        "loss_type": "nll",  # every arm the same loss on every trl: 1.9's default chunked_nll has no per-token losses
        "use_cpu": use_cpu,
        "dataloader_num_workers": 0,
    }


def write_config(args: argparse.Namespace, out: Path, use_cpu: bool) -> Path:
    """``OUT/config.yaml``; its first line names the settings that made ``init/`` and the data, so a rerun with
    other ones is another plan to ``sftkey ab`` (refused in the same folder), not a resumed one."""
    import yaml

    made_by = " ".join(
        f"--{name.replace('_', '-')} {getattr(args, name)}"
        for name in ("task", "train_size", "test_size", "terms", "digits", "hidden_size", "layers", "seed")
    )
    path = out / "config.yaml"
    header = f"# sftkey demo's TRL config (sftkey train --config {path}); init/ and the data are from: {made_by}\n"
    path.write_text(header + yaml.safe_dump(trl_config(args, out, use_cpu), sort_keys=False), encoding="utf-8")
    return path


def ab_arguments(args: argparse.Namespace, out: Path, config: Path) -> argparse.Namespace:
    """``sftkey ab``'s arguments for the demo's config, test set, arms and seeds (its parser: its defaults)."""
    from .main import build_parser

    argv = [
        "ab", str(config), "--eval", str(out / "test.jsonl"), "--out", str(out), "--arms", args.arms,
        "--seeds", args.seeds or str(args.seed), "--stage2-ratio", str(args.stage2_ratio),
        "--max-new-tokens", "64", "--eval-batch-size", "64",
    ]  # fmt: skip
    if args.arms_file:
        argv += ["--arms-file", args.arms_file]
    return build_parser().parse_args(argv)


def run(args: argparse.Namespace) -> int:
    """Run the demo; with ``--json`` stdout holds only the result and everything else printed meanwhile goes to
    stderr, libraries' own prints included (deepspeed's logger writes to stdout). Exit status 1 when a unit failed."""
    result_stream = sys.stdout
    if args.device == "cpu":  # the units' evaluation too (sftkey eval takes the GPU where torch sees one)
        os.environ["CUDA_VISIBLE_DEVICES"] = ""
    name_the_cpu_accelerator(args.device)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        report, failed = _demo(args)
    if args.json:
        print(json.dumps(report), file=result_stream)
    else:
        _print_summary(report, args)
    return 1 if failed else 0


def _demo(args: argparse.Namespace) -> tuple[dict[str, Any], list[str]]:
    """Data, tokenizer, initial weights, TRL config, then ``sftkey ab`` on them: its report and its failed units."""
    from . import ab

    _apply_quick(args)
    arms = ab.resolve_arms(args.arms, args.arms_file, args.stage2_ratio)  # bad arms refused before anything is made
    started = time.perf_counter()
    out = Path(args.output_dir).resolve()
    out.mkdir(parents=True, exist_ok=True)
    _say(
        f"[1/3] Generating {args.train_size} training and {args.test_size} held-out {args.task} questions "
        f"({args.terms} numbers of {args.digits} digit(s))"
    )
    train, test = make_splits(args.task, args.train_size, args.test_size, args.terms, args.digits, args.seed)
    save_records(train, out / "train.jsonl")
    save_records(test, out / "test.jsonl")
    _say(f"      example: {train[0]['prompt'][0]['content']!r} -> {train[0]['completion'][0]['content']!r}")

    _say("[2/3] Building a tokenizer (digits split), a tiny random Llama and the TRL config that trains it")
    import torch

    from ..tiny import build_model, build_tokenizer

    texts = [r["prompt"][0]["content"] + "\n" + r["completion"][0]["content"] for r in train]
    tokenizer = build_tokenizer(str(out / "init"), vocab_size=300, texts=texts, split_digits=True)
    model = build_model(
        str(out / "init"), len(tokenizer), seed=args.seed, hidden_size=args.hidden_size, layers=args.layers
    )
    _say(f"      {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tokenizer)}")
    use_cpu = args.device == "cpu" or not torch.cuda.is_available()
    config = write_config(args, out, use_cpu)
    _say(f"      {config}")

    plan, configs = ab.build_plan(ab_arguments(args, out, config))
    ab.write_plan(out, plan, configs)
    jobs = len(arms) if use_cpu else 1  # a tiny model gains little from more threads, a lot from more processes
    side = f", {jobs} side by side" if jobs > 1 else ", one after another"
    _say(
        f"[3/3] sftkey ab: {len(arms)} arm(s) x {len(plan['seeds'])} seed(s), {plan['max_steps']} optimizer steps "
        f"each{side} ({out / 'plan.json'}):"
    )
    for arm, overrides in arms.items():
        _say(f"      {arm}: {ARM_LABELS.get(arm, 'plain SFT' if overrides == ab.PLAIN_SFT else overrides)}")
    report, failed = ab.execute(out, plan, jobs, args.threads, plot=not args.no_plot)
    settings = {"task": args.task, "train_size": len(train), "test_size": len(test)}
    return {**report, **settings, "wall_seconds": round(time.perf_counter() - started, 1)}, failed


def _print_summary(report: dict[str, Any], args: argparse.Namespace) -> None:
    """Below ab's report: the plot, how to re-score a model and where everything is."""
    out = report["out"]
    if report["plot"]:
        print(f"  plot: {report['plot']}")
    elif not args.no_plot:
        print("  (no plot: matplotlib is not installed; pip install matplotlib to get report.png)")
    unit = next((unit["name"] for unit in reversed(report["units"]) if unit["status"] == "ok"), None)
    if unit:
        print(f"  re-score a model: sftkey eval {out}/runs/{unit}/model {out}/test.jsonl -o {unit}.jsonl")
    print("  the same comparison on your model: sftkey ab CONFIG --eval EVAL.jsonl --out OUT (docs/ab.md)")
    print(f"  everything is in {out}/ ; total time {report['wall_seconds'] / 60:.1f} min")
