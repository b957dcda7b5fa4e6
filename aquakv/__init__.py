"""aquakv: AQUA-KV compressed KV caches for transformers, calibrated at cluster scale."""

from aquakv.bundle import Bundle
from aquakv.cache import AquaKVCache
from aquakv.config import CacheConfig, CalibrationConfig, QuantizerConfig
from aquakv.registry import load_bundle, pull

__all__ = ["AquaKVCache", "Bundle", "CacheConfig", "CalibrationConfig", "QuantizerConfig", "load_bundle", "pull"]
