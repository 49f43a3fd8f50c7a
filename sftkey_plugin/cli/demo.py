"""``sftkey demo``: plain SFT against SFTKey on generated arithmetic, with a tiny model trained from scratch on CPU.

Every arm starts from the same random weights, sees the same batches in the same order and runs the same number of
optimizer steps (``sft_short`` excepted); SFTKey's stage 2 (loss on the key answer tokens only) takes the last part
of those steps. All are scored by ``sftkey eval``'s code on held-out questions that never occur in training. The
arms are those of the equal-compute study (``benchmarks/reproduce.py``), which uses this module's training code.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import multiprocessing
import os
import random
import sys
import time
import warnings
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any, NamedTuple

from ..examples import arithmetic_problem, tagged_response
from ..schedule import stage2_start_step
from .ab_report import loss_curves, verdict, write_plot
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
        help="train a tiny model with plain SFT and with SFTKey on this CPU and compare them (< 10 min)",
        description="Generate chain-of-thought arithmetic in the paper's <Thinking>/<Answer> format, train a tiny "
        "Llama from scratch once per arm for the same number of optimizer steps (by default plain SFT, the paper's "
        "two_stage and a constant key weight of 2, the one variant of the equal-compute study that was not worse "
        "than plain SFT on either task), "
        "evaluate each on held-out questions and print accuracy, format accuracy and a paired bootstrap CI on each "
        "arm's difference from the first. Writes data, models, per-example results and (with matplotlib) demo.png "
        "to --output-dir.",
        epilog="Arms: "
        + "; ".join(f"{name}: {label}" for name, label in ARM_LABELS.items())
        + ". Task 'arithmetic': the answer repeats the last reasoning line. Task 'choice': the question lists "
        "four options and the answer is the letter of the computed value, so the answer tokens hold a step the "
        "reasoning does not. Task 'parity': the answer is whether the computed value is even or odd, likewise.",
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
        type=parse_arms,
        default=parse_arms(DEMO_ARMS),
        help=f"comma-separated arms to train, the first is the baseline the others are compared with (default "
        f"{DEMO_ARMS}; all: {','.join(ARM_LABELS)})",
    )
    parser.add_argument(
        "--stage2-ratio",
        type=float,
        default=0.8,
        help="share of the steps before two_stage's stage 2, soft_stage2's soft stage 2 and the end of ramp's ramp, "
        "and sft_short's share of the steps (default 0.8: the paper starts stage 2 once stage 1 has converged, which "
        "takes this tiny model about 80%% of the run; the plugin's own default, 0.5, starts stage 2 while the "
        "reasoning is still being learnt)",
    )
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch CPU threads (default 1: a tiny model gains nothing from more, and loses a lot "
        "when other processes share the cores)",
    )
    parser.add_argument(
        "--device",
        default="auto",
        choices=["auto", "cpu"],
        help="auto: train on the GPU where torch sees one (default), cpu: always on the CPU",
    )
    parser.add_argument("--no-plot", action="store_true", help="do not write demo.png")
    parser.add_argument("--json", action="store_true", help="print the final results as one JSON object")
    parser.set_defaults(func=run)


def parse_arms(value: str) -> list[str]:
    """``--arms``: known names, at least one, none twice."""
    arms = [arm.strip() for arm in value.split(",") if arm.strip()]
    unknown = [arm for arm in arms if arm not in ARM_LABELS]
    if unknown or not arms or len(set(arms)) < len(arms):
        raise argparse.ArgumentTypeError(f"{value!r}: give distinct arms from {','.join(ARM_LABELS)}")
    return arms


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


def _quiet_libraries() -> None:
    """Keep the demo's output to its own progress lines (library progress bars and warnings are noise here)."""
    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations in the libraries, not the user's code
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    plugin_logger = logging.getLogger("sftkey_plugin")
    if not any(getattr(h, "sftkey_demo", False) for h in plugin_logger.handlers):  # once per process, not per arm
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("    %(message)s"))
        handler.sftkey_demo = True  # type: ignore[attr-defined]
        plugin_logger.addHandler(handler)
    plugin_logger.setLevel(logging.INFO)


def _progress_callback(name: str, say: Callable[..., None]) -> Any:
    """A callback printing the loss every tenth of the run (the arms train side by side: no progress bars)."""
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            logs = logs or {}
            if "loss" in logs and state.global_step % max(1, state.max_steps // 10) == 0:
                stage = f" stage {int(logs['sftkey/stage'])}" if "sftkey/stage" in logs else ""
                say(f"    {name} step {state.global_step}/{state.max_steps}: loss {logs['loss']:.3f}{stage}")

    return Progress()


def plan_of(arm: str, args: argparse.Namespace) -> ArmPlan:
    """The arm's plan for the run's ``--steps`` and ``--stage2-ratio`` (and its ``key_loss_scale``, when set)."""
    return arm_settings(arm, args.steps, args.stage2_ratio, getattr(args, "key_loss_scale", 1.0))


def build_trainer(
    arm: str, args: argparse.Namespace, init_dir: Path, tokenizer: Any, train: list, peft_config: Any = None
) -> Any:
    """The arm's trainer, from the shared initial weights: stock ``trl.SFTTrainer`` for the plain arms (nothing of
    ours), ``SFTKeyTrainer`` for the others; ``peft_config`` trains a PEFT adapter instead of the whole model."""
    plan = plan_of(arm, args)
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM
    from trl import SFTTrainer

    from ..trl import SFTKeyConfig, SFTKeyTrainer

    config = SFTKeyConfig(
        output_dir=str(Path(args.output_dir) / arm),
        sftkey=plan.sftkey is not None,
        **(plan.sftkey or {}),
        max_steps=plan.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate * plan.learning_rate_scale,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, plan.steps // 20),
        weight_decay=0.0,
        logging_steps=max(1, plan.steps // 40),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        bf16=False,
        gradient_checkpointing=False,  # TRL 1.16 turns both on by default, CPU included
        loss_type="nll",  # every arm the same loss on every trl: 1.9's default chunked_nll has no per-token losses
        use_cpu=args.device == "cpu" or not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer_class = SFTTrainer if plan.sftkey is None else SFTKeyTrainer
    return trainer_class(
        model=AutoModelForCausalLM.from_pretrained(str(init_dir)),
        args=config,
        train_dataset=Dataset.from_list([{k: r[k] for k in ("prompt", "completion")} for r in train]),
        processing_class=tokenizer,
        peft_config=peft_config,
    )


def key_loss_scale(args: argparse.Namespace, init_dir: Path, tokenizer: Any, train: list) -> float:
    """The mean factor by which ``weighted_x3``'s weights raise plain SFT's loss with ``sftkey_normalize: tokens``:
    ``1 + (3 - 1) x`` the key share of the trained tokens, as its trainer marks them (the ``sft_lr_*`` arms' rate)."""
    stats = build_trainer("weighted_x3", args, init_dir, tokenizer, train).sftkey_callback.data_stats[0]
    return 1.0 + (X3_KEY_WEIGHT - 1.0) * stats.key_tokens / stats.completion_tokens


def train_arm(
    arm: str,
    args: argparse.Namespace,
    init_dir: Path,
    tokenizer: Any,
    train: list,
    say: Callable[..., None],
    peft_config: Any = None,
) -> tuple[Any, list]:
    """Train one arm (``arm_settings``, ``build_trainer``); returns the model and its log history."""
    from transformers import PrinterCallback

    trainer = build_trainer(arm, args, init_dir, tokenizer, train, peft_config)
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_callback(arm, say))
    trainer.train()
    trainer.save_model(str(Path(args.output_dir) / arm))
    return trainer.model, trainer.state.log_history


def _say(*parts: Any) -> None:
    print(*parts, flush=True)


def _apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.steps = min(args.steps, 20)
        args.train_size = min(args.train_size, 64)
        args.test_size = min(args.test_size, 16)


def name_the_cpu_accelerator(device: str) -> None:
    """Training on the CPU, tell deepspeed so (``DS_ACCELERATOR``, inherited by the arms' processes): where it is
    installed (a test dependency), its accelerator detection would otherwise print a warning in every process."""
    import torch

    if device == "cpu" or not torch.cuda.is_available():
        os.environ.setdefault("DS_ACCELERATOR", "cpu")


def run(args: argparse.Namespace) -> int:
    """Run the demo; with ``--json`` stdout holds only the result and everything else printed meanwhile goes to
    stderr, libraries' own prints included (deepspeed's logger writes to stdout)."""
    result_stream = sys.stdout
    name_the_cpu_accelerator(args.device)
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        report = _demo(args)
    if args.json:
        print(json.dumps(report), file=result_stream)
    else:
        _print_summary(report, args)
    return 0


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    """Data, tokenizer, shared initial weights, one training and evaluation per arm, comparisons, plot: the report."""
    _apply_quick(args)
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)
    _say(
        f"[1/4] Generating {args.train_size} training and {args.test_size} held-out {args.task} questions "
        f"({args.terms} numbers of {args.digits} digit(s))"
    )
    train, test = make_splits(args.task, args.train_size, args.test_size, args.terms, args.digits, args.seed)
    save_records(train, out / "train.jsonl")
    save_records(test, out / "test.jsonl")
    _say(f"      example: {train[0]['prompt'][0]['content']!r} -> {train[0]['completion'][0]['content']!r}")

    _say("[2/4] Building a tokenizer (digits split) and a tiny random Llama")
    from ..tiny import build_model, build_tokenizer
    from .evaluate import compare_results

    texts = [r["prompt"][0]["content"] + "\n" + r["completion"][0]["content"] for r in train]
    tokenizer = build_tokenizer(str(out / "init"), vocab_size=300, texts=texts, split_digits=True)
    model = build_model(
        str(out / "init"), len(tokenizer), seed=args.seed, hidden_size=args.hidden_size, layers=args.layers
    )
    _say(f"      {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tokenizer)}")

    if any(arm in LOSS_SCALED_RATES for arm in args.arms):
        args.key_loss_scale = key_loss_scale(args, out / "init", tokenizer, train)
        _say(f"      weighted_x3's loss scale: {args.key_loss_scale:.3f} (the sft_lr_* arms' learning rates follow it)")
    _say(f"[3/4] Training and evaluating {len(args.arms)} arm(s) side by side, one process each:")
    for arm in args.arms:
        plan = plan_of(arm, args)
        rate = (
            f", learning rate {args.learning_rate * plan.learning_rate_scale:.2g}" if arm in LOSS_SCALED_RATES else ""
        )
        _say(f"      {arm}: {ARM_LABELS[arm]}, {plan.steps} optimizer steps{rate}")
    # spawned processes: each arm trains as it would alone (same seed, weights and batches), on its own core
    with ProcessPoolExecutor(len(args.arms), mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {arm: pool.submit(_train_and_score, arm, args, train, test) for arm in args.arms}
        results = {arm: future.result() for arm, future in futures.items()}

    baseline, others = args.arms[0], args.arms[1:]
    _say(f"[4/4] Comparing each arm with {baseline}, paired per question")
    comparisons = {
        arm: compare_results(results[baseline]["rows"], results[arm]["rows"], seed=args.seed) for arm in others
    }
    (out / "comparison.json").write_text(json.dumps(comparisons, indent=1) + "\n", encoding="utf-8")
    plot = None
    if not args.no_plot:
        curves = {arm: loss_curves(result["history"]) for arm, result in results.items()}
        scores = {arm: {m: [r["summary"][m]] for m in ("accuracy", "format_accuracy")} for arm, r in results.items()}
        plot = write_plot(out / "demo.png", curves, scores, f"held-out {args.task} questions (n={args.test_size})")
    return {
        "task": args.task,
        "steps": args.steps,
        "train_size": len(train),
        "test_size": len(test),
        "baseline": baseline,
        "arms": {arm: results[arm]["summary"] for arm in args.arms},
        "comparisons": comparisons,
        "plot": plot,
        "wall_seconds": round(time.perf_counter() - started, 1),
        "output_dir": str(out),
    }


def _train_and_score(arm: str, args: argparse.Namespace, train: list, test: list) -> dict[str, Any]:
    """In a worker process: train one arm, score it on the test questions, write its results; summary, rows, log."""
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        import torch
        from transformers import AutoTokenizer

        from .evaluate import evaluate_records, write_results

        _quiet_libraries()
        torch.set_num_threads(args.threads)
        out = Path(args.output_dir)
        tokenizer = AutoTokenizer.from_pretrained(str(out / "init"))
        started = time.perf_counter()
        trained, history = train_arm(arm, args, out / "init", tokenizer, train, _say)
        train_seconds = time.perf_counter() - started
        rows, summary = evaluate_records(trained, tokenizer, test, batch_size=64, max_new_tokens=64)
        summary.update(train_seconds=round(train_seconds, 1), steps=plan_of(arm, args).steps)
        write_results(rows, summary, str(out / f"{arm}.jsonl"), str(out / f"{arm}.summary.json"))
        print(
            f"      {arm}: accuracy {summary['accuracy']:.3f}, format accuracy {summary['format_accuracy']:.3f} "
            f"(trained in {train_seconds:.0f} s)",
            flush=True,
        )
    return {"summary": summary, "rows": rows, "history": history}


def _print_summary(report: dict[str, Any], args: argparse.Namespace) -> None:
    """Each arm's comparison table with the baseline, a verdict and where everything is."""
    from .evaluate import format_comparison

    baseline, out = report["baseline"], report["output_dir"]
    for arm, comparison in report["comparisons"].items():
        print(format_comparison(comparison, baseline, arm))
        print(verdict(comparison["accuracy"]["difference"], comparison["accuracy"]["ci"], arm, baseline))
    if report["plot"]:
        print(f"  plot: {report['plot']}")
    elif not args.no_plot:
        print("  (no plot: matplotlib is not installed; pip install matplotlib to get demo.png)")
    arm = args.arms[-1]
    print(f"  re-score a model: sftkey eval {out}/{arm} {out}/test.jsonl -o {arm}.jsonl")
    print(f"  everything is in {out}/ ; total time {report['wall_seconds'] / 60:.1f} min")
