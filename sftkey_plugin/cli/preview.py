"""``sftkey preview``: what SFTKey will train on, before any GPU hour is spent.

Each record is tokenised exactly as the TRL trainer does (``tokenize_with_key_mask``), labels are derived
with TRL's rules, truncation is applied, and every example is classed found / missing / cut.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections import defaultdict
from collections.abc import Sequence
from typing import Any

from ..config import EDGE_TOKENS, TURNS
from ..finders import validate_finder_options
from ..masking import IGNORE_INDEX, truncation_slice
from ..stats import AMBIGUOUS, CUT, FOUND, MISSING, KeyDataStats, key_status
from ..weights import (
    SFTKEY_EXAMPLE_WEIGHT,
    SFTKEY_WEIGHT,
    DataWeightOptions,
    DataWeightScan,
    compose_data_weights,
    scan_data_weights,
)
from .data import CLIError, load_records, parse_json_option, record_form

NO_FINDER = "(none)"
ERROR = "error"  # the record cannot be tokenised at all (TRL would stop on it too)
EXAMPLE_FIELDS = ("index", "finder", "status", "tokens", "key_tokens", "trained_tokens", "turns", "turns_found")


def add_parser(subparsers: Any) -> None:
    """Register ``preview`` and its options."""
    parser = subparsers.add_parser(
        "preview",
        help="show which tokens SFTKey will train as the key answer",
        description="Tokenise DATA as the TRL trainer will, find the key answer in every example and report how "
        "many have one, how many tokens it has and how many were cut by max_length; then print a few examples "
        "with the key tokens highlighted and token boundaries visible.",
        epilog="Example: sftkey preview data.jsonl --tokenizer Qwen/Qwen2.5-0.5B --max-length 1024 --min-found 0.95",
    )
    parser.add_argument(
        "data",
        help="a .jsonl/.json/.parquet file or a datasets folder (messages, prompt/completion or text records)",
    )
    parser.add_argument("--tokenizer", required=True, help="tokenizer folder or hub name (must be a fast tokenizer)")
    parser.add_argument("--split", help="split to read from a DatasetDict folder (default: train)")
    parser.add_argument("--finder", default="auto", help="key-span finder (default: auto)")
    parser.add_argument("--finder-options", help='finder options as JSON, e.g. \'{"pattern": "(?P<key>...)"}\'')
    parser.add_argument("--max-length", type=int, help="truncate to this many tokens, as SFTConfig.max_length")
    parser.add_argument("--truncation-mode", default="keep_start", choices=["keep_start", "keep_end"])
    parser.add_argument("--text-field", default="text", help="field of text-form records (default: text)")
    parser.add_argument("--assistant-only-loss", action="store_true", help="as SFTConfig.assistant_only_loss")
    parser.add_argument(
        "--completion-only-loss",
        action=argparse.BooleanOptionalAction,
        default=None,
        help="as SFTConfig.completion_only_loss (default: on for prompt/completion data)",
    )
    parser.add_argument(
        "--edge-tokens",
        default="include",
        choices=list(EDGE_TOKENS),
        help="tokens straddling a span edge count as key (include) or not",
    )
    parser.add_argument(
        "--no-eos",
        dest="include_eos",
        action="store_false",
        help="do not count the EOS after the answer as a key token",
    )
    parser.add_argument(
        "--turns",
        default="all",
        choices=list(TURNS),
        help="multi-turn data: key span in every assistant turn (all, default) or only the last, as sftkey_turns",
    )
    parser.add_argument(
        "--reasoning-field",
        help="the assistant-message field with the reasoning, as sftkey_reasoning_field (default: "
        "reasoning_content, thinking or reasoning)",
    )
    parser.add_argument(
        "--message-weight-field",
        default="weight",
        help="the assistant-message field with its weight, as sftkey_message_weight_field (default: weight)",
    )
    parser.add_argument(
        "--example-weight-field", help="the record field with its weight, as sftkey_example_weight_field"
    )
    parser.add_argument(
        "--prompt-weight", type=float, default=0.0, help="the weight of the prompt tokens, as sftkey_prompt_weight"
    )
    parser.add_argument("-n", "--num-examples", type=int, default=5, help="examples to print (default 5)")
    parser.add_argument(
        "--show",
        default="all",
        choices=["all", FOUND, MISSING, CUT],
        help="which examples to print (default: the first ones, whatever their status)",
    )
    parser.add_argument(
        "--color",
        default="auto",
        choices=["auto", "always", "never"],
        help="ANSI colours (auto: when stdout is a terminal); without them key tokens are [[...]]",
    )
    parser.add_argument(
        "--min-found",
        type=float,
        metavar="SHARE",
        help="exit with status 1 when fewer than this share of examples keep a complete key span",
    )
    parser.add_argument("--json", action="store_true", help="print one JSON object instead of the report")
    parser.set_defaults(func=run)


def classify(
    encoded: dict[str, Any],
    max_length: int | None,
    truncation_mode: str,
    completion_only_loss: bool | None,
    prompt_weight: float = 0.0,
) -> dict[str, Any]:
    """Status and token counts of one tokenised example, with TRL's label rules and truncation; with data weights
    (``sftkey_weight`` in ``encoded``) each token's data weight (``compose_data_weights``: 0 where not trained)."""
    length = len(encoded["input_ids"])
    trained = [1] * length
    if "completion_mask" in encoded and completion_only_loss is not False:
        trained = [t & c for t, c in zip(trained, encoded["completion_mask"])]
    if "assistant_masks" in encoded:
        trained = [t & a for t, a in zip(trained, encoded["assistant_masks"])]
    key = [k & t for k, t in zip(encoded["sftkey_mask"], trained)]
    keep = truncation_slice(max_length, truncation_mode)
    finder = encoded["sftkey_finder"]
    status = key_status(finder, key, keep)
    weights, counts = None, None
    if SFTKEY_WEIGHT in encoded:
        labels = [token if t else IGNORE_INDEX for token, t in zip(encoded["input_ids"], trained)]
        kept_ids, kept_labels = encoded["input_ids"][keep], labels[keep]
        composed = compose_data_weights(
            kept_ids, kept_labels, encoded[SFTKEY_WEIGHT][keep], encoded[SFTKEY_EXAMPLE_WEIGHT], prompt_weight
        )
        weights = [0.0] * length
        weights[keep] = composed[SFTKEY_WEIGHT]
        scored = [w for w, label in zip(composed[SFTKEY_WEIGHT], composed["labels"]) if label != IGNORE_INDEX]
        counts = (sum(scored), len(scored), scored.count(0.0))
    return {
        "weights": weights,
        "weight_counts": counts,
        "finder": finder or NO_FINDER,
        "status": status,
        "tokens": length,
        "key_tokens": sum(key[keep]),
        "trained_tokens": sum(trained[keep]),
        "emptied": sum(trained[keep]) == 0,
        "kept": range(length)[keep],
        "key": key,
        "trained": trained,
        "turns": encoded["sftkey_turns"],
        "turns_found": encoded["sftkey_turns_found"] if status != MISSING else 0,
    }


def token_texts(tokenizer: Any, ids: Sequence[int]) -> list[str]:
    """The text of each token, decoded in context so leading spaces and multi-byte characters come out right."""
    texts = []
    for index in range(len(ids)):
        start = max(0, index - 8)
        before = tokenizer.decode(ids[start:index], clean_up_tokenization_spaces=False) if index > start else ""
        after = tokenizer.decode(ids[start : index + 1], clean_up_tokenization_spaces=False)
        texts.append(after[len(before) :] if after.startswith(before) else tokenizer.decode([ids[index]]))
    return texts


def _visible(text: str) -> str:
    return text.replace("\t", "→").replace("\n", "↵\n")


_KEY_STYLES = ("30;43", "30;103")  # black on yellow / bright yellow, alternating so boundaries show
_TRAINED_STYLES = ("0", "34")
_PROMPT_STYLES = ("2", "2;36")


def render_tokens(texts: Sequence[str], key: Sequence[int], trained: Sequence[int], kept: range, color: bool) -> str:
    """Tokens with visible boundaries; key tokens highlighted (colour) or in ``[[...]]``; ``✂`` at the cut;
    without colour ``»…«`` around the trained tokens (when not all are)."""
    kept_end = kept.stop if kept.step == 1 else len(texts)
    kept_start = kept.start
    marks_training = 0 in trained  # » « mark the trained part only where some tokens are not trained
    parts: list[str] = []
    for index, text in enumerate(texts):
        if index == kept_end or (index == kept_start and kept_start > 0):
            parts.append(" ✂ " if color else "✂")
        shown = _visible(text)
        if color:
            styles = _KEY_STYLES if key[index] else _TRAINED_STYLES if trained[index] else _PROMPT_STYLES
            cut = ";9" if not kept_start <= index < kept_end else ""
            style = f"\x1b[{styles[index % 2]}{cut}m"
            # each line painted on its own, so no background colour runs on past a newline
            parts.append("\n".join(f"{style}{piece}\x1b[0m" if piece else "" for piece in shown.split("\n")))
            continue
        opens = key[index] and (index == 0 or not key[index - 1])
        closes = key[index] and (index + 1 == len(texts) or not key[index + 1])
        after_break = index == 0 or texts[index - 1].endswith("\n") or (key[index - 1] and not key[index])
        separator = "" if after_break or opens else "·"
        if marks_training and trained[index] != (trained[index - 1] if index else 0):
            separator += "»" if trained[index] else "«"
        parts.append(separator + ("[[" if opens else "") + shown + ("]]" if closes else ""))
    return "".join(parts)


def _by_finder(rows: list[dict[str, Any]]) -> dict[str, dict[str, float]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for row in rows:
        groups[row["finder"] if row["status"] != MISSING else NO_FINDER].append(row)
    table = {}
    for name, group in sorted(groups.items(), key=lambda item: -len(item[1])):
        table[name] = {
            "examples": len(group),
            "complete": sum(r["status"] == FOUND for r in group),
            "cut": sum(r["status"] == CUT for r in group),
            "key_tokens_per_example": sum(r["key_tokens"] for r in group) / len(group),
            "trained_tokens_per_example": sum(r["trained_tokens"] for r in group) / len(group),
        }
    return table


def summarise(
    rows: list[dict[str, Any]], errors: list[dict[str, Any]], scan: DataWeightScan | None = None
) -> dict[str, Any]:
    """Counts over the examples (``KeyDataStats`` plus the complete share and per-finder rows; with data weights
    their counts)."""
    stats = KeyDataStats.from_columns(
        "preview",
        [r["status"] for r in rows],
        [r["finder"] for r in rows],  # counted by finder only when found; ambiguous / not_located counted apart
        [r["key_tokens"] for r in rows],
        [r["trained_tokens"] for r in rows],
        [(r["turns"], r["turns_found"]) for r in rows],
    )
    stats.emptied = sum(r["emptied"] for r in rows)
    if scan is not None and scan.active:
        stats.weighted_records = scan.weighted_records
        stats.count_weights(*zip(*(r["weight_counts"] for r in rows)))
    return {
        **stats.as_dict(),
        "complete": stats.complete,
        "found_share": stats.found / stats.examples if stats.examples else 0.0,
        "complete_share": stats.complete_share,
        "errors": len(errors),
        "by_finder": _by_finder(rows),
    }


def format_summary(summary: dict[str, Any], header: str, per_finder: bool) -> str:
    """The summary as an aligned plain-text table."""
    n = summary["examples"] or 1

    def share(count: int) -> str:
        return f"{count:>7}  ({100.0 * count / n:5.1f}%)"

    key_share = 100.0 * summary["key_tokens"] / summary["completion_tokens"] if summary["completion_tokens"] else 0.0
    lines = [
        header,
        f"  {'examples':<38}{summary['examples']:>7}",
        f"  {'with a key span':<38}{share(summary['found'])}",
        f"  {'  complete after truncation':<38}{share(summary['complete'])}",
        f"  {'  answer cut by truncation':<38}{share(summary['cut'])}",
        f"  {'without a key span':<38}{share(summary['missing'])}",
        f"  {'  ambiguous (answers disagree)':<38}{share(summary['ambiguous'])}",
        f"  {'  altered by the chat template':<38}{share(summary['not_located'])}",
        f"  {'assistant turns (with a key span)':<38}{summary['turns']:>7}  ({summary['turns_found']})",
        f"  {'no trained token left (TRL drops)':<38}{summary['emptied']:>7}",
        f"  {'records that cannot be tokenised':<38}{summary['errors']:>7}",
        f"  {'key tokens per example':<38}{summary['key_tokens'] / n:>7.1f}",
        f"  {'trained tokens per example':<38}{summary['completion_tokens'] / n:>7.1f}  (key {key_share:.1f}%)",
    ]
    if summary["weighted_records"] is not None:
        tokens = summary["weighted_tokens"]
        mean = summary["weight_sum"] / tokens if tokens else 0.0
        lines += [
            f"  {'records with a data weight':<38}{share(summary['weighted_records'])}",
            f"  {'mean token weight (prompt included)':<38}{mean:>7.3g}  (over {tokens} tokens)",
            f"  {'tokens at weight 0':<38}{summary['zero_weight_tokens']:>7}",
        ]
    if per_finder:
        lines += [
            "",
            f"  {'finder':<14}{'examples':>9}{'complete':>9}{'cut':>6}{'key tok/ex':>12}{'trained tok/ex':>16}",
        ]
        for name, row in summary["by_finder"].items():
            lines.append(
                f"  {name:<14}{row['examples']:>9}{row['complete']:>9}{row['cut']:>6}"
                f"{row['key_tokens_per_example']:>12.1f}{row['trained_tokens_per_example']:>16.1f}"
            )
    return "\n".join(lines)


def _use_color(choice: str) -> bool:
    return choice == "always" or (choice == "auto" and sys.stdout.isatty())


def run(args: argparse.Namespace) -> int:
    """Tokenise, classify, print the table and examples; 1 when ``--min-found`` is not met."""
    from tqdm.auto import tqdm
    from transformers import AutoTokenizer

    from ..tokenize import MarkingOptions, require_fast_tokenizer, tokenize_with_key_mask

    options = parse_json_option(args.finder_options, "--finder-options")
    validate_finder_options(args.finder, options)  # a bad name or option fails once, not on every record
    records = load_records(args.data, args.split)
    if not records:
        raise CLIError(f"{args.data}: no records")
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer)
    require_fast_tokenizer(tokenizer)
    marking = MarkingOptions(args.finder, options, args.edge_tokens, args.include_eos, args.turns, args.reasoning_field)
    weights = DataWeightOptions(args.message_weight_field, args.example_weight_field, args.prompt_weight)
    if args.prompt_weight < 0 or args.prompt_weight != args.prompt_weight:
        raise CLIError(f"--prompt-weight must be a number >= 0, not {args.prompt_weight}")
    try:
        scan = scan_data_weights(records, weights)
    except ValueError as error:
        raise CLIError(str(error)) from error
    rows, errors, encodings = [], [], {}
    for index, record in enumerate(tqdm(records, desc="tokenizing", unit="ex", disable=None)):
        try:
            encoded = tokenize_with_key_mask(
                record,
                tokenizer,
                marking,
                text_field=args.text_field,
                assistant_only_loss=args.assistant_only_loss,
                weights=weights if scan.active else None,
            )
        except (ValueError, KeyError, TypeError) as error:
            errors.append({"index": index, "error": str(error)})
            continue
        row = {
            "index": index,
            **classify(encoded, args.max_length, args.truncation_mode, args.completion_only_loss, args.prompt_weight),
        }
        rows.append(row)
        encodings[index] = encoded["input_ids"]
    if not rows:
        raise CLIError(f"no record could be tokenised; first error: {errors[0]['error']}")
    summary = summarise(rows, errors, scan)
    shown = [r for r in rows if args.show in ("all", r["status"])][: max(args.num_examples, 0)]
    passed = args.min_found is None or summary["complete_share"] >= args.min_found
    if args.json:
        print(json.dumps(_json_report(args, summary, shown, errors, encodings, tokenizer, passed), ensure_ascii=False))
    else:
        _print_report(args, records, summary, shown, errors, encodings, tokenizer)
    if not passed:
        print(
            f"sftkey preview: only {summary['complete_share']:.1%} of examples keep a complete key span "
            f"(--min-found {args.min_found})",
            file=sys.stderr,
        )
        return 1
    return 0


def _json_report(args, summary, shown, errors, encodings, tokenizer, passed):  # type: ignore[no-untyped-def]
    """The machine-readable report: summary, the shown examples token by token, the errors."""
    examples = []
    for row in shown:
        texts = token_texts(tokenizer, encodings[row["index"]])
        examples.append(
            {
                **{k: row[k] for k in EXAMPLE_FIELDS},
                "token_texts": texts,
                "key_mask": row["key"],
                "trained_mask": row["trained"],
                "weights": row["weights"],
                "key_text": "".join(t for t, k in zip(texts, row["key"]) if k),
            }
        )
    return {
        "data": str(args.data),
        "finder": args.finder,
        "max_length": args.max_length,
        "summary": summary,
        "min_found": args.min_found,
        "passed": passed,
        "examples": examples,
        "errors": errors[:20],
    }


def _print_report(args, records, summary, shown, errors, encodings, tokenizer) -> None:  # type: ignore[no-untyped-def]
    """The human report: table, legend, then each shown example."""
    forms = sorted({record_form(r, args.text_field) or "unknown" for r in records})
    length = f"max_length {args.max_length} ({args.truncation_mode})" if args.max_length else "no max_length"
    header = f"SFTKey preview of {args.data}: {', '.join(forms)} form, finder {args.finder}, {length}"
    print(format_summary(summary, header, per_finder=args.finder == "auto"))
    for error in errors[:3]:
        print(f"  record {error['index']}: {error['error']}")
    if not shown:
        return
    color = _use_color(args.color)
    legend = (
        "\x1b[30;43m key \x1b[0m\x1b[30;103m tokens \x1b[0m, \x1b[34mtrained\x1b[0m, \x1b[2mnot trained\x1b[0m, "
        "alternating shades = token boundaries"
        if color
        else "[[key tokens]], »trained part«, tokens separated by ·, ↵ = newline"
    )
    print(f"\nExamples ({legend}; ✂ = max_length cut):")
    for row in shown:
        texts = token_texts(tokenizer, encodings[row["index"]])
        print(
            f"\n--- record {row['index']}: {row['status']}, finder {row['finder']}"
            + (" (answer statements disagree: no key)" if row["finder"] == AMBIGUOUS else "")
            + f", {row['key_tokens']} key of "
            f"{row['trained_tokens']} trained tokens ({row['tokens']} in all)"
            + (f", key in {row['turns_found']} of {row['turns']} assistant turns" if row["turns"] > 1 else "")
        )
        trained = row["trained"] if row["weights"] is None else [int(w > 0) for w in row["weights"]]
        print(render_tokens(texts, row["key"], trained, row["kept"], color))
        if row["weights"] is not None:
            print(f"token weights: {weight_runs(row['weights'])}")


def weight_runs(weights: Sequence[float]) -> str:
    """Each token's data weight, as runs of equal weights: ``tokens 0-17: 0; 18-38: 0.5; ...``."""
    runs = []
    start = 0
    for index in range(1, len(weights) + 1):
        if index == len(weights) or weights[index] != weights[start]:
            span = f"{start}" if index - 1 == start else f"{start}-{index - 1}"
            runs.append(f"{span}: {weights[start]:g}")
            start = index
    return "tokens " + "; ".join(runs)
