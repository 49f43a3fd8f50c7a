"""``sftkey eval``: batched generation, answer extraction with the training finders, accuracy and format accuracy.

``--compare A.jsonl B.jsonl`` pairs two result files by example and puts a paired bootstrap confidence
interval (and an exact McNemar test) on the accuracy difference.
"""

from __future__ import annotations

import argparse
import json
import math
import time
from collections import Counter
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .answers import answers_match, extract_answer, format_ok, normalize_answer
from .data import CLIError, last_assistant_index, load_records, parse_json_option, record_form

SCORE_WEIGHTS = (0.7, 0.3)  # the paper's Score = 0.7 Acc + 0.3 Fmt


def add_parser(subparsers: Any) -> None:
    """Register ``eval`` and its options."""
    parser = subparsers.add_parser(
        "eval",
        help="answer accuracy and format accuracy of a model (or --compare two result files)",
        description="Generate a response for every record of DATA (greedy by default, batched, left padding), "
        "extract the answer with the same finders as training, normalise it (1,000 = 1000, $5 = 5, 0.50 = 1/2, "
        "(B) = B) and compare it with the gold answer (the record's --answer-field, else the answer found in its "
        "reference response). Reports accuracy, format accuracy (the whole output is "
        "<Thinking>…</Thinking><Answer>…</Answer>) and the paper's Score = 0.7 Acc + 0.3 Fmt; writes one result "
        "line per example (jsonl) and a summary (json).",
        epilog="Examples: sftkey eval out/sft data/test.jsonl -o sft.jsonl; sftkey eval out/sftkey data/test.jsonl "
        "-o sftkey.jsonl; sftkey eval --compare sft.jsonl sftkey.jsonl",
    )
    parser.add_argument("model", nargs="?", help="model folder or hub name")
    parser.add_argument("data", nargs="?", help="records with prompts (messages, prompt/completion, or --prompt-field)")
    parser.add_argument("--compare", nargs=2, metavar=("A.jsonl", "B.jsonl"), help="compare two result files instead")
    parser.add_argument("--tokenizer", help="tokenizer, if not the model's folder")
    parser.add_argument("--split", help="split to read from a DatasetDict folder")
    parser.add_argument("--limit", type=int, help="evaluate only the first N records")
    parser.add_argument("--finder", default="auto", help="how answers are found in outputs (default auto)")
    parser.add_argument("--finder-options", help="finder options as JSON")
    parser.add_argument("--answer-field", default="answer", help="record field with the gold answer (default answer)")
    parser.add_argument("--prompt-field", help="raw records: field with the question (sent as a user message)")
    parser.add_argument(
        "--format-pattern",
        help="regular expression an output must fully match for format accuracy "
        "(named groups must be non-blank); default: the paper's tag structure",
    )
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-new-tokens", type=int, default=512)
    parser.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=float, default=1.0)
    parser.add_argument("--top-p", type=float, default=1.0)
    parser.add_argument("--top-k", type=int, default=0, help="0: no top-k filter")
    parser.add_argument("--seed", type=int, default=0, help="sampling and bootstrap seed")
    parser.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda, cuda:1, mps")
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="auto: float32 on cpu, the checkpoint's dtype elsewhere",
    )
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    parser.add_argument("-o", "--output", default="eval-results.jsonl", help="per-example results (jsonl)")
    parser.add_argument("--summary", help="summary json (default: OUTPUT with .summary.json)")
    parser.add_argument("--resamples", type=int, default=10000, help="--compare: bootstrap resamples")
    parser.add_argument("--confidence", type=float, default=0.95, help="--compare: confidence level")
    parser.add_argument("--json", action="store_true", help="print the summary (or comparison) as JSON")
    parser.set_defaults(func=run)


# ---------------------------------------------------------------- prompts and gold answers


def prompt_messages(record: Mapping[str, Any], prompt_field: str | None = None) -> list[dict[str, Any]] | str:
    """What the model is given: the conversation before the last assistant turn, or a plain prompt string."""
    if prompt_field:
        if not isinstance(record.get(prompt_field), str):
            raise CLIError(f"a record has no string field {prompt_field!r}")
        return [{"role": "user", "content": record[prompt_field]}]
    form = record_form(record)
    if form == "messages":
        index = last_assistant_index(record["messages"])
        return list(record["messages"][: index if index is not None else len(record["messages"])])
    if isinstance(record.get("prompt"), (list, str)):  # prompt-only records (no reference completion) too
        return record["prompt"]
    raise CLIError("eval needs prompts: messages or prompt/completion records, or --prompt-field FIELD")


def reference_response(record: Mapping[str, Any]) -> str | None:
    """The record's own response (last assistant message or completion), where it has one."""
    form = record_form(record)
    if form == "messages":
        index = last_assistant_index(record["messages"])
        return record["messages"][index].get("content") if index is not None else None
    if form == "prompt_completion":
        index = last_assistant_index(record["completion"])
        return record["completion"][index].get("content") if index is not None else None
    if form == "prompt_completion_text":
        return record["completion"]
    return None


def gold_answer(
    record: Mapping[str, Any],
    answer_field: str,
    finder: str = "auto",
    options: Mapping[str, Any] | None = None,
) -> str | None:
    """The gold answer: the answer field if present, else the answer the finder reads in the reference response."""
    value = record.get(answer_field)
    if value is not None and str(value).strip():
        return str(value).strip()
    reference = reference_response(record)
    if not isinstance(reference, str):
        return None
    return extract_answer(reference, finder, options, record).answer


def render_prompt(tokenizer: Any, prompt: list[dict[str, Any]] | str) -> tuple[list[int], str]:
    """Token ids and text of a prompt: chat-templated with the generation prompt, or tokenised as is."""
    if isinstance(prompt, str):
        return list(tokenizer(prompt)["input_ids"]), prompt
    if not getattr(tokenizer, "chat_template", None):
        raise CLIError("conversational prompts need a tokenizer with a chat template")
    text = tokenizer.apply_chat_template(prompt, tokenize=False, add_generation_prompt=True)
    # TRL tokenises chat renders without special tokens (the template holds them): match training
    return list(tokenizer(text, add_special_tokens=False)["input_ids"]), text


# ---------------------------------------------------------------- generation


def _eos_ids(model: Any, tokenizer: Any) -> set[int]:
    ids = {tokenizer.eos_token_id} if tokenizer.eos_token_id is not None else set()
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids |= set(configured if isinstance(configured, list) else [configured] if configured is not None else [])
    return ids


def generate(
    model: Any,
    tokenizer: Any,
    prompt_ids: Sequence[Sequence[int]],
    *,
    batch_size: int = 16,
    max_new_tokens: int = 512,
    sampling: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> tuple[list[str], int]:
    """Batched generation with left padding (longest prompts first); returns the outputs (cut at EOS) and the
    number of generated tokens."""
    import torch
    from tqdm.auto import tqdm

    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos_ids = _eos_ids(model, tokenizer)
    sampling = dict(sampling or {})
    settings: dict[str, Any] = {"do_sample": bool(sampling.get("do_sample"))}
    if settings["do_sample"]:
        settings.update(
            temperature=sampling.get("temperature", 1.0),
            top_p=sampling.get("top_p", 1.0),
            top_k=sampling.get("top_k") or None,
        )
    else:  # override sampling defaults some checkpoints ship in generation_config.json
        settings.update(temperature=None, top_p=None, top_k=None)
    order = sorted(range(len(prompt_ids)), key=lambda i: -len(prompt_ids[i]))
    outputs: list[str] = [""] * len(prompt_ids)
    generated = 0
    device = next(model.parameters()).device
    was_training = model.training
    model.eval()
    bar = tqdm(total=len(order), desc="generating", unit="ex", disable=None if progress else True)
    try:
        for start in range(0, len(order), batch_size):
            batch = order[start : start + batch_size]
            width = max(len(prompt_ids[i]) for i in batch)
            ids = torch.tensor([[pad_id] * (width - len(prompt_ids[i])) + list(prompt_ids[i]) for i in batch])
            mask = torch.tensor([[0] * (width - len(prompt_ids[i])) + [1] * len(prompt_ids[i]) for i in batch])
            with torch.no_grad():
                out = model.generate(
                    input_ids=ids.to(device),
                    attention_mask=mask.to(device),
                    max_new_tokens=max_new_tokens,
                    pad_token_id=pad_id,
                    eos_token_id=sorted(eos_ids) or None,
                    **settings,
                )
            for row, index in zip(out[:, width:].tolist(), batch):
                end = next((j for j, token in enumerate(row) if token in eos_ids), len(row))
                generated += end
                # special tokens kept: a model may have the tags as added special tokens
                outputs[index] = tokenizer.decode(row[:end], skip_special_tokens=False)
            bar.update(len(batch))
    finally:
        bar.close()
        model.train(was_training)
    return outputs, generated


# ---------------------------------------------------------------- scoring


def score_outputs(
    outputs: Sequence[str],
    golds: Sequence[str | None],
    *,
    finder: str = "auto",
    finder_options: Mapping[str, Any] | None = None,
    format_pattern: str | None = None,
    records: Sequence[Mapping[str, Any]] | None = None,
) -> list[dict[str, Any]]:
    """One result row per output: extracted answer, normalised forms, correct (None without gold), format_ok."""
    rows = []
    for index, (output, gold) in enumerate(zip(outputs, golds)):
        extraction = extract_answer(output, finder, finder_options, records[index] if records else None)
        predicted, expected = normalize_answer(extraction.answer), normalize_answer(gold)
        rows.append(
            {
                "index": index,
                "output": output,
                "gold": gold,
                "prediction": extraction.answer,
                "finder": extraction.finder,
                "prediction_normalized": predicted,
                "gold_normalized": expected,
                "correct": None if expected is None else answers_match(extraction.answer, gold),
                "format_ok": format_ok(output, format_pattern),
            }
        )
    return rows


def summarise(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    """Accuracy (over examples with a gold answer), format accuracy, the paper's Score, extraction counts."""
    graded = [r for r in rows if r["correct"] is not None]
    accuracy = sum(r["correct"] for r in graded) / len(graded) if graded else 0.0
    fmt = sum(r["format_ok"] for r in rows) / len(rows) if rows else 0.0
    return {
        "examples": len(rows),
        "graded": len(graded),
        "correct": sum(r["correct"] for r in graded),
        "accuracy": accuracy,
        "format_ok": sum(r["format_ok"] for r in rows),
        "format_accuracy": fmt,
        "score": SCORE_WEIGHTS[0] * accuracy + SCORE_WEIGHTS[1] * fmt,
        "extracted": sum(r["prediction"] is not None for r in rows),
        "by_finder": dict(Counter(r["finder"] or "(none)" for r in rows).most_common()),
    }


def evaluate_records(
    model: Any,
    tokenizer: Any,
    records: Sequence[Mapping[str, Any]],
    *,
    finder: str = "auto",
    finder_options: Mapping[str, Any] | None = None,
    answer_field: str = "answer",
    prompt_field: str | None = None,
    format_pattern: str | None = None,
    batch_size: int = 16,
    max_new_tokens: int = 512,
    sampling: Mapping[str, Any] | None = None,
    progress: bool = True,
) -> tuple[list[dict[str, Any]], dict[str, Any]]:
    """Generate for every record and score: ``(rows, summary)``. The demo calls this with a model in memory."""
    rendered = [render_prompt(tokenizer, prompt_messages(r, prompt_field)) for r in records]
    golds = [gold_answer(r, answer_field, finder, finder_options) for r in records]
    started = time.perf_counter()
    outputs, generated = generate(
        model,
        tokenizer,
        [ids for ids, _ in rendered],
        batch_size=batch_size,
        max_new_tokens=max_new_tokens,
        sampling=sampling,
        progress=progress,
    )
    seconds = time.perf_counter() - started
    rows = score_outputs(
        outputs,
        golds,
        finder=finder,
        finder_options=finder_options,
        format_pattern=format_pattern,
        records=records,
    )
    for row, (_, text) in zip(rows, rendered):
        row["prompt"] = text
    summary = summarise(rows)
    summary.update(
        generated_tokens=generated,
        generation_seconds=round(seconds, 2),
        tokens_per_second=round(generated / seconds, 1) if seconds else None,
    )
    return rows, summary


# ---------------------------------------------------------------- comparison


def paired_bootstrap(
    a: Sequence[float], b: Sequence[float], resamples: int = 10000, seed: int = 0, confidence: float = 0.95
) -> tuple[float, float, float]:
    """Mean of ``b - a`` and its percentile bootstrap interval, resampling examples (pairs kept together)."""
    import numpy as np

    diffs = np.asarray(b, dtype=float) - np.asarray(a, dtype=float)
    if diffs.size == 0:
        return 0.0, 0.0, 0.0
    rng = np.random.default_rng(seed)
    means = []
    for done in range(0, resamples, 1000):  # chunks bound the index matrix's memory
        picks = rng.integers(0, diffs.size, size=(min(1000, resamples - done), diffs.size))
        means.append(diffs[picks].mean(axis=1))
    tail = (1.0 - confidence) / 2
    low, high = np.quantile(np.concatenate(means), [tail, 1.0 - tail])
    return float(diffs.mean()), float(low), float(high)


def mcnemar_exact(a_only: int, b_only: int) -> float:
    """Two-sided exact McNemar p-value from the discordant pairs (A right only, B right only)."""
    total = a_only + b_only
    if total == 0:
        return 1.0
    tail = sum(math.comb(total, k) for k in range(min(a_only, b_only) + 1)) / 2**total
    return min(1.0, 2 * tail)


def read_results(path: str | Path) -> list[dict[str, Any]]:
    """Rows of a per-example results file written by ``sftkey eval``."""
    rows = load_records(path)
    if rows and not {"index", "correct", "format_ok"} <= set(rows[0]):
        raise CLIError(f"{path}: not an sftkey eval results file (needs index, correct, format_ok)")
    return rows


def compare_results(
    rows_a: Sequence[Mapping[str, Any]],
    rows_b: Sequence[Mapping[str, Any]],
    *,
    resamples: int = 10000,
    seed: int = 0,
    confidence: float = 0.95,
) -> dict[str, Any]:
    """Accuracy and format accuracy of A and B on their common graded examples, B - A with bootstrap CIs."""
    by_index_b = {row["index"]: row for row in rows_b}
    pairs = []
    for row in rows_a:
        other = by_index_b.get(row["index"])
        if other is None:
            continue
        if row.get("prompt") is not None and other.get("prompt") is not None and row["prompt"] != other["prompt"]:
            raise CLIError(
                f"example {row['index']} has different prompts in the two files: not the same evaluation set"
            )
        pairs.append((row, other))
    if not pairs:
        raise CLIError("the two result files share no example index")
    graded = [(a, b) for a, b in pairs if a["correct"] is not None and b["correct"] is not None]
    result: dict[str, Any] = {
        "paired": len(pairs),
        "graded": len(graded),
        "only_in_a": len(rows_a) - len(pairs),
        "only_in_b": len(rows_b) - len(pairs),
        "confidence": confidence,
    }
    for metric, chosen in (("accuracy", graded), ("format_accuracy", pairs)):
        key = "correct" if metric == "accuracy" else "format_ok"
        a_values = [float(a[key]) for a, _ in chosen]
        b_values = [float(b[key]) for _, b in chosen]
        diff, low, high = paired_bootstrap(a_values, b_values, resamples, seed, confidence)
        result[metric] = {
            "a": sum(a_values) / len(a_values) if a_values else 0.0,
            "b": sum(b_values) / len(b_values) if b_values else 0.0,
            "difference": diff,
            "ci": [low, high],
        }
    a_only = sum(bool(a["correct"]) and not b["correct"] for a, b in graded)
    b_only = sum(bool(b["correct"]) and not a["correct"] for a, b in graded)
    result.update(a_right_b_wrong=a_only, b_right_a_wrong=b_only, mcnemar_p=mcnemar_exact(a_only, b_only))
    return result


def format_comparison(result: Mapping[str, Any], name_a: str, name_b: str) -> str:
    """The comparison as a side-by-side table with a one-line verdict."""
    level = f"{result['confidence']:.0%}"
    name_a, name_b = f"A: {name_a}", f"B: {name_b}"
    width = max(len(name_a), len(name_b), 8)
    lines = [
        f"sftkey eval --compare: {result['paired']} paired examples ({result['graded']} with a gold answer)",
        f"  {'':<17}{name_a:>{width}}  {name_b:>{width}}  {'B - A':>8}  {level} CI (paired bootstrap)",
    ]
    for metric, label in (("accuracy", "accuracy"), ("format_accuracy", "format accuracy")):
        row = result[metric]
        low, high = row["ci"]
        lines.append(
            f"  {label:<17}{row['a']:>{width}.4f}  {row['b']:>{width}.4f}  {row['difference']:>+8.4f}  "
            f"[{low:+.4f}, {high:+.4f}]"
        )
    lines.append(
        f"  B right where A is wrong: {result['b_right_a_wrong']}; A right where B is wrong: "
        f"{result['a_right_b_wrong']}; exact McNemar p = {result['mcnemar_p']:.3g}"
    )
    low, high = result["accuracy"]["ci"]
    if low > 0 or high < 0:
        better = "B" if low > 0 else "A"
        lines.append(
            f"  The accuracy difference is unlikely to be noise: the {level} CI excludes 0 ({better} is better)."
        )
    else:
        lines.append(f"  The accuracy difference is within noise: the {level} CI includes 0.")
    if result["only_in_a"] or result["only_in_b"]:
        lines.append(f"  (unpaired examples ignored: {result['only_in_a']} only in A, {result['only_in_b']} only in B)")
    return "\n".join(lines)


# ---------------------------------------------------------------- command


def load_model(path: str, device: str = "auto", dtype: str = "auto") -> Any:
    """A causal LM, or a PEFT adapter on its base model, on the chosen device (float32 on CPU unless told otherwise)."""
    import torch
    from transformers import AutoModelForCausalLM

    if device == "auto":
        device = "cuda" if torch.cuda.is_available() else "cpu"
    chosen = (
        torch.float32 if dtype == "auto" and device == "cpu" else dtype if dtype == "auto" else getattr(torch, dtype)
    )
    if (Path(path) / "adapter_config.json").exists():
        # a PEFT adapter folder: its base model with the adapter (Axolotl saves the base's config.json beside it,
        # which AutoModelForCausalLM would take for a full checkpoint)
        from peft import AutoPeftModelForCausalLM

        model = AutoPeftModelForCausalLM.from_pretrained(path, dtype=chosen)
    else:
        model = AutoModelForCausalLM.from_pretrained(path, dtype=chosen)
    return model.to(device)  # type: ignore[arg-type]  # transformers decorates .to(); mypy misreads the wrapper


def format_summary(summary: Mapping[str, Any], output: str, summary_path: str) -> str:
    """The human report of one evaluation."""
    return "\n".join(
        [
            f"sftkey eval: {summary['examples']} examples ({summary['graded']} with a gold answer)",
            f"  accuracy         {summary['accuracy']:.4f}  ({summary['correct']}/{summary['graded']})",
            f"  format accuracy  {summary['format_accuracy']:.4f}  ({summary['format_ok']}/{summary['examples']})",
            f"  score            {summary['score']:.4f}  (0.7 Acc + 0.3 Fmt)",
            f"  answer extracted {summary['extracted']}/{summary['examples']}  by finder: {summary['by_finder']}",
            f"  wrote {output} and {summary_path}",
        ]
    )


def run(args: argparse.Namespace) -> int:
    """``--compare``, or load, generate, score and write."""
    if args.compare:
        name_a, name_b = (Path(p).stem for p in args.compare)
        result = compare_results(
            read_results(args.compare[0]),
            read_results(args.compare[1]),
            resamples=args.resamples,
            seed=args.seed,
            confidence=args.confidence,
        )
        result.update(a=args.compare[0], b=args.compare[1])
        print(json.dumps(result) if args.json else format_comparison(result, name_a, name_b))
        return 0
    if not (args.model and args.data):
        raise CLIError("give MODEL and DATA, or --compare A.jsonl B.jsonl")
    from transformers import AutoTokenizer

    options = parse_json_option(args.finder_options, "--finder-options")
    records = load_records(args.data, args.split)[: args.limit]
    if not records:
        raise CLIError(f"{args.data}: no records")
    import torch

    if args.threads:
        torch.set_num_threads(args.threads)
    tokenizer = AutoTokenizer.from_pretrained(args.tokenizer or args.model)
    model = load_model(args.model, args.device, args.dtype)
    sampling: dict[str, Any] = {"do_sample": args.do_sample}
    if args.do_sample:
        torch.manual_seed(args.seed)
        sampling.update(temperature=args.temperature, top_p=args.top_p, top_k=args.top_k, seed=args.seed)
    rows, summary = evaluate_records(
        model,
        tokenizer,
        records,
        finder=args.finder,
        finder_options=options,
        answer_field=args.answer_field,
        prompt_field=args.prompt_field,
        format_pattern=args.format_pattern,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
    )
    summary.update(
        model=args.model,
        data=str(args.data),
        finder=args.finder,
        max_new_tokens=args.max_new_tokens,
        sampling=sampling,
    )
    summary_path = args.summary or str(Path(args.output).with_suffix("")) + ".summary.json"
    write_results(rows, summary, args.output, summary_path)
    print(json.dumps(summary) if args.json else format_summary(summary, args.output, summary_path))
    return 0


def write_results(
    rows: Sequence[Mapping[str, Any]], summary: Mapping[str, Any], output: str, summary_path: str
) -> None:
    """Per-example jsonl and the summary json."""
    Path(output).parent.mkdir(parents=True, exist_ok=True)
    with open(output, "w", encoding="utf-8") as handle:
        for row in rows:
            handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    Path(summary_path).write_text(json.dumps(summary, indent=1) + "\n", encoding="utf-8")
