"""Kernel settings: one frozen value, chosen when a cache is built and passed to its backend (no global state).

``AQUAKV_KERNELS=0`` in the environment turns the Triton kernels off; it is read by :meth:`KernelSettings.from_env`
(once per cache) and, for the stand-alone quantize / dequantize dispatch, once at import (:data:`ENV_ENABLED`).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from typing import Literal, get_args

Precision = Literal["bf16", "tf32", "tf32x3", "ieee"]
Prediction = Literal["chained", "stored"]
PREDICTIONS = get_args(Prediction)  # for command lines
KeyResidual = Literal["pre_rope", "post_rope"]
KEY_RESIDUALS = get_args(KeyResidual)
ENV_ENABLED = os.environ.get("AQUAKV_KERNELS", "1") != "0"
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@dataclass(frozen=True)
class KernelSettings:
    """How a cache reads its compressed tokens.

    - ``enabled``: use the Triton kernels where they apply (CUDA, or CPU under ``TRITON_INTERPRET=1``).
    - ``attention``: ``"auto"`` (fused decode attention straight from the codes where the Triton backend runs, else
      reconstruct-then-attend), ``"fused"`` (the fused protocol on any backend; on the torch backend it is the
      pure-PyTorch reference of the fused math), ``"full"`` (always return full keys / values to the model).
    - ``predictor``: matmul precision of the predictors: bf16 operands with fp32 accumulation, ``tf32``, ``ieee``.
    - ``low_rank``: ``"auto"`` factors a predictor whose weight has rank <= min(D_in, D_out)/4; ``"off"`` never.
    - ``gemm``: reconstruct-then-attend path: predictor matmuls in ``"cublas"`` or fused into the ``"triton"`` kernel.
    - ``epilogue_tile``: ``(rows, warps)`` of the reconstruct-then-attend epilogue kernel (None: measured default).
    - ``scratch``: dtype of the per-pass reconstruction scratch the fused kernel hands to the next layer.
    - ``tile_tokens``: compressed tokens per program of the fused kernel (None: chosen from the grid size).
    - ``prediction``: ``"chained"`` (each layer's predictions come from the previous layer's reconstruction of the same
      tokens, recomputed per read: the fused kernel hands it on), or ``"stored"``: every compressed token also keeps
      its low-rank predictor inputs (float8, ``RK + RV`` values per token and layer, :class:`aquakv.codec.Projections`),
      so a layer is read on its own. At rank 64 of an 8B model's D = 1024 that is +136 bytes per token and layer on
      576 of 2-bit codes and scales (+24%), and the fused kernel ~1.5x faster (docs/benchmarks/decode.md, round
      15); at rank 256 (D/4) +520 bytes (+90%) and ~3x faster at batch 8 (rounds 21-22), its key prediction on float8
      tensor cores (the key predictor's ``up`` rounded to float8 for every stored key prediction, round 24). Needs
      every predictor low rank (rank <= D/4).
    - ``value_latents``: with stored projections, where the value predictor's low-rank term ``P z^V up`` is computed:
      ``"fused"`` in every decode program (a ``[tile, RV]`` operand per program), ``"deferred"`` after the merge,
      summed over all tokens first (three small kernels), ``"auto"`` deferred where the decode kernel runs several
      programs per SM or the rank is high (:data:`aquakv.kernels.decode.DEFER_PROGRAMS_PER_SM`, ``DEFER_RANK``). The
      same math either way.
    - ``key_residual``: where the key residual is quantized. ``"pre_rope"`` (the paper's, and the default): keys, their
      predictions and residuals are all before RoPE. ``"post_rope"``: the residual of a layer with a key predictor is
      rotated to the token's position first (``RoPE_t(K - P^K(...))``, :func:`aquakv.rope.residual_rotation`) and
      un-rotated after dequantization, so the attention to it needs no per-token un-rotation or RoPE (a layer without
      one, layer 0, keeps its keys before RoPE). RoPE is orthogonal, so the residual's norm is the same; the
      predictors and grids are the bundle's. With ``prediction="stored"``, a bf16 model of 4 or 8 KV heads of 128 and
      rank <= 128 on a GPU with float8 tensor cores, the CUDA decode kernel reads it (:mod:`aquakv.kernels.cuda`:
      rank 64 at 32k, 82 sequences in 64 GB: 3.35x DynamicCache's tokens/s, docs/benchmarks/decode.md round 28);
      elsewhere the PyTorch backend does (the Triton kernels read pre-RoPE residuals).
    - ``keep_reconstructions``: reconstruct-then-attend (``attention="full"``) keeps each layer's reconstruction of
      its compressed tokens across passes and reconstructs only the tokens compressed since: the same numbers with
      O(T) instead of O(T²) work over a chunked pass, for evaluation (it holds an uncompressed copy of the cache).
    """

    enabled: bool = True
    attention: Literal["auto", "fused", "full"] = "auto"
    predictor: Precision = "bf16"
    low_rank: Literal["auto", "off"] = "auto"
    gemm: Literal["cublas", "triton"] = "cublas"
    epilogue_tile: tuple[int, int] | None = None
    scratch: Literal["bf16", "fp8"] = "bf16"
    tile_tokens: int | None = None
    prediction: Prediction = "chained"
    value_latents: Literal["auto", "fused", "deferred"] = "auto"
    key_residual: KeyResidual = "pre_rope"
    keep_reconstructions: bool = False

    def __post_init__(self) -> None:
        checks = {"attention": ("auto", "fused", "full"), "predictor": ("bf16", "tf32", "tf32x3", "ieee"),
                  "low_rank": ("auto", "off"), "gemm": ("cublas", "triton"), "scratch": ("bf16", "fp8"),
                  "prediction": PREDICTIONS, "value_latents": ("auto", "fused", "deferred"),
                  "key_residual": KEY_RESIDUALS}
        for name, allowed in checks.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}, got {getattr(self, name)!r}")
        if self.tile_tokens is not None and (self.tile_tokens < 16 or self.tile_tokens & (self.tile_tokens - 1)):
            raise ValueError(f"tile_tokens must be a power of two >= 16, got {self.tile_tokens}")
        if self.prediction == "stored" and self.low_rank == "off":
            raise ValueError("prediction='stored' keeps low-rank projections: it needs low_rank='auto'")
        if self.keep_reconstructions and self.attention != "full":
            raise ValueError("keep_reconstructions needs attention='full' (the fused path reconstructs in registers)")

    @classmethod
    def from_env(cls, **overrides: object) -> KernelSettings:
        """Defaults, with ``enabled`` from ``AQUAKV_KERNELS`` (read now), then ``overrides``."""
        base = cls(enabled=os.environ.get("AQUAKV_KERNELS", "1") != "0")
        return replace(base, **overrides) if overrides else base

    def with_(self, **changes: object) -> KernelSettings:
        """A copy with ``changes``."""
        return replace(self, **changes)
