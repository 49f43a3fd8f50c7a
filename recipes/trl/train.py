"""Train one TRL recipe: TRL's own ``trl/scripts/sft.py`` with ``SFTKeyConfig`` and ``SFTKeyTrainer``.

    python recipes/trl/train.py --config recipes/trl/gsm8k/qwen2.5-1.5b_lora_finder_sftkey.yaml
    accelerate launch --config_file recipes/trl/accelerate/fsdp2_8gpu.yaml recipes/trl/train.py --config RECIPE.yaml

Any key can be overridden on the command line (``--output_dir out --max_steps 10``). The YAML is read by
``TrlParser((ScriptArguments, SFTKeyConfig, ModelConfig))``: model and PEFT options as ``trl.ModelConfig``, the dataset
as ``trl.ScriptArguments``, the rest (the ``sftkey_*`` keys included) as ``SFTKeyConfig``. Two differences from TRL's
script: ``dataset_name`` may also be a local ``.jsonl``/``.json``/``.parquet`` file (what the data step writes), and
the trainer is ``SFTKeyTrainer`` (with ``sftkey: false`` it is stock ``SFTTrainer``).
"""

from __future__ import annotations

import os
from typing import Any

LOCAL_FORMATS = {".jsonl": "json", ".json": "json", ".parquet": "parquet"}


def make_parser() -> Any:
    from trl import ModelConfig, ScriptArguments, TrlParser

    from sftkey_plugin import SFTKeyConfig

    return TrlParser((ScriptArguments, SFTKeyConfig, ModelConfig))


def load_data(script_args: Any) -> Any:
    from datasets import load_dataset

    name = script_args.dataset_name
    suffix = os.path.splitext(name)[1].lower()
    if os.path.isfile(name) and suffix in LOCAL_FORMATS:
        return load_dataset(LOCAL_FORMATS[suffix], data_files={script_args.dataset_train_split: name})
    return load_dataset(name, name=script_args.dataset_config, streaming=script_args.dataset_streaming)


def main(script_args: Any, training_args: Any, model_args: Any) -> Any:
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

    dataset = load_data(script_args)
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
    trainer.accelerator.print(f"Model saved to {training_args.output_dir}.")
    if training_args.push_to_hub:
        trainer.push_to_hub(dataset_name=script_args.dataset_name)
    if hasattr(trainer, "end"):  # transformers >= 5.18: finish the trackers and the process group
        trainer.end()
    return trainer


if __name__ == "__main__":
    main(*make_parser().parse_args_and_config())
