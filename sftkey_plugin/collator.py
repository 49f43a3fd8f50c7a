"""Carry the per-token ``sftkey_mask`` (and the data-weight columns ``sftkey_weight`` / ``sftkey_prompt`` where the
rows have them) through any collator, padded with 0 or concatenated exactly like ``input_ids``."""

from __future__ import annotations

import itertools
from collections.abc import Callable, Collection, Mapping
from dataclasses import dataclass
from typing import Any

import torch

SFTKEY_MASK = "sftkey_mask"
# every per-token column SFTKey carries, with its batch dtype (the data-weight names are those of weights.py, which
# this module does not import, so that it stays free of the config)
SFTKEY_COLUMNS: dict[str, torch.dtype] = {
    SFTKEY_MASK: torch.long,
    "sftkey_weight": torch.float32,
    "sftkey_prompt": torch.long,
}


def _flatten(examples: list[Any]) -> list[Mapping[str, Any]]:
    """Axolotl's multipack collators get a list of bins, each a list of rows; others get rows."""
    if examples and isinstance(examples[0], list):
        return [row for group in examples for row in group]
    return examples


def _strip(examples: list[Any], columns: Collection[str]) -> list[Any]:
    if examples and isinstance(examples[0], list):
        return [[{k: v for k, v in row.items() if k not in columns} for row in group] for group in examples]
    return [{k: v for k, v in row.items() if k not in columns} for row in examples]


@dataclass
class SFTKeyDataCollator:
    """Wrap ``inner``: take ``sftkey_mask`` (and the other ``SFTKEY_COLUMNS`` the rows have) out of each row,
    collate the rest, then add each back as a tensor of exactly ``input_ids``'s shape (rows concatenated when the
    inner collator flattens them), each row's values where ``inner`` put that row's tokens, 0 elsewhere: the side it
    padded is read from the batch, not assumed (TRL's collator pads on the right whatever the tokenizer says). A row
    ``inner`` changed or put elsewhere is an error, never a silent misalignment.
    """

    inner: Callable[[list[Any]], dict[str, Any]]
    column: str = SFTKEY_MASK

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        rows = _flatten(examples)
        if not rows or self.column not in rows[0]:
            raise KeyError(
                f"SFTKey: the training rows have no {self.column!r} column. The dataset was prepared without the "
                "SFTKey transform (for example with skip_prepare_dataset, or by a trainer without the SFTKey plugin)."
            )
        columns = [self.column, *(c for c in SFTKEY_COLUMNS if c != self.column and c in rows[0])]
        ids = [torch.as_tensor(row["input_ids"], dtype=torch.long) for row in rows]
        batch = self.inner(_strip(examples, columns))
        input_ids = batch["input_ids"]
        if input_ids.shape[0] == len(rows):
            rows_ids = ids
        elif input_ids.shape[0] == 1 or (input_ids.shape[0] == len(examples) and isinstance(examples[0], list)):
            rows_ids = self._group(examples, ids, input_ids.shape[0])
        else:
            raise ValueError(f"SFTKey cannot match {len(rows)} rows to a batch of {input_ids.shape[0]} sequences.")
        attention = batch.get("attention_mask")
        starts = [
            row_start(row_ids, input_ids[index], None if attention is None else attention[index])
            for index, row_ids in enumerate(rows_ids)
        ]
        for column in columns:
            values = [torch.as_tensor(row[column], dtype=SFTKEY_COLUMNS.get(column, torch.long)) for row in rows]
            if len(rows_ids) != len(values):
                values = self._group(examples, values, input_ids.shape[0])
            batch[column] = torch.stack(
                [
                    place_row(value, row_ids, input_ids[index], start)
                    for index, (value, row_ids, start) in enumerate(zip(values, rows_ids, starts))
                ]
            )
        return batch

    @staticmethod
    def _group(examples: list[Any], masks: list[torch.Tensor], n_rows: int) -> list[torch.Tensor]:
        """Concatenate masks the way rows were concatenated: all into one row, or one row per packed bin."""
        if n_rows == 1:
            return [torch.cat(masks)]
        bounds = list(itertools.accumulate([0, *(len(group) for group in examples)]))
        return [torch.cat(masks[start:end]) for start, end in itertools.pairwise(bounds)]


def row_start(row_ids: torch.Tensor, batch_row: torch.Tensor, attention_row: torch.Tensor | None = None) -> int:
    """Where a collator put a row's tokens in its padded batch row: at the start (padded on the right) or at the end
    (padded on the left), read from the tokens (and, where both fit, the attention mask); an error otherwise."""
    n, width = row_ids.numel(), batch_row.numel()
    starts = [start for start in dict.fromkeys((0, width - n)) if start >= 0]
    fits = [start for start in starts if torch.equal(batch_row[start : start + n], row_ids)]
    if len(fits) > 1 and attention_row is not None:
        fits = [start for start in fits if bool(attention_row[start : start + n].ne(0).all())]
    if len(fits) != 1:
        problem = "changed or moved a row's input_ids" if not fits else "padded a row so that its side is unclear"
        raise ValueError(f"SFTKey: the data collator {problem}; its key tokens cannot be placed.")
    return fits[0]


def place_row(mask: torch.Tensor, row_ids: torch.Tensor, batch_row: torch.Tensor, start: int) -> torch.Tensor:
    """``mask`` (one value per token of ``row_ids``) spread over ``batch_row``'s width from ``start``, where the
    collator put the row (``row_start``), 0 elsewhere."""
    if mask.numel() != row_ids.numel():
        raise ValueError(f"SFTKey: a key mask of {mask.numel()} tokens belongs to a row of {row_ids.numel()} tokens.")
    placed = mask.new_zeros(batch_row.numel())
    placed[start : start + mask.numel()] = mask
    return placed


@dataclass
class KeyMarkingCollator:
    """For rows without a key mask (a stock trainer's): each row's key mask is made from its own tokens, where the
    trained tokens are those ``inner`` labels when it collates the row alone (``key_mask_from_token_ids``), and the
    rows are then collated with their masks by ``SFTKeyDataCollator``. ``mark_row`` gives a row's ``TurnsMarked``
    columns with its ``labels`` (for the data counts)."""

    inner: Callable[[list[Any]], dict[str, Any]]
    tokenizer: Any
    marking: Any  # tokenize.MarkingOptions

    def mark_row(self, row: Mapping[str, Any]) -> dict[str, Any]:
        from .tokenize import key_mask_from_token_ids

        alone = self.inner([dict(row)])
        row_ids = torch.as_tensor(row["input_ids"], dtype=torch.long)
        attention = alone.get("attention_mask")
        # a row collated alone is padded only up to pad_to_multiple_of, on the side the collator pads
        start = row_start(row_ids, alone["input_ids"][0], None if attention is None else attention[0])
        keep = slice(start, start + row_ids.numel())
        ids, labels = alone["input_ids"][0][keep].tolist(), alone["labels"][0][keep].tolist()
        marked = key_mask_from_token_ids(ids, labels, self.tokenizer, self.marking, row)
        return {**marked.columns(), "labels": labels}

    def __call__(self, examples: list[Any]) -> dict[str, Any]:
        rows = [{**row, SFTKEY_MASK: self.mark_row(row)[SFTKEY_MASK]} for row in examples]
        return SFTKeyDataCollator(self.inner)(rows)
