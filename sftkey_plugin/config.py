"""The one ``sftkey_*`` config vocabulary, shared by the TRL config and the Axolotl plugin arguments."""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
from dataclasses import dataclass, field
from typing import Any

from .schedule import weighs

MODES = ("two_stage", "key_only", "weighted", "phases")
ON_MISSING = ("error", "drop", "keep")
EDGE_TOKENS = ("include", "exclude")
NORMALIZE = ("tokens", "weights")
TURNS = ("all", "last")
PHASE_UNITS = ("ratio", "steps", "epoch")
PHASE_INTERPOLATIONS = ("step", "linear")
PHASE_KEYS = ("start", "key_weight", "other_weight")


@dataclass
class SFTKeyArguments:
    """SFTKey options. Every field is also a YAML key (TRL ``TrlParser`` or Axolotl) of the same name."""

    sftkey: bool = field(default=False, metadata={"help": "Enable SFTKey key-answer training."})
    sftkey_mode: str = field(
        default="two_stage",
        metadata={
            "help": "two_stage (the paper: stage 1 plain SFT, stage 2 loss on key tokens only), key_only "
            "(loss on key tokens only from the start: the paper's Key-Tag ablation), weighted (one stage, key "
            "tokens weigh sftkey_key_weight, other completion tokens sftkey_other_weight) or phases (your own "
            "schedule of weights: sftkey_phases).",
            "choices": list(MODES),
        },
    )
    sftkey_finder: str = field(
        default="auto",
        metadata={
            "help": "How the key answer is found in each completion: auto, tags, think, gsm8k, boxed, answer_is, "
            "content, regex, field, or a finder registered under the 'sftkey_plugin.finders' entry-point group."
        },
    )
    sftkey_finder_options: dict | str | None = field(  # this spelling lets HfArgumentParser take JSON
        default=None,
        metadata={
            "help": "Options for the finder, e.g. {'pattern': '(?P<key>...)'} for regex, {'answer_field': "
            "'answer'} for field, {'thinking_close': '</reasoning>'} for tags. On the command line, a JSON string."
        },
    )
    sftkey_stage2_ratio: float = field(
        default=0.5,
        metadata={"help": "two_stage: stage 2 starts after this fraction of the optimizer steps (like warmup_ratio)."},
    )
    sftkey_stage2_steps: int | None = field(
        default=None,
        metadata={
            "help": "two_stage: the number of stage-1 optimizer steps (like warmup_steps): stage 2 starts with "
            "optimizer step sftkey_stage2_steps + 1. Overrides sftkey_stage2_ratio."
        },
    )
    sftkey_stage2_epoch: float | None = field(
        default=None,
        metadata={
            "help": "two_stage: stage 2 starts once this many epochs are done (e.g. 2: with the first step of the 3rd "
            "epoch), at the trainer's real epoch boundary (its state.epoch), not at a step count converted from "
            "max_steps, which Axolotl estimates with sample packing. Overrides sftkey_stage2_ratio."
        },
    )
    sftkey_key_weight: float = field(
        default=1.0,
        metadata={
            "help": "weighted: weight of the key answer tokens (with both weights 1.0 it trains bit for bit as plain "
            "SFT)."
        },
    )
    sftkey_other_weight: float = field(
        default=1.0, metadata={"help": "weighted: weight of the other (reasoning) completion tokens."}
    )
    sftkey_phases: list[dict] | str | None = field(  # this spelling lets HfArgumentParser take JSON
        default=None,
        metadata={
            "help": "phases: a list of {start, key_weight, other_weight}, the first with start 0; each phase's weights "
            "hold from its start (in sftkey_phase_unit) to the next phase's. A weight of 0 takes those tokens out of "
            "the loss, as stage 2 does. E.g. a soft stage 2: [{start: 0, key_weight: 1, other_weight: 1}, {start: "
            "0.5, key_weight: 1, other_weight: 0.1}]. On the command line, a JSON string."
        },
    )
    sftkey_phase_unit: str = field(
        default="ratio",
        metadata={
            "help": "phases: what start counts. ratio: the fraction of the optimizer steps (as sftkey_stage2_ratio), "
            "steps: completed optimizer steps (as sftkey_stage2_steps), epoch: epochs done (as sftkey_stage2_epoch).",
            "choices": list(PHASE_UNITS),
        },
    )
    sftkey_phase_interpolation: str = field(
        default="step",
        metadata={
            "help": "phases: step (each phase's weights hold until the next phase starts) or linear (the weights move "
            "linearly from one phase's start to the next's, optimizer step by optimizer step, and hold after the "
            "last).",
            "choices": list(PHASE_INTERPOLATIONS),
        },
    )
    sftkey_normalize: str = field(
        default="tokens",
        metadata={
            "help": "weighted and phases: the loss denominator. tokens: the number of loss tokens of the optimizer "
            "step (1.0/1.0 is plain SFT; larger weights make larger steps), weights: the sum of their weights (a "
            "weighted mean, as LLaMA-Factory's weighted loss; scaling both weights changes nothing).",
            "choices": list(NORMALIZE),
        },
    )
    sftkey_on_missing: str = field(
        default="keep",
        metadata={
            "help": "Examples with no key span, or whose key was cut by max_length: error (stop with a message), "
            "drop (remove them, counted in the log) or keep (train on them normally in stage 1 / weighted, no loss "
            "in stage 2 / key_only).",
            "choices": list(ON_MISSING),
        },
    )
    sftkey_edge_tokens: str = field(
        default="include",
        metadata={
            "help": "Tokens that straddle a key span's edge: include (they count as key) or exclude.",
            "choices": list(EDGE_TOKENS),
        },
    )
    sftkey_include_eos: bool = field(
        default=True,
        metadata={
            "help": "Whether the end-of-turn/EOS token right after the answer (and any whitespace tokens before it) "
            "is a key token."
        },
    )
    sftkey_turns: str = field(
        default="all",
        metadata={
            "help": "Multi-turn conversations: all (every trained assistant message gets its own key span) or last "
            "(only the last assistant message's answer is key).",
            "choices": list(TURNS),
        },
    )
    sftkey_reasoning_field: str | None = field(
        default=None,
        metadata={
            "help": "The assistant-message field that holds the reasoning apart from the answer (default: "
            "reasoning_content, thinking or reasoning, whichever a message has). Such a message's content is its "
            "answer: auto makes all of it key."
        },
    )
    sftkey_min_found: float = field(
        default=0.5,
        metadata={
            "help": "Refuse to train when fewer than this share of the training examples keep a key span (after "
            "truncation) in a mode that needs key tokens (two_stage, key_only, weighted with unequal weights, or "
            "phases with a phase whose key weight differs from its other weight); 0 turns the check off."
        },
    )

    sftkey_message_weight_field: str = field(
        default="weight",
        metadata={
            "help": "The field of an assistant message that holds its weight (a number >= 0; absent means 1, 0 means "
            "not trained): every trained token of the message is multiplied by it. On any other message it is an "
            "error; set to another name, a field that no record has is an error."
        },
    )
    sftkey_example_weight_field: str | None = field(
        default=None,
        metadata={
            "help": "A record-level column that holds the example's weight (a number >= 0; absent means 1): every "
            "trained token of the example, prompt tokens included, is multiplied by it. A column that no record has "
            "is an error."
        },
    )
    sftkey_prompt_weight: float = field(
        default=0.0,
        metadata={
            "help": "The weight of the prompt tokens that completion_only_loss / assistant_only_loss (Axolotl: "
            "train_on_inputs: false, roles_to_train) leave out (0: not trained, as without it; Weighted Instruction "
            "Tuning uses a small weight such as 0.1). They weigh this (times the example weight) in every phase."
        },
    )


SFTKEY_FIELDS: tuple[dataclasses.Field[Any], ...] = dataclasses.fields(SFTKeyArguments)
SFTKEY_FIELD_NAMES: tuple[str, ...] = tuple(f.name for f in SFTKEY_FIELDS)


def sftkey_arguments_from(source: Any) -> SFTKeyArguments:
    """Read the ``sftkey_*`` fields from any object with those attributes (a TRL config, an Axolotl cfg)."""
    values = {}
    for name in SFTKEY_FIELD_NAMES:
        value = getattr(source, name, None)
        if value is not None:
            values[name] = value
    return SFTKeyArguments(**values)


def mode_weights(args: SFTKeyArguments) -> list[tuple[float, float]]:
    """The ``(key_weight, other_weight)`` of each phase of the mode, in order."""
    if args.sftkey_mode == "two_stage":
        return [(1.0, 1.0), (1.0, 0.0)]
    if args.sftkey_mode == "key_only":
        return [(1.0, 0.0)]
    if args.sftkey_mode == "weighted":
        return [(args.sftkey_key_weight, args.sftkey_other_weight)]
    return [(phase["key_weight"], phase["other_weight"]) for phase in parse_phases(args.sftkey_phases)]


def needs_key_tokens(args: SFTKeyArguments) -> bool:
    """Whether the mode trains anything differently with key tokens (weighted 1:1 is plain SFT)."""
    return any(key != other for key, other in mode_weights(args))


def weighs_tokens(args: SFTKeyArguments) -> bool:
    """Whether some step weighs a trained token other than 1 (a weight of 0 masks the label instead), so the loss
    path must give per-token losses (the weights read from the data are known once it is read: ``DataWeightScan``)."""
    weights = mode_weights(args)
    if any(weighs(*pair) for pair in weights) or weighs(args.sftkey_prompt_weight, 0.0):
        return True
    linear = args.sftkey_mode == "phases" and args.sftkey_phase_interpolation == "linear"
    return linear and len(set(weights)) > 1  # the weights between two different phases are fractions


def parse_phases(value: list[dict] | str | None) -> list[dict[str, float]]:
    """``sftkey_phases`` as a list of ``{start, key_weight, other_weight}`` floats (a JSON string is parsed), or a
    ``ValueError`` saying what to change."""
    if isinstance(value, str):
        try:
            value = json.loads(value)
        except json.JSONDecodeError as error:
            raise ValueError(f"sftkey_phases is not valid JSON: {error}") from error
    if not isinstance(value, list) or not value:
        raise ValueError("sftkey_mode='phases' needs sftkey_phases: a list of {start, key_weight, other_weight}.")
    phases = []
    for index, phase in enumerate(value):
        if not isinstance(phase, dict) or set(phase) != set(PHASE_KEYS):
            raise ValueError(f"sftkey_phases[{index}] must have exactly the keys {list(PHASE_KEYS)}, not {phase!r}.")
        if not all(isinstance(phase[k], int | float) and not isinstance(phase[k], bool) for k in PHASE_KEYS):
            raise ValueError(f"sftkey_phases[{index}]: start and the weights must be numbers, not {phase!r}.")
        phases.append({k: float(phase[k]) for k in PHASE_KEYS})
    return phases


def _validate_phases(args: SFTKeyArguments) -> None:
    """Parse ``sftkey_phases`` in place and check the schedule it describes."""
    phases = args.sftkey_phases = parse_phases(args.sftkey_phases)
    starts = [phase["start"] for phase in phases]
    if starts[0] != 0:
        raise ValueError(f"sftkey_phases[0] must start at 0 (the first step), not {starts[0]:g}.")
    if any(later <= earlier for earlier, later in itertools.pairwise(starts)):
        raise ValueError(f"sftkey_phases must start in increasing order, not at {[f'{s:g}' for s in starts]}.")
    if args.sftkey_phase_unit == "ratio" and starts[-1] > 1:
        raise ValueError(
            f"sftkey_phases start at {starts[-1]:g}, past the end of training in sftkey_phase_unit: ratio (0 to 1); "
            "set sftkey_phase_unit: steps or epoch for counts."
        )
    if args.sftkey_phase_unit == "steps" and any(not start.is_integer() for start in starts):
        raise ValueError(f"sftkey_phases start at whole optimizer steps with sftkey_phase_unit: steps, not {starts}.")
    for index, phase in enumerate(phases):
        if phase["key_weight"] < 0 or phase["other_weight"] < 0:
            raise ValueError(f"sftkey_phases[{index}]: weights must be >= 0, not {phase}.")
        if phase["key_weight"] == 0 and phase["other_weight"] == 0:
            raise ValueError(f"sftkey_phases[{index}]: key_weight and other_weight cannot both be 0: nothing trains.")


PRESET_FIELD_NAMES = (
    "sftkey_stage2_ratio",
    "sftkey_stage2_steps",
    "sftkey_stage2_epoch",
    "sftkey_key_weight",
    "sftkey_other_weight",
)


def _refuse_preset_settings(args: SFTKeyArguments) -> None:
    """In phases mode the presets' own keys are not read: refuse any set to other than its default, not ignore it."""
    defaults = {field.name: field.default for field in SFTKEY_FIELDS}
    for name in PRESET_FIELD_NAMES:
        if getattr(args, name) != defaults[name]:
            raise ValueError(
                f"{name} is not read in sftkey_mode: phases (sftkey_phases gives each phase's start and weights): "
                f"remove {name}, or express it in sftkey_phases."
            )


def _validate_data_weight_settings(args: SFTKeyArguments) -> None:
    """The data-weight keys: field names that are names, a prompt weight that is a finite number >= 0."""
    for name in ("sftkey_message_weight_field", "sftkey_example_weight_field"):
        value = getattr(args, name)
        if value is not None and (not isinstance(value, str) or not value.strip()):
            raise ValueError(f"{name} must be a field name, not {value!r}.")
    prompt = args.sftkey_prompt_weight
    if isinstance(prompt, bool) or not isinstance(prompt, int | float) or not math.isfinite(prompt) or prompt < 0:
        raise ValueError(
            f"sftkey_prompt_weight must be a finite number >= 0 (0: prompt tokens are not trained), not {prompt!r}; "
            "negative weights are not unlikelihood training."
        )


def validate_sftkey_arguments(args: SFTKeyArguments) -> None:
    """Raise ``ValueError`` with a message that says what to change for any inconsistent ``sftkey_*`` value.

    A JSON string in ``sftkey_finder_options`` (from a command line) is parsed in place.
    """
    from .finders import validate_finder_options

    if args.sftkey_finder_options is None:
        args.sftkey_finder_options = {}
    if isinstance(args.sftkey_finder_options, str):
        try:
            args.sftkey_finder_options = json.loads(args.sftkey_finder_options)
        except json.JSONDecodeError as error:
            raise ValueError(f"sftkey_finder_options is not valid JSON: {error}") from error

    choices = {
        "sftkey_mode": MODES,
        "sftkey_normalize": NORMALIZE,
        "sftkey_on_missing": ON_MISSING,
        "sftkey_edge_tokens": EDGE_TOKENS,
        "sftkey_turns": TURNS,
        "sftkey_phase_unit": PHASE_UNITS,
        "sftkey_phase_interpolation": PHASE_INTERPOLATIONS,
    }
    for name, allowed in choices.items():
        if getattr(args, name) not in allowed:
            raise ValueError(f"{name} must be one of {list(allowed)}, not {getattr(args, name)!r}.")
    if not 0.0 <= args.sftkey_min_found <= 1.0:
        raise ValueError(f"sftkey_min_found must be in [0, 1] (0 turns the check off), not {args.sftkey_min_found}.")
    if not 0.0 <= args.sftkey_stage2_ratio <= 1.0:
        raise ValueError(f"sftkey_stage2_ratio must be in [0, 1], not {args.sftkey_stage2_ratio}.")
    if args.sftkey_stage2_steps is not None and args.sftkey_stage2_steps < 0:
        raise ValueError(f"sftkey_stage2_steps must be >= 0, not {args.sftkey_stage2_steps}.")
    if args.sftkey_stage2_epoch is not None and args.sftkey_stage2_epoch < 0:
        raise ValueError(f"sftkey_stage2_epoch must be >= 0, not {args.sftkey_stage2_epoch}.")
    if args.sftkey_stage2_steps is not None and args.sftkey_stage2_epoch is not None:
        raise ValueError("Set at most one of sftkey_stage2_steps and sftkey_stage2_epoch.")
    for name in ("sftkey_key_weight", "sftkey_other_weight"):
        if getattr(args, name) < 0:
            raise ValueError(f"{name} must be >= 0, not {getattr(args, name)}.")
    if args.sftkey_key_weight == 0 and args.sftkey_other_weight == 0:
        raise ValueError("sftkey_key_weight and sftkey_other_weight cannot both be 0: nothing would be trained.")
    _validate_data_weight_settings(args)
    if args.sftkey_mode == "phases":
        _validate_phases(args)
        _refuse_preset_settings(args)
    elif args.sftkey_phases is not None:
        raise ValueError(f"sftkey_phases is read in sftkey_mode: phases only, not {args.sftkey_mode}: set the mode.")
    if not isinstance(args.sftkey_finder_options, dict):
        raise ValueError(f"sftkey_finder_options must be a mapping, not {type(args.sftkey_finder_options).__name__}.")
    validate_finder_options(args.sftkey_finder, args.sftkey_finder_options)
