"""Triton kernels for the AQUA-KV codec on CUDA; the PyTorch code in :mod:`aquakv.quantize` stays the reference.

Kernels (each one launch, fp32 accuracy wherever the reference is fp32):

- :func:`quantize`: pad, randomized Hadamard rotation per group, L2-norm scale, nearest point of a ``d``-dim grid
  (d = 1 or 2), bit-packing into exactly the byte layout of :func:`aquakv.packing.pack` (codes written on the GPU
  unpack on the CPU and back).
- :func:`dequantize`: unpack, grid lookup, scale, inverse rotation, optionally ``+ add`` (a prediction).
- :func:`predict_dequantize`: ``[a1, a2] @ W + b + add + deq(codes)`` tile by tile (``head_dim`` columns), optionally
  RoPE'd and written in the attention layout ``[B, H, T, hd]``; the matmul part is optional (Triton ``tl.dot``).
- :func:`read_compressed`: drop-in for ``AquaKVLayer._read_compressed``. By default the predictor matmuls run in
  cuBLAS (bf16 operands, fp32 accumulation) and one kernel per K / V adds the dequantized residual (and RoPE for
  keys); ``settings(gemm="triton")`` fuses the matmul into the kernel instead. Low-rank predictors are factored.

The Hadamard transform is a product with a ``±1`` matrix (random signs folded in) on the tensor cores: the fp32
operand is split into two fp16 parts (22 significant bits, inputs normalized to ``|x| <= ~4`` first), so the result is
as accurate as fp32 arithmetic. Bit-packing: a row's codes form one little-endian bit stream (code ``i`` at bits
``i*b .. i*b+b-1``), which is what ``pack`` produces for every ``b``; a group of ``g/d`` codes is a whole number of
bytes when ``g/d`` is a multiple of 8.

Use: ``enabled(device)`` says whether the kernels run there (CUDA with Triton importable, or Triton's interpreter
on CPU when ``TRITON_INTERPRET=1``); ``AQUAKV_KERNELS=0`` or ``with disabled():`` turns them off.
"""

from __future__ import annotations

import contextlib
import os
import weakref
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from aquakv.config import QuantizerConfig
from aquakv.packing import packed_bytes
from aquakv.quantize import Quantized

try:  # Triton is optional: CPU-only installs import this module and never call a kernel
    import triton
    import triton.language as tl

    try:
        from triton.language.extra import libdevice
    except ImportError:  # pragma: no cover - older layouts
        from triton.language.extra.cuda import libdevice
    HAS_TRITON = True
except Exception:  # pragma: no cover - exercised on CPU-only installs
    triton = tl = libdevice = None
    HAS_TRITON = False

INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"
_STATE = {"on": os.environ.get("AQUAKV_KERNELS", "1") != "0", "predictor": "bf16", "low_rank": "auto",
          "gemm": "cublas", "tile": None}


# ----------------------------------------------------------------------------------------------------------- control


def enabled(device: torch.device | str | None = None) -> bool:
    """Whether the kernels run on ``device`` (CUDA with Triton, or CPU under ``TRITON_INTERPRET=1``)."""
    if not (HAS_TRITON and _STATE["on"]):
        return False
    dev = torch.device(device) if device is not None else torch.device("cuda")
    return (dev.type == "cuda" and torch.cuda.is_available()) or (INTERPRET and dev.type == "cpu")


def supports_head_dim(head_dim: int) -> bool:
    """Head sizes the fused cache read handles (one RoPE tile per head, a multiple of 64)."""
    return head_dim % 64 == 0


def supports(cfg: QuantizerConfig) -> bool:
    """Quantizer configs the kernels handle: d in {1, 2}, at most 8 index bits, 16 <= g/d, g <= 512."""
    v = cfg.group_size // cfg.dim
    return cfg.dim in (1, 2) and cfg.index_bits <= 8 and v >= 16 and v % 8 == 0 and cfg.group_size <= 512


@contextlib.contextmanager
def disabled() -> Iterator[None]:
    """Run the PyTorch reference paths inside this block."""
    old = _STATE["on"]
    _STATE["on"] = False
    try:
        yield
    finally:
        _STATE["on"] = old


@contextlib.contextmanager
def settings(predictor: str | None = None, low_rank: str | None = None, gemm: str | None = None,
             tile: tuple[int, int] | None = None) -> Iterator[None]:
    """``predictor``: ``"bf16"`` (bf16 operands, fp32 accumulation; default), ``"tf32"`` or ``"ieee"`` (fp32
    operands). ``low_rank``: ``"auto"`` (factor a predictor whose weight has rank <= min(D_in, D_out)/4) or ``"off"``.
    ``gemm``: ``"cublas"`` (default) or ``"triton"`` (matmul fused into the reconstruction kernel). ``tile``:
    ``(rows, warps)`` of the epilogue kernel (residual + prediction + RoPE, no matmul).
    """
    old = dict(_STATE)
    if gemm is not None:
        if gemm not in ("cublas", "triton"):
            raise ValueError(f"gemm must be cublas or triton, got {gemm!r}")
        _STATE["gemm"] = gemm
    if tile is not None:
        _STATE["tile"] = tile
    if predictor is not None:
        if predictor not in ("bf16", "tf32", "tf32x3", "ieee"):
            raise ValueError(f"predictor precision must be bf16, tf32, tf32x3 or ieee, got {predictor!r}")
        _STATE["predictor"] = predictor
    if low_rank is not None:
        if low_rank not in ("auto", "off"):
            raise ValueError(f"low_rank must be auto or off, got {low_rank!r}")
        _STATE["low_rank"] = low_rank
    try:
        yield
    finally:
        _STATE.update(old)


# ------------------------------------------------------------------------------------------------- Hadamard matrices


def hadamard_pm1(g: int) -> torch.Tensor:
    """Sylvester ``±1`` Hadamard matrix ``[g, g]`` (float32): ``walsh_hadamard(x) == x @ H * g**-0.5``."""
    if g <= 0 or g & (g - 1):
        raise ValueError(f"Hadamard size must be a power of two, got {g}")
    h = torch.ones(1, 1)
    while h.shape[0] < g:
        h = torch.cat([torch.cat([h, h], 1), torch.cat([h, -h], 1)], 0)
    return h


class _PerTensor:
    """A cache keyed by tensor identity that forgets a tensor's entries when it is freed (tensors are not hashable
    by value, so ``WeakKeyDictionary`` does not work for them)."""

    def __init__(self) -> None:
        self._data: dict[int, tuple[weakref.ref, dict]] = {}

    def get(self, t: torch.Tensor) -> dict:
        entry = self._data.get(id(t))
        if entry is None or entry[0]() is not t:
            key = id(t)
            entry = (weakref.ref(t, lambda _, k=key: self._data.pop(k, None)), {})
            self._data[key] = entry
        return entry[1]


_MATRICES = _PerTensor()


def _operand_dtype() -> torch.dtype:
    return torch.float32 if INTERPRET else torch.float16  # the interpreter cannot multiply half-precision matrices


def rotation_matrices(signs: torch.Tensor, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """``(S, S.T)``, ``[g, g]`` ``±1`` matrices with ``S = diag(signs) @ H`` (cached per signs tensor): rotating is
    ``x @ S * g**-0.5``, un-rotating ``y @ S.T * g**-0.5``."""
    key = (str(device), _operand_dtype())
    per = _MATRICES.get(signs)
    if key in per and per[key][0] == signs._version:
        return per[key][1]
    s = signs.detach().float().cpu()[:, None] * hadamard_pm1(signs.numel())
    mats = (s.contiguous().to(device, _operand_dtype()), s.T.contiguous().to(device, _operand_dtype()))
    per[key] = (signs._version, mats)
    return mats


# ----------------------------------------------------------------------------------------------------------- kernels

if HAS_TRITON:

    @triton.jit
    def _dot_exact(x, h, acc, INTERP: tl.constexpr):
        """``acc + x @ h`` for fp32 ``x`` (``|x|`` of order 1) and a ``±1`` fp16 matrix ``h``, to fp32 accuracy:
        two fp16 products of the exact split ``x = hi + lo`` (22 significant bits)."""
        if INTERP:
            out = tl.dot(x, h.to(tl.float32), acc, input_precision="ieee")
        else:
            hi = x.to(tl.float16)
            lo = (x - hi.to(tl.float32)).to(tl.float16)
            out = tl.dot(hi, h, acc)
            out = tl.dot(lo, h, out)
        return out

    @triton.jit
    def _mma(a, w, acc, PRED: tl.constexpr, INTERP: tl.constexpr):
        if INTERP:
            out = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision="ieee")
        elif PRED == "bf16":
            out = tl.dot(a.to(tl.bfloat16), w.to(tl.bfloat16), acc)
        else:
            out = tl.dot(a.to(tl.float32), w.to(tl.float32), acc, input_precision=PRED)
        return out

    @triton.jit
    def _codes_per_column(codes_ptr, rows, rmask, row_bytes, grp, GS: tl.constexpr, D: tl.constexpr,
                          BITS: tl.constexpr):
        """``[BM, GS]`` int32: for each column ``k`` of group ``grp``, the code of its ``d``-vector ``k // D``."""
        k = tl.arange(0, GS)
        bit = (k // D) * BITS
        base = rows[:, None].to(tl.int64) * row_bytes + grp * (GS // D * BITS // 8) + (bit // 8)[None, :]
        m = rmask[:, None]
        word = tl.load(codes_ptr + base, mask=m, other=0).to(tl.int32)
        if (BITS != 1) and (BITS != 2) and (BITS != 4) and (BITS != 8):  # a code may straddle two bytes
            nxt = tl.load(codes_ptr + base + 1, mask=m & ((bit % 8) + BITS > 8)[None, :], other=0).to(tl.int32)
            word = word | (nxt << 8)
        return (word >> (bit % 8)[None, :]) & ((1 << BITS) - 1)

    @triton.jit
    def _deq_tile(codes_ptr, scales_ptr, grid_ptr, hr_ptr, rows, rmask, row_bytes, G, grp, col_off,
                  BM: tl.constexpr, WIDTH: tl.constexpr, GS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                  INTERP: tl.constexpr):
        """Columns ``col_off .. col_off + WIDTH`` of group ``grp`` dequantized: ``[BM, WIDTH]`` float32."""
        codes = _codes_per_column(codes_ptr, rows, rmask, row_bytes, grp, GS, D, BITS)
        kk = tl.arange(0, GS)
        unit = tl.load(grid_ptr + codes * D + (kk % D)[None, :])  # grid coordinates, |u| < ~5
        h = tl.load(hr_ptr + kk[:, None] * GS + col_off + tl.arange(0, WIDTH)[None, :])
        acc = _dot_exact(unit, h, tl.zeros((BM, WIDTH), tl.float32), INTERP)
        scale = tl.load(scales_ptr + rows.to(tl.int64) * G + grp, mask=rmask, other=0.0).to(tl.float32)
        return acc * (scale * (1.0 / GS))[:, None]

    @triton.jit
    def _quantize_kernel(x_ptr, stride_x, n_rows, C, hc_ptr, grid_ptr, codes_ptr, row_bytes, scales_ptr, G,
                         BM: tl.constexpr, GS: tl.constexpr, D: tl.constexpr, NPTS: tl.constexpr,
                         BITS: tl.constexpr, INTERP: tl.constexpr):
        pid_m = tl.program_id(0)
        grp = tl.program_id(1)
        V: tl.constexpr = GS // D
        rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < n_rows
        cols = grp * GS + tl.arange(0, GS)
        x = tl.load(x_ptr + rows[:, None].to(tl.int64) * stride_x + cols[None, :],
                    mask=rmask[:, None] & (cols < C)[None, :], other=0.0).to(tl.float32)
        # the rotation is orthonormal: the group's norm is ||x||, and unit = rotate(x) * sqrt(g) / norm = (x / norm) @ S
        norm = tl.sqrt_rn(tl.sum(x * x, axis=1))
        xs = tl.div_rn(x, tl.maximum(norm, 1e-12)[:, None])
        kk = tl.arange(0, GS)
        h = tl.load(hc_ptr + kk[:, None] * GS + kk[None, :])
        unit = _dot_exact(xs, h, tl.zeros((BM, GS), tl.float32), INTERP)
        if D == 2:
            u0, u1 = tl.split(tl.reshape(unit, (BM, V, 2)))
        else:
            u0 = unit
        best = tl.full((BM, V), float("inf"), tl.float32)
        idx = tl.zeros((BM, V), tl.int32)
        for j in range(NPTS):  # argmin of |p|^2 - 2 <u, p>, first index on ties (as torch.argmin)
            gx = tl.load(grid_ptr + j * D)
            if D == 2:
                gy = tl.load(grid_ptr + j * D + 1)
                s = (gx * gx + gy * gy) - 2.0 * (u0 * gx + u1 * gy)
            else:
                s = gx * gx - 2.0 * (u0 * gx)
            better = s < best
            best = tl.where(better, s, best)
            idx = tl.where(better, j, idx)
        M: tl.constexpr = V // 8
        k8 = tl.arange(0, 8)
        mm = tl.arange(0, M)
        idx3 = tl.reshape(idx, (BM, M, 8)).to(tl.int64)
        word = tl.sum(idx3 << (k8 * BITS).to(tl.int64)[None, None, :], axis=2)
        byts = (word[:, :, None] >> (k8 * 8).to(tl.int64)[None, None, :]) & 255
        off = (rows[:, None, None].to(tl.int64) * row_bytes + grp * (M * BITS)
               + mm[None, :, None] * BITS + k8[None, None, :])
        tl.store(codes_ptr + off, byts.to(tl.uint8), mask=rmask[:, None, None] & (k8 < BITS)[None, None, :])
        tl.store(scales_ptr + rows.to(tl.int64) * G + grp, norm.to(scales_ptr.dtype.element_ty), mask=rmask)

    @triton.jit
    def _dequantize_kernel(codes_ptr, row_bytes, scales_ptr, G, n_rows, C, hr_ptr, grid_ptr,
                           out_ptr, stride_o, add_ptr, stride_a,
                           BM: tl.constexpr, GS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                           HAS_ADD: tl.constexpr, INTERP: tl.constexpr):
        pid_m = tl.program_id(0)
        grp = tl.program_id(1)
        rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < n_rows
        cols = grp * GS + tl.arange(0, GS)
        acc = _deq_tile(codes_ptr, scales_ptr, grid_ptr, hr_ptr, rows, rmask, row_bytes, G, grp, 0,
                        BM, GS, GS, D, BITS, INTERP)
        mask = rmask[:, None] & (cols < C)[None, :]
        r64 = rows[:, None].to(tl.int64)
        if HAS_ADD:
            acc += tl.load(add_ptr + r64 * stride_a + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(out_ptr + r64 * stride_o + cols[None, :], acc.to(out_ptr.dtype.element_ty), mask=mask)

    @triton.jit
    def _addr(rb, rt, c0, WIDTH: tl.constexpr, s_b, s_t, s_h, HD: tl.constexpr):
        """Offsets of ``[rows, c0 .. c0 + WIDTH]`` in a view ``b*s_b + t*s_t + (c // HD)*s_h + c % HD``; the columns
        lie in one head (``c0`` a multiple of ``WIDTH <= HD``), so they are contiguous (vectorized accesses)."""
        row = rb.to(tl.int64) * s_b + rt.to(tl.int64) * s_t + ((c0 // HD) * s_h + c0 % HD)
        return row[:, None] + tl.arange(0, WIDTH)[None, :]

    @triton.jit
    def _fused_kernel(a1_ptr, a1_sb, a1_st, a1_sh, K1,
                      a2_ptr, a2_sb, a2_st, a2_sh, K2,
                      w_ptr, bias_ptr, N,
                      add_ptr, add_sb, add_st, add_sh,
                      codes_ptr, row_bytes, scales_ptr, G, grid_ptr, hr_ptr,
                      o_ptr, o_sb, o_st, o_sh,
                      r_ptr, r_sb, r_st, r_sh,
                      pos_ptr, pos_sb, inv_freq_ptr, rope_scale,
                      n_rows, T,
                      BM: tl.constexpr, BN: tl.constexpr, BK: tl.constexpr, HD: tl.constexpr,
                      GS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
                      HAS_PRED: tl.constexpr, HAS_A2: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_ADD: tl.constexpr,
                      HAS_DEQ: tl.constexpr,
                      HAS_OUT: tl.constexpr, HAS_OUT2: tl.constexpr, ROPE: tl.constexpr, PRED: tl.constexpr,
                      INTERP: tl.constexpr):
        """One ``[BM, BN]`` tile of ``[a1, a2] @ W + b + deq(codes)``, kept as two ``BN/2`` halves so RoPE
        (``BN == HD``) pairs column ``c`` with ``c + HD/2`` in registers; stored to ``o`` and/or ``r`` (RoPE'd
        there when ``ROPE``)."""
        pid_n = tl.program_id(0)  # fastest: the programs sharing A rows run together (L2 reuse)
        pid_m = tl.program_id(1)
        HB: tl.constexpr = BN // 2
        rows = pid_m * BM + tl.arange(0, BM)
        rmask = rows < n_rows
        rb = rows // T
        rt = rows % T
        cl = pid_n * BN + tl.arange(0, HB)
        ch = cl + HB
        acc_l = tl.zeros((BM, HB), tl.float32)
        acc_h = tl.zeros((BM, HB), tl.float32)
        if HAS_PRED:
            for k0 in range(0, K1, BK):
                kk = k0 + tl.arange(0, BK)
                kmask = kk < K1
                a = tl.load(a1_ptr + _addr(rb, rt, k0, BK, a1_sb, a1_st, a1_sh, HD),
                            mask=rmask[:, None] & kmask[None, :], other=0.0)
                wrow = kk[:, None].to(tl.int64) * N
                wl = tl.load(w_ptr + wrow + cl[None, :], mask=kmask[:, None], other=0.0)
                wh = tl.load(w_ptr + wrow + ch[None, :], mask=kmask[:, None], other=0.0)
                acc_l = _mma(a, wl, acc_l, PRED, INTERP)
                acc_h = _mma(a, wh, acc_h, PRED, INTERP)
            if HAS_A2:
                for k0 in range(0, K2, BK):
                    kk = k0 + tl.arange(0, BK)
                    kmask = kk < K2
                    a = tl.load(a2_ptr + _addr(rb, rt, k0, BK, a2_sb, a2_st, a2_sh, HD),
                                mask=rmask[:, None] & kmask[None, :], other=0.0)
                    wrow = (K1 + kk)[:, None].to(tl.int64) * N
                    wl = tl.load(w_ptr + wrow + cl[None, :], mask=kmask[:, None], other=0.0)
                    wh = tl.load(w_ptr + wrow + ch[None, :], mask=kmask[:, None], other=0.0)
                    acc_l = _mma(a, wl, acc_l, PRED, INTERP)
                    acc_h = _mma(a, wh, acc_h, PRED, INTERP)
        if HAS_BIAS:
            acc_l += tl.load(bias_ptr + cl).to(tl.float32)[None, :]
            acc_h += tl.load(bias_ptr + ch).to(tl.float32)[None, :]
        omask = rmask[:, None]
        if HAS_ADD:
            acc_l += tl.load(add_ptr + _addr(rb, rt, pid_n * BN, HB, add_sb, add_st, add_sh, HD), mask=omask,
                             other=0.0).to(tl.float32)
            acc_h += tl.load(add_ptr + _addr(rb, rt, pid_n * BN + HB, HB, add_sb, add_st, add_sh, HD), mask=omask,
                             other=0.0).to(tl.float32)
        if HAS_DEQ:
            c0 = pid_n * BN
            acc_l += _deq_tile(codes_ptr, scales_ptr, grid_ptr, hr_ptr, rows, rmask, row_bytes, G,
                               c0 // GS, c0 % GS, BM, HB, GS, D, BITS, INTERP)
            acc_h += _deq_tile(codes_ptr, scales_ptr, grid_ptr, hr_ptr, rows, rmask, row_bytes, G,
                               (c0 + HB) // GS, (c0 + HB) % GS, BM, HB, GS, D, BITS, INTERP)
        if HAS_OUT:
            tl.store(o_ptr + _addr(rb, rt, pid_n * BN, HB, o_sb, o_st, o_sh, HD), acc_l.to(o_ptr.dtype.element_ty),
                     mask=omask)
            tl.store(o_ptr + _addr(rb, rt, pid_n * BN + HB, HB, o_sb, o_st, o_sh, HD),
                     acc_h.to(o_ptr.dtype.element_ty), mask=omask)
        if HAS_OUT2:
            if ROPE:
                pos = tl.load(pos_ptr + rb.to(tl.int64) * pos_sb + rt, mask=rmask, other=0).to(tl.float32)
                inv = tl.load(inv_freq_ptr + tl.arange(0, HB))
                f = pos[:, None] * inv[None, :]
                if INTERP:
                    cos = tl.cos(f) * rope_scale
                    sin = tl.sin(f) * rope_scale
                else:
                    cos = libdevice.cos(f) * rope_scale
                    sin = libdevice.sin(f) * rope_scale
                kl = acc_l.to(r_ptr.dtype.element_ty).to(tl.float32)  # the reference rounds before RoPE
                kh = acc_h.to(r_ptr.dtype.element_ty).to(tl.float32)
                out_l = kl * cos - kh * sin
                out_h = kh * cos + kl * sin
            else:
                out_l = acc_l
                out_h = acc_h
            tl.store(r_ptr + _addr(rb, rt, pid_n * BN, HB, r_sb, r_st, r_sh, HD), out_l.to(r_ptr.dtype.element_ty),
                     mask=omask)
            tl.store(r_ptr + _addr(rb, rt, pid_n * BN + HB, HB, r_sb, r_st, r_sh, HD),
                     out_h.to(r_ptr.dtype.element_ty), mask=omask)


# ------------------------------------------------------------------------------------------------------ host wrappers


def _block_rows(group_size: int) -> int:
    """Rows per program of the group-tiled kernels: about 4096 values in flight."""
    return max(16, min(128, 4096 // group_size))


def quantize(x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor, cfg: QuantizerConfig) -> Quantized:
    """Kernel version of :func:`aquakv.quantize.quantize` (same codes but for near-ties, same byte layout).

    Does not check for NaN / Inf: the dispatching caller does.
    """
    if not supports(cfg):
        raise ValueError(f"kernels do not support {cfg}")
    lead, C = x.shape[:-1], x.shape[-1]
    x2 = x.reshape(-1, C)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    n, g, d, bits = x2.shape[0], cfg.group_size, cfg.dim, cfg.index_bits
    groups = -(-C // g)
    row_bytes = packed_bytes(groups * g // d, bits)
    codes = torch.empty(n, row_bytes, dtype=torch.uint8, device=x.device)
    scales = torch.empty(n, groups, dtype=cfg.torch_scale_dtype, device=x.device)
    if n:
        rot, _ = rotation_matrices(signs, x.device)
        gr = grid.to(x.device, torch.float32).contiguous()
        bm = _block_rows(g)
        _quantize_kernel[(triton.cdiv(n, bm), groups)](
            x2, x2.stride(0), n, C, rot, gr, codes, row_bytes, scales, groups,
            BM=bm, GS=g, D=d, NPTS=gr.shape[0], BITS=bits, INTERP=INTERPRET, num_warps=4)
    return Quantized(codes.view(*lead, row_bytes), scales.view(*lead, groups), C)


def dequantize(q: Quantized, grid: torch.Tensor, signs: torch.Tensor, cfg: QuantizerConfig,
               add: torch.Tensor | None = None, out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kernel version of :func:`aquakv.quantize.dequantize`, optionally fused with ``+ add`` (``[..., C]``)."""
    if not supports(cfg):
        raise ValueError(f"kernels do not support {cfg}")
    lead, groups, C = q.scales.shape[:-1], q.scales.shape[-1], q.channels
    g, d, bits = cfg.group_size, cfg.dim, cfg.index_bits
    n = q.scales.numel() // groups if groups else 0
    codes = q.codes.reshape(n, q.codes.shape[-1]).contiguous()
    scales = q.scales.reshape(n, groups).contiguous()
    out = torch.empty(n, C, dtype=out_dtype, device=codes.device)
    if add is not None:
        add = add.reshape(n, C)
        if add.stride(-1) != 1:
            add = add.contiguous()
    if n:
        _, unrot = rotation_matrices(signs, codes.device)
        gr = grid.to(codes.device, torch.float32).contiguous()
        bm = _block_rows(g)
        _dequantize_kernel[(triton.cdiv(n, bm), groups)](
            codes, codes.shape[-1], scales, groups, n, C, unrot, gr, out, out.stride(0),
            add if add is not None else out, add.stride(0) if add is not None else 0,
            BM=bm, GS=g, D=d, BITS=bits, HAS_ADD=add is not None, INTERP=INTERPRET, num_warps=4)
    return out.view(*lead, C)


@dataclass
class View:
    """A logical ``[B, T, C]`` matrix at ``b*sb + t*st + (c // hd)*sh + c % hd`` of ``tensor`` (``hd`` = the kernel's
    head dim): ``plain`` for contiguous ``[B, T, C]``, ``heads`` for the attention layout ``[B, H, T, hd]``."""

    tensor: torch.Tensor
    sb: int
    st: int
    sh: int

    @staticmethod
    def plain(x: torch.Tensor, hd: int) -> View:
        if not x.is_contiguous():
            raise ValueError("plain views need a contiguous [B, T, C] tensor")
        return View(x, x.shape[1] * x.shape[2], x.shape[2], hd)

    @staticmethod
    def heads(x: torch.Tensor) -> View:
        if x.stride(3) != 1:
            raise ValueError("head views need a unit stride over head_dim")
        return View(x, x.stride(0), x.stride(2), x.stride(1))


def predict_dequantize(
    batch: int, tokens: int, channels: int, head_dim: int,
    a1: View | None = None, a2: View | None = None,
    weight: torch.Tensor | None = None, bias: torch.Tensor | None = None, add: View | None = None,
    q: Quantized | None = None, grid: torch.Tensor | None = None, signs: torch.Tensor | None = None,
    cfg: QuantizerConfig | None = None,
    out: View | None = None, out2: View | None = None, rope: bool = False,
    positions: torch.Tensor | None = None, inv_freq: torch.Tensor | None = None, rope_scale: float = 1.0,
    precision: str | None = None, block_n: int | None = None, k1: int | None = None,
) -> None:
    """``[a1, a2] @ weight + bias + add + deq(q)`` over ``batch * tokens`` rows and ``channels`` columns, written to
    ``out`` and/or ``out2`` (with ``rope``: RoPE at ``positions [B, >=T]`` applied there; tiles of ``head_dim``
    columns).

    ``weight [K1 + K2, channels]`` in the operand dtype (bf16 for ``precision="bf16"``, else fp32); its first ``k1``
    rows (default: all, or half with ``a2``) multiply ``a1``. Any part may be absent: no ``a1`` means no prediction,
    no ``q`` no residual.
    """
    precision = precision or _STATE["predictor"]
    bn = block_n or head_dim
    dev = (a1 or out or out2).tensor.device
    if channels % bn or bn < 32 or bn & (bn - 1) or bn // 2 > head_dim or head_dim % 64:
        raise ValueError(f"channels {channels} must be a multiple of the tile width {bn} (a power of two >= 32, "
                         f"at most 2 x head_dim); head_dim {head_dim} must be a multiple of 64")
    if rope and (out2 is None or bn != head_dim or positions is None or inv_freq is None):
        raise ValueError("RoPE needs out2, positions, inv_freq and tiles of exactly one head")
    if q is not None:
        if cfg is None or not supports(cfg) or cfg.group_size % (bn // 2):
            raise ValueError(f"the fused kernel needs a supported quantizer with group size a multiple of {bn // 2}")
        _, recon = rotation_matrices(signs, dev)
        gr = grid.to(dev, torch.float32).contiguous()
        codes, scales = q.codes, q.scales
        if not (codes.is_contiguous() and scales.is_contiguous()):
            codes, scales = codes.contiguous(), scales.contiguous()
    dummy = (a1 or out or out2).tensor
    n_rows = batch * tokens
    if a1 is not None:  # a matmul: large tiles
        bm, warps = (128, 8) if n_rows >= 128 * 64 else (64, 4)
    else:  # an epilogue (add + residual + RoPE): `settings(tile=...)` or the measured default
        bm, warps = _STATE["tile"] or (128, 8)
    a2_k = 0
    if a1 is None:
        k1 = 0
    elif k1 is None:
        k1 = weight.shape[0] if a2 is None else weight.shape[0] // 2
    if a1 is not None:
        a2_k = weight.shape[0] - k1
    grid_shape = (channels // bn, triton.cdiv(n_rows, bm))
    pos = positions if positions is not None else dummy
    _fused_kernel[grid_shape](
        a1.tensor if a1 else dummy, a1.sb if a1 else 0, a1.st if a1 else 0, a1.sh if a1 else 0, k1,
        a2.tensor if a2 else dummy, a2.sb if a2 else 0, a2.st if a2 else 0, a2.sh if a2 else 0, a2_k,
        weight if weight is not None else dummy, bias if bias is not None else dummy, channels,
        add.tensor if add else dummy, add.sb if add else 0, add.st if add else 0, add.sh if add else 0,
        codes if q is not None else dummy, codes.shape[-1] if q is not None else 0,
        scales if q is not None else dummy, scales.shape[-1] if q is not None else 0,
        gr if q is not None else dummy, recon if q is not None else dummy,
        out.tensor if out else dummy, out.sb if out else 0, out.st if out else 0, out.sh if out else 0,
        out2.tensor if out2 else dummy, out2.sb if out2 else 0, out2.st if out2 else 0, out2.sh if out2 else 0,
        pos, pos.stride(0) if positions is not None else 0, inv_freq if inv_freq is not None else dummy,
        float(rope_scale), n_rows, tokens,
        BM=bm, BN=bn, BK=64, HD=head_dim, GS=cfg.group_size if q is not None else 64,
        D=cfg.dim if q is not None else 1, BITS=cfg.index_bits if q is not None else 1,
        HAS_PRED=a1 is not None, HAS_A2=a2 is not None, HAS_BIAS=bias is not None, HAS_ADD=add is not None,
        HAS_DEQ=q is not None,
        HAS_OUT=out is not None, HAS_OUT2=out2 is not None, ROPE=bool(rope), PRED=precision, INTERP=INTERPRET,
        num_warps=warps, num_stages=3)


# ------------------------------------------------------------------------------------------- predictors on the GPU


@dataclass
class PreparedPredictor:
    """A predictor's weights in the operand dtype: full ``weight [K, N]`` or factors ``down [K, r]``, ``up [r, N]``
    (``weight == down @ up``); ``bias [N]`` float32 and ``bias_op`` in the operand dtype (for cuBLAS ``addmm``)."""

    bias: torch.Tensor
    bias_op: torch.Tensor
    weight: torch.Tensor | None = None
    down: torch.Tensor | None = None
    up: torch.Tensor | None = None

    @property
    def rank(self) -> int | None:
        return None if self.down is None else self.down.shape[1]


_PREPARED = _PerTensor()


def low_rank_factors(weight: torch.Tensor, tol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(down [K, r], up [r, N])`` with ``down @ up == weight`` (to ``tol``) when the weight's rank is at most a
    quarter of ``min(K, N)``, so factoring saves at least half the arithmetic; else ``None``.

    A randomized range finder (float64, on the weight's device) tests the rank cheaply; ``r`` is padded with zero
    directions to a multiple of 32 (whole kernel tiles).
    """
    w = weight.detach().double()
    k_max = min(w.shape) // 4
    if k_max < 1 or not torch.isfinite(w).all():
        return None
    gen = torch.Generator(device=w.device).manual_seed(0)
    probe = torch.randn(w.shape[1], min(k_max + 8, min(w.shape)), generator=gen, dtype=w.dtype, device=w.device)
    q, _ = torch.linalg.qr(w @ probe)
    b = q.T @ w
    norm = float(w.norm())
    if norm == 0 or float((w - q @ b).norm()) > tol * norm:
        return None
    u, s, vh = torch.linalg.svd(b, full_matrices=False)
    r = int((s > tol * s[0]).sum())
    if r > k_max:
        return None
    pad = -(-r // 32) * 32
    down = torch.zeros(w.shape[0], pad, dtype=w.dtype, device=w.device)
    up = torch.zeros(pad, w.shape[1], dtype=w.dtype, device=w.device)
    down[:, :r] = (q @ u[:, :r]) * s[:r]
    up[:r] = vh[:r]
    return down.float(), up.float()


def prepare(predictor, dtype: torch.dtype, device: torch.device, low_rank: str | None = None) -> PreparedPredictor:
    """Kernel operands of ``predictor`` (cached per weight tensor)."""
    low_rank = low_rank or _STATE["low_rank"]
    key = (dtype, str(device), low_rank)
    per = _PREPARED.get(predictor.weight)
    if key in per:
        return per[key]
    factors = low_rank_factors(predictor.weight) if low_rank == "auto" else None
    bias = predictor.bias.to(device, torch.float32).contiguous()
    bias_op = bias.to(dtype)
    if factors is None:
        prep = PreparedPredictor(bias, bias_op, weight=predictor.weight.to(device, dtype).contiguous())
    else:
        prep = PreparedPredictor(bias, bias_op, down=factors[0].to(device, dtype).contiguous(),
                                 up=factors[1].to(device, dtype).contiguous())
    per[key] = prep
    return prep


def _predict_cublas(prep: PreparedPredictor, inputs: list[torch.Tensor]) -> torch.Tensor:
    """``[inputs] @ W + b`` through cuBLAS, ``[rows, N]`` in the operand dtype; two inputs multiply the two halves of
    the weight's rows (no concatenation)."""
    if prep.weight is not None:
        if len(inputs) == 1:
            return torch.addmm(prep.bias_op, inputs[0], prep.weight)
        k1 = inputs[0].shape[1]
        out = torch.addmm(prep.bias_op, inputs[0], prep.weight[:k1])
        return out.addmm_(inputs[1], prep.weight[k1:])
    z = inputs[0] @ prep.down[: inputs[0].shape[1]]
    if len(inputs) > 1:
        z.addmm_(inputs[1], prep.down[inputs[0].shape[1]:])
    return torch.addmm(prep.bias_op, z, prep.up)


def _reconstruct(batch: int, tokens: int, channels: int, head_dim: int, prep: PreparedPredictor | None,
                 inputs: list[torch.Tensor], residual, q: Quantized, out: torch.Tensor, out2: torch.Tensor | None,
                 rope: tuple | None, precision: str, gemm: str) -> None:
    """One of K̂ / V̂ into ``out [B, T, D]`` (and RoPE'd into ``out2 [B, H, T, hd]``): prediction from ``inputs``
    (``[B, T, D]`` each) plus the dequantized residual."""
    rope_kw = {} if rope is None else {"rope": True, "positions": rope[0], "inv_freq": rope[1], "rope_scale": rope[2]}
    common = {"q": q, "grid": residual.grid, "signs": residual.signs, "cfg": residual.config,
              "out": View.plain(out, head_dim), "out2": None if out2 is None else View.heads(out2),
              "precision": precision, **rope_kw}
    if prep is None:
        predict_dequantize(batch, tokens, channels, head_dim, **common)
        return
    if gemm == "cublas":
        pred = _predict_cublas(prep, [x.view(batch * tokens, -1) for x in inputs])
        predict_dequantize(batch, tokens, channels, head_dim, add=View.plain(pred.view(batch, tokens, -1), head_dim),
                           **common)
        return
    views = [View.plain(x, head_dim) for x in inputs]
    a1, a2 = views[0], (views[1] if len(views) > 1 else None)
    if prep.weight is not None:
        predict_dequantize(batch, tokens, channels, head_dim, a1=a1, a2=a2, weight=prep.weight, bias=prep.bias,
                           **common)
        return
    r = prep.rank
    z = torch.empty(batch, tokens, r, dtype=prep.down.dtype, device=out.device)
    zn = 128 if r % 128 == 0 else (64 if r % 64 == 0 else 32)
    predict_dequantize(batch, tokens, r, head_dim, a1=a1, a2=a2, weight=prep.down, out=View.plain(z, head_dim),
                       precision=precision, block_n=zn)
    predict_dequantize(batch, tokens, channels, head_dim, a1=View.plain(z, head_dim), weight=prep.up,
                       bias=prep.bias, **common)


def read_compressed(layer) -> tuple[torch.Tensor, torch.Tensor]:
    """Drop-in for ``AquaKVLayer._read_compressed`` on CUDA. Keys: predictor matmul (cuBLAS, or fused with
    ``settings(gemm="triton")``), then one kernel adds the dequantized residual and writes both ``K̂`` (pre-RoPE,
    ``[B, T, D]``, for the next layer) and RoPE(``K̂``) in the attention layout. Values likewise, written once as
    ``[B, T, D]`` (returned as a ``[B, H, T, hd]`` view). ``shared.prev_old`` holds ``(K̂, V̂)`` ``[B, T, D]`` in the
    model dtype (bf16 precision, default) or float32 (``"tf32"`` / ``"ieee"``); every layer of a pass must be read
    through this function.
    """
    shared = layer.shared
    t = layer.compressed_len
    if t == 0:
        shared.prev_old = None
        return layer.sink_keys[:, :, :0], layer.sink_values[:, :, :0]
    codec, block = layer.codec, layer.compressed
    b, h, _, hd = layer.keys.shape
    d = h * hd
    dev, dt = layer.device, layer.dtype
    precision, gemm = _STATE["predictor"], _STATE["gemm"]
    operand = torch.bfloat16 if precision == "bf16" else torch.float32
    scratch = operand  # the next layer multiplies it by its predictor in this dtype
    prev = shared.prev_old
    keys_pre = torch.empty(b, t, d, dtype=scratch, device=dev)
    keys = torch.empty(b, h, t, hd, dtype=dt, device=dev)
    values_pre = torch.empty(b, t, d, dtype=scratch, device=dev)
    rotary = shared.rotary
    rope = (shared.positions[:, :t].to(dev, torch.int32), rotary.inv_freq.to(dev, torch.float32).contiguous(),
            float(getattr(rotary, "attention_scaling", 1.0)))
    kp = None if codec.key_predictor is None else prepare(codec.key_predictor, operand, dev)
    vp = None if codec.value_predictor is None else prepare(codec.value_predictor, operand, dev)
    if (kp is not None or vp is not None) and prev is None:
        raise ValueError("this layer's predictors need the previous layer's reconstruction")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        _reconstruct(b, t, d, hd, kp, [prev[0]] if kp else [], codec.keys, block.keys, keys_pre, keys, rope,
                     precision, gemm)
        _reconstruct(b, t, d, hd, vp, [keys_pre, prev[1]] if vp else [], codec.values, block.values, values_pre,
                     None, None, precision, gemm)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = tf32
    shared.prev_old = (keys_pre, values_pre)
    return keys, values_pre.view(b, t, h, hd).transpose(1, 2).to(dt)


def copy_bandwidth(nbytes: int = 1 << 31, reps: int = 20) -> float:
    """Measured device-to-device copy bandwidth in bytes/s (bytes read plus bytes written)."""
    x = torch.empty(nbytes // 2, dtype=torch.uint8, device="cuda")
    y = torch.empty_like(x)
    x.random_()
    for _ in range(3):
        y.copy_(x)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    times = []
    for _ in range(reps):
        start.record()
        y.copy_(x)
        end.record()
        end.synchronize()
        times.append(start.elapsed_time(end) / 1e3)
    times.sort()
    return nbytes / times[len(times) // 2]


__all__ = ["HAS_TRITON", "INTERPRET", "View", "PreparedPredictor", "copy_bandwidth", "dequantize", "disabled",
           "enabled", "hadamard_pm1", "low_rank_factors", "predict_dequantize", "prepare", "quantize",
           "read_compressed", "rotation_matrices", "settings", "supports"]
