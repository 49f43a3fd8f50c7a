"""Training overhead of SFTKey against stock ``trl.SFTTrainer``: median step time and peak memory, as ratios.

Every arm trains the same randomly initialised model on the same data, batch and seed; arms are interleaved in
rounds (A B C ..., A B C ...) so drifting machine load hits them alike, and the ratio of medians is reported.

    python benchmarks/overhead.py                       # CPU: two small shapes, each arm in its own process
    python benchmarks/overhead.py --device cuda --shapes qwen-0.5b --packing --bf16   # the GPU run (gpu.sh)

Peak memory: ``torch.cuda.max_memory_allocated`` on GPU; on CPU the peak resident set of a fresh process per run
(``--isolate``, the default there), which includes the interpreter and libraries, so CPU memory ratios are diluted.
"""

from __future__ import annotations

import argparse
import gc
import json
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

# name -> LlamaConfig overrides; "large-vocab" has Qwen's vocabulary size, where the LM head dominates
SHAPES: dict[str, dict[str, Any]] = {
    "small": dict(
        vocab_size=32000,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=4,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "large-vocab": dict(
        vocab_size=151936,
        hidden_size=128,
        intermediate_size=384,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
    ),
    "qwen-0.5b": dict(
        vocab_size=151936,
        hidden_size=896,
        intermediate_size=4864,
        num_hidden_layers=24,
        num_attention_heads=14,
        num_key_value_heads=2,
        tie_word_embeddings=True,
    ),
}
# name -> SFTKeyConfig overrides (None: stock trl.SFTTrainer)
ARMS: dict[str, dict[str, Any] | None] = {
    "stock": None,
    "two_stage/stage1": dict(sftkey=True, sftkey_mode="two_stage", sftkey_stage2_steps=1 << 30),
    "two_stage/stage2": dict(sftkey=True, sftkey_mode="two_stage", sftkey_stage2_steps=0),
    "key_only": dict(sftkey=True, sftkey_mode="key_only"),
    "weighted": dict(sftkey=True, sftkey_mode="weighted", sftkey_key_weight=3.0),
}


def run_arm(options: argparse.Namespace, shape: str, arm: str) -> dict[str, float]:
    """Train one arm for warm-up + measured steps; return its median step time and peak memory."""
    import torch
    from datasets import Dataset
    from transformers import LlamaConfig, LlamaForCausalLM, TrainerCallback
    from trl import SFTTrainer

    from sftkey_plugin import SFTKeyConfig, SFTKeyTrainer
    from sftkey_plugin.examples import arithmetic_records
    from sftkey_plugin.tiny import build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="sftkey-bench-"))
    tokenizer = build_tokenizer(str(work / "tok"))
    torch.manual_seed(0)
    dtype = torch.bfloat16 if options.bf16 else torch.float32
    model = LlamaForCausalLM(LlamaConfig(max_position_embeddings=4096, **SHAPES[shape])).to(dtype)
    # long chains of reasoning: the answer is a small share of the completion, as in real CoT data
    records = arithmetic_records(4096, seed=0, form="prompt_completion", terms=options.terms)
    step_times: list[float] = []

    class Timer(TrainerCallback):
        def on_step_begin(self, args, state, control, **kwargs):
            self._sync()
            self.start = time.perf_counter()

        def on_step_end(self, args, state, control, **kwargs):
            self._sync()
            step_times.append(time.perf_counter() - self.start)

        @staticmethod
        def _sync() -> None:
            if torch.cuda.is_available():
                torch.cuda.synchronize()

    overrides = ARMS[arm]
    config = SFTKeyConfig(
        output_dir=str(work / "out"),
        max_steps=options.warmup + options.steps,
        per_device_train_batch_size=options.batch,
        max_length=options.max_length,
        packing=options.packing,
        bf16=options.bf16,
        gradient_checkpointing=False,
        learning_rate=1e-5,
        report_to=[],
        save_strategy="no",
        logging_steps=10**6,
        seed=0,
        disable_tqdm=True,
        use_cpu=options.device == "cpu",
        dataloader_num_workers=0,
        **(overrides or {}),
    )
    trainer_cls = SFTTrainer if overrides is None else SFTKeyTrainer
    trainer = trainer_cls(
        model=model,
        args=config,
        train_dataset=Dataset.from_list(records),
        processing_class=tokenizer,
        callbacks=[Timer()],
    )
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
    trainer.train()
    if options.device == "cuda":
        peak = torch.cuda.max_memory_allocated() / 2**20
    else:
        peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    trainer.accelerator.free_memory()  # in-process runs must not inherit the previous arm's memory
    del trainer, model
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return {"step_s": statistics.median(step_times[options.warmup :]), "peak_mib": peak}


def measure(options: argparse.Namespace, shape: str, arm: str) -> dict[str, float]:
    """One run, in a fresh process when isolating (so CPU peak RSS belongs to this arm alone)."""
    if not options.isolate:
        return run_arm(options, shape, arm)
    command = [sys.executable, __file__, *sys.argv[1:], "--child", shape, arm]  # the child returns before --json
    result = subprocess.run(command, capture_output=True, text=True, check=False)
    if result.returncode != 0:
        raise RuntimeError(f"{shape}/{arm} failed:\n{result.stderr[-3000:]}")
    return json.loads(result.stdout.strip().splitlines()[-1])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    parser.add_argument("--shapes", default="small,large-vocab", help=f"comma-separated, from {list(SHAPES)}")
    parser.add_argument("--arms", default=",".join(ARMS), help=f"comma-separated, from {list(ARMS)}")
    parser.add_argument("--rounds", type=int, default=3, help="interleaved rounds of all arms")
    parser.add_argument("--steps", type=int, default=10, help="measured optimizer steps per run")
    parser.add_argument("--warmup", type=int, default=3, help="unmeasured optimizer steps per run")
    parser.add_argument("--batch", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=512)
    parser.add_argument("--terms", type=int, default=12, help="reasoning steps per example")
    parser.add_argument("--packing", action="store_true")
    parser.add_argument("--bf16", action="store_true")
    parser.add_argument(
        "--isolate",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="one process per run (default: on for CPU, off for CUDA)",
    )
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        options.isolate = False
        print(json.dumps(run_arm(options, *options.child)))
        return
    if options.isolate is None:
        options.isolate = options.device == "cpu"

    shapes, arms = options.shapes.split(","), options.arms.split(",")
    runs: dict[tuple[str, str], list[dict[str, float]]] = {(s, a): [] for s in shapes for a in arms}
    for shape in shapes if not options.isolate else []:
        # a discarded first in-process run per shape: kernel compilation and autotuning happen there
        print(f"warm-up {shape}: {measure(options, shape, arms[0])}", flush=True)
    for round_index in range(options.rounds):
        for shape in shapes:
            order = arms[round_index % len(arms) :] + arms[: round_index % len(arms)]  # rotate who goes first
            for arm in order:
                runs[shape, arm].append(measure(options, shape, arm))
                print(f"round {round_index + 1} {shape:>11} {arm:<17} {runs[shape, arm][-1]}", flush=True)

    rows = []
    for shape in shapes:
        base_time = statistics.median(r["step_s"] for r in runs[shape, "stock"])
        base_mem = statistics.median(r["peak_mib"] for r in runs[shape, "stock"])
        for arm in arms:
            step = statistics.median(r["step_s"] for r in runs[shape, arm])
            mem = statistics.median(r["peak_mib"] for r in runs[shape, arm])
            rows.append(
                {
                    "shape": shape,
                    "arm": arm,
                    "step_ms": 1000 * step,
                    "time_ratio": step / base_time,
                    "peak_mib": mem,
                    "memory_ratio": mem / base_mem,
                }
            )
    print(f"\n{'shape':<12}{'arm':<18}{'step ms':>9}{'time x':>8}{'peak MiB':>10}{'mem x':>7}")
    for row in rows:
        print(
            f"{row['shape']:<12}{row['arm']:<18}{row['step_ms']:>9.1f}{row['time_ratio']:>8.3f}"
            f"{row['peak_mib']:>10.0f}{row['memory_ratio']:>7.3f}"
        )
    if options.json:
        settings = {k: v for k, v in vars(options).items() if k != "child"}
        Path(options.json).write_text(
            json.dumps(
                {"settings": settings, "rows": rows, "runs": {f"{s}/{a}": r for (s, a), r in runs.items()}}, indent=2
            )
        )


if __name__ == "__main__":
    main()
