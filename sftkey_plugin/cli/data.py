"""Reading and writing record files (jsonl, json, parquet, a ``datasets`` folder) and telling record forms apart."""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

FORMS = ("messages", "prompt_completion", "prompt_completion_text", "text")


class CLIError(Exception):
    """A problem with the user's input: printed as one line, exit status 2."""


def load_records(path: str | os.PathLike[str], split: str | None = None) -> list[dict[str, Any]]:
    """All records of a jsonl/json/parquet file or a ``datasets.save_to_disk`` folder, as plain dicts."""
    source = Path(path)
    if not source.exists():
        raise CLIError(f"{source}: no such file or folder")
    if source.is_dir():
        return _load_saved_dataset(source, split)
    suffix = source.suffix.lower()
    if suffix == ".jsonl":
        return _load_jsonl(source)
    if suffix == ".json":
        return _load_json(source)
    if suffix == ".parquet":
        import datasets

        return datasets.Dataset.from_parquet(str(source)).to_list()
    raise CLIError(f"{source}: expected a .jsonl, .json or .parquet file or a datasets folder")


def _load_jsonl(source: Path) -> list[dict[str, Any]]:
    records = []
    with source.open(encoding="utf-8") as handle:
        for number, line in enumerate(handle, 1):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as error:
                raise CLIError(f"{source}:{number}: not valid JSON ({error.msg})") from error
            if not isinstance(record, dict):
                raise CLIError(f"{source}:{number}: each line must be a JSON object")
            records.append(record)
    return records


def _load_json(source: Path) -> list[dict[str, Any]]:
    try:
        data = json.loads(source.read_text(encoding="utf-8"))
    except json.JSONDecodeError:
        return _load_jsonl(source)  # many ".json" files are really JSON lines
    if isinstance(data, dict) and isinstance(data.get("data"), list):
        data = data["data"]
    if not isinstance(data, list) or not all(isinstance(r, dict) for r in data):
        raise CLIError(f"{source}: expected a JSON list of objects (or {{'data': [...]}})")
    return data


def _load_saved_dataset(source: Path, split: str | None) -> list[dict[str, Any]]:
    import datasets

    try:
        loaded = datasets.load_from_disk(str(source))
    except FileNotFoundError as error:
        raise CLIError(f"{source}: not a folder written by datasets' save_to_disk ({error})") from error
    if isinstance(loaded, datasets.DatasetDict):
        names = list(loaded)
        chosen = split or ("train" if "train" in names else names[0] if len(names) == 1 else None)
        if chosen not in names:
            raise CLIError(f"{source}: choose a split with --split (one of {names})")
        loaded = loaded[chosen]
    elif split:
        raise CLIError(f"{source}: holds a single dataset, not splits; drop --split")
    return loaded.to_list()


def save_records(records: Iterable[Mapping[str, Any]], path: str | os.PathLike[str]) -> int:
    """Write records to a jsonl/json/parquet file or (no suffix) a ``datasets`` folder; returns how many."""
    target = Path(path)
    rows = [dict(r) for r in records]
    if target.parent != Path():
        target.parent.mkdir(parents=True, exist_ok=True)
    suffix = target.suffix.lower()
    if suffix == "":
        import datasets

        datasets.Dataset.from_list(rows).save_to_disk(str(target))
    elif suffix == ".jsonl":
        with target.open("w", encoding="utf-8") as handle:
            for row in rows:
                handle.write(json.dumps(row, ensure_ascii=False) + "\n")
    elif suffix == ".json":
        target.write_text(json.dumps(rows, ensure_ascii=False, indent=1) + "\n", encoding="utf-8")
    elif suffix == ".parquet":
        import datasets

        datasets.Dataset.from_list(rows).to_parquet(str(target))
    else:
        raise CLIError(f"{target}: write .jsonl, .json or .parquet (or a folder name without suffix)")
    return len(rows)


def record_form(record: Mapping[str, Any], text_field: str = "text") -> str | None:
    """``messages``, ``prompt_completion`` (conversational), ``prompt_completion_text``, ``text`` or None."""
    if isinstance(record.get("messages"), list):
        return "messages"
    if "prompt" in record and "completion" in record:
        if isinstance(record["prompt"], list) and isinstance(record["completion"], list):
            return "prompt_completion"
        if isinstance(record["prompt"], str) and isinstance(record["completion"], str):
            return "prompt_completion_text"
        return None
    if isinstance(record.get(text_field), str):
        return "text"
    return None


def last_assistant_index(messages: list[Mapping[str, Any]]) -> int | None:
    """Index of the last assistant message (the one SFTKey reads), or None."""
    for index in range(len(messages) - 1, -1, -1):
        if messages[index].get("role") == "assistant":
            return index
    return None


def parse_json_option(value: str | None, name: str) -> dict[str, Any]:
    """A JSON object given on the command line (``--finder-options '{"pattern": "..."}'``)."""
    if not value:
        return {}
    try:
        parsed = json.loads(value)
    except json.JSONDecodeError as error:
        raise CLIError(f"{name} is not valid JSON: {error}") from error
    if not isinstance(parsed, dict):
        raise CLIError(f"{name} must be a JSON object")
    return parsed
