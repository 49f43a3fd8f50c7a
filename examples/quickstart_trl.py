"""SFTKey in a real TRL run on CPU: a tiny model, generated chain-of-thought data, the paper's two stages.

python examples/quickstart_trl.py [--steps 40] [--output-dir outputs/quickstart]
"""

from __future__ import annotations

import argparse
import logging

from datasets import Dataset

from sftkey_plugin import SFTKeyConfig, SFTKeyTrainer
from sftkey_plugin.examples import arithmetic_records
from sftkey_plugin.tiny import build_model, build_tokenizer


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=40, help="optimizer steps (stage 2 starts half-way)")
    parser.add_argument("--output-dir", default="outputs/quickstart")
    options = parser.parse_args()
    logging.basicConfig(level=logging.INFO, format="%(message)s")

    tokenizer = build_tokenizer(f"{options.output_dir}/tiny")
    model = build_model(f"{options.output_dir}/tiny", len(tokenizer))
    dataset = Dataset.from_list(arithmetic_records(512, seed=0, form="prompt_completion"))
    args = SFTKeyConfig(
        output_dir=options.output_dir,
        sftkey=True,
        sftkey_mode="two_stage",  # stage 1: every completion token; stage 2: the <Answer> block only
        sftkey_finder="tags",
        sftkey_stage2_ratio=0.5,
        max_steps=options.steps,
        per_device_train_batch_size=16,
        learning_rate=3e-3,
        logging_steps=5,
        bf16=False,
        gradient_checkpointing=False,
        save_strategy="no",
        report_to=[],
    )
    trainer = SFTKeyTrainer(model=model, args=args, train_dataset=dataset, processing_class=tokenizer)
    trainer.train()
    for entry in trainer.state.log_history:
        if "loss" in entry:
            print(
                f"step {entry['step']:>3}  stage {int(entry['sftkey/stage'])}  loss {entry['loss']:.3f}  "
                f"key loss {entry.get('sftkey/key_loss', float('nan')):.3f}  "
                f"reasoning loss {entry.get('sftkey/reasoning_loss', float('nan')):.3f}"
            )


if __name__ == "__main__":
    main()
