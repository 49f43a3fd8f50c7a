"""SFTKey under FSDP2 on one CUDA process: each mode trained with the TRL recipes' FSDP2 block (bf16, one process
launched by torchrun) and without FSDP; the losses must agree and every parameter must be a DTensor. The FSDP runs
also save a FULL_STATE_DICT checkpoint, which the CPU tests cannot (see the README, "Several GPUs").

    python benchmarks/fsdp_check.py --device cuda --json OUT.json    # the GPU machine (gpu.sh)
    python benchmarks/fsdp_check.py --device cpu                      # float32 on CPU, with the tests' FSDP patch

Exits non-zero when a loss differs by more than the tolerance or FSDP fell back to plain training.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
MODES: dict[str, dict[str, Any]] = {
    "two_stage": {"sftkey_mode": "two_stage", "sftkey_stage2_steps": 2},
    "key_only": {"sftkey_mode": "key_only"},
    "weighted": {"sftkey_mode": "weighted", "sftkey_key_weight": 3.0, "sftkey_other_weight": 0.5},
}
STEPS = 4
# bf16: FSDP2 casts the parameters to bf16 (MixedPrecisionPolicy) where the plain run autocasts; both round to bf16's
# 8-bit mantissa, so losses may differ by a few 1e-3 relative (the CPU bf16 test allows 2e-2 against float32).
# float32 (CPU): only summation order differs.
TOLERANCE = {"cuda": 2e-2, "cpu": 1e-5}


def recipe_fsdp_config(device: str) -> dict[str, Any]:
    """The FSDP2 block of recipes/trl/accelerate/fsdp2_8gpu.yaml; sharded checkpoints on CPU, where saving a
    FULL_STATE_DICT one fails."""
    import yaml

    config = yaml.safe_load((ROOT / "recipes" / "trl" / "accelerate" / "fsdp2_8gpu.yaml").read_text(encoding="utf-8"))
    block = dict(config["fsdp_config"])
    return block if device == "cuda" else {**block, "fsdp_state_dict_type": "SHARDED_STATE_DICT"}


def train(work: Path, device: str, mode: str, fsdp: bool) -> dict[str, Any]:
    """Train ``STEPS`` SGD steps of ``mode``; the logged losses and whether the parameters were sharded."""
    from datasets import Dataset
    from torch.distributed.tensor import DTensor
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from sftkey_plugin import SFTKeyConfig, SFTKeyTrainer
    from sftkey_plugin.examples import arithmetic_records

    sharding = {"fsdp": True, "fsdp_config": recipe_fsdp_config(device)} if fsdp else {}
    args = SFTKeyConfig(
        output_dir=str(work / f"{mode}-{'fsdp' if fsdp else 'plain'}"),
        sftkey=True,
        **MODES[mode],
        max_steps=STEPS,
        per_device_train_batch_size=4,
        optim="sgd",
        learning_rate=0.1,
        bf16=device == "cuda",
        use_cpu=device == "cpu",
        gradient_checkpointing=False,
        max_length=128,
        logging_steps=1,
        save_strategy="no",
        report_to=[],
        seed=0,
        dataloader_num_workers=0,
        disable_tqdm=True,
        **sharding,
    )
    trainer = SFTKeyTrainer(
        model=AutoModelForCausalLM.from_pretrained(str(work / "tiny")),
        args=args,
        train_dataset=Dataset.from_list(arithmetic_records(4 * STEPS, seed=7, form="prompt_completion")),
        processing_class=AutoTokenizer.from_pretrained(str(work / "tiny")),
    )
    trainer.train()
    sharded = all(isinstance(p, DTensor) for p in trainer.model.parameters())
    if fsdp and device == "cuda":
        trainer.save_model()  # a FULL_STATE_DICT checkpoint, gathered from the shards
    return {
        "losses": [h["loss"] for h in trainer.state.log_history if "loss" in h],
        "fsdp": trainer.is_fsdp_enabled and sharded,
        "saved": (Path(args.output_dir) / "model.safetensors").exists(),
    }


def fsdp_child(work: Path, device: str) -> None:
    """Inside ``torchrun --nproc_per_node 1``: every mode under FSDP2, written to ``WORK/fsdp.json``."""
    if device == "cpu":  # accelerate never chooses FSDP for CPU processes: the tests' patch lets it
        sys.path.insert(0, str(ROOT / "tests"))
        from sharded_worker import allow_fsdp_on_cpu

        allow_fsdp_on_cpu()
    results = {mode: train(work, device, mode, fsdp=True) for mode in MODES}
    (work / "fsdp.json").write_text(json.dumps(results))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--device", choices=["cpu", "cuda"], default="cuda")
    parser.add_argument("--json", help="write the results here")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    options = parser.parse_args()
    if options.child:
        fsdp_child(Path(options.child), options.device)
        return

    from sftkey_plugin.tiny import build_model, build_tokenizer

    work = Path(tempfile.mkdtemp(prefix="sftkey-fsdp-"))
    build_model(str(work / "tiny"), len(build_tokenizer(str(work / "tiny"))))
    plain = {mode: train(work, options.device, mode, fsdp=False) for mode in MODES}
    launch = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "1", __file__]
    launch += ["--device", options.device, "--child", str(work)]
    subprocess.run(launch, check=True, timeout=900)
    sharded = json.loads((work / "fsdp.json").read_text())

    tolerance, failures, report = TOLERANCE[options.device], [], {}
    for mode in MODES:
        one, many = plain[mode]["losses"], sharded[mode]["losses"]
        diff = max(abs(a - b) / abs(b) if b else abs(a) for a, b in zip(many, one, strict=True))
        report[mode] = {"plain": one, "fsdp": many, "max_rel_diff": diff, **sharded[mode]}
        print(f"{mode:10s} FSDP2 {'on' if sharded[mode]['fsdp'] else 'OFF'}: max relative loss difference {diff:.1e}")
        if len(one) != STEPS or diff > tolerance or not sharded[mode]["fsdp"]:
            failures.append(mode)
        if options.device == "cuda" and not sharded[mode]["saved"]:
            failures.append(f"{mode} (FULL_STATE_DICT save)")
    if options.json:
        Path(options.json).write_text(json.dumps({"device": options.device, "modes": report}, indent=1))
    if failures:
        sys.exit(f"FSDP2 check failed (tolerance {tolerance}): {failures}")
    print(f"FSDP2 check passed on {options.device} (relative tolerance {tolerance})")


if __name__ == "__main__":
    main()
