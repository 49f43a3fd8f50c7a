"""The docs cannot drift from the code: the configuration reference is what the generator writes from
``SFTKeyArguments``, with every option and its real default, and the README's map names every page.
(scripts/build_docs.sh builds the pages themselves strictly; scripts/test.sh runs it.)"""

from __future__ import annotations

import dataclasses
import importlib.util
import re
from pathlib import Path
from types import ModuleType

from sftkey_plugin.config import SFTKEY_FIELDS

ROOT = Path(__file__).resolve().parents[1]


def _generator() -> ModuleType:
    spec = importlib.util.spec_from_file_location("config_reference", ROOT / "scripts" / "config_reference.py")
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_configuration_reference_is_what_the_generator_writes():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    assert page == _generator().render_page(page), "docs/configuration.md is stale: python scripts/config_reference.py"


def test_every_option_is_in_the_reference_with_its_real_default():
    page = (ROOT / "docs" / "configuration.md").read_text(encoding="utf-8")
    rows = [re.split(r"(?<!\\)\|", line)[1:-1] for line in page.splitlines() if line.startswith("| `sftkey")]
    documented = {cells[0].strip(" `"): cells[2].strip() for cells in rows}
    expected = {
        field.name: "not set" if field.default is None else f"`{str(field.default).lower()}`"
        for field in SFTKEY_FIELDS
        if field.default is not dataclasses.MISSING
    }
    assert len(expected) == len(SFTKEY_FIELDS) > 15
    assert documented == expected


def test_the_readme_maps_every_docs_page():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    mapped = set(re.findall(r"^\| `(docs/[\w-]+\.md)` \|", readme, re.M))
    pages = {f"docs/{path.name}" for path in (ROOT / "docs").glob("*.md")}
    assert mapped == pages
