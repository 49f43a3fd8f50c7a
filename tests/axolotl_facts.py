"""A test-only Axolotl plugin (``plugins: [axolotl_facts.RunFacts]``, with ``tests/`` on the path) that records what
an ``axolotl train`` run was made of, to compare a run where the SFTKey plugin is installed (and, on Axolotl 0.21,
discovered) with one where it is not. It imports nothing of this package, so it also runs where it is not installed.

When training ends it writes ``<output_dir>/facts.json``: the plugins Axolotl loaded, whether ``sftkey_plugin`` could
be imported, the validated config, the trainer and collator classes, the training arguments, the loss settings, the
prepared train/eval rows (hashed) and the log history without timings.
"""

from __future__ import annotations

import hashlib
import importlib.util
import json
from pathlib import Path
from typing import Any

from axolotl.integrations.base import BasePlugin, PluginManager
from transformers import TrainerCallback

TIMING_KEYS = ("runtime", "per_sec", "total_flos")


def _name(value: Any) -> str | None:
    return None if value is None else f"{type(value).__module__}.{type(value).__qualname__}"


def _rows_digest(dataset: Any) -> str | None:
    if dataset is None:
        return None
    return hashlib.sha256(json.dumps(dataset.to_list(), sort_keys=True).encode()).hexdigest()


class _SaveFacts(TrainerCallback):
    def __init__(self, cfg: Any, trainer: Any) -> None:
        self.cfg, self.trainer = cfg, trainer

    def on_train_end(self, args, state, control, **kwargs):  # type: ignore[no-untyped-def]
        trainer = self.trainer
        facts = {
            "plugins": list(PluginManager.get_instance().plugins),
            "sftkey_importable": importlib.util.find_spec("sftkey_plugin") is not None,
            "cfg": json.loads(json.dumps(dict(self.cfg), default=str, sort_keys=True)),
            "trainer": _name(trainer),
            "collators": [_name(trainer.data_collator), _name(getattr(trainer, "eval_data_collator", None))],
            "training_args": json.loads(args.to_json_string()),
            "average_tokens_across_devices": args.average_tokens_across_devices,
            "model_accepts_loss_kwargs": trainer.model_accepts_loss_kwargs,
            "compute_loss_func": repr(trainer.compute_loss_func),
            "callbacks": sorted(_name(callback) for callback in trainer.callback_handler.callbacks),
            "train_columns": trainer.train_dataset.column_names,
            "train_rows": _rows_digest(trainer.train_dataset),
            "eval_rows": _rows_digest(trainer.eval_dataset),
            "log_history": [
                {k: v for k, v in entry.items() if not any(t in k for t in TIMING_KEYS)} for entry in state.log_history
            ],
        }
        Path(args.output_dir, "facts.json").write_text(json.dumps(facts, indent=1, sort_keys=True), encoding="utf-8")


class RunFacts(BasePlugin):
    def add_callbacks_post_trainer(self, cfg: Any, trainer: Any) -> list[TrainerCallback]:
        return [_SaveFacts(cfg, trainer)]
