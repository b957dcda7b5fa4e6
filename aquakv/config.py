"""All configuration in one typed place, validated once at the edge, hashed to name a run.

``QuantizerConfig`` says how one residual is quantized, ``CacheConfig`` how the runtime
cache lays tokens out, ``CalibrationConfig`` everything a calibration run depends on.
"""

from __future__ import annotations

import hashlib
import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Annotated, Literal

from pydantic import BaseModel, ConfigDict, Discriminator, Field, Tag, ValidationError, field_validator, model_validator

from aquakv.errors import ConfigError

if TYPE_CHECKING:
    import torch


class _Frozen(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    def digest(self) -> str:
        """Short SHA-256 of the canonical JSON of this config."""
        blob = json.dumps(self.model_dump(mode="json"), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]


class QuantizerConfig(_Frozen):
    """HIGGS quantizer: ``size`` grid points in ``dim`` dimensions, Hadamard groups of ``group_size``; each group's
    scale (its norm) stored as ``scale_dtype``: ``float8_e4m3fn`` halves fp16's 0.25 bits per value at g=64 (3 mantissa
    bits: the scale rounded by at most 6.25%; norms above 448 saturate, below 2^-9 flush to zero)."""

    dim: int = Field(2, ge=1, le=8)
    size: int = Field(16, ge=2, le=65536)
    group_size: int = Field(64, ge=2, le=4096)
    scale_dtype: Literal["float16", "float32", "float8_e4m3fn"] = "float16"

    @field_validator("size", "group_size")
    @classmethod
    def _power_of_two(cls, v: int) -> int:
        if v & (v - 1):
            raise ValueError(f"must be a power of two, got {v}")
        return v

    @model_validator(mode="after")
    def _dim_divides_group(self) -> QuantizerConfig:
        if self.group_size % self.dim:
            raise ValueError(f"grid dim {self.dim} must divide group_size {self.group_size}")
        return self

    @property
    def index_bits(self) -> int:
        return int(math.log2(self.size))

    @property
    def torch_scale_dtype(self) -> torch.dtype:
        import torch  # here, not at the top: a config (the CLI, the flow's process) needs no torch until used

        return getattr(torch, self.scale_dtype)

    @property
    def scale_max(self) -> float:
        """The largest finite scale: norms above it are stored as it (fp8 has no infinity)."""
        import torch

        return float(torch.finfo(self.torch_scale_dtype).max)

    @property
    def index_bits_per_value(self) -> float:
        return self.index_bits / self.dim

    @property
    def bits_per_value(self) -> float:
        """Index bits plus scale bits, per (padded) value."""
        return self.index_bits_per_value + 8 * self.torch_scale_dtype.itemsize / self.group_size

    @classmethod
    def for_bits(cls, bits: int, dim: int = 2, **kw: object) -> QuantizerConfig:
        """The grid with ``bits`` index bits per value at dimension ``dim`` (e.g. 2 -> d=2, n=16)."""
        return cls(dim=dim, size=2 ** (bits * dim), **kw)


FIT_ALGORITHM = 3  # bump when the fit's math changes, so resumed runs never mix layers fitted two ways
MAX_SINKS = 1024
MAX_RECENT_WINDOW = 1 << 16


class CacheConfig(_Frozen):
    """Runtime layout: ``sinks`` exact first tokens, compressed blocks, exact window < ``recent_window`` tokens."""

    sinks: int = Field(4, ge=0, le=MAX_SINKS)
    recent_window: int = Field(128, ge=1, le=MAX_RECENT_WINDOW)
    compress: bool = True


class PredictorRanks(_Frozen):
    """Separate fixed ranks for the key and value predictors. At decode, keys are reconstructed token by token
    before RoPE, so their rank costs per token; with stored projections, values are attended to in the latent space,
    so theirs costs per tile. Quality needs the key rank more (docs/benchmarks/predictor-ranks.md)."""

    keys: int = Field(ge=1)
    values: int = Field(ge=1)


# one int, or a mapping per kind: chosen by the input's shape, so a bad value gets only its own shape's error
Rank = Annotated[Annotated[int, Field(ge=1), Tag("int")] | Annotated[PredictorRanks, Tag("per kind")],
                 Discriminator(lambda v: "per kind" if isinstance(v, dict | PredictorRanks) else "int")]


class CalibrationConfig(_Frozen):
    """Everything a calibration run depends on. ``collect_digest`` names the activations, ``digest`` the bundle."""

    name: str = "aquakv"
    version: str = "v1"
    model: str
    data: str
    text_field: str = "text"
    seq_len: int = Field(1024, ge=8)
    num_samples: int = Field(64, ge=1)
    heldout_samples: int = Field(8, ge=1)
    # held-out windows are cut to this many tokens (None: seq_len), the same tokens in more, shorter rows: validation
    # feeds every layer one chunk (a recent window of tokens) at a time, all rows together, and on a 70B layer each
    # such call costs about the same host time whatever its rows, so its time follows the window length, not the
    # token count
    heldout_seq_len: int | None = Field(None, ge=8)
    seed: int = 0
    keys: QuantizerConfig = QuantizerConfig()
    values: QuantizerConfig = QuantizerConfig()
    first_layer: QuantizerConfig = QuantizerConfig(dim=2, size=256)
    damping: float = Field(1e-3, gt=0)
    # fixed rank of every predictor, or {keys: r_K, values: r_V} (None: full rank)
    predictor_rank: Rank | None = None
    # or: per layer, the smallest rank (a multiple of 16) within this relative residual-MSE budget of full rank
    predictor_rank_budget: float | None = Field(None, ge=0, le=10)
    fit_mode: Literal["chain", "parallel"] = "chain"
    # "fitted": each layer's keys and values grids are Lloyd-fitted to that layer's calibration residuals (chain mode)
    grids: Literal["gaussian", "fitted"] = "gaussian"
    # leave each sample's first cache.sinks tokens (exact at inference) out of the predictor and grid statistics
    exclude_sinks: bool = False
    # average stored bits/value (index + scales, all layers): each layer's keys and values get the grid size of
    # keys.dim / values.dim that minimises the expected loss increase (quantization error x the loss's Fisher
    # sensitivity: pipeline.budget); None: keys / values as given
    bit_budget: float | None = Field(None, gt=0, le=16)
    # bit budget only: calibration samples the loss's sensitivity to each layer's keys and values is measured on
    # (pipeline.sensitivity: a streamed forward and backward pass; each layer's input kept on the host)
    sensitivity_samples: int = Field(2, ge=1)
    cache: CacheConfig = CacheConfig()
    dtype: Literal["float32", "bfloat16", "float16"] = "float32"
    max_ppl_increase: float = Field(0.05, gt=0)
    registry: str = "registry"
    workdir: str = "work"
    workers: int = Field(1, ge=1)
    ray_address: str | None = None
    resident: bool = False  # execution strategy: fused collect+fit on the workers (pipeline.resident), not hashed
    # resident only: also write K/V to activations.zarr in the background, so a re-fit with other quantizers skips
    # collection (2 x layers x tokens x D values: ~655 GB bf16 for 70B x 2M tokens), not hashed
    write_activations: bool = True
    # resident only: every this many layers the workers save what a resumed run needs (hidden states, the chains'
    # reconstructions: ~6.4 GB per worker at 70B x 2M tokens over 8 workers), so a crash resumes there instead of at
    # layer 0; 0 turns it off; not hashed
    resident_checkpoint_every: int = Field(10, ge=0)

    @model_validator(mode="after")
    def _one_rank_policy(self) -> CalibrationConfig:
        if self.predictor_rank is not None and self.predictor_rank_budget is not None:
            raise ValueError("set predictor_rank (fixed) or predictor_rank_budget (per layer), not both")
        if self.grids == "fitted" and self.fit_mode != "chain":
            raise ValueError("grids: fitted needs fit_mode: chain (grids are fitted to the chain's residuals)")
        if self.bit_budget is not None and (self.fit_mode != "chain" or self.resident):
            raise ValueError("bit_budget needs fit_mode: chain and resident: false (the allocation reads every "
                             "layer's activations before the chain starts)")
        if self.bit_budget is not None and self.sensitivity_samples > self.num_samples:
            raise ValueError(f"sensitivity_samples {self.sensitivity_samples} > num_samples {self.num_samples}")
        if self.heldout_seq_len is not None and self.seq_len % self.heldout_seq_len:
            raise ValueError(f"heldout_seq_len {self.heldout_seq_len} must divide seq_len {self.seq_len} (held-out "
                             "windows are cut from seq_len-token samples)")
        if self.exclude_sinks and self.cache.sinks >= self.seq_len:
            raise ValueError(f"exclude_sinks leaves no token of a {self.seq_len}-token sample "
                             f"(cache.sinks = {self.cache.sinks})")
        return self

    def rank_of(self, kind: Literal["keys", "values"]) -> int | None:
        """The fixed rank of ``kind``'s predictors (None: full rank or a rank budget)."""
        if isinstance(self.predictor_rank, PredictorRanks):
            return getattr(self.predictor_rank, kind)
        return self.predictor_rank

    @property
    def heldout_window(self) -> int:
        """Tokens per held-out row: ``heldout_seq_len``, else ``seq_len``."""
        return self.heldout_seq_len or self.seq_len

    @property
    def skipped_tokens(self) -> int:
        """Leading tokens of every calibration sample left out of the statistics (see ``exclude_sinks``)."""
        return self.cache.sinks if self.exclude_sinks else 0

    def collect_digest(self) -> str:
        """What the collected activations depend on: model, data and sampling, never quantizer settings."""
        fields = ("model", "data", "text_field", "seq_len", "num_samples", "heldout_samples", "seed", "dtype")
        if self.heldout_seq_len is not None:  # (unset, it leaves the digests of earlier runs as they were)
            fields += ("heldout_seq_len",)
        blob = json.dumps({k: getattr(self, k) for k in fields}, sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def fit_digest(self) -> str:
        """What the fitted layers depend on: the activations plus quantizers, damping, rank and fit mode."""
        fields = ("keys", "values", "first_layer", "damping", "predictor_rank", "predictor_rank_budget", "fit_mode",
                  "grids", "bit_budget")
        extra = {} if self.bit_budget is None else {"sensitivity": ["fisher", self.sensitivity_samples]}
        blob = json.dumps({"collect": self.collect_digest(), **self.model_dump(mode="json", include=set(fields)),
                           "skipped_tokens": self.skipped_tokens, "algorithm": FIT_ALGORITHM, **extra},
                          sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    def digest(self) -> str:
        """What the bundle depends on: everything but where things go and how many workers do it."""
        skip = {"registry", "workdir", "workers", "ray_address", "version", "max_ppl_increase", "resident",
                "write_activations", "resident_checkpoint_every"}
        if self.heldout_seq_len is None:  # (unset, it leaves the digests of earlier runs as they were)
            skip.add("heldout_seq_len")
        if self.bit_budget is None:  # (only a bit budget reads it)
            skip.add("sensitivity_samples")
        blob = json.dumps(self.model_dump(mode="json", exclude=skip), sort_keys=True).encode()
        return hashlib.sha256(blob).hexdigest()[:16]

    @classmethod
    def from_yaml(cls, path: str | Path, **overrides: object) -> CalibrationConfig:
        """Load and validate a YAML config; ``overrides`` (None = keep) win. Raises :class:`ConfigError`."""
        import yaml

        try:
            raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            mark = getattr(e, "problem_mark", None)
            where = f" at line {mark.line + 1}, column {mark.column + 1}" if mark else ""
            raise ConfigError(f"config {path} is not valid YAML: {getattr(e, 'problem', None) or e}{where}") from e
        except (OSError, UnicodeDecodeError) as e:
            raise ConfigError(f"cannot read config {path}: {e}") from e
        if not isinstance(raw, dict):
            raise ConfigError(f"config {path} must be a YAML mapping of CalibrationConfig fields")
        return cls.validated({**raw, **{k: v for k, v in overrides.items() if v is not None}}, source=str(path))

    @classmethod
    def validated(cls, raw: dict, source: str = "the flags") -> CalibrationConfig:
        """``model_validate`` with pydantic's errors turned into one readable :class:`ConfigError` line."""
        try:
            return cls.model_validate(raw)
        except ValidationError as e:
            raise ConfigError(f"invalid config ({source}): {describe(e)}") from e


def describe(e: ValidationError) -> str:
    """pydantic's errors as ``field: problem (got value)`` joined on one line."""
    parts = []
    for err in e.errors():
        where = ".".join(str(p) for p in err["loc"]) or "config"
        got = "" if err["type"] in ("missing", "extra_forbidden") else f" (got {err.get('input')!r:.40})"
        msg = "unknown field" if err["type"] == "extra_forbidden" else err["msg"]
        parts.append(f"{where}: {msg}{got}")
    return "; ".join(parts)
