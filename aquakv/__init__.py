"""aquakv: AQUA-KV compressed KV caches for transformers, calibrated at cluster scale.

The names below are imported on first use (PEP 562): ``import aquakv.errors`` or ``aquakv.config`` (the CLI's
``--help``, the flow's process) does not pull in torch and transformers.
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

_EXPORTS = {"AquaKVCache": "aquakv.cache", "Bundle": "aquakv.bundle", "CacheConfig": "aquakv.config",
            "CalibrationConfig": "aquakv.config", "QuantizerConfig": "aquakv.config", "load_bundle": "aquakv.registry",
            "pull": "aquakv.registry"}
__all__ = ["AquaKVCache", "Bundle", "CacheConfig", "CalibrationConfig", "QuantizerConfig", "load_bundle", "pull"]

if TYPE_CHECKING:
    from aquakv.bundle import Bundle
    from aquakv.cache import AquaKVCache
    from aquakv.config import CacheConfig, CalibrationConfig, QuantizerConfig
    from aquakv.registry import load_bundle, pull


def __getattr__(name: str) -> Any:
    if name not in _EXPORTS:
        raise AttributeError(f"module 'aquakv' has no attribute {name!r}")
    value = getattr(importlib.import_module(_EXPORTS[name]), name)
    globals()[name] = value
    return value
