"""SFTKey for TRL and Axolotl: emphasise the key answer tokens of chain-of-thought SFT (arXiv 2512.21017).

The core (finders, masking, schedule, loss) imports no training framework; the TRL names below load lazily.
"""

from __future__ import annotations

import importlib.metadata
from typing import Any

from .config import SFTKeyArguments
from .finders import find_key_spans, finder_names, match_key_spans
from .hookspecs import AmbiguousAnswer, hookimpl


def _installed_version() -> str:
    """pyproject.toml holds the version; the installed metadata (a wheel or an editable install) carries it here."""
    try:
        return importlib.metadata.version("sftkey-plugin")
    except importlib.metadata.PackageNotFoundError:  # a source tree on sys.path, never installed (benchmarks/gpu.sh)
        return "0+unknown"


__version__ = _installed_version()

_LAZY = {
    "SFTKeyConfig": "sftkey_plugin.trl",
    "SFTKeyTrainer": "sftkey_plugin.trl",
    "SFTKeyMixin": "sftkey_plugin.trl",
    "SFTKeyCallback": "sftkey_plugin.callback",
}

__all__ = [
    "AmbiguousAnswer",
    "SFTKeyArguments",
    "find_key_spans",
    "finder_names",
    "hookimpl",
    "match_key_spans",
    *_LAZY,
]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sftkey_plugin' has no attribute {name!r}")
