"""``sftkey demo``: plain SFT against SFTKey on generated arithmetic, with a tiny model trained from scratch on CPU.

Both arms start from the same random weights, see the same batches in the same order and run the same number of
optimizer steps; SFTKey's stage 2 (loss on the key answer tokens only) takes the last part of those steps. Both
are scored by ``sftkey eval``'s code on held-out questions that never occur in training.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import random
import sys
import time
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

from ..examples import arithmetic_problem, tagged_response
from .data import CLIError, save_records

ARMS = ("sft", "sftkey")
LETTERS = "ABCD"
PARITY = ("even", "odd")


def add_parser(subparsers: Any) -> None:
    """Register ``demo`` and its options."""
    parser = subparsers.add_parser(
        "demo",
        help="train a tiny model with plain SFT and with SFTKey on this CPU and compare them (< 10 min)",
        description="Generate chain-of-thought arithmetic in the paper's <Thinking>/<Answer> format, train a tiny "
        "Llama from scratch twice for the same number of optimizer steps (plain SFT; SFTKey two_stage), evaluate "
        "both on held-out questions and print accuracy, format accuracy and a paired bootstrap CI on the difference. "
        "Writes data, models, per-example results and (with matplotlib) demo.png to --output-dir.",
        epilog="Task 'arithmetic': the answer repeats the last reasoning line. Task 'choice': the question lists "
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
    parser.add_argument("--sftkey-mode", default="two_stage", choices=["two_stage", "key_only", "weighted"])
    parser.add_argument(
        "--stage2-ratio",
        type=float,
        default=0.8,
        help="two_stage: share of the steps before stage 2 starts (default 0.8: the paper starts stage 2 once stage "
        "1 has converged, which takes this tiny model about 80%% of the run; the plugin's own default, 0.5, starts "
        "stage 2 while the reasoning is still being learnt)",
    )
    parser.add_argument("--key-weight", type=float, default=2.0, help="weighted mode: weight of key tokens")
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
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(logging.Formatter("    %(message)s"))
    plugin_logger = logging.getLogger("sftkey_plugin")
    plugin_logger.addHandler(handler)
    plugin_logger.setLevel(logging.INFO)


def _progress_callback(name: str, say: Callable[..., None]) -> Any:
    """A callback with a tqdm bar on a terminal, else a line every tenth of the run."""
    from tqdm.auto import tqdm
    from transformers import TrainerCallback

    class Progress(TrainerCallback):
        def on_train_begin(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.bar = tqdm(total=state.max_steps, desc=f"  training {name}", unit="step", disable=None)
            self.every = max(1, state.max_steps // 10)

        def on_step_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.bar.update(1)

        def on_log(self, args, state, control, logs=None, **kwargs):  # type: ignore[no-untyped-def]
            logs = logs or {}
            if "loss" not in logs:
                return
            stage = f" stage {int(logs['sftkey/stage'])}" if "sftkey/stage" in logs else ""
            self.bar.set_postfix_str(f"loss {logs['loss']:.3f}{stage}")
            if self.bar.disable and state.global_step % self.every == 0:
                say(f"    {name} step {state.global_step}/{state.max_steps}: loss {logs['loss']:.3f}{stage}")

        def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
            self.bar.close()

    return Progress()


def train_arm(
    arm: str,
    args: argparse.Namespace,
    init_dir: Path,
    tokenizer: Any,
    train: list,
    say: Callable[..., None],
    sftkey: dict[str, Any] | None = None,
    steps: int | None = None,
    peft_config: Any = None,
) -> tuple[Any, list]:
    """Train one arm from the shared initial weights; returns the model and its log history.

    ``sftkey``: the arm's ``sftkey_*`` settings (None: stock ``trl.SFTTrainer``); by default the demo's own, for the
    arm named ``sftkey``. ``steps`` defaults to ``args.steps``; ``peft_config`` trains a PEFT adapter instead.
    """
    if sftkey is None and arm == "sftkey":
        sftkey = {
            "sftkey_mode": args.sftkey_mode,
            "sftkey_stage2_ratio": args.stage2_ratio,
            "sftkey_key_weight": args.key_weight,
        }
    import torch
    from datasets import Dataset
    from transformers import AutoModelForCausalLM, PrinterCallback
    from trl import SFTTrainer

    from ..trl import SFTKeyConfig, SFTKeyTrainer

    model = AutoModelForCausalLM.from_pretrained(str(init_dir))
    config = SFTKeyConfig(
        output_dir=str(Path(args.output_dir) / arm),
        sftkey=sftkey is not None,
        **(sftkey or {}),
        max_steps=steps or args.steps,
        per_device_train_batch_size=args.batch_size,
        learning_rate=args.learning_rate,
        lr_scheduler_type="cosine",
        warmup_steps=max(1, (steps or args.steps) // 20),
        weight_decay=0.0,
        logging_steps=max(1, (steps or args.steps) // 40),
        save_strategy="no",
        report_to=[],
        seed=args.seed,
        data_seed=args.seed,
        bf16=False,
        gradient_checkpointing=False,  # TRL 1.16 turns both on by default, CPU included
        use_cpu=args.device == "cpu" or not torch.cuda.is_available(),
        dataloader_num_workers=0,
        disable_tqdm=True,
    )
    trainer_class = SFTTrainer if sftkey is None else SFTKeyTrainer  # plain arms: stock TRL, nothing of ours
    records = [{k: r[k] for k in ("prompt", "completion")} for r in train]
    trainer = trainer_class(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        peft_config=peft_config,
    )
    trainer.remove_callback(PrinterCallback)
    trainer.add_callback(_progress_callback(arm, say))
    trainer.train()
    trainer.save_model(str(Path(args.output_dir) / arm))
    return model, trainer.state.log_history


def _apply_quick(args: argparse.Namespace) -> None:
    if args.quick:
        args.steps = min(args.steps, 20)
        args.train_size = min(args.train_size, 64)
        args.test_size = min(args.test_size, 16)


def run(args: argparse.Namespace) -> int:
    """Run the demo; with ``--json`` stdout holds only the result and everything else printed meanwhile goes to
    stderr, libraries' own prints included (deepspeed's logger writes to stdout)."""
    result_stream = sys.stdout
    with contextlib.redirect_stdout(sys.stderr) if args.json else contextlib.nullcontext():
        report = _demo(args)
    if args.json:
        print(json.dumps(report), file=result_stream)
    else:
        _print_summary(report, args)
    return 0


def _demo(args: argparse.Namespace) -> dict[str, Any]:
    """Data, tokenizer, shared initial weights, two trainings, two evaluations, comparison, plot: the report."""
    _apply_quick(args)
    started = time.perf_counter()
    out = Path(args.output_dir)
    out.mkdir(parents=True, exist_ok=True)

    def say(*parts: Any) -> None:
        print(*parts, flush=True)

    say(
        f"[1/5] Generating {args.train_size} training and {args.test_size} held-out {args.task} questions "
        f"({args.terms} numbers of {args.digits} digit(s))"
    )
    train, test = make_splits(args.task, args.train_size, args.test_size, args.terms, args.digits, args.seed)
    save_records(train, out / "train.jsonl")
    save_records(test, out / "test.jsonl")
    say(f"      example: {train[0]['prompt'][0]['content']!r} -> {train[0]['completion'][0]['content']!r}")

    say("[2/5] Building a tokenizer (digits split) and a tiny random Llama (loading the training libraries)")
    import torch

    from ..tiny import build_model, build_tokenizer
    from .evaluate import compare_results, evaluate_records, write_results

    _quiet_libraries()
    torch.set_num_threads(args.threads)
    texts = [r["prompt"][0]["content"] + "\n" + r["completion"][0]["content"] for r in train]
    tokenizer = build_tokenizer(str(out / "init"), vocab_size=300, texts=texts, split_digits=True)
    model = build_model(
        str(out / "init"), len(tokenizer), seed=args.seed, hidden_size=args.hidden_size, layers=args.layers
    )
    say(f"      {sum(p.numel() for p in model.parameters()):,} parameters, vocabulary {len(tokenizer)}")

    results: dict[str, Any] = {}
    histories: dict[str, list] = {}
    for number, arm in enumerate(ARMS, 3):
        label = "plain SFT" if arm == "sft" else f"SFTKey ({args.sftkey_mode})"
        say(f"[{number}/5] Training {label} for {args.steps} optimizer steps, then evaluating")
        arm_started = time.perf_counter()
        trained, histories[arm] = train_arm(arm, args, out / "init", tokenizer, train, say)
        train_seconds = time.perf_counter() - arm_started
        rows, summary = evaluate_records(trained, tokenizer, test, batch_size=64, max_new_tokens=64)
        summary.update(train_seconds=round(train_seconds, 1), steps=args.steps)
        write_results(rows, summary, str(out / f"{arm}.jsonl"), str(out / f"{arm}.summary.json"))
        results[arm] = {"summary": summary, "rows": rows}
        say(
            f"      {label}: accuracy {summary['accuracy']:.3f}, format accuracy {summary['format_accuracy']:.3f} "
            f"(trained in {train_seconds:.0f} s)"
        )

    say("[5/5] Comparing (A = plain SFT, B = SFTKey)")
    comparison = compare_results(results["sft"]["rows"], results["sftkey"]["rows"], seed=args.seed)
    (out / "comparison.json").write_text(json.dumps(comparison, indent=1) + "\n", encoding="utf-8")
    plot = write_plot(out / "demo.png", histories, results, args) if not args.no_plot else None
    wall = time.perf_counter() - started
    report = {
        "task": args.task,
        "steps": args.steps,
        "train_size": len(train),
        "test_size": len(test),
        "sft": results["sft"]["summary"],
        "sftkey": results["sftkey"]["summary"],
        "comparison": comparison,
        "plot": plot,
        "wall_seconds": round(wall, 1),
        "output_dir": str(out),
    }
    return report


def _print_summary(report: dict[str, Any], args: argparse.Namespace) -> None:
    """The comparison table, a verdict and where everything is."""
    from .evaluate import format_comparison

    comparison, out = report["comparison"], report["output_dir"]
    print(format_comparison(comparison, "plain SFT", "SFTKey"))
    print(_verdict(comparison))
    if report["plot"]:
        print(f"  plot: {report['plot']}")
    elif not args.no_plot:
        print("  (no plot: matplotlib is not installed; pip install matplotlib to get demo.png)")
    print(f"  re-score a model: sftkey eval {out}/sftkey {out}/test.jsonl -o sftkey.jsonl")
    print(f"  everything is in {out}/ ; total time {report['wall_seconds'] / 60:.1f} min")


def _verdict(comparison: dict[str, Any]) -> str:
    """One honest sentence on what this run shows."""
    low, high = comparison["accuracy"]["ci"]
    diff = comparison["accuracy"]["difference"]
    if low > 0:
        return f"  On this run SFTKey beat plain SFT by {100 * diff:.1f} accuracy points at equal steps."
    if high < 0:
        return f"  On this run SFTKey was worse than plain SFT by {-100 * diff:.1f} accuracy points at equal steps."
    return "  On this run the two are not distinguishable; try more --steps or another --seed."


def write_plot(path: Path, histories: dict[str, list], results: dict[str, Any], args: argparse.Namespace) -> str | None:
    """Loss curves of both arms and their accuracies as a PNG; None when matplotlib is not importable."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return None
    figure, (curves, bars) = plt.subplots(1, 2, figsize=(11, 4))
    for arm, history in histories.items():
        logged = [entry for entry in history if "loss" in entry]
        note = " (stage 2: key tokens only)" if arm == "sftkey" and args.sftkey_mode == "two_stage" else ""
        curves.plot([e["step"] for e in logged], [e["loss"] for e in logged], label=f"{arm} training loss{note}")
        keyed = [entry for entry in history if "sftkey/key_loss" in entry]
        if keyed:
            curves.plot(
                [e["step"] for e in keyed],
                [e["sftkey/key_loss"] for e in keyed],
                "--",
                label=f"{arm} key-token loss",
            )
    if args.sftkey_mode == "two_stage":
        curves.axvline(args.steps * args.stage2_ratio, color="grey", linestyle=":", label="SFTKey stage 2 starts")
    curves.set(xlabel="optimizer step", ylabel="loss", yscale="log", title="training loss")
    curves.legend(fontsize=8)
    names = list(results)
    for offset, (metric, label) in enumerate((("accuracy", "accuracy"), ("format_accuracy", "format accuracy"))):
        values = [results[name]["summary"][metric] for name in names]
        positions = [i + offset * 0.4 for i in range(len(names))]
        bars.bar(positions, values, width=0.4, label=label)
        for x, value in zip(positions, values):
            bars.text(x, value + 0.01, f"{value:.2f}", ha="center", fontsize=8)
    bars.set_xticks([i + 0.2 for i in range(len(names))], names)
    bars.set(ylim=(0, 1.1), title=f"held-out {args.task} questions (n={args.test_size})")
    bars.legend(fontsize=8)
    figure.tight_layout()
    figure.savefig(path, dpi=100)
    plt.close(figure)
    return str(path)
