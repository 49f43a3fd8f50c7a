"""``axolotl sftkey-preview CONFIG.yml``: what SFTKey marks in a config's data, before a training run.

Loads the config as ``axolotl train`` does (plugins, validation, normalisation), tokenises a sample of each
dataset with the plugin's strategy, prints the key-marking summary (with the data-weight counts) and shows a few
examples with the key tokens between ``[[`` and ``]]`` (coloured on a terminal; tokens without loss dimmed) and, with
data weights, each token's weight as ``<xW>`` where it changes. It also says so when ``sftkey``
keys are set but Axolotl would not load the plugin (0.19 without it under ``plugins:``: the keys are dropped silently).
"""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

import click
import yaml

from .args import PLUGIN_NAME

KEY_OPEN, KEY_CLOSE = "[[", "]]"


def plugin_warning(raw: dict[str, Any]) -> str | None:
    """The warning for ``sftkey`` keys in a config that does not list the plugin, where Axolotl does not load it from
    its entry point either (0.19); None when all is well."""
    from .plugin import plugin_discovered

    keys = sorted(k for k in raw if k == "sftkey" or k.startswith("sftkey_"))
    if keys and PLUGIN_NAME not in (raw.get("plugins") or []) and not plugin_discovered():
        return (
            f"WARNING: the config sets {', '.join(keys)} but does not list the plugin, so `axolotl train` ignores "
            f"them and trains without SFTKey. Add it (Axolotl 0.21 and later load it without the list):\nplugins:\n"
            f"  - {PLUGIN_NAME}"
        )
    return None


def _highlight(tokenizer: Any, row: dict[str, Any], color: bool, weights: list[float] | None = None) -> str:
    """The row's text with its key tokens between ``[[`` and ``]]`` and, given ``weights``, ``<xW>`` wherever the
    token weight changes."""
    from ..collator import SFTKEY_MASK

    pieces = []
    in_key = False
    weight = None
    for index, (token, label, key) in enumerate(zip(row["input_ids"], row["labels"], row[SFTKEY_MASK])):
        text = tokenizer.decode([token])
        if weights is not None and weights[index] != weight:
            weight = weights[index]
            pieces.append(f"<x{weight:g}>")
        if key and not in_key:
            pieces.append(KEY_OPEN)
        if not key and in_key:
            pieces.append(KEY_CLOSE)
        in_key = bool(key)
        if color and key:
            text = click.style(text, fg="green", bold=True)
        elif color and label == -100:
            text = click.style(text, dim=True)
        pieces.append(text)
    if in_key:
        pieces.append(KEY_CLOSE)
    return "".join(pieces)


def _raw_dataset(dataset_config: Any, cfg: Any, sample: int):  # type: ignore[no-untyped-def]
    from axolotl.utils.data.shared import load_dataset_with_config
    from datasets import DatasetDict

    dataset = load_dataset_with_config(dataset_config, cfg.hf_use_auth_token)
    if isinstance(dataset, DatasetDict):
        dataset = dataset[dataset_config.split or "train"]
    return dataset.select(range(min(sample, len(dataset))))


def preview_rows(cfg: Any, tokenizer: Any, dataset_config: Any, sample: int) -> tuple[list[dict[str, Any]], int]:
    """Tokenise up to ``sample`` rows of one dataset as the training run would (Axolotl's own dataset wrapper, so every
    ``type`` it knows: chat_template, alpaca, completion, ...): ``(rows, dropped by sequence_len)``."""
    from axolotl.utils.data.sft import _parse_dataset_type
    from axolotl.utils.data.wrappers import get_dataset_wrapper

    from ..collator import SFTKEY_MASK
    from ..config import sftkey_arguments_from, validate_sftkey_arguments
    from ..tokenize import MarkingOptions
    from .trainer import mark_fallback_row

    raw = _raw_dataset(dataset_config, cfg, sample)
    base_type, prompt_style = _parse_dataset_type(dataset_config.type)
    tokenised, _ = get_dataset_wrapper(
        dataset_config=dataset_config,
        tokenizer=tokenizer,
        cfg=cfg,
        dataset_base_type=base_type,
        dataset=raw,
        dataset_prompt_style=prompt_style,
    )  # pre-tokenised rows come back as they are
    rows = [dict(row) for row in tokenised]
    arguments = sftkey_arguments_from(cfg)
    validate_sftkey_arguments(arguments)
    marking = MarkingOptions.from_arguments(arguments)
    # rows of non-chat types get their mask (and prompt weights) from their own tokens, as the trainer marks them
    prompt_weight = float(arguments.sftkey_prompt_weight)
    rows = [
        row if SFTKEY_MASK in row else {**row, **mark_fallback_row(row, tokenizer, marking, prompt_weight)}
        for row in rows
    ]
    kept = [row for row in rows if len(row["input_ids"]) <= cfg.sequence_len]
    return kept, len(rows) - len(kept)


@click.command("sftkey-preview")
@click.argument("config", type=click.Path(exists=True, dir_okay=False, path_type=Path))
@click.option("--num-examples", "-n", default=2, show_default=True, help="Examples shown with key tokens marked.")
@click.option("--sample", default=256, show_default=True, help="Rows per dataset tokenised for the summary.")
@click.option("--color/--no-color", default=None, help="Colour the key tokens (default: when on a terminal).")
def sftkey_preview(config: Path, num_examples: int, sample: int, color: bool | None) -> None:
    """Preview SFTKey key-answer marking on a config's datasets."""
    from axolotl.cli.config import load_cfg
    from axolotl.loaders import load_tokenizer
    from axolotl.utils.dict import DictDefault
    from datasets import Dataset

    from ..collator import SFTKEY_MASK
    from ..config import sftkey_arguments_from
    from ..stats import marked_rows_stats
    from ..weights import SFTKEY_PROMPT, SFTKEY_WEIGHT, DataWeightOptions, DataWeightScan
    from .strategy import SFTKEY_FINDER
    from .trainer import dataset_stats

    color = sys.stdout.isatty() if color is None else color
    raw = yaml.safe_load(config.read_text(encoding="utf-8")) or {}
    warning = plugin_warning(raw)
    if warning:
        click.secho(warning, fg="yellow", err=True)
        click.echo(f"(previewing as if {PLUGIN_NAME} were listed)", err=True)
        raw["plugins"] = [*(raw.get("plugins") or []), PLUGIN_NAME]
    if not raw.get("sftkey"):
        raise click.ClickException("sftkey is not true in this config: there is nothing to preview.")

    cfg = load_cfg(DictDefault(raw))
    tokenizer = load_tokenizer(cfg)
    options = DataWeightOptions.from_arguments(sftkey_arguments_from(cfg))
    for index, dataset_config in enumerate(cfg.datasets or []):
        rows, dropped_long = preview_rows(cfg, tokenizer, dataset_config, sample)
        name = f"datasets[{index}] {dataset_config.path}"
        if rows:  # counted as the trainer counts them (the data-weight counts when the data weighs its tokens)
            stats, scan = dataset_stats(Dataset.from_list(rows), name, options)
        else:
            stats, scan = marked_rows_stats(name, rows), DataWeightScan(options)
        stats.count_policy(cfg.sftkey_on_missing or "keep")
        click.echo(stats.summary_line())
        click.echo(
            f"  first {min(sample, len(rows) + dropped_long)} rows tokenised; {dropped_long} longer "
            f"than sequence_len {cfg.sequence_len} (dropped by Axolotl, so no answer is cut); "
            f"sftkey_mode {cfg.sftkey_mode or 'two_stage'}; prepared data in {cfg.dataset_prepared_path}"
        )
        for number, row in enumerate(rows[:num_examples], start=1):
            n_key = sum(row[SFTKEY_MASK])
            prompt = row.get(SFTKEY_PROMPT) or [0] * len(row["labels"])  # the prompt weight's tokens: not counted
            n_trained = sum(1 for label, p in zip(row["labels"], prompt) if label != -100 and not p)
            finder = row.get(SFTKEY_FINDER) or "none"
            turns = (
                f", key in {row['sftkey_turns_found']} of {row['sftkey_turns']} turns"
                if row.get("sftkey_turns", 1) > 1
                else ""
            )
            click.echo(f"--- example {number}: finder {finder}, {n_key} key of {n_trained} trained tokens{turns} ---")
            click.echo(_highlight(tokenizer, row, color, row.get(SFTKEY_WEIGHT) if scan.active else None))


if __name__ == "__main__":
    sftkey_preview()
