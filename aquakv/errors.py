"""Exceptions with messages that say what is wrong and what to do."""


class AquaKVError(Exception):
    """Base of every aquakv error."""


class NonFiniteError(AquaKVError, ValueError):
    """NaN or Inf reached the quantizer or a statistics accumulator."""


class BundleError(AquaKVError):
    """A bundle cannot be used."""


class BundleIntegrityError(BundleError):
    """A bundle file is missing, truncated or does not match its SHA-256."""


class BundleFormatError(BundleError):
    """The manifest is unreadable, of an unknown format version, or inconsistent (e.g. a grid vs its config)."""


class ModelMismatchError(BundleError):
    """The bundle was calibrated for another model."""


class BundleNotFoundError(BundleError):
    """The bundle URI cannot be reached or holds no bundle."""


class PublishConflictError(BundleError):
    """Another run already published this bundle version."""


class RegistryNotWritableError(BundleError):
    """The bundle registry cannot be written (permissions, credentials, a file in the way)."""


class ConfigError(AquaKVError):
    """A configuration file or flag is unreadable or invalid."""


class DataError(AquaKVError):
    """Input text that cannot be used (too short, not text)."""


class CalibrationError(AquaKVError):
    """A calibration stage cannot go on (bad checkpoint, data, tokenizer, gate missed...)."""


class ManifestSchemaError(BundleFormatError):
    """A manifest field is missing, unknown, of the wrong type, out of range or inconsistent with the model."""


class UnsafeBundlePathError(BundleFormatError):
    """A name in a bundle would place a file outside it, or a bundle file is a link or not a regular file."""


class BundleLimitError(BundleFormatError):
    """A manifest, JSON nesting or safetensors header is larger or deeper than aquakv accepts."""


class NonFiniteBundleError(BundleFormatError):
    """A bundle's predictor weights, grids or Hadamard signs hold NaN, Inf or invalid values."""


class LatestPointerError(RegistryNotWritableError):
    """A version was published completely but the registry's ``latest`` pointer could not be moved to it."""


class UnsupportedModelError(AquaKVError, ValueError):
    """A model whose cache AQUA-KV cannot compress correctly (not per-layer keys/values, or keys not RoPE'd the way
    the model's own ``apply_rotary_pos_emb`` does)."""
