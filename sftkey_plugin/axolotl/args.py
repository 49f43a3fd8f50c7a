"""The ``sftkey_*`` YAML keys for Axolotl, derived from the one vocabulary in ``sftkey_plugin.config``.

``SFTKeyInputArgs`` is mixed into Axolotl's ``AxolotlInputConfig`` (``BasePlugin.get_input_args``): every field
of ``SFTKeyArguments`` becomes a top-level key of the same name and meaning, optional (unset keys take the
``SFTKeyArguments`` defaults when read back with ``sftkey_arguments_from(cfg)``). The validators run on the whole
config and refuse, with what to change, the settings the plugin cannot honour.
"""

from __future__ import annotations

import typing
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, create_model, model_validator

from ..config import (
    SFTKEY_FIELDS,
    SFTKeyArguments,
    sftkey_arguments_from,
    validate_sftkey_arguments,
    weighs_tokens,
)

PLUGIN_NAME = "sftkey_plugin.axolotl.SFTKeyPlugin"
STRATEGY_TYPE = "sftkey_plugin.axolotl.strategy"


def _field_definitions() -> dict[str, Any]:
    hints = typing.get_type_hints(SFTKeyArguments)
    definitions: dict[str, Any] = {}
    for field in SFTKEY_FIELDS:
        annotation = hints[field.name]
        choices = field.metadata.get("choices")
        if choices:
            annotation = Literal[tuple(choices)]  # type: ignore[valid-type]
        definitions[field.name] = (
            annotation | None,
            Field(default=None, json_schema_extra={"description": field.metadata.get("help", "")}),
        )
    return definitions


def _refuse(setting: str, why: str, change: str) -> None:
    raise ValueError(f"SFTKey (sftkey: true) cannot be used with {setting}: {why}. {change}")


def _truthy(value: Any) -> bool:
    return bool(value) and value not in ("false", "False", "0")


FUSED_LOSSES = ("cut_cross_entropy", "liger_fused_linear_cross_entropy")


def fused_loss(cfg: Any) -> str | None:
    """The fused loss the config turns on (lm_head and cross-entropy in one kernel, no per-token losses), or None."""
    get = cfg.get if isinstance(cfg, dict) else lambda name: getattr(cfg, name, None)
    return next((name for name in FUSED_LOSSES if get(name)), None)


class _SFTKeyValidators(BaseModel):
    """The validators of ``SFTKeyInputArgs`` (the fields are added by ``create_model`` below)."""

    model_config = ConfigDict(extra="ignore")

    @model_validator(mode="before")
    @classmethod
    def sftkey_check_unsupported(cls, data: Any) -> Any:
        if not isinstance(data, dict) or not _truthy(data.get("sftkey")):
            return data
        get = data.get
        sliced = "each rank would see a slice of the sequence while the key mask and labels stay whole"
        block = get("context_parallel")  # Axolotl 0.21's block, which it keeps equal to context_parallel_size
        size = block.get("size") if isinstance(block, dict) else getattr(block, "size", None)
        if int(size or 1) > 1:
            _refuse(
                f"context_parallel: {{size: {size}}} (context_parallel_size: {size})",
                sliced,
                "Remove context_parallel and context_parallel_size (DDP, FSDP and DeepSpeed ZeRO work) or set "
                "sftkey: false.",
            )
        for name in ("context_parallel_size", "sequence_parallel_degree", "tensor_parallel_size"):
            if int(get(name) or 1) > 1:
                why = (
                    sliced
                    if name != "tensor_parallel_size"
                    else "the loss would see vocabulary-sharded logits (untested)"
                )
                _refuse(
                    f"{name}: {get(name)}", why, f"Set {name}: 1 (DDP, FSDP and DeepSpeed ZeRO work) or sftkey: false."
                )
        for name in ("rl", "reward_model", "process_reward_model"):
            if get(name):
                _refuse(
                    f"{name}: {get(name)}",
                    "SFTKey is a supervised fine-tuning objective",
                    f"Remove {name} or set sftkey: false.",
                )
        if get("streaming"):
            _refuse(
                "streaming: true",
                "the key mask is made when the dataset is prepared, which streaming skips",
                "Set streaming: false.",
            )
        if get("pretraining_dataset"):
            _refuse(
                "pretraining_dataset",
                "pretraining text has no answer to mark",
                "Use datasets: with a messages (chat_template) dataset instead.",
            )
        if get("skip_prepare_dataset"):
            _refuse(
                "skip_prepare_dataset: true",
                "the key mask is made when the dataset is prepared",
                "Set skip_prepare_dataset: false.",
            )
        if get("batch_flattening") is True:
            _refuse(
                "batch_flattening: true",
                "it is not tested with the key mask",
                "Set batch_flattening: false or use sample_packing: true.",
            )
        if get("processor_type"):
            _refuse(
                f"processor_type: {get('processor_type')}",
                "multimodal collators drop the key mask",
                "Remove processor_type (text-only models).",
            )
        if str(get("excess_length_strategy") or "").lower() == "truncate":
            _refuse(
                "excess_length_strategy: truncate",
                "Axolotl truncates input_ids and labels but not the key mask",
                "Use excess_length_strategy: drop (the default) or raise, or raise sequence_len.",
            )
        if get("use_eaft"):
            _refuse("use_eaft: true", "both replace the training loss", "Remove use_eaft or set sftkey: false.")
        if _truthy(get("balance_labels")):
            _refuse(
                "balance_labels: true",
                "it balances the count of trained tokens across micro-batches and processes while SFTKey's loss counts "
                "key tokens (stage 2, key_only) or weighs tokens, and it needs Axolotl's own collator, which SFTKey "
                "wraps to carry the key mask",
                "Set balance_labels: false.",
            )
        if get("trainer_cls"):
            _refuse(
                f"trainer_cls: {get('trainer_cls')}",
                "the SFTKey plugin supplies the trainer",
                "Remove trainer_cls (or subclass sftkey_plugin.axolotl.SFTKeyAxolotlTrainer in your own plugin).",
            )
        return data

    @model_validator(mode="after")
    def sftkey_check_loss_paths(self) -> Any:
        if not getattr(self, "sftkey", None):
            return self
        arguments = sftkey_arguments_from(self)
        try:
            validate_sftkey_arguments(arguments)
        except ValueError as error:
            raise ValueError(f"SFTKey: {error}") from error
        _check_fused_loss(self, arguments)
        _check_data_weights(self, arguments)
        if getattr(self, "liger_use_token_scaling", None):
            _refuse(
                "liger_use_token_scaling: true",
                "it reweights tokens inside the fused loss",
                "Set liger_use_token_scaling: false.",
            )
        return self


DATA_WEIGHT_FIELDS = ("sftkey_message_weight_field", "sftkey_example_weight_field")


def _check_fused_loss(cfg: Any, arguments: SFTKeyArguments) -> None:
    """A fused loss returns no per-token losses: refused with the keys that need them, data weights (any prompt
    weight above 0, or a weight field set by name) or mode weights other than 0 and 1. Message weights found in the
    data under the default field are refused before the first step (``trainer.mark_count_and_apply_policy``)."""
    fused = fused_loss(cfg)
    if not fused:
        return
    why = "a fused loss returns no per-token losses to weigh"
    fields = [name for name in DATA_WEIGHT_FIELDS if getattr(cfg, name, None) is not None]
    if fields or arguments.sftkey_prompt_weight > 0:
        key = fields[0] if fields else "sftkey_prompt_weight"
        _refuse(
            f"{fused}: true and {key}: {getattr(arguments, key)}",
            f"data weights need per-token losses, and {why}",
            f"Set {fused}: false (or drop its plugin), or "
            + (f"unset {key}." if fields else "set sftkey_prompt_weight: 0."),
        )
    if weighs_tokens(arguments):
        _refuse(
            f"{fused}: true in sftkey_mode: {arguments.sftkey_mode} with token weights other than 0 and 1",
            why,
            f"Set {fused}: false (or drop its plugin), or use sftkey_mode: two_stage / key_only, which keep the "
            "fused loss.",
        )


def _check_data_weights(cfg: Any, arguments: SFTKeyArguments) -> None:
    """The data-weight keys against Axolotl's settings: a prompt weight needs prompt tokens left out of the labels,
    and message / example weights need the records, which only the SFTKey chat_template strategy reads."""
    if arguments.sftkey_prompt_weight > 0 and _truthy(getattr(cfg, "train_on_inputs", None)):
        _refuse(
            f"train_on_inputs: true and sftkey_prompt_weight: {arguments.sftkey_prompt_weight}",
            "train_on_inputs already trains the inputs at weight 1, so no prompt token is left for the prompt weight",
            "Set train_on_inputs: false to train the inputs at sftkey_prompt_weight, or sftkey_prompt_weight: 0.",
        )
    fields = [name for name in DATA_WEIGHT_FIELDS if getattr(cfg, name, None) is not None]
    others = [d for d in getattr(cfg, "datasets", None) or [] if _dataset_type(d) != STRATEGY_TYPE]
    if fields and others:
        _refuse(
            f"{fields[0]} and a dataset of type {_dataset_type(others[0])} ({_dataset_path(others[0])})",
            "the weights are read from the records' messages, which only type chat_template keeps (other types "
            "reach SFTKey as tokens; their rows take sftkey_prompt_weight only)",
            f"Use a messages dataset with type: chat_template, or unset {fields[0]}.",
        )


def _dataset_type(dataset: Any) -> Any:
    return dataset.get("type") if isinstance(dataset, dict) else getattr(dataset, "type", None)


def _dataset_path(dataset: Any) -> Any:
    return dataset.get("path") if isinstance(dataset, dict) else getattr(dataset, "path", None)


SFTKeyInputArgs = create_model(  # type: ignore[call-overload]
    "SFTKeyInputArgs",
    __base__=_SFTKeyValidators,
    __module__=__name__,
    __doc__="Axolotl config keys of the SFTKey plugin (generated from sftkey_plugin.config.SFTKeyArguments).",
    **_field_definitions(),
)

__all__ = ["PLUGIN_NAME", "STRATEGY_TYPE", "SFTKeyInputArgs"]
