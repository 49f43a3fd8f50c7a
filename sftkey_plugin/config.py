"""The one ``sftkey_*`` config vocabulary, shared by the TRL config and the Axolotl plugin arguments."""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass, field
from typing import Any

MODES = ("two_stage", "key_only", "weighted")
ON_MISSING = ("error", "drop", "keep")
EDGE_TOKENS = ("include", "exclude")
TURNS = ("all", "last")


@dataclass
class SFTKeyArguments:
    """SFTKey options. Every field is also a YAML key (TRL ``TrlParser`` or Axolotl) of the same name."""

    sftkey: bool = field(default=False, metadata={"help": "Enable SFTKey key-answer training."})
    sftkey_mode: str = field(
        default="two_stage",
        metadata={
            "help": "two_stage (the paper: stage 1 plain SFT, stage 2 loss on key tokens only), key_only "
            "(loss on key tokens only from the start: the paper's Key-Tag ablation) or weighted (one stage, key "
            "tokens weigh sftkey_key_weight, other completion tokens sftkey_other_weight).",
            "choices": list(MODES),
        },
    )
    sftkey_finder: str = field(
        default="auto",
        metadata={
            "help": "How the key answer is found in each completion: auto, tags, think, gsm8k, boxed, answer_is, "
            "regex, field, or a finder registered under the 'sftkey_plugin.finders' entry-point group."
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
        metadata={"help": "two_stage: stage 2 starts at this optimizer step; overrides sftkey_stage2_ratio."},
    )
    sftkey_stage2_epoch: float | None = field(
        default=None,
        metadata={"help": "two_stage: stage 2 starts at this epoch (e.g. 2 for the 3rd epoch); overrides the ratio."},
    )
    sftkey_key_weight: float = field(default=1.0, metadata={"help": "weighted: weight of the key answer tokens."})
    sftkey_other_weight: float = field(
        default=1.0, metadata={"help": "weighted: weight of the other (reasoning) completion tokens."}
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
        metadata={"help": "Whether the end-of-turn/EOS token right after the answer is a key token."},
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
            "truncation) in a mode that needs key tokens (two_stage, key_only, weighted with sftkey_key_weight != "
            "sftkey_other_weight); 0 turns the check off."
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


def needs_key_tokens(args: SFTKeyArguments) -> bool:
    """Whether the mode trains anything differently with key tokens (weighted 1:1 is plain SFT)."""
    return args.sftkey_mode != "weighted" or args.sftkey_key_weight != args.sftkey_other_weight


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
        "sftkey_on_missing": ON_MISSING,
        "sftkey_edge_tokens": EDGE_TOKENS,
        "sftkey_turns": TURNS,
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
    if not isinstance(args.sftkey_finder_options, dict):
        raise ValueError(f"sftkey_finder_options must be a mapping, not {type(args.sftkey_finder_options).__name__}.")
    validate_finder_options(args.sftkey_finder, args.sftkey_finder_options)
