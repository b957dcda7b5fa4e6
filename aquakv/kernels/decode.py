"""The decode path on CUDA: flash-decoding attention straight from the compressed cache.

:func:`decode_attention` launches ``_decode_attention_kernel`` over (tile of compressed tokens, batch row). Each
program reconstructs its tile of layer ``l`` from the codes and layer ``l-1``'s reconstruction of the same tile (read
from a per-pass scratch), writes layer ``l``'s reconstruction there for layer ``l+1``, applies RoPE at the tokens' own
positions and returns attention partials (normalized output + log-sum-exp) of every query head; :func:`attend_exact`
(``_exact_merge_kernel``, one program per query row) attends to the exact segments (sinks, recent window, new tokens)
and merges the partials into the layer's output.
"""

from __future__ import annotations

import math

import torch

from aquakv.kernels import HAS_TRITON
from aquakv.kernels.host import _PerTensor, prepare, rotation_matrices
from aquakv.kernels.settings import INTERPRET, KernelSettings

if HAS_TRITON:
    from aquakv.kernels.jit import _decode_attention_kernel, _exact_merge_kernel

MAX_QUERY_ROWS = 64  # query heads per KV head x query tokens one program handles


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


def needs_own_buffer(codec, settings: KernelSettings) -> bool:
    """Whether layer ``l`` must write its reconstruction to another buffer than the one it reads: a full-rank
    predictor reads every column of the previous reconstruction while the kernel overwrites them."""
    for p in (codec.key_predictor, codec.value_predictor):
        if p is not None:
            mode = _predictor_operands(p, p.weight.device, settings)[0]
            if mode == 1:
                return True
    return False


def supports_fused(codec, head_dim: int) -> bool:
    """Whether the decode kernel handles this layer: each half-head of columns lies inside one Hadamard group."""
    return all(r.config.group_size % (head_dim // 2) == 0 for r in (codec.keys, codec.values))


def _sm_count(device: torch.device) -> int:
    if device.type == "cuda":
        return torch.cuda.get_device_properties(device).multi_processor_count
    return 16


def _launch_config(rows: int, full_rank: bool, settings: KernelSettings, device: torch.device) -> tuple[int, int, int]:
    """``(tokens per program, warps, pipeline stages)`` for ``rows = batch x compressed tokens``: 64-token tiles once
    they give every SM two programs, else 32 (measured on an H200, 2026-11-26: 128-token tiles with 8 warps were no
    faster, 4 warps with 128 tokens spilled; 64-token tiles with 8 warps or 32-token tiles were slower). 4 pipeline
    stages for 64-token tiles with low-rank or no predictors (0.255 vs 0.281 ms per layer with 2, rank 64, 32k, batch
    1); a ``full_rank`` predictor keeps 2 (4 were 1.4x slower there)."""
    if settings.tile_tokens:
        bt = settings.tile_tokens
    else:
        bt = 64 if rows >= 2 * _sm_count(device) * 64 else 32
    return bt, 4, 4 if bt == 64 and not full_rank else 2


_TABLES = _PerTensor()


def _grid_table(grid: torch.Tensor, device: torch.device) -> torch.Tensor:
    """``grid [n, d <= 2]`` as ``[n]`` int32 (cached per grid tensor and device): the code's fp16 coordinates packed
    (coordinate ``j`` in bits ``16 j .. 16 j + 15``), so the kernel gathers one word per code."""
    per, key = _TABLES.get(grid), str(device)
    if key in per and per[key][0] == grid._version:
        return per[key][1]
    bits = grid.to(device, torch.float16).view(torch.int16).to(torch.int64) & 0xFFFF
    packed = sum(bits[:, j] << (16 * j) for j in range(grid.shape[1]))
    table = torch.where(packed >= 2**31, packed - 2**32, packed).to(torch.int32).contiguous()
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
    scaling: float, settings: KernelSettings,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention partials of ``query [B, Hq, Q, hd]`` over ``length`` compressed tokens.

    ``keys_q`` / ``values_q``: codes ``[B, length, row_bytes]`` and scales ``[B, length, groups]`` of the key and
    value residuals; ``codec``: the layer's :class:`~aquakv.codec.LayerCodec` (grids, signs, predictors);
    ``prev`` / ``cur``: scratch ``[B, capacity, 2 * D]`` (``K̂ | V̂``, pre-RoPE) holding layer ``l-1``'s reconstruction
    / receiving layer ``l``'s (may be the same tensor unless :func:`needs_own_buffer`); ``positions [B, >= length]``
    int32; ``key_mask [B, length]`` (nonzero = attend) or None. Returns ``o [B, Hq, Q, tiles, hd]`` float32
    (normalized per tile) and ``lse [B, Hq, Q, tiles]`` float32 (natural log; ``-inf`` for a fully masked tile).
    """
    b, hq, qlen, hd = query.shape
    d = prev.shape[-1] // 2
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
    bt, warps, stages = _launch_config(b * length, kmode == 1 or vmode == 1, settings, dev)
    nt = math.ceil(length / bt)
    qm = max(16, 1 << (gq * qlen - 1).bit_length())
    o = torch.empty(b, hq, qlen, nt, hd, dtype=torch.float32, device=dev)
    lse = torch.empty(b, hq, qlen, nt, dtype=torch.float32, device=dev)
    probs = torch.empty(b * nt, h, qm, bt, dtype=torch.float32 if INTERPRET else torch.bfloat16, device=dev)
    if (kmode == 1 or vmode == 1) and prev.data_ptr() == cur.data_ptr():
        raise ValueError("a full-rank predictor needs separate prev and cur scratch buffers")
    _, k_unrot = rotation_matrices(codec.keys.signs, dev)
    _, v_unrot = rotation_matrices(codec.values.signs, dev)
    kgrid, vgrid = _grid_table(codec.keys.grid, dev), _grid_table(codec.values.grid, dev)
    kcfg, vcfg = codec.keys.config, codec.values.config
    kc, kc_words = _codes_operand(keys_q.codes, kcfg)
    vc, vc_words = _codes_operand(values_q.codes, vcfg)
    ks, vs = keys_q.scales.contiguous(), values_q.scales.contiguous()
    dummy = o
    mask = key_mask.to(torch.int8).contiguous() if key_mask is not None else dummy
    _decode_attention_kernel[(nt, b)](
        query, query.stride(0), query.stride(1), query.stride(2),
        kc, kc.shape[-1], ks, ks.shape[-1], kgrid, k_unrot,
        vc, vc.shape[-1], vs, vs.shape[-1], vgrid, v_unrot,
        prev, cur, prev.stride(0), prev.stride(1),
        kw if kw is not None else dummy, kb if kb is not None else dummy, ka if ka is not None else dummy,
        kup if kup is not None else dummy,
        vw if vw is not None else dummy, vb if vb is not None else dummy, va if va is not None else dummy,
        vup if vup is not None else dummy,
        positions, positions.stride(0), inv_freq, float(rope_scale),
        mask, probs, o, lse,
        length, nt, hq, qlen, float(scaling) * math.log2(math.e),
        DM=d, H=h, HD=hd, GQ=gq, QM=qm, BT=bt, BK=64,
        KPRED=kmode, VPRED=vmode, RK=rk, RV=rv,
        GS_K=kcfg.group_size, D_K=kcfg.dim, BITS_K=kcfg.index_bits, WORDS_K=kc_words,
        GS_V=vcfg.group_size, D_V=vcfg.dim, BITS_V=vcfg.index_bits, WORDS_V=vc_words,
        HAS_MASK=key_mask is not None, INTERP=INTERPRET, num_warps=warps, num_stages=stages,
    )
    return o, lse


def attend_exact(query: torch.Tensor, exact_keys: torch.Tensor, exact_values: torch.Tensor, sinks: int, length: int,
                 mask: torch.Tensor | None, scaling: float,
                 compressed: tuple[torch.Tensor, torch.Tensor] | None) -> torch.Tensor:
    """Attention of ``query [B, Hq, Q, hd]`` to the exact segments ``exact_keys / exact_values [B, Hkv, TE, hd]``
    (``[sinks | window]``, the ``length`` compressed tokens between them), merged with the compressed tokens' partials
    ``compressed`` (``o [B, Hq, Q, tiles, hd]``, ``lse [B, Hq, Q, tiles]`` as :func:`decode_attention` returns them, or
    None) -> ``[B, Q, Hq, hd]`` in the query's dtype; ``mask``: a transformers mask ``[B or 1, 1, Q, >= kv_len]``
    (bool, or additive float) or None (causal for ``Q > 1``). The math of :func:`aquakv.attention.attend_segments`."""
    b, hq, qlen, hd = query.shape
    hkv, te = exact_keys.shape[1], exact_keys.shape[2]
    kv_len = te + length
    if query.stride(-1) != 1 or exact_keys.stride(-1) != 1 or exact_values.stride(-1) != 1:
        query, exact_keys, exact_values = query.contiguous(), exact_keys.contiguous(), exact_values.contiguous()
    out = torch.empty(b, qlen, hq, hd, dtype=query.dtype, device=query.device)
    o, lse = compressed if compressed is not None else (out, out)  # contiguous, as decode_attention returns them
    nt = o.shape[3] if compressed is not None else 0
    if mask is not None:
        m = mask[:, 0, :, -kv_len:].expand(b, qlen, kv_len)
        thr = 0.0 if m.dtype == torch.bool else torch.finfo(m.dtype).min / 2
        m = m.view(torch.uint8) if m.dtype == torch.bool else m
        m_strides = m.stride()
    else:
        m, thr, m_strides = out, 0.0, (0, 0, 0)
    _exact_merge_kernel[(b * hq * qlen,)](
        query, query.stride(0), query.stride(1), query.stride(2),
        exact_keys, *exact_keys.stride()[:3], exact_values, *exact_values.stride()[:3],
        m, *m_strides, float(thr),
        o, lse, out,
        te, sinks, length, nt, hq, hq // hkv, qlen, float(scaling) * math.log2(math.e),
        HD=hd, BE=64, BN=64, HAS_MASK=mask is not None, CAUSAL=mask is None and qlen > 1, num_warps=4,
    )
    return out
