"""The decode path on CUDA: flash-decoding attention straight from the compressed cache.

:func:`decode_attention` launches ``_decode_attention_kernel`` over (tile of compressed tokens, batch row). Each
program reconstructs its tile of layer ``l`` from the codes and what layer ``l-1`` handed on for the same tile (read
from a per-pass scratch: its reconstruction, or only its low-rank projections, :func:`handoff`), hands layer ``l``'s
on to layer ``l+1`` the same way, applies RoPE at the tokens' own positions and returns attention partials
(normalized output + log-sum-exp) of every query head; :func:`attend_exact` (``_exact_merge_kernel``, one program
per query row) attends to the exact segments (sinks, recent window, new tokens) and merges the partials into the
layer's output.
"""

from __future__ import annotations

import functools
import math
from typing import NamedTuple

import torch

from aquakv.codec import key_factor
from aquakv.kernels import HAS_TRITON
from aquakv.kernels.host import _PerTensor, prepare, rotation_matrices
from aquakv.kernels.settings import INTERPRET, KernelSettings
from aquakv.predictors import kernel_rank

if HAS_TRITON:
    import triton
    from triton.runtime.errors import OutOfResources

    from aquakv.kernels.jit import (
        _decode_attention_kernel,
        _exact_merge_kernel,
        _latent_add_kernel,
        _latent_up_kernel,
        _latent_values_kernel,
    )

MAX_QUERY_ROWS = 64  # query heads per KV head x query tokens one program handles
# Stored projections: the value predictor's low-rank term leaves the decode kernel for _latent_values_kernel once the
# decode kernel has this many programs per SM, or its rank is DEFER_RANK or more (``KernelSettings.value_latents=
# "auto"``). One layer at 32k, H100 (docs/benchmarks/decode.md rounds 22-23): batch 8 (16 programs per SM) rank 256
# 1.442 -> 1.177 ms, rank 64 0.815 -> 0.742; batch 1 (2 per SM) rank 256 0.185 -> 0.166, but rank 64 0.100 -> 0.105.
DEFER_PROGRAMS_PER_SM = 4
DEFER_RANK = 256
# Stored projections: from this (kernel) rank the key prediction ``z^K @ up`` runs on float8 tensor cores (z^K is
# float8 as stored, up rounded to float8 for every stored key prediction: aquakv.codec.round_factor). 32k, H100, the
# decode kernel alone: rank 256 0.131 -> 0.116 ms at batch 1, 1.037 -> 0.797 at batch 8; rank 64 slower (0.094 ->
# 0.109 at batch 1), so below this rank the same rounded factor is multiplied in bf16 (decode.md round 24).
FP8_KEY_RANK = 256
# Stored, value term deferred, key product in bf16 (rank < FP8_KEY_RANK): registers per thread capped so that three
# programs fit an SM. Rank 64, 32k, H100, the decode kernel alone: 0.674 -> 0.611 ms at batch 8, 2.626 -> 2.329 at
# batch 32; the float8 rank-256 kernel was slower capped (0.797 -> 0.886 at batch 8; decode.md round 24).
STORED_DEFERRED_REGISTERS = 168
MAX_LATENT_CHUNKS = 256  # token chunks per batch row at most (_latent_up_kernel adds their partial sums)
LATENT_UP_ROWS = 32  # rows of ``up`` per _latent_up_kernel program
# Highest predictor rank of the projected hand-on. Kernel alone, 32k tokens, H100, 128-token tiles / 8 warps / 1 stage
# (`benchmarks/decode.py --sections sweep`, 2026-11-26): rank 128 projected 0.305 / 2.425 ms at batch 1 / 8 against
# the full hand-on's best 0.305 / 2.284 (64-token tiles), with 8x less scratch; rank 256 projected 0.832 / 6.685
# against 0.604 / 4.786 full (its [tile, rank] accumulators spill: 376 spilled registers against 222).
MAX_PROJECTED_RANK = 128


class LatentValues(NamedTuple):
    """What the value predictor's deferred term of stored projections needs (:func:`_add_latent_values`): the decode
    kernel's per-tile probabilities ``probs [B*tiles, Hkv, QM, BT]``, the tokens' ``z^V [B, >= length, RV]`` (a view of
    the stored latents) and their scales ``[B, length, 2]``, and ``up [RV, D]``."""

    probs: torch.Tensor
    latents: torch.Tensor
    scales: torch.Tensor
    up: torch.Tensor


class Partials(NamedTuple):
    """The compressed tokens' attention partials: ``o [B, Hq, Q, tiles, hd]`` (float32, normalized per tile), ``lse
    [B, Hq, Q, tiles]`` (natural log), and the deferred value term of stored projections (or None)."""

    o: torch.Tensor
    lse: torch.Tensor
    latent: LatentValues | None = None


def scratch_dtype(settings: KernelSettings) -> torch.dtype:
    """dtype of the reconstruction scratch: bf16, or fp8 e4m3 (``settings.scratch == "fp8"``)."""
    return torch.float8_e4m3fn if settings.scratch == "fp8" else torch.bfloat16


def _predictor_operands(predictor, device: torch.device, settings: KernelSettings):
    """``(mode, weight, bias, down, up, rank)``: mode 0 none, 1 full weight, 2 low-rank factors (rank a power of 2)."""
    if predictor is None:
        return 0, None, None, None, None, 16
    dtype = torch.float32 if INTERPRET else torch.bfloat16
    prep = prepare(predictor, dtype, device, settings.low_rank, rank_multiple=0)
    if prep.weight is not None:
        return 1, prep.weight, prep.bias, None, None, 16
    return 2, None, prep.bias, prep.down, prep.up, prep.down.shape[1]


_KEY_UP = _PerTensor()


def _stored_key_up(predictor, device: torch.device, fp8: bool) -> tuple[torch.Tensor, float]:
    """``(up8 operand, scale)``: the stored key predictor's rounded ``up`` (:func:`aquakv.codec.key_factor`, the bits
    every stored key prediction uses), zero-padded to the kernel rank ``R``, cached per weight, device and form.
    ``fp8``: ``up8^T [DM, R]`` float8, K-major as float8 tensor cores read it; else ``up8 [R, DM]`` in the operand
    dtype (exact: e4m3 values are bf16 values), the scale applied to ``z^K``."""
    per, key = _KEY_UP.get(predictor.weight), (str(device), fp8)
    if key not in per:
        up8, scale = key_factor(predictor)
        up8 = up8.to(device)
        up8 = torch.cat([up8, up8.new_zeros(kernel_rank(up8.shape[0]) - up8.shape[0], up8.shape[1])])
        op = up8.t() if fp8 else up8.to(torch.float32 if INTERPRET else torch.bfloat16)
        per[key] = (op.contiguous(), float(scale))
    return per[key]


def needs_own_buffer(codec, settings: KernelSettings) -> bool:
    """Whether layer ``l`` must write its reconstruction to another buffer than the one it reads: a full-rank
    predictor reads every column of the previous reconstruction while the kernel overwrites them."""
    for p in (codec.key_predictor, codec.value_predictor):
        if p is not None:
            mode = _predictor_operands(p, p.weight.device, settings)[0]
            if mode == 1:
                return True
    return False


def handoff(codecs, settings: KernelSettings, channels: int) -> tuple[bool, int]:
    """``(projected, columns)`` of the scratch rows one layer hands to the next: the next layer's low-rank projections
    of its inputs (``projected``: every predictor low rank, at most :data:`MAX_PROJECTED_RANK`, or absent; the widest
    layer's ``RK + RV`` columns, at least 16) or the full reconstruction ``[K̂ | V̂]`` (``2 * channels`` columns)."""
    width = 16
    for codec in codecs:
        modes = [_predictor_operands(p, p.weight.device, settings) for p in (codec.key_predictor,
                                                                               codec.value_predictor) if p is not None]
        if any(m[0] == 1 or m[5] > MAX_PROJECTED_RANK for m in modes):
            return False, 2 * channels
        width = max(width, sum(m[5] for m in modes))
    return True, width


def supports_fused(codec, head_dim: int) -> bool:
    """Whether the decode kernel handles this layer: each half-head of columns lies inside one Hadamard group."""
    return all(r.config.group_size % (head_dim // 2) == 0 for r in (codec.keys, codec.values))


@functools.cache  # (per call it cost as much host time as a kernel launch)
def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 16


@functools.cache
def _float8_mma(device: torch.device) -> bool:
    """Whether ``device`` multiplies float8 on tensor cores (compute capability 8.9 and up: Ada, Hopper; Triton's
    interpreter on the CPU emulates it). Elsewhere (A100) the stored key product stays bf16."""
    return device.type != "cuda" or torch.cuda.get_device_capability(device) >= (8, 9)


def _launch_config(rows: int, full_rank: bool, projected: bool, settings: KernelSettings,
                   device: torch.device, rank: int = 0, stored: bool = False) -> tuple[int, int, int]:
    """``(tokens per program, warps, pipeline stages)`` for ``rows = batch x compressed tokens`` (measured on H200s,
    2026-11-26, rank 64 at 32k). Projected hand-on: 128-token tiles with 8 warps, 1 stage once they give every SM a
    program (0.198 vs 0.204 ms per layer with 2 stages, 0.277 with 64-token tiles; batch 1). Full hand-on: 64-token
    tiles once they give every SM two programs, else 32 (128-token tiles were no faster there); 4 stages for 64-token
    tiles without a full-rank predictor (0.255 vs 0.281 ms with 2), a ``full_rank`` predictor keeps 2 (4 were 1.4x
    slower). Low-rank predictors above :data:`MAX_PROJECTED_RANK` (full hand-on): 128-token tiles, 8 warps, 1 stage
    like the projected hand-on (rank 256 on an H100, 2026-11-26: 0.602 / 4.71 ms per layer at batch 1 / 8 vs 0.697 /
    5.43 for 64 / 4 / 1; 64-token tiles with more stages do not fit shared memory)."""
    sms = _sm_count(device)
    wide = projected or (not full_rank and rank > MAX_PROJECTED_RANK)
    bt = settings.tile_tokens or (128 if wide and rows >= sms * 128 else 64 if rows >= 2 * sms * 64 else 32)
    if bt >= 128:  # stored projections: 4 warps (0.133 vs 0.168 ms with 8, rank 64, 32k, batch 1, H100)
        return bt, 4 if stored else 8, 1
    return bt, 4, (3 if projected else 4) if bt == 64 and not full_rank else 2


def _launch_candidates(first: tuple[int, ...]) -> list[tuple[int, ...]]:
    """``first``, then configs that need less shared memory (fewer stages, then smaller tiles), each with ``first``'s
    register cap if it has one: a high predictor rank (e.g. 256 at D = 1024) does not fit the measured default (293 KB
    of shared memory against an H100's 227 KB, 2026-11-26)."""
    bt, warps, stages, *cap = first
    out = [first] + [(bt, warps, s, *cap) for s in range(stages - 1, 0, -1)]
    out += [(t, 4, s, *cap) for t in (64, 32) if t < bt for s in (2, 1)]
    return list(dict.fromkeys(out))


_TABLES = _PerTensor()
_FITS: dict[tuple, tuple[int, ...]] = {}  # (wanted launch, kernel constants, device) -> the config that fits


def _grid_table(grid: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``grid [n, d]`` (d in 1, 2, 4) as ``[n]`` int32 (d <= 2) or int64 (d = 4), cached per grid tensor and device:
    the code's fp16 coordinates packed (coordinate ``j`` in bits ``16 j .. 16 j + 15``), so the kernel gathers one
    word per code."""
    per, key = _TABLES.get(grid), str(device)
    if key in per and per[key][0] == grid._version:
        return per[key][1]
    half = grid.to(device, torch.float16)
    if half.shape[1] == 1:  # coordinate in the low half of an int32 word, zeros above
        half = torch.cat([half, torch.zeros_like(half)], 1)
    table = half.contiguous().view(torch.int32 if half.shape[1] == 2 else torch.int64).reshape(-1).contiguous()
    per[key] = (grid._version, table)
    return table


def _codes_operand(codes: torch.Tensor, cfg) -> tuple[torch.Tensor, bool]:
    """Codes ``[B, T, row_bytes]`` as the kernel reads them: int32 words when every group starts on a word and no
    code straddles two (``words = True``), else bytes."""
    codes = codes.contiguous()
    group_bytes = cfg.group_size // cfg.dim * cfg.index_bits // 8
    words = 32 % cfg.index_bits == 0 and group_bytes % 4 == 0 and codes.shape[-1] % 4 == 0
    return (codes.view(torch.int32), True) if words else (codes, False)


def decode_attention(
    query: torch.Tensor, keys_q, values_q, length: int, codec, prev: torch.Tensor, cur: torch.Tensor,
    positions: torch.Tensor, inv_freq: torch.Tensor, rope_scale: float, key_mask: torch.Tensor | None,
    scaling: float, settings: KernelSettings, projected: bool = False, next_codec=None,
    launch: tuple[int, ...] | None = None, stored: torch.Tensor | None = None,
) -> Partials:
    """Attention partials of ``query [B, Hq, Q, hd]`` over ``length`` compressed tokens.

    ``keys_q`` / ``values_q``: codes ``[B, length, row_bytes]`` and scales ``[B, length, groups]`` of the key and
    value residuals; ``codec``: the layer's :class:`~aquakv.codec.LayerCodec` (grids, signs, predictors);
    ``prev`` / ``cur``: scratch ``[B, capacity, columns]`` holding what this layer reads / receiving what the next
    layer (``next_codec``, None for the last) reads (may be the same tensor unless :func:`needs_own_buffer`): the full
    reconstruction ``[K̂ | V̂]`` pre-RoPE, or its low-rank projections when ``projected`` (see :func:`handoff`);
    ``stored``: the block's projection scales ``[B, length, 2]`` when ``prev`` holds its stored projections
    ``[B, length, RK + RV]`` (:class:`~aquakv.codec.Projections`; ``cur`` unused, ``next_codec`` None), the value
    predictor's low-rank term then possibly deferred to the merge (``settings.value_latents``, :class:`LatentValues`);
    ``positions [B, >= length]`` int32; ``key_mask [B, length]`` (nonzero = attend) or None. Returns
    :class:`Partials` (``lse`` ``-inf`` for a fully masked tile). ``launch``: ``(tokens per program, warps,
    stages)`` instead of the measured default, optionally with a fourth element, a register cap per thread (benchmark
    sweeps; no fallback when it does not fit).
    """
    b, hq, qlen, hd = query.shape
    d = keys_q.channels
    h = d // hd
    gq = hq // h
    if gq * qlen > MAX_QUERY_ROWS:
        raise ValueError(f"{gq} query heads per KV head x {qlen} query tokens > {MAX_QUERY_ROWS}")
    dev = query.device
    for q in (keys_q, values_q):
        if q.codes.shape[:2] != (b, length) or q.scales.shape[:2] != (b, length):
            raise ValueError("codes and scales must be [B, length, ...]")
    if query.stride(-1) != 1:
        query = query.contiguous()
    kmode, kw, kb, ka, kup, rk = _predictor_operands(codec.key_predictor, dev, settings)
    vmode, vw, vb, va, vup, rv = _predictor_operands(codec.value_predictor, dev, settings)
    ka2 = va2 = None
    rk2 = rv2 = 0
    if stored is not None:
        widths = (rk if kmode else 0) + (rv if vmode else 0)
        if kmode == 1 or vmode == 1 or (widths and prev.shape[-1] != widths) or next_codec is not None:
            raise ValueError("stored projections need low-rank predictors whose widths match them, and no hand-on")
    if projected and next_codec is not None:
        nkmode, _, _, ka2, _, rk2 = _predictor_operands(next_codec.key_predictor, dev, settings)
        nvmode, _, _, va2, _, rv2 = _predictor_operands(next_codec.value_predictor, dev, settings)
        rk2, rv2 = rk2 if nkmode else 0, rv2 if nvmode else 0
    key8, kup_scale = False, 1.0
    if stored is not None and kmode == 2:  # the stored key predictor's rounded up (codec.stored_factors)
        key8 = rk >= FP8_KEY_RANK and _float8_mma(dev)
        kup, kup_scale = _stored_key_up(codec.key_predictor, dev, key8)
    qm = max(16, 1 << (gq * qlen - 1).bit_length())
    if (kmode == 1 or vmode == 1) and prev.data_ptr() == cur.data_ptr():
        raise ValueError("a full-rank predictor needs separate prev and cur scratch buffers")
    _, k_unrot = rotation_matrices(codec.keys.signs, dev)
    _, v_unrot = rotation_matrices(codec.values.signs, dev)
    kgrid, vgrid = _grid_table(codec.keys.grid, dev), _grid_table(codec.values.grid, dev)
    kcfg, vcfg = codec.keys.config, codec.values.config
    kc, kc_words = _codes_operand(keys_q.codes, kcfg)
    vc, vc_words = _codes_operand(values_q.codes, vcfg)
    ks, vs = keys_q.scales.contiguous(), values_q.scales.contiguous()
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else None

    def run(config: tuple[int, ...]) -> Partials:
        bt, warps, stages, *cap = config
        nt = math.ceil(length / bt)
        o = torch.empty(b, hq, qlen, nt, hd, dtype=torch.float32, device=dev)
        lse = torch.empty(b, hq, qlen, nt, dtype=torch.float32, device=dev)
        probs = torch.empty(b * nt, h, qm, bt, dtype=torch.float32 if INTERPRET else torch.bfloat16, device=dev)
        dummy = o
        defer = stored is not None and vmode == 2 and defers_values(settings, rv, b * nt, _sm_count(dev))
        _decode_attention_kernel[(nt, b)](
            query, query.stride(0), query.stride(1), query.stride(2),
            kc, kc.shape[-1], ks, ks.shape[-1], kgrid, k_unrot,
            vc, vc.shape[-1], vs, vs.shape[-1], vgrid, v_unrot,
            prev, cur, prev.stride(0), prev.stride(1), stored if stored is not None else dummy,
            kw if kw is not None else dummy, kb if kb is not None else dummy, ka if ka is not None else dummy,
            kup if kup is not None else dummy, kup_scale,
            vw if vw is not None else dummy, vb if vb is not None else dummy, va if va is not None else dummy,
            vup if vup is not None else dummy, ka2 if ka2 is not None else dummy, va2 if va2 is not None else dummy,
            positions, positions.stride(0), inv_freq, float(rope_scale),
            mask if mask is not None else dummy, probs, o, lse,
            length, nt, hq, qlen, float(scaling) * math.log2(math.e),
            DM=d, H=h, HD=hd, GQ=gq, QM=qm, BT=bt, BK=64,
            KPRED=kmode, VPRED=vmode, RK=rk, RV=rv, PROJ=projected or stored is not None, RK2=rk2, RV2=rv2,
            STORED=stored is not None, DEFER_V=defer, Z8=key8,
            GS_K=kcfg.group_size, D_K=kcfg.dim, BITS_K=kcfg.index_bits, WORDS_K=kc_words,
            GS_V=vcfg.group_size, D_V=vcfg.dim, BITS_V=vcfg.index_bits, WORDS_V=vc_words,
            HAS_MASK=key_mask is not None, INTERP=INTERPRET, num_warps=warps, num_stages=stages,
            **({"maxnreg": cap[0]} if cap else {}),
        )
        if not defer:
            return Partials(o, lse)
        return Partials(o, lse, LatentValues(probs, prev[..., rk if kmode else 0:], stored, vup))

    if launch is not None:  # benchmark sweeps: exactly this config
        return run(launch)
    projected = projected or stored is not None
    wanted = _launch_config(b * length, kmode == 1 or vmode == 1, projected, settings, dev,
                            max(rk if kmode else 0, rv if vmode else 0), stored is not None)
    if (stored is not None and vmode == 2 and not key8
            and defers_values(settings, rv, b * math.ceil(length / wanted[0]), _sm_count(dev))):
        wanted = (*wanted, STORED_DEFERRED_REGISTERS)
    key = (wanted, d, hd, gq, qm, kmode, vmode, rk, rv, projected, rk2, rv2, stored is not None, kcfg, vcfg, str(dev))
    if key in _FITS:
        return run(_FITS[key])
    *larger, smallest = _launch_candidates(wanted)
    for config in larger:
        try:
            out = run(config)
        except OutOfResources:
            continue
        _FITS[key] = config
        return out
    _FITS[key] = smallest
    return run(smallest)


# Launch of the exact-segment merge, ``(exact tokens per block, partials per block, warps, output columns per
# program)``. With fewer query rows than SMs (batch 1: 32 rows of an 8B model) a row's columns are split over
# programs (0.337 -> 0.299 ms per step at batch 1, 32k, H100) and the partials of 32k tokens are read in one block of
# 256 by 8 warps; with more rows (batch 8: 256) one program per row (splitting doubled it: every program re-reads the
# whole keys). `benchmarks/decode.py --sections merge_sweep`, 36 launches, H100 2026-11-26: 14.8 -> 10.3 us per layer
# at batch 1, 20.6 -> 17.8 us at batch 8 (decode.md round 13).
MERGE_FEW_ROWS = (64, 256, 8, 32)
MERGE_MANY_ROWS = (128, 128, 4, 128)


def attend_exact(query: torch.Tensor, exact_keys: torch.Tensor, exact_values: torch.Tensor, sinks: int, length: int,
                 mask: torch.Tensor | None, scaling: float,
                 compressed: Partials | tuple[torch.Tensor, torch.Tensor] | None,
                 launch: tuple[int, int, int, int] | None = None,
                 exact_len: torch.Tensor | None = None) -> torch.Tensor:
    """Attention of ``query [B, Hq, Q, hd]`` to the exact segments ``exact_keys / exact_values [B, Hkv, TE, hd]``
    (``[sinks | window]``, the ``length`` compressed tokens between them), merged with the compressed tokens' partials
    ``compressed`` (``o [B, Hq, Q, tiles, hd]``, ``lse [B, Hq, Q, tiles]`` as :func:`decode_attention` returns them, or
    None) -> ``[B, Q, Hq, hd]`` in the query's dtype; ``mask``: a transformers mask ``[B or 1, 1, Q, >= kv_len]``
    (bool, or additive float) or None (causal for ``Q > 1``). The math of :func:`aquakv.attention.attend_segments`.
    ``launch``: ``(exact tokens per block, partials per block, warps, output columns per program)`` instead of the
    default (benchmark sweeps). A deferred value term (``compressed.latent``) is added after the merge.
    ``exact_len`` (int32 ``[1]`` on the device, one query token): only the first ``exact_len`` of the buffers' tokens
    are exact, read on the device so that a captured CUDA graph replays as the window grows (:mod:`aquakv.graphs`);
    a mask then spans the whole buffers."""
    b, hq, qlen, hd = query.shape
    hkv, te = exact_keys.shape[1], exact_keys.shape[2]
    if exact_len is not None and qlen > 1:
        raise ValueError("a device-side exact length needs one query token")
    kv_len = te + length
    if query.stride(-1) != 1 or exact_keys.stride(-1) != 1 or exact_values.stride(-1) != 1:
        query, exact_keys, exact_values = query.contiguous(), exact_keys.contiguous(), exact_values.contiguous()
    out = torch.empty(b, qlen, hq, hd, dtype=query.dtype, device=query.device)
    o, lse, latent = Partials(*compressed) if compressed is not None else (out, out, None)  # (o, lse) pairs too
    lse_row = torch.empty(b, hq, qlen, dtype=torch.float32, device=query.device) if latent is not None else out
    nt = o.shape[3] if compressed is not None else 0
    if mask is not None:
        m = mask[:, 0, :, -kv_len:].expand(b, qlen, kv_len)
        thr = 0.0 if m.dtype == torch.bool else torch.finfo(m.dtype).min / 2
        m = m.view(torch.uint8) if m.dtype == torch.bool else m
        m_strides = m.stride()
    else:
        m, thr, m_strides = out, 0.0, (0, 0, 0)
    rows = b * hq * qlen
    few = rows < _sm_count(query.device)  # more programs per row only while SMs are idle
    be, bn, warps, dc = launch or (MERGE_FEW_ROWS if few else MERGE_MANY_ROWS)
    dc = dc if hd % dc == 0 else hd
    _exact_merge_kernel[(rows, hd // dc)](
        query, query.stride(0), query.stride(1), query.stride(2),
        exact_keys, *exact_keys.stride()[:3], exact_values, *exact_values.stride()[:3],
        m, *m_strides, float(thr),
        o, lse, out, lse_row,
        te, exact_len if exact_len is not None else out, sinks, length, nt, hq, hq // hkv, qlen,
        float(scaling) * math.log2(math.e),
        HD=hd, DC=dc, BE=be, BN=bn, HAS_MASK=mask is not None, CAUSAL=mask is None and qlen > 1,
        LSE_OUT=latent is not None, TE_DEVICE=exact_len is not None, num_warps=warps,
    )
    if latent is not None:
        _add_latent_values(out, latent, lse, lse_row, length, hkv)
    return out


def defers_values(settings: KernelSettings, rank: int, programs: int, sms: int) -> bool:
    """Whether a stored layer's value predictor term of width ``rank`` is deferred past the merge
    (``value_latents``) when the decode kernel runs ``programs`` programs on ``sms`` SMs."""
    if settings.value_latents != "auto":
        return settings.value_latents == "deferred"
    return programs >= DEFER_PROGRAMS_PER_SM * sms or rank >= DEFER_RANK


def _add_latent_values(out: torch.Tensor, latent: LatentValues, lse: torch.Tensor, lse_row: torch.Tensor,
                       length: int, hkv: int) -> None:
    """``out [B, Q, Hq, hd] += (sum_t P_t s_t z^V_t) @ up[:, head]``: the value predictor's low-rank term of stored
    projections, with ``P`` the final probabilities (per-tile ones times ``exp(lse - lse_row)``). Token chunks of whole
    decode tiles, about two programs per SM (``_latent_values_kernel``); their partial sums are added, through blocks
    of ``up``'s rows, by ``_latent_up_kernel``, and the blocks by ``_latent_add_kernel``."""
    b, qlen, hq, hd = out.shape
    nt = lse.shape[-1]
    bt, qm = latent.probs.shape[-1], latent.probs.shape[-2]
    rv = latent.up.shape[0]
    rows = hq * qlen
    mb = 16 if rows <= 16 else 32
    row_blocks = -(-rows // mb)
    # tiles per program: about two programs per SM, at most MAX_LATENT_CHUNKS chunks per batch row to add up
    per_program = max(-(-b * row_blocks * nt // (2 * _sm_count(out.device))), -(-nt // MAX_LATENT_CHUNKS))
    ch = per_program * bt
    chunks = -(-length // ch)
    part = torch.empty(b, chunks, row_blocks * mb, rv, dtype=torch.float32, device=out.device)
    z = latent.latents
    _latent_values_kernel[(chunks, b, row_blocks)](
        latent.probs, lse, lse_row, z, z.stride(0), z.stride(1), latent.scales, part, length, nt, ch, hq, qlen,
        H=hkv, GQ=hq // hkv, QM=qm, BT=bt, MB=mb, RV=rv, BS=min(bt, 64), INTERP=INTERPRET, num_warps=4,
    )
    br = min(LATENT_UP_ROWS, rv)  # divides rv: factorization widths are powers of two (predictors.kernel_rank)
    blocks = torch.empty(b, rows, rv // br, hd, dtype=torch.float32, device=out.device)
    _latent_up_kernel[(rows, b, rv // br)](part, latent.up, blocks, chunks, row_blocks * mb, qlen, hq // hkv, HD=hd,
                                           RV=rv, DM=latent.up.shape[1], BR=br,
                                           CB=min(64, triton.next_power_of_2(chunks)), num_warps=4)
    _latent_add_kernel[(rows, b)](blocks, out, qlen, hq, HD=hd, KB=rv // br, num_warps=4)
