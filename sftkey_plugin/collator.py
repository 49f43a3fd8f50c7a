"""Carry the per-token ``sftkey_mask`` through any collator, padded or concatenated exactly like ``input_ids``."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch

SFTKEY_MASK = "sftkey_mask"


def _flatten(examples: list[Any]) -> list[Mapping[str, Any]]:
    """Axolotl's multipack collators get a list of bins, each a list of rows; others get rows."""
    if examples and isinstance(examples[0], list):
        return [row for group in examples for row in group]
    return examples


def _strip(examples: list[Any], column: str) -> list[Any]:
    if examples and isinstance(examples[0], list):
        return [[{k: v for k, v in row.items() if k != column} for row in group] for group in examples]
    return [{k: v for k, v in row.items() if k != column} for row in examples]


@dataclass
class SFTKeyDataCollator:
    """Wrap ``inner``: take ``sftkey_mask`` out of each row, collate the rest, then add the mask back as a
    ``torch.long`` tensor of exactly ``input_ids``'s shape (rows concatenated when the inner collator flattens them,
    padded with 0 on ``padding_side``). A length that does not match is an error, never a silent misalignment.
    """

    inner: Callable[[list[Any]], dict[str, Any]]
    padding_side: str = "right"
    column: str = SFTKEY_MASK

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        rows = _flatten(examples)
        if not rows or self.column not in rows[0]:
            raise KeyError(
                f"SFTKey: the training rows have no {self.column!r} column. The dataset was prepared without the "
                "SFTKey transform (for example with skip_prepare_dataset, or by a trainer without the SFTKey plugin)."
            )
        masks = [torch.as_tensor(row[self.column], dtype=torch.long) for row in rows]
        batch = self.inner(_strip(examples, self.column))
        input_ids = batch["input_ids"]
        if input_ids.shape[0] == len(masks):
            rows_masks = masks
        elif input_ids.shape[0] == 1 or (input_ids.shape[0] == len(examples) and isinstance(examples[0], list)):
            rows_masks = self._group(examples, masks, input_ids.shape[0])
        else:
            raise ValueError(f"SFTKey cannot match {len(masks)} rows to a batch of {input_ids.shape[0]} sequences.")
        batch[self.column] = torch.stack([self._pad(mask, input_ids.shape[1]) for mask in rows_masks])
        return batch

    @staticmethod
    def _group(examples: list[Any], masks: list[torch.Tensor], n_rows: int) -> list[torch.Tensor]:
        """Concatenate masks the way rows were concatenated: all into one row, or one row per packed bin."""
        if n_rows == 1:
            return [torch.cat(masks)]
        bounds = list(itertools.accumulate([0, *(len(group) for group in examples)]))
        return [torch.cat(masks[start:end]) for start, end in itertools.pairwise(bounds)]

    def _pad(self, mask: torch.Tensor, width: int) -> torch.Tensor:
        if mask.numel() > width:
            raise ValueError(f"SFTKey: a key mask of {mask.numel()} tokens does not fit a row of {width} tokens.")
        padding = mask.new_zeros(width - mask.numel())
        return torch.cat([padding, mask] if self.padding_side == "left" else [mask, padding])


@dataclass
class KeyMarkingCollator:
    """For rows without a key mask (a stock trainer's): each row's key mask is made from its own tokens, where the
    trained tokens are those ``inner`` labels when it collates the row alone (``key_mask_from_token_ids``), and the
    rows are then collated with their masks by ``SFTKeyDataCollator``. ``mark_row`` gives a row's ``TurnsMarked``
    columns with its ``labels`` (for the data counts)."""

    inner: Callable[[list[Any]], dict[str, Any]]
    tokenizer: Any
    marking: Any  # tokenize.MarkingOptions
    padding_side: str = "right"

    def mark_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        from .tokenize import key_mask_from_token_ids

        alone = self.inner([dict(row)])
        ids, labels, n = alone["input_ids"][0].tolist(), alone["labels"][0].tolist(), len(row["input_ids"])
        # a row collated alone is padded only up to pad_to_multiple_of, on padding_side
        keep = slice(len(ids) - n, None) if self.padding_side == "left" else slice(0, n)
        if ids[keep] != list(row["input_ids"]):
            raise ValueError("SFTKey: the data collator changed a row's input_ids; its key tokens cannot be placed.")
        marked = key_mask_from_token_ids(ids[keep], labels[keep], self.tokenizer, self.marking, row)
        return {**marked.columns(), "labels": labels[keep]}

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        rows = [{**row, SFTKEY_MASK: self.mark_row(row)[SFTKEY_MASK]} for row in examples]
        return SFTKeyDataCollator(self.inner, self.padding_side)(rows)
