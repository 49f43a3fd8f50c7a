"""``SFTKeyConfig``: TRL's ``SFTConfig`` plus the ``sftkey_*`` fields, so ``TrlParser`` reads them from YAML."""

from __future__ import annotations

from dataclasses import dataclass

from trl import SFTConfig

from ..config import SFTKeyArguments, validate_sftkey_arguments


@dataclass
class SFTKeyConfig(SFTConfig, SFTKeyArguments):
    """``SFTConfig`` with the SFTKey options (see ``sftkey_plugin.config.SFTKeyArguments`` for each field)."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.sftkey:
            validate_sftkey_arguments(self)
