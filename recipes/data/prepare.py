"""The recipes' data step: one of the paper's datasets as chat records in the dataset's own chain-of-thought form.

    python recipes/data/prepare.py DATASET OUT.jsonl [--input FILE] [--split train] [--sample N] [--seed 0]

Each record is ``{"messages": [user, assistant], "answer": <bare gold answer>}`` (``sftkey eval`` reads ``answer``
as the gold answer). The assistant message keeps the dataset's own convention, so either

- ``sftkey convert OUT.jsonl TAGGED.jsonl --from SOURCE`` rewrites it as ``<Thinking>…</Thinking>\\n<Answer>…</Answer>``
  (the paper's format; the recipes then use ``sftkey_finder: tags``), or
- a finder marks the answer where it is, without tags (``sftkey_finder: gsm8k`` on GSM8K, for example).

- gsm8k (openai/gsm8k, main): the solution, ending ``#### N``; convert ``--from gsm8k``; finder ``gsm8k``.
- openr1_math (open-r1/OpenR1-Math-220k, default): the ``solution``, its ``\\boxed{}`` inside; convert
  ``--from field`` (the ``answer`` field); finder ``boxed``.
- openbookqa (allenai/openbookqa, additional): the fact ``fact1``, then ``The answer is (B).``; convert
  ``--from answer_is``; finder ``answer_is``.
- cot_collection (kaist-ai/CoT-Collection, a downloaded file via ``--input``): the ``rationale``; convert
  ``--from field`` (the ``target``); no finder alone: the rationale does not contain the answer.

Our choices (the paper does not say): the bare question as the only user message (no system prompt); GSM8K's
calculator annotations ``<<48/2=24>>`` removed (``--keep-calculator-annotations`` keeps them); OpenBookQA's
reasoning is the open-book fact the question was written from (the dataset has no rationale).
"""

from __future__ import annotations

import argparse
import json
import random
import re
import sys
from collections.abc import Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

HUB = {
    "gsm8k": ("openai/gsm8k", "main"),
    "openr1_math": ("open-r1/OpenR1-Math-220k", "default"),
    "openbookqa": ("allenai/openbookqa", "additional"),
    # The hub repository is a loading script and one JSON file: download it and pass --input (see recipes/README.md)
    "cot_collection": None,
}
CALCULATOR = re.compile(r"<<[^<>]*>>")


class Skip(Exception):
    """A source row that cannot become a training record (missing field); counted, not written."""


def _text(row: Mapping[str, Any], name: str) -> str:
    value = row.get(name)
    if not isinstance(value, str) or not value.strip():
        raise Skip(f"no {name}")
    return value.strip()


def _chat(question: str, response: str, answer: str) -> dict[str, Any]:
    messages = [{"role": "user", "content": question}, {"role": "assistant", "content": response}]
    return {"messages": messages, "answer": answer}


def gsm8k(row: Mapping[str, Any], keep_calculator: bool = False) -> dict[str, Any]:
    response = _text(row, "answer")
    if not keep_calculator:
        response = CALCULATOR.sub("", response)
    if "####" not in response:
        raise Skip("no #### line")
    return _chat(_text(row, "question"), response, response.rsplit("####", 1)[1].strip())


def openr1_math(row: Mapping[str, Any], keep_calculator: bool = False) -> dict[str, Any]:
    return _chat(_text(row, "problem"), _text(row, "solution"), _text(row, "answer"))


def openbookqa(row: Mapping[str, Any], keep_calculator: bool = False) -> dict[str, Any]:
    choices = row.get("choices") or {}
    labels, texts = choices.get("label") or [], choices.get("text") or []
    key = _text(row, "answerKey")
    if not labels or len(labels) != len(texts) or key not in labels:
        raise Skip("bad choices")
    options = "\n".join(f"({label}) {text}" for label, text in zip(labels, texts))
    fact = _text(row, "fact1")
    fact = fact[0].upper() + fact[1:] + ("" if fact.endswith((".", "!", "?")) else ".")
    return _chat(f"{_text(row, 'question_stem')}\n{options}", f"{fact}\nThe answer is ({key}).", key)


def cot_collection(row: Mapping[str, Any], keep_calculator: bool = False) -> dict[str, Any]:
    return _chat(_text(row, "source"), _text(row, "rationale"), _text(row, "target"))


BUILDERS: dict[str, Callable[..., dict[str, Any]]] = {
    "gsm8k": gsm8k,
    "openr1_math": openr1_math,
    "openbookqa": openbookqa,
    "cot_collection": cot_collection,
}


def read_rows(dataset: str, input_path: str | None, split: str) -> Iterable[Mapping[str, Any]]:
    """Rows of a local file (.jsonl/.json/.parquet; a JSON object of records too) or of the hub dataset."""
    if input_path:
        path = Path(input_path)
        if path.suffix == ".json":
            with path.open(encoding="utf-8") as handle:
                data = json.load(handle)
            if isinstance(data, dict):  # {id: record, ...}
                return [value for value in data.values() if isinstance(value, dict)]
            return data
        if path.suffix == ".jsonl":
            with path.open(encoding="utf-8") as handle:
                return [json.loads(line) for line in handle if line.strip()]
        import datasets

        return datasets.Dataset.from_parquet(str(path))
    if HUB[dataset] is None:
        raise SystemExit(f"{dataset}: pass --input (the downloaded data file); see recipes/README.md")
    import datasets

    name, config = HUB[dataset]
    return datasets.load_dataset(name, config, split=split)


def prepare(
    dataset: str,
    rows: Iterable[Mapping[str, Any]],
    sample: int | None = None,
    seed: int = 0,
    keep_calculator: bool = False,
) -> tuple[list[dict[str, Any]], dict[str, int]]:
    """The records and the count of skipped rows per reason."""
    records, skipped = [], {}
    for row in rows:
        try:
            records.append(BUILDERS[dataset](row, keep_calculator=keep_calculator))
        except Skip as reason:
            skipped[str(reason)] = skipped.get(str(reason), 0) + 1
    if sample is not None and sample < len(records):
        records = random.Random(seed).sample(records, sample)
    return records, skipped


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("dataset", choices=sorted(BUILDERS))
    parser.add_argument("output", help="the records, as JSON lines")
    parser.add_argument("--input", help="a local copy of the dataset (.jsonl, .json or .parquet) instead of the hub")
    parser.add_argument("--split", default="train", help="hub split (default train)")
    parser.add_argument("--sample", type=int, help="keep a random subset of this many records")
    parser.add_argument("--seed", type=int, default=0, help="seed of --sample (default 0)")
    parser.add_argument("--keep-calculator-annotations", action="store_true", help="GSM8K: keep <<48/2=24>>")
    args = parser.parse_args(argv)
    rows = read_rows(args.dataset, args.input, args.split)
    records, skipped = prepare(args.dataset, rows, args.sample, args.seed, args.keep_calculator_annotations)
    out = Path(args.output)
    out.parent.mkdir(parents=True, exist_ok=True)
    with out.open("w", encoding="utf-8") as handle:
        for record in records:
            handle.write(json.dumps(record, ensure_ascii=False) + "\n")
    print(f"{args.dataset}: wrote {len(records)} records to {out}; skipped {skipped or 'none'}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
