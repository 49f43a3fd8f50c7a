"""``sftkey convert``: rewrite chain-of-thought records into the paper's ``<Thinking>…</Thinking><Answer>…</Answer>``.

The split into reasoning and answer uses the same finders as training. A record that cannot be split is written,
with its reason, to a rejects file: nothing is dropped silently.
"""

from __future__ import annotations

import argparse
import copy
import json
from collections import Counter
from collections.abc import Mapping
from pathlib import Path
from typing import Any

from ..examples import tagged_response
from ..finders import match_key_spans
from ..tokenize import REASONING_FIELDS
from .answers import format_ok, strip_markers
from .data import CLIError, last_assistant_index, load_records, parse_json_option, record_form, save_records

SOURCES = ("gsm8k", "think", "boxed", "answer_is", "field")
TAG_STRINGS = ("<Thinking>", "</Thinking>", "<Answer>", "</Answer>")
CONVERTED, UNCHANGED = "converted", "already tagged"


class Reject(Exception):
    """A record that cannot be converted; the message is the reason written to the rejects file."""


def add_parser(subparsers: Any) -> None:
    """Register ``convert`` and its options."""
    parser = subparsers.add_parser(
        "convert",
        help="rewrite chain-of-thought data into the <Thinking>/<Answer> format",
        description="Split each record's response into reasoning and answer with a finder and write it as "
        "<Thinking>reasoning</Thinking>\\n<Answer>answer</Answer>, keeping the record's form (messages or "
        "prompt/completion) and its other fields. Records that cannot be split go to a rejects file with the "
        "reason. A bare 'answer' field is added when the record has none (sftkey eval reads it as the gold answer).",
        epilog="Sources: gsm8k (reasoning, then '#### N'), think (<think>reasoning</think> answer), boxed (the "
        "whole solution is the reasoning, the last \\boxed{} the answer), answer_is ('... The answer is (B).'), "
        "field (the response is the reasoning, --answer-field the answer). Raw question/answer files such as "
        "GSM8K: --prompt-field question --response-field answer. Assistant messages with the reasoning in "
        "reasoning_content (Qwen3/DeepSeek-R1 style; also thinking or reasoning) are converted whatever --from says: "
        "that field is the reasoning, the content the answer.",
    )
    parser.add_argument("input", help="a .jsonl/.json/.parquet file or a datasets folder")
    parser.add_argument("output", help="the converted records: .jsonl, .json, .parquet, or a folder name")
    parser.add_argument("--from", dest="source", required=True, choices=SOURCES, help="how answers are marked")
    parser.add_argument("--answer-field", default="answer", help="the answer field for --from field (default answer)")
    parser.add_argument("--finder-options", help="extra finder options as JSON")
    parser.add_argument("--prompt-field", help="raw records: the field holding the question")
    parser.add_argument("--response-field", help="raw records: the field holding the chain-of-thought response")
    parser.add_argument(
        "--to",
        dest="target_form",
        default="messages",
        choices=["messages", "prompt_completion"],
        help="form written for raw records (default messages)",
    )
    parser.add_argument("--split", help="split to read from a DatasetDict folder")
    parser.add_argument(
        "--allow-trailing",
        action="store_true",
        help="drop text after the answer (e.g. 'I hope it is correct.') instead of rejecting",
    )
    parser.add_argument(
        "--reasoning-field",
        help="the assistant-message field holding the reasoning apart from the answer (default: reasoning_content, "
        "thinking or reasoning); such a message is converted whatever --from says: its content is the answer",
    )
    parser.add_argument("--rejects", help="where rejected records go (default: OUTPUT's name + .rejects.jsonl)")
    parser.add_argument("--json", action="store_true", help="print the counts as one JSON object")
    parser.set_defaults(func=run)


def split_response(
    response: str,
    source: str,
    record: Mapping[str, Any],
    options: Mapping[str, Any],
    allow_trailing: bool = False,
) -> tuple[str, str]:
    """``(reasoning, answer)`` of one response; raises ``Reject`` with the reason."""
    if source == "field":
        field = options.get("answer_field", "answer")
        if field not in record or record[field] is None or not str(record[field]).strip():
            raise Reject(f"no answer in field {field!r}")
        return response.strip(), str(record[field]).strip()
    _, spans = match_key_spans(response, source, record, options)
    if not spans:
        raise Reject(f"no key span found by the {source} finder")
    start, end = spans[-1]
    answer = strip_markers(response[start:end])
    if source == "boxed":
        reasoning = response  # the box sits inside the solution's last sentence: the solution stays whole
    elif source == "think":
        close = response.rfind("</think>")
        opening = response.rfind("<think>", 0, close)
        reasoning = response[opening + len("<think>") if opening >= 0 else 0 : close]
        answer = response[start:end]  # everything after </think> is the final response: kept whole
    else:
        reasoning = response[:start]
        trailing = response[end:].strip().lstrip(".").strip()
        if trailing and not allow_trailing:
            raise Reject(f"text after the answer: {trailing[:60]!r} (use --allow-trailing to drop it)")
    return reasoning.strip(), answer.strip()


def reasoning_field_of(message: Mapping[str, Any], wanted: str | None = None) -> str | None:
    """The name of the field holding a message's reasoning apart from its content (None: it has none)."""
    names = (wanted,) if wanted else REASONING_FIELDS
    return next((name for name in names if isinstance(message.get(name), str) and message[name].strip()), None)


def _tag_separate_reasoning(message: Mapping[str, Any], field: str) -> dict[str, Any]:
    """A message with ``reasoning_content`` (or the like): its reasoning and its content become one tagged content."""
    reasoning, answer = str(message[field]).strip(), str(message.get("content") or "").strip()
    _check(reasoning, answer)
    tagged = {key: value for key, value in message.items() if key != field}
    return {**tagged, "content": tagged_response(reasoning, answer)}


def _convert_separate_reasoning(messages: list[dict[str, Any]], wanted: str | None) -> bool:
    """Convert, in place, every assistant message that keeps its reasoning in a separate field; True if any did."""
    converted = False
    for index, message in enumerate(messages):
        field = reasoning_field_of(message, wanted) if message.get("role") == "assistant" else None
        if field is not None:
            messages[index] = _tag_separate_reasoning(message, field)
            converted = True
    return converted


def _check(reasoning: str, answer: str) -> None:
    if not reasoning:
        raise Reject("empty reasoning")
    if not answer:
        raise Reject("empty answer")
    if any(tag in reasoning or tag in answer for tag in TAG_STRINGS):
        raise Reject("the reasoning or answer already contains a <Thinking>/<Answer> tag")


def convert_record(record: dict[str, Any], args: argparse.Namespace, options: Mapping[str, Any]) -> tuple[dict, str]:
    """The converted record and ``converted`` / ``already tagged``; raises ``Reject``."""
    output = copy.deepcopy(record)
    if args.prompt_field or args.response_field:
        return _convert_raw(output, args, options)
    form = record_form(record)
    if form == "messages":
        holder = output["messages"]
    elif form == "prompt_completion":
        holder = output["completion"]
    elif form == "prompt_completion_text":
        holder = None
    elif form == "text":
        raise Reject("text-form record: no prompt/completion boundary (use --prompt-field/--response-field)")
    else:
        raise Reject("unknown record form: expected messages, prompt/completion, or --prompt-field/--response-field")
    if holder is None:
        response = output["completion"]
    else:
        index = last_assistant_index(holder)
        if index is None or not isinstance(holder[index].get("content"), str):
            raise Reject("no assistant message with string content")
        response = holder[index]["content"]
        converted = _convert_separate_reasoning(holder, getattr(args, "reasoning_field", None))
        if converted and holder[index]["content"] != response:  # the answer turn was one of them
            output.setdefault("answer", strip_markers(response.strip()))
            return output, CONVERTED
    if format_ok(response):
        return output, UNCHANGED
    reasoning, answer = split_response(response, args.source, record, options, args.allow_trailing)
    _check(reasoning, answer)
    tagged = tagged_response(reasoning, answer)
    if holder is None:
        output["completion"] = tagged
    else:
        holder[index] = {**holder[index], "content": tagged}
    output.setdefault("answer", strip_markers(answer))  # the bare answer: sftkey eval reads it as gold
    return output, CONVERTED


def _convert_raw(record: dict[str, Any], args: argparse.Namespace, options: Mapping[str, Any]) -> tuple[dict, str]:
    """A question/response record (e.g. GSM8K's question/answer) written as messages or prompt/completion."""
    if not (args.prompt_field and args.response_field):
        raise CLIError("give both --prompt-field and --response-field")
    question, response = record.get(args.prompt_field), record.get(args.response_field)
    if not isinstance(question, str) or not isinstance(response, str):
        raise Reject(f"missing string fields {args.prompt_field!r}/{args.response_field!r}")
    reasoning, answer = split_response(response, args.source, record, options, args.allow_trailing)
    _check(reasoning, answer)
    for name in (args.prompt_field, args.response_field):
        record.pop(name)
    user = [{"role": "user", "content": question}]
    assistant = [{"role": "assistant", "content": tagged_response(reasoning, answer)}]
    converted: dict[str, Any] = (
        {"messages": user + assistant} if args.target_form == "messages" else {"prompt": user, "completion": assistant}
    )
    converted.update(record)
    converted.setdefault("answer", answer)  # GSM8K's own 'answer' held the whole response: it becomes the bare one
    return converted, CONVERTED


def run(args: argparse.Namespace) -> int:
    """Convert every record; write the output and the rejects; print the counts."""
    from tqdm.auto import tqdm

    options = parse_json_option(args.finder_options, "--finder-options")
    if args.source == "field":
        options.setdefault("answer_field", args.answer_field)
    records = load_records(args.input, args.split)
    converted, rejects, counts = [], [], Counter[str]()
    reasons: Counter[str] = Counter()
    for index, record in enumerate(tqdm(records, desc="converting", unit="rec", disable=None)):
        try:
            output, status = convert_record(record, args, options)
        except Reject as reason:
            rejects.append({"index": index, "reason": str(reason), "record": record})
            reasons[str(reason).split(":")[0]] += 1
            continue
        counts[status] += 1
        converted.append(output)
    save_records(converted, args.output)
    rejects_path = Path(args.rejects) if args.rejects else _default_rejects_path(Path(args.output))
    if rejects:
        save_records(rejects, rejects_path)
    report = {
        "input": str(args.input),
        "output": str(args.output),
        "records": len(records),
        "converted": counts[CONVERTED],
        "already_tagged": counts[UNCHANGED],
        "rejected": len(rejects),
        "reject_reasons": dict(reasons.most_common()),
        "rejects_file": str(rejects_path) if rejects else None,
    }
    if args.json:
        print(json.dumps(report))
    else:
        print(_format_report(report))
    return 0


def _default_rejects_path(output: Path) -> Path:
    name = output.name[: -len(output.suffix)] if output.suffix else output.name
    return output.with_name(name + ".rejects.jsonl")


def _format_report(report: dict[str, Any]) -> str:
    lines = [
        f"sftkey convert: {report['records']} records from {report['input']}",
        f"  converted       {report['converted']:>7}",
        f"  already tagged  {report['already_tagged']:>7}  (kept unchanged)",
        f"  rejected        {report['rejected']:>7}",
    ]
    lines += [f"    {count:>7}  {reason}" for reason, count in report["reject_reasons"].items()]
    lines.append(f"  wrote {report['converted'] + report['already_tagged']} records to {report['output']}")
    if report["rejects_file"]:
        lines.append(f"  wrote {report['rejected']} rejected records (with reasons) to {report['rejects_file']}")
    return "\n".join(lines)
