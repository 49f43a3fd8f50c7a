"""SFTKey for TRL and Axolotl: emphasise the key answer tokens of chain-of-thought SFT (arXiv 2512.21017).

The core (finders, masking, schedule, loss) imports no training framework; the TRL names below load lazily.
"""

from __future__ import annotations

from typing import Any

from .config import SFTKeyArguments
from .finders import find_key_spans, finder_names, match_key_spans
from .hookspecs import hookimpl

__version__ = "0.1.0"

_LAZY = {
    "SFTKeyConfig": "sftkey_plugin.trl",
    "SFTKeyTrainer": "sftkey_plugin.trl",
    "SFTKeyMixin": "sftkey_plugin.trl",
    "SFTKeyCallback": "sftkey_plugin.callback",
}

__all__ = ["SFTKeyArguments", "find_key_spans", "finder_names", "hookimpl", "match_key_spans", *_LAZY]


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        return getattr(importlib.import_module(_LAZY[name]), name)
    raise AttributeError(f"module 'sftkey_plugin' has no attribute {name!r}")
