"""Training overhead of the SFTKey Axolotl plugin: ``axolotl train`` with and without it, as ratios.

Each arm is a real ``python -m axolotl.cli.train`` process on the same tiny model, data, batch and seed. A step's
time is the wall time between two ``on_step_end`` events of the trainer (a whole optimizer step: data, forward,
backward, optimizer, callbacks); each run reports the median over its steps after ``--warmup``, so start-up and its
jitter do not enter. Peak memory is the process's peak resident set. Arms are interleaved over rounds, and each arm's
figure is the median over rounds.

    python benchmarks/overhead_axolotl.py [--rounds 5] [--steps 40] [--warmup 5] [--json out.json]
    python benchmarks/overhead_axolotl.py --before /tmp/old-checkout   # also each SFTKey arm on an older plugin

Between processes the same arm's step time varies by up to 10-20% on a small shared CPU machine; the per-round
spread is printed with each arm, and the ratios mean something only where they exceed it.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

import yaml

ARMS: dict[str, dict[str, Any]] = {
    "stock": {},
    "two_stage/stage1": {"sftkey_mode": "two_stage", "sftkey_stage2_steps": 1 << 30},
    "two_stage/stage2": {"sftkey_mode": "two_stage", "sftkey_stage2_steps": 0},
    "weighted": {"sftkey_mode": "weighted", "sftkey_key_weight": 3.0},
}
# Runs the training module with a timestamp at the end of every optimizer step, and reports the median step time
# after the warm-up and the peak resident set on exit (Axolotl's CLI ends through sys.exit)
RUNNER = (
    "import atexit, resource, runpy, statistics, sys, time\n"
    "import transformers.trainer_callback as tc\n"
    "stamps, original, warmup = [], tc.CallbackHandler.on_step_end, int(sys.argv[2])\n"
    "def on_step_end(self, *args, **kwargs):\n"
    "    stamps.append(time.perf_counter())\n"
    "    return original(self, *args, **kwargs)\n"
    "tc.CallbackHandler.on_step_end = on_step_end\n"
    "def report():\n"
    "    steps = [b - a for a, b in zip(stamps, stamps[1:])][warmup:]\n"
    "    print('STEP_S', statistics.median(steps), file=sys.stderr)\n"
    "    print('PEAK_RSS_KIB', resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)\n"
    "atexit.register(report)\n"
    "sys.argv = ['axolotl.cli.train', sys.argv[1]]\n"
    "runpy.run_module('axolotl.cli.train', run_name='__main__')\n"
)


def base_config(work: Path, data: Path, steps: int, packing: bool) -> dict[str, Any]:
    """An ordinary CPU Axolotl config on the tiny model (the keys ENVIRONMENT.md lists for CPU)."""
    return {
        "base_model": str(work / "tiny"), "datasets": [{"path": str(data), "ds_type": "json", "type": "chat_template"}],
        "dataset_prepared_path": str(work / "prepared"), "output_dir": str(work / "out"), "sequence_len": 512,
        "micro_batch_size": 8, "gradient_accumulation_steps": 1, "max_steps": steps, "learning_rate": 1e-4,
        "optimizer": "adamw_torch", "lr_scheduler": "constant", "logging_steps": 1000, "seed": 0, "bf16": False,
        "fp16": False, "tf32": False, "flash_attention": False, "attn_implementation": "sdpa",
        "gradient_checkpointing": False, "dataloader_num_workers": 0, "dataloader_pin_memory": False,
        "save_strategy": "no", "val_set_size": 0, "dataset_num_proc": 1, "sample_packing": packing,
        "pad_to_sequence_len": packing,
    }  # fmt: skip


BEFORE = " @before"


def run(work: Path, data: Path, arm: str, options: argparse.Namespace) -> tuple[float, float]:
    """One ``axolotl train``: (median step seconds after the warm-up, peak RSS MiB). An arm ending in BEFORE runs
    the plugin from ``options.before`` (a checkout of an older version)."""
    config = base_config(work, data, options.steps, options.packing)
    name = arm.removesuffix(BEFORE)
    if name != "stock":
        config.update({"plugins": ["sftkey_plugin.axolotl.SFTKeyPlugin"], "sftkey": True, **ARMS[name]})
    path = work / f"{arm.replace('/', '_').replace(' ', '')}.yml"
    path.write_text(yaml.safe_dump(config))
    env = {**os.environ, "AXOLOTL_DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1",
           "WANDB_DISABLED": "true"}  # fmt: skip
    if arm.endswith(BEFORE):
        env["PYTHONPATH"] = options.before
    result = subprocess.run([sys.executable, "-c", RUNNER, str(path), str(options.warmup)], capture_output=True,
                            text=True, env=env, cwd=work, check=False)  # fmt: skip
    output = result.stdout + result.stderr
    if result.returncode != 0:
        raise RuntimeError(f"{arm} failed:\n{output[-3000:]}")
    lines = output.splitlines()
    step = next(float(line.split()[1]) for line in lines if line.startswith("STEP_S"))
    peak = next(int(line.split()[1]) for line in lines if line.startswith("PEAK_RSS_KIB")) / 1024
    return step, peak


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=40)
    parser.add_argument("--warmup", type=int, default=5)
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--before", help="a checkout of an older plugin: its SFTKey arms run too, interleaved")
    parser.add_argument("--json")
    options = parser.parse_args()

    from sftkey_plugin.examples import arithmetic_records
    from sftkey_plugin.tiny import build_model, build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="sftkey-axolotl-bench-"))
    tokenizer = build_tokenizer(str(work / "tiny"))
    build_model(str(work / "tiny"), len(tokenizer))
    data = work / "data.jsonl"
    records = arithmetic_records(2048, seed=0, form="messages", terms=12)
    data.write_text("".join(json.dumps({"messages": r["messages"]}) + "\n" for r in records))

    arms = list(ARMS) + ([arm + BEFORE for arm in ARMS if arm != "stock"] if options.before else [])
    results: dict[str, list[dict[str, float]]] = {arm: [] for arm in arms}
    for round_index in range(options.rounds):
        for arm in arms[round_index % len(arms) :] + arms[: round_index % len(arms)]:
            step, peak = run(work, data, arm, options)
            results[arm].append({"step_s": step, "peak_mib": peak})
            print(f"round {round_index + 1} {arm:<25} step {1000 * step:.1f} ms, peak {peak:.0f} MiB", flush=True)
    base_step = statistics.median(r["step_s"] for r in results["stock"])
    base_mem = statistics.median(r["peak_mib"] for r in results["stock"])
    rows = []
    print(f"\n{'arm':<26}{'step ms':>9}{'rounds ms':>14}{'time x':>8}{'peak MiB':>10}{'mem x':>7}")
    for arm in arms:
        steps = [1000 * r["step_s"] for r in results[arm]]
        step, spread = statistics.median(steps) / 1000, f"{min(steps):.1f}-{max(steps):.1f}"
        mem = statistics.median(r["peak_mib"] for r in results[arm])
        rows.append({"arm": arm, "step_ms": 1000 * step, "time_ratio": step / base_step, "peak_mib": mem,
                     "memory_ratio": mem / base_mem})  # fmt: skip
        print(f"{arm:<26}{1000 * step:>9.1f}{spread:>14}{step / base_step:>8.3f}{mem:>10.0f}{mem / base_mem:>7.3f}")
    if options.json:
        Path(options.json).write_text(json.dumps({"settings": vars(options), "rows": rows, "runs": results}, indent=2))


if __name__ == "__main__":
    main()
