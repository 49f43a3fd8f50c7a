"""Data preparation cost: SFTKey's key marking against TRL's own tokenisation of the same chat data.

Times ``SFTTrainer._prepare_dataset`` (stock) and ``SFTKeyTrainer._prepare_dataset`` (tokenisation with offsets,
finder, alignment, labels, truncation, policy) on the same examples, interleaved, with 1 and more processes.

    python benchmarks/transform.py [--examples 10000] [--num-proc 1,2] [--repeats 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any


def build_trainers(work: Path) -> dict[str, Any]:
    """A stock and an SFTKey trainer on a tiny model: only their ``_prepare_dataset`` is timed."""
    from datasets import Dataset
    from trl import SFTTrainer

    from sftkey_plugin import SFTKeyConfig, SFTKeyTrainer
    from sftkey_plugin.examples import arithmetic_records
    from sftkey_plugin.tiny import build_model, build_tokenizer

    tokenizer = build_tokenizer(str(work))
    build_model(str(work), len(tokenizer))
    seed_data = Dataset.from_list(arithmetic_records(8, form="messages"))
    trainers = {}
    for name, cls, extra in [("stock", SFTTrainer, {}), ("sftkey", SFTKeyTrainer, {"sftkey": True})]:
        args = SFTKeyConfig(
            output_dir=str(work / name), bf16=False, report_to=[], max_length=512, assistant_only_loss=False, **extra
        )
        trainers[name] = (cls(model=str(work), args=args, train_dataset=seed_data, processing_class=tokenizer), args)
    return trainers


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--examples", type=int, default=10000)
    parser.add_argument("--num-proc", default="1,2", help="comma-separated dataset_num_proc values")
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--json", help="write the results here")
    options = parser.parse_args()

    from datasets import Dataset, disable_progress_bars

    from sftkey_plugin.examples import arithmetic_records

    disable_progress_bars()
    data = Dataset.from_list(arithmetic_records(options.examples, seed=1, form="messages", terms=8))
    trainers = build_trainers(Path(tempfile.mkdtemp(prefix="sftkey-transform-")))
    rows = []
    for num_proc in [int(n) for n in options.num_proc.split(",")]:
        times: dict[str, list[float]] = {name: [] for name in trainers}
        for repeat in range(options.repeats):
            for name in sorted(trainers, reverse=repeat % 2 == 1):  # alternate who goes first
                trainer, args = trainers[name]
                args.dataset_num_proc = num_proc if num_proc > 1 else None
                start = time.perf_counter()
                prepared = trainer._prepare_dataset(data, trainer.processing_class, args, False, None, "train")
                times[name].append(time.perf_counter() - start)
                assert len(prepared) == options.examples
        stock, sftkey = statistics.median(times["stock"]), statistics.median(times["sftkey"])
        rows.append(
            {"num_proc": num_proc, "stock_s": stock, "sftkey_s": sftkey, "ratio": sftkey / stock, "runs": times}
        )
        print(
            f"num_proc {num_proc}: stock {stock:.2f} s, sftkey {sftkey:.2f} s, ratio {sftkey / stock:.3f}", flush=True
        )
    if options.json:
        Path(options.json).write_text(json.dumps({"settings": vars(options), "rows": rows}, indent=2))


if __name__ == "__main__":
    main()
