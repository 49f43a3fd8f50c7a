"""The TRL adapter: ``SFTKeyConfig``, ``SFTKeyTrainer`` and ``SFTKeyMixin``."""

from .config import SFTKeyConfig
from .trainer import SFTKeyMixin, SFTKeyTrainer

__all__ = ["SFTKeyConfig", "SFTKeyMixin", "SFTKeyTrainer"]
