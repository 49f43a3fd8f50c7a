"""The Axolotl adapter: list ``sftkey_plugin.axolotl.SFTKeyPlugin`` under ``plugins:`` and set ``sftkey: true``.

```yaml
plugins:
  - sftkey_plugin.axolotl.SFTKeyPlugin
sftkey: true
sftkey_mode: two_stage
datasets:
  - path: data.jsonl
    type: chat_template        # rewritten to sftkey_plugin.axolotl.strategy by the plugin
```
"""

from __future__ import annotations

from typing import Any

from .plugin import SFTKeyPlugin

__all__ = ["SFTKeyAxolotlTrainer", "SFTKeyPlugin"]


def __getattr__(name: str) -> Any:
    if name == "SFTKeyAxolotlTrainer":
        from .trainer import SFTKeyAxolotlTrainer

        return SFTKeyAxolotlTrainer
    raise AttributeError(f"module 'sftkey_plugin.axolotl' has no attribute {name!r}")
