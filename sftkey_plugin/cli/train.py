"""``sftkey train``: TRL's ``trl/scripts/sft.py`` with ``SFTKeyConfig`` and ``SFTKeyTrainer``, from a config file.

    sftkey train --config cfg.yaml [--key value ...]
    python -m sftkey_plugin.cli.train --config cfg.yaml
    accelerate launch [--config_file accelerate.yaml] -m sftkey_plugin.cli.train --config cfg.yaml

The YAML and the command line are read by ``TrlParser((ScriptArguments, SFTKeyConfig, ModelConfig,
DatasetMixtureConfig))``, the dataclasses ``trl sft`` reads with ``SFTKeyConfig`` for ``SFTConfig``: every
``SFTConfig`` key, the ``sftkey_*`` keys, model, PEFT and quantisation options, ``dataset_name`` or ``datasets``;
command-line flags override the file. Differences from TRL's script: ``dataset_name`` may also be a local
``.jsonl``/``.json``/``.parquet`` file; a key no dataclass knows is an error (``trl sft`` hands such keys to
``accelerate launch``; here the launcher is yours, so an unknown key is a typo); after training the Trainer's state
(``trainer_state.json``: ``log_history``, ``global_step``) is saved in ``output_dir``. With ``sftkey: false`` the
trainer is stock ``SFTTrainer``.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys
from collections.abc import Sequence
from typing import Any

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}
PROG = "sftkey train"


def make_parser(prog: str | None = PROG) -> Any:
    """TRL's ``sft`` parser with ``SFTKeyConfig`` in the place of ``SFTConfig``."""
    from trl import DatasetMixtureConfig, ModelConfig, ScriptArguments, TrlParser

    from sftkey_plugin import SFTKeyConfig

    dataclass_types: tuple[Any, ...] = (ScriptArguments, SFTKeyConfig, ModelConfig, DatasetMixtureConfig)
    return TrlParser(dataclass_types, prog=prog)


def load_data(script_args: Any, dataset_args: Any = None) -> Any:
    """The ``DatasetDict`` TRL's script loads: a ``datasets`` mixture, a hub name, or here also a local file."""
    from datasets import load_dataset

    name = script_args.dataset_name
    if dataset_args is not None and dataset_args.datasets:
        from trl import get_dataset

        if name:
            logging.getLogger(__name__).warning("Both `datasets` and `dataset_name` are given: `datasets` is used.")
        return get_dataset(dataset_args)
    if not name:
        raise ValueError("Either `datasets` or `dataset_name` must be provided.")
    suffix = os.path.splitext(name)[1].lower()
    if os.path.isfile(name) and suffix in LOCAL_FORMATS:
        return load_dataset(LOCAL_FORMATS[suffix], data_files={script_args.dataset_train_split: name})
    return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)


def train(script_args: Any, training_args: Any, model_args: Any, dataset_args: Any = None) -> Any:
    """Build the trainer as TRL's script does, train, save the model and the Trainer's state; return the trainer."""
    from trl import get_peft_config, get_quantization_config

    from sftkey_plugin import SFTKeyTrainer

    model_init_kwargs = {
        "revision": model_args.model_revision,
        "trust_remote_code": training_args.trust_remote_code,
        "attn_implementation": model_args.attn_implementation,
        "dtype": model_args.dtype,
    }
    model_init_kwargs.update(training_args.model_init_kwargs or {})
    training_args.model_init_kwargs = model_init_kwargs

    dataset = load_data(script_args, dataset_args)
    eval_dataset = None
    if training_args.eval_strategy != "no":
        eval_dataset = dataset[script_args.dataset_test_split]
    trainer = SFTKeyTrainer(
        model=model_args.model_name_or_path,
        args=training_args,
        train_dataset=dataset[script_args.dataset_train_split],
        eval_dataset=eval_dataset,
        quantization_config=get_quantization_config(model_args),
        peft_config=get_peft_config(model_args),
    )
    trainer.train(resume_from_checkpoint=training_args.resume_from_checkpoint)
    trainer.save_model(training_args.output_dir)
    trainer.save_state()  # trainer_state.json: what `sftkey ab` reads (log_history, global_step)
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers and the process group
        trainer.end()
    return trainer


def main(argv: Sequence[str] | None = None, prog: str | None = PROG) -> int:
    """Parse ``argv`` (``--config FILE`` and overrides; ``--help`` prints every key) and train."""
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    args = list(sys.argv[1:] if argv is None else argv)
    if not args:
        args = ["--help"]
    train(*parse(args, prog))
    return 0


def parse(args: Sequence[str], prog: str | None = PROG) -> list[Any]:
    """The four argument dataclasses of ``args``; a key none of them knows is an error naming it."""
    *parsed, unknown = make_parser(prog).parse_args_and_config(list(args), return_remaining_strings=True)
    if unknown:
        keys = [item.lstrip("-") for item in unknown if item.startswith("--")] or unknown
        raise ValueError(
            f"unknown keys {keys}: not fields of ScriptArguments, SFTKeyConfig, ModelConfig or DatasetMixtureConfig "
            f"(`{prog} --help` lists them; settings of `accelerate launch` go on its command line)"
        )
    return parsed


def add_parser(subparsers: Any) -> None:
    """Register ``train``; its arguments are TrlParser's, handed over unparsed (``main`` forwards them)."""
    parser = subparsers.add_parser(
        "train",
        help="TRL's `trl sft` with the sftkey_* keys: sftkey train --config cfg.yaml [--key value ...]",
        add_help=False,  # --help is TrlParser's, which lists every key
    )
    parser.set_defaults(func=_run, forwards_argv=True)


def _run(args: argparse.Namespace) -> int:
    return main(args.argv)


if __name__ == "__main__":
    sys.exit(main(prog="python -m sftkey_plugin.cli.train"))
