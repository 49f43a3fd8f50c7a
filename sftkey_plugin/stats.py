"""Per-dataset counts of key marking, and the one readable log line made from them."""

from __future__ import annotations

from collections import Counter
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

from .config import SFTKeyArguments, mode_weights, needs_key_tokens
from .finders import finder_chain
from .hookspecs import AMBIGUOUS as AMBIGUOUS  # the finder value when answer statements disagree (re-exported)
from .masking import IGNORE_INDEX

# Per-example status values written by the transform
FOUND = "found"
MISSING = "missing"  # no finder found a key span (or the template hid the content)
CUT = "cut"  # a key span was found but truncation to max_length removed some of its tokens
NOT_LOCATED = "not_located"  # the finder value when the chat template altered the answer text


def key_status(finder: str, key_mask: list[int], keep: slice) -> str:
    """``MISSING`` (no finder matched, the template altered the answer, the answer is ambiguous, or no trained key
    token), ``CUT`` (truncation to ``keep`` removes some key tokens) or ``FOUND``; ``key_mask`` holds trained key
    tokens only."""
    if not finder or finder in (NOT_LOCATED, AMBIGUOUS) or 1 not in key_mask:
        return MISSING
    return CUT if sum(key_mask[keep]) < sum(key_mask) else FOUND


@dataclass
class KeyDataStats:
    """What key marking did to one dataset, before and after the ``sftkey_on_missing`` policy."""

    name: str = "train"
    examples: int = 0
    found: int = 0
    missing: int = 0
    cut: int = 0
    dropped: int = 0  # removed by sftkey_on_missing=drop
    emptied: int = 0  # dropped because truncation left no trained token (TRL's own rule, counted here too)
    kept_without_key: int = 0  # sftkey_on_missing=keep: trained in stage 1 only
    not_located: int = 0  # missing because the chat template altered the answer text
    ambiguous: int = 0  # missing because the finder saw answer statements it cannot tell apart
    key_tokens: int = 0
    completion_tokens: int = 0
    turns: int = 0  # assistant turns searched for a key (1 per example outside multi-turn conversations)
    turns_found: int = 0  # those with a key span
    by_finder: Counter[str] = field(default_factory=Counter)
    weighted_records: int | None = None  # records with a message or example weight (None: data weights off)
    weight_sum: float = 0.0  # the data weights of the trained tokens (prompt tokens included)
    weighted_tokens: int = 0  # those tokens
    zero_weight_tokens: int = 0  # those of them at data weight 0 (not trained)

    @classmethod
    def from_columns(
        cls,
        name: str,
        statuses: Iterable[str],
        finders: Iterable[str],
        key_counts: Iterable[int],
        completion_counts: Iterable[int],
        turn_counts: Iterable[tuple[int, int]] | None = None,
    ) -> KeyDataStats:
        """Counts from per-example columns; ``turn_counts`` holds ``(turns, turns found)`` per example."""
        stats = cls(name=name)
        for turns, found in turn_counts or ():
            stats.turns += turns
            stats.turns_found += found
        for status, finder, keys, completion in zip(statuses, finders, key_counts, completion_counts):
            stats.examples += 1
            stats.found += status != MISSING
            stats.missing += status == MISSING
            stats.cut += status == CUT
            stats.key_tokens += keys
            stats.completion_tokens += completion
            if finder and status != MISSING:
                stats.by_finder[finder] += 1
            stats.not_located += finder == NOT_LOCATED
            stats.ambiguous += finder == AMBIGUOUS
        return stats

    @property
    def complete(self) -> int:
        """The examples that keep a complete key span (found, not cut by truncation)."""
        return self.found - self.cut

    @property
    def complete_share(self) -> float:
        """The share of examples that keep a complete key span."""
        return self.complete / self.examples if self.examples else 0.0

    def count_weights(
        self, weight_sums: Iterable[float], weighted_tokens: Iterable[int], zero_weight_tokens: Iterable[int]
    ) -> None:
        """Add the data-weight counts of each row."""
        self.weight_sum += sum(weight_sums)
        self.weighted_tokens += sum(weighted_tokens)
        self.zero_weight_tokens += sum(zero_weight_tokens)

    def data_weights_line(self) -> str | None:
        """The data-weight part of the summary (None when data weights are off)."""
        if self.weighted_records is None:
            return None
        mean = self.weight_sum / self.weighted_tokens if self.weighted_tokens else 0.0
        return (
            f"data weights: {self.weighted_records} of {self.examples} records weighted, mean token weight "
            f"{mean:.3g} over {self.weighted_tokens} trained tokens (prompt tokens included), "
            f"{self.zero_weight_tokens} tokens at weight 0"
        )

    def count_policy(self, on_missing: str) -> None:
        """Record what ``sftkey_on_missing`` does with the examples without a key span: dropped or kept."""
        if on_missing == "drop":
            self.dropped = self.missing
        else:
            self.kept_without_key = self.missing

    def summary_line(self) -> str:
        """One line for the training log."""
        share = 100.0 * self.found / self.examples if self.examples else 0.0
        finders = ", ".join(f"{name} {count}" for name, count in self.by_finder.most_common())
        per_example = self.examples or 1
        key_share = 100.0 * self.key_tokens / self.completion_tokens if self.completion_tokens else 0.0
        parts = [
            f"SFTKey {self.name} data: {self.examples} examples, key span found in {self.found} ({share:.1f}%)"
            + (f" [{finders}]" if finders else ""),
            *(
                [f"key span in {self.turns_found} of {self.turns} assistant turns"]
                if self.turns > self.examples
                else []
            ),
            f"{self.missing} without a key span" + self.missing_reasons(),
            f"{self.cut} answers cut by truncation",
            f"{self.dropped} dropped",
            f"{self.kept_without_key} kept without key tokens",
            f"{self.emptied} emptied by truncation",
            f"{self.key_tokens / per_example:.1f} key of {self.completion_tokens / per_example:.1f} trained tokens per "
            f"example ({key_share:.1f}%)",
            *filter(None, [self.data_weights_line()]),
        ]
        return "; ".join(parts)

    def missing_reasons(self) -> str:
        """`` (M ambiguous: answer statements disagree; N altered by the chat template)``, or "" when none apply."""
        reasons = [
            *([f"{self.ambiguous} ambiguous: answer statements disagree"] if self.ambiguous else []),
            *([f"{self.not_located} altered by the chat template"] if self.not_located else []),
        ]
        return f" ({'; '.join(reasons)})" if reasons else ""

    def as_dict(self) -> Mapping[str, object]:
        return {**self.__dict__, "by_finder": dict(self.by_finder)}


_WITHOUT_KEYS = {
    "two_stage": "stage 2 would train nothing, step after step",
    "key_only": "key_only would train nothing",
    "weighted": "sftkey_key_weight would weigh (almost) nothing",
    "phases": "the key weights of sftkey_phases would weigh (almost) nothing",
}


def _without_keys(arguments: SFTKeyArguments) -> str:
    """What the mode would train without key tokens, for the refusal."""
    if all(key == 0 for key, _ in mode_weights(arguments)):
        return (
            "the answers it leaves out (key weight 0) could not be told apart, so they would be trained like the rest"
        )
    return _WITHOUT_KEYS[arguments.sftkey_mode]


def marked_rows_stats(name: str, rows: Iterable[Mapping[str, Any]]) -> KeyDataStats:
    """Counts of rows that hold ``labels`` and ``sftkey_mask`` (only trained key tokens), with the ``TurnsMarked``
    columns ``sftkey_finder``, ``sftkey_turns`` and ``sftkey_turns_found`` where the rows were marked here (a row
    whose mask came with the data counts as one turn, found by ``pretokenized``); with data weights
    (``sftkey_weight``, ``sftkey_prompt``) the weights of the trained tokens, the prompt tokens left out of the
    trained tokens (the caller sets ``weighted_records``, the records with a weight, when data weights are on)."""
    statuses: list[str] = []
    finders: list[str] = []
    keys: list[int] = []
    trained: list[int] = []
    turns: list[tuple[int, int]] = []
    weights: list[tuple[float, int, int]] = []  # per row with data weights: weight sum, trained tokens, at weight 0
    for row in rows:
        if "sftkey_weight" in row:
            scored = [w for w, label in zip(row["sftkey_weight"], row["labels"]) if label != IGNORE_INDEX]
            weights.append((sum(scored), len(scored), scored.count(0.0)))
        mask, finder = row["sftkey_mask"], row.get("sftkey_finder", "pretokenized")
        n_key = int(sum(mask))
        statuses.append(key_status(finder, mask, slice(None)))
        finders.append(finder)
        keys.append(n_key)
        prompt = row.get("sftkey_prompt") or [0] * len(row["labels"])
        trained.append(sum(1 for label, p in zip(row["labels"], prompt) if label != IGNORE_INDEX and not p))
        turns.append((row.get("sftkey_turns", 1), row.get("sftkey_turns_found", int(n_key > 0))))
    stats = KeyDataStats.from_columns(name, statuses, finders, keys, trained, turns)
    if weights:
        stats.count_weights(*zip(*weights))
    return stats


def missing_keys_error(stats: KeyDataStats, rows: list[int] | None = None) -> ValueError:
    """The refusal of ``sftkey_on_missing='error'``: how many examples have no key span and why, how many had it cut
    by truncation, the first such ``rows`` when known, and what to change."""
    cut = f" and {stats.cut} had their answer cut by max_length" if stats.cut else ""
    first = f" (first: rows {rows[:5]})" if rows else ""
    return ValueError(
        f"SFTKey: {stats.missing} of {stats.examples} {stats.name} examples have no key span{stats.missing_reasons()}"
        f"{cut}{first}. Fix the data, choose another sftkey_finder, or set sftkey_on_missing to 'drop' or 'keep'."
    )


def check_key_share(stats: KeyDataStats, arguments: SFTKeyArguments, data_form: str, preview: str) -> None:
    """Refuse (``ValueError``) to train when too few examples keep a key span for the mode to mean anything.

    Below ``sftkey_min_found`` (0: never), or when truncation cut every key span found; only in modes that need key
    tokens. The message names the data form, the finders tried, the share found and the ``preview`` command.
    """
    if arguments.sftkey_min_found <= 0 or not needs_key_tokens(arguments) or not stats.examples:
        return
    if stats.complete_share >= arguments.sftkey_min_found:
        return
    all_cut = stats.found > 0 and stats.cut == stats.found
    options = arguments.sftkey_finder_options if isinstance(arguments.sftkey_finder_options, dict) else {}
    tried = finder_chain(arguments.sftkey_finder, options)
    if arguments.sftkey_finder == "auto":
        answer_only = ", ".join(finder_chain("auto", options, answer_only=True))
        tried[-1] += f"; for assistant messages with separate reasoning: {answer_only}"
    lines = [
        f"SFTKey will not train: {stats.complete} of {stats.examples} {stats.name} examples "
        f"({stats.complete_share:.1%}) keep a key span, below sftkey_min_found={arguments.sftkey_min_found}; "
        f"sftkey_mode={arguments.sftkey_mode} needs key tokens ({_without_keys(arguments)}).",
        f"Data form: {data_form}. Finders tried: {', '.join(tried)}.",
        f"{stats.missing} examples have no key span"
        + stats.missing_reasons()
        + f", {stats.cut} had their key cut by truncation"
        + (" (every key span found was cut: raise max_length or use truncation_mode keep_end)" if all_cut else "")
        + ".",
        f"Look at what is found with: {preview}",
        "Then convert the data (sftkey convert), choose sftkey_finder / sftkey_finder_options, or set "
        "sftkey_min_found: 0 to train anyway.",
    ]
    raise ValueError("\n".join(lines))
