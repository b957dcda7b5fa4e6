"""The ``@triton.jit`` kernels of AQUA-KV (import only where Triton is; :mod:`aquakv.kernels.host` and
:mod:`aquakv.kernels.decode` launch them).

- ``_quantize_kernel`` / ``_dequantize_kernel``: the HIGGS codec (rotation, scale, grid, bit-packing) per group.
- ``_fused_kernel``: ``[a1, a2] @ W + b + add + deq(codes)``, optionally RoPE'd: reconstruct-then-attend reads.
- ``_decode_attention_kernel``: flash-decoding straight from the compressed cache (one program per batch row and
  tile of compressed tokens: unpack, grid, inverse Hadamard, predictor, RoPE, attention partials).
- ``_exact_merge_kernel``: attention to the exact segments (sinks, recent window) merged with those partials.

The Hadamard transform is a product with a ``±1`` matrix (random signs folded in) on the tensor cores. In the codec
kernels the fp32 operand is split into two fp16 parts (22 significant bits, inputs normalized to ``|x| <= ~4``), so
the result is as accurate as fp32 arithmetic; the decode kernel uses one fp16 product (grid coordinates to 11 bits,
far below the quantization error). Bit-packing: a row's codes form one little-endian bit stream (code ``i`` at bits
``i*b .. i*b+b-1``), as :func:`aquakv.packing.pack` writes it.
"""

from __future__ import annotations

import triton
import triton.language as tl

try:
    from triton.language.extra import libdevice
except ImportError:  # pragma: no cover - older layouts
    from triton.language.extra.cuda import libdevice

LN2 = tl.constexpr(0.6931471805599453)
LOG2E = tl.constexpr(1.4426950408889634)


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
def _quantize_kernel(x_ptr, stride_x, n_rows, C, hc_ptr, grid_ptr, codes_ptr, row_bytes, scales_ptr, G, scale_max,
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
    elif D == 4:
        ua, ub = tl.split(tl.reshape(unit, (BM, V, 2, 2)))  # coordinates (0, 2) and (1, 3)
        u0, u2 = tl.split(ua)
        u1, u3 = tl.split(ub)
    else:
        u0 = unit
    best = tl.full((BM, V), float("inf"), tl.float32)
    idx = tl.zeros((BM, V), tl.int32)
    for j in range(NPTS):  # argmin of |p|^2 - 2 <u, p>, first index on ties (as torch.argmin)
        gx = tl.load(grid_ptr + j * D)
        if D == 2:
            gy = tl.load(grid_ptr + j * D + 1)
            s = (gx * gx + gy * gy) - 2.0 * (u0 * gx + u1 * gy)
        elif D == 4:
            gy = tl.load(grid_ptr + j * D + 1)
            gz = tl.load(grid_ptr + j * D + 2)
            gw = tl.load(grid_ptr + j * D + 3)
            s = (gx * gx + gy * gy + gz * gz + gw * gw) - 2.0 * (u0 * gx + u1 * gy + u2 * gz + u3 * gw)
        else:
            s = gx * gx - 2.0 * (u0 * gx)
        better = s < best
        best = tl.where(better, s, best)
        idx = tl.where(better, j, idx)
    # every 8 codes fill BITS bytes of the row's little-endian bit stream
    M: tl.constexpr = V // 8
    k8 = tl.arange(0, 8)
    mm = tl.arange(0, M)
    if BITS <= 8:  # the 8 codes fit one 64-bit word
        idx3 = tl.reshape(idx, (BM, M, 8)).to(tl.int64)
        word = tl.sum(idx3 << (k8 * BITS).to(tl.int64)[None, None, :], axis=2)
        byts = (word[:, :, None] >> (k8 * 8).to(tl.int64)[None, None, :]) & 255
        jb = k8
    else:  # byte j gathers, from each code k, the bits that fall in it (code k's bit 0 sits at bit k*BITS - 8j)
        jb = tl.arange(0, 16)
        at = (k8[None, :] * BITS - jb[:, None] * 8)[None, None, :, :]
        idx4 = tl.reshape(idx, (BM, M, 1, 8))
        part = tl.where(at >= 0, idx4 << tl.minimum(tl.maximum(at, 0), 31), idx4 >> tl.minimum(tl.maximum(-at, 0), 31))
        byts = tl.sum(tl.where((at > -BITS) & (at < 8), part & 255, 0), axis=3)
    off = (rows[:, None, None].to(tl.int64) * row_bytes + grp * (M * BITS)
           + mm[None, :, None] * BITS + jb[None, None, :])
    tl.store(codes_ptr + off, byts.to(tl.uint8), mask=rmask[:, None, None] & (jb < BITS)[None, None, :])
    tl.store(scales_ptr + rows.to(tl.int64) * G + grp, tl.minimum(norm, scale_max).to(scales_ptr.dtype.element_ty),
             mask=rmask)

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
def _rows_times_weight(acc_l, acc_h, a_ptr, s_b, s_t, s_h, K, w_row0, rb, rt, rmask, w_ptr, N, cl, ch,
                       BK: tl.constexpr, HD: tl.constexpr, PRED: tl.constexpr, INTERP: tl.constexpr):
    """``acc += A[rows, :K] @ W[w_row0 : w_row0 + K, cl | ch]`` for one input ``A`` (a view, see :func:`_addr`), the
    two column halves accumulated apart: one predictor input (``[K̂_l]``, or each part of ``[K̂_l, V̂_p]``)."""
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        kmask = kk < K
        a = tl.load(a_ptr + _addr(rb, rt, k0, BK, s_b, s_t, s_h, HD), mask=rmask[:, None] & kmask[None, :], other=0.0)
        wrow = (w_row0 + kk)[:, None].to(tl.int64) * N
        wl = tl.load(w_ptr + wrow + cl[None, :], mask=kmask[:, None], other=0.0)
        wh = tl.load(w_ptr + wrow + ch[None, :], mask=kmask[:, None], other=0.0)
        acc_l = _mma(a, wl, acc_l, PRED, INTERP)
        acc_h = _mma(a, wh, acc_h, PRED, INTERP)
    return acc_l, acc_h


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
        acc_l, acc_h = _rows_times_weight(acc_l, acc_h, a1_ptr, a1_sb, a1_st, a1_sh, K1, 0, rb, rt, rmask, w_ptr, N,
                                          cl, ch, BK, HD, PRED, INTERP)
        if HAS_A2:
            acc_l, acc_h = _rows_times_weight(acc_l, acc_h, a2_ptr, a2_sb, a2_st, a2_sh, K2, K1, rb, rt, rmask, w_ptr,
                                              N, cl, ch, BK, HD, PRED, INTERP)
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



# ------------------------------------------------------------------------------------------------ decode attention


@triton.jit
def _dot16(a, b, acc, INTERP: tl.constexpr):
    """``acc + a @ b`` with bf16 operands and fp32 accumulation (fp32 ``ieee`` under the interpreter)."""
    if INTERP:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a.to(tl.bfloat16), b.to(tl.bfloat16), acc)
    return out


@triton.jit
def _dot8(a, b, acc, INTERP: tl.constexpr):
    """``acc + a @ b`` with float8 e4m3 operands and fp32 accumulation (fp32 ``ieee`` under the interpreter)."""
    if INTERP:
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc)
    return out


@triton.jit
def _codes_from_words(codes_ptr, rows, rmask, row_words, grp, BM: tl.constexpr, V: tl.constexpr,
                      BITS: tl.constexpr):
    """``[BM, V]`` int32: the ``V`` codes of group ``grp`` from the row's 32-bit words (``32 % BITS == 0`` and every
    group starts on a word): one coalesced ``[BM, words]`` load, unpacked with shifts."""
    NW: tl.constexpr = V * BITS // 32  # words per group
    w = tl.load(codes_ptr + rows[:, None].to(tl.int64) * row_words + grp * NW + tl.arange(0, NW)[None, :],
                mask=rmask[:, None], other=0)
    shift = tl.arange(0, 32 // BITS) * BITS
    return tl.reshape((w[:, :, None] >> shift[None, None, :]) & ((1 << BITS) - 1), (BM, V))


@triton.jit
def _grid_units(codes_ptr, table_ptr, rows, rmask, row_len, grp, BM: tl.constexpr, GS: tl.constexpr, D: tl.constexpr,
                BITS: tl.constexpr, WORDS: tl.constexpr):
    """``[BM, GS]`` fp16 grid coordinates of group ``grp`` (the residual in the rotated space, before its scale).
    ``table``: per code, its ``D <= 2`` fp16 grid coordinates packed in an int32 (one gather per code; ``D = 4``: four
    in an int64); ``WORDS``: codes read as int32 words (``row_len`` in words), else bytes."""
    V: tl.constexpr = GS // D
    if WORDS:
        codes = _codes_from_words(codes_ptr, rows, rmask, row_len, grp, BM, V, BITS)
    else:
        codes = _codes_per_column(codes_ptr, rows, rmask, row_len, grp, V, 1, BITS)
    e = tl.load(table_ptr + codes)
    lo = (e & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
    if D == 4:  # an int64 per code; joined (0, 2), (1, 3) then together flatten to coordinates 0, 1, 2, 3
        c1 = ((e >> 16) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        c2 = ((e >> 32) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        c3 = ((e >> 48) & 0xFFFF).to(tl.int16).to(tl.float16, bitcast=True)
        unit = tl.reshape(tl.join(tl.join(lo, c2), tl.join(c1, c3)), (BM, GS))
    elif D == 2:
        unit = tl.reshape(tl.join(lo, (e >> 16).to(tl.int16).to(tl.float16, bitcast=True)), (BM, GS))
    else:
        unit = lo
    return unit


@triton.jit
def _deq_fast(codes_ptr, scales_ptr, table_ptr, hr_ptr, h, rows, rmask, row_len, G, c0, rdiv,
              BM: tl.constexpr, WIDTH: tl.constexpr, GS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr,
              WORDS: tl.constexpr, HELD: tl.constexpr, INTERP: tl.constexpr):
    """Dequantized residual of columns ``c0 .. c0 + WIDTH`` (inside one group), divided by ``rdiv`` per row (``[BM]``
    or a scalar): ``[BM, WIDTH]`` float32, one fp16 product of the grid coordinates (:func:`_grid_units`) with the
    ``±1`` un-rotation: its slice ``h`` (``HELD``, :func:`_unrotation`) or read here from ``hr_ptr``."""
    grp = c0 // GS
    unit = _grid_units(codes_ptr, table_ptr, rows, rmask, row_len, grp, BM, GS, D, BITS, WORDS)
    if not HELD:
        h = _unrotation_slice(hr_ptr, c0, GS, WIDTH)
    if INTERP:
        acc = tl.dot(unit.to(tl.float32), h.to(tl.float32), input_precision="ieee")
    else:
        acc = tl.dot(unit, h, tl.zeros((BM, WIDTH), tl.float32))
    scale = tl.load(scales_ptr + rows.to(tl.int64) * G + grp, mask=rmask, other=0.0).to(tl.float32)
    return acc * (scale * (1.0 / GS) / rdiv)[:, None]


@triton.jit
def _unrotation_slice(hr_ptr, c0, GS: tl.constexpr, WIDTH: tl.constexpr):
    """Columns ``c0 % GS ..`` ``+ WIDTH`` of the ``[GS, GS]`` un-rotation: ``[GS, WIDTH]``, what columns ``c0 ..``
    of a row use."""
    return tl.load(hr_ptr + tl.arange(0, GS)[:, None] * GS + (c0 % GS) + tl.arange(0, WIDTH)[None, :])


@triton.jit
def _unrotation(hr_ptr, GS: tl.constexpr, HB: tl.constexpr, HELD: tl.constexpr):
    """``HELD``: the slices every head's low and high halves use, read once per program (where the group size
    divides the head, every head's halves sit at the same offsets of their groups); else placeholders, and each
    half head reads its own slice where it uses it (:func:`_unrotation_slice`)."""
    lo = 0.0
    hi = 0.0
    if HELD:
        lo, hi = _unrotation_slice(hr_ptr, 0, GS, HB), _unrotation_slice(hr_ptr, HB, GS, HB)
    return lo, hi


@triton.jit
def _attend_rotated(p, psum, pz, up_ptr, bias_ptr, R: tl.constexpr, c_ptr, s_ptr, grid_ptr, hr_ptr, h, rows, tmask,
                    c_rl, groups, c0, DM: tl.constexpr, QM: tl.constexpr, BT: tl.constexpr, HB: tl.constexpr,
                    GS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, WORDS: tl.constexpr, PRED: tl.constexpr,
                    HELD: tl.constexpr, INTERP: tl.constexpr):
    """``p [QM, BT] @ V̂[:, c0 : c0 + HB]`` without forming V̂: values carry no RoPE, so the attention is linear in
    each of their parts, ``(p * scale) @ units @ H^T[:, cols] + (p @ z) @ up[:, cols] + sum(p) bias``. The residual
    stays in the rotated space until ``QM`` rows are left, so the per-token un-rotation and prediction
    (two ``[BT, 64] x [64, HB]`` products) become ``[QM, BT] x [BT, GS]`` and two ``QM``-row products.
    ``pz = p @ z [QM, R]`` (``PRED`` 2), ``psum = sum(p) [QM]`` (``PRED`` 1, 2)."""
    grp = c0 // GS
    unit = _grid_units(c_ptr, grid_ptr, rows, tmask, c_rl, grp, BT, GS, D, BITS, WORDS)
    scale = tl.load(s_ptr + rows.to(tl.int64) * groups + grp, mask=tmask, other=0.0).to(tl.float32)
    pu = _dot16(p.to(tl.float32) * (scale * (1.0 / GS))[None, :], unit, tl.zeros((QM, GS), tl.float32), INTERP)
    if not HELD:
        h = _unrotation_slice(hr_ptr, c0, GS, HB)
    acc = _dot16(pu, h, tl.zeros((QM, HB), tl.float32), INTERP)
    cols = c0 + tl.arange(0, HB)
    if PRED == 2:
        acc = _dot16(pz, tl.load(up_ptr + tl.arange(0, R)[:, None] * DM + cols[None, :]), acc, INTERP)
    if PRED != 0:
        acc += psum[:, None] * tl.load(bias_ptr + cols)[None, :]
    return acc


@triton.jit
def _rope_cos_sin(pos, inv_freq, rope_scale, INTERP: tl.constexpr):
    """``cos, sin`` of ``pos[:, None] * inv_freq[None, :]`` (times ``rope_scale``): the fp32 angle is reduced to
    ``[-pi, pi]`` exactly enough (Cody-Waite, two parts of 2 pi) for the hardware's approximate sine / cosine."""
    f = pos[:, None] * inv_freq[None, :]
    if INTERP:
        return tl.cos(f) * rope_scale, tl.sin(f) * rope_scale
    k = libdevice.rint(f * 0.15915494309189535)
    r = (f - k * 6.28125) - k * 0.0019353071795864769
    return libdevice.fast_cosf(r) * rope_scale, libdevice.fast_sinf(r) * rope_scale


@triton.jit
def _rows_times(x_ptr, xrow, xmask, w_ptr, w_ld, w_row0, w_col0, K: tl.constexpr, BM: tl.constexpr,
                BN: tl.constexpr, BK: tl.constexpr, acc, INTERP: tl.constexpr):
    """``acc + X[:, 0:K] @ W[w_row0 : w_row0 + K, w_col0 : w_col0 + BN]`` with ``X`` rows at ``x_ptr + xrow``
    (``[BM]`` int64 offsets, unit column stride) and ``W`` row-major with leading dimension ``w_ld``."""
    for k0 in range(0, K, BK):
        kk = k0 + tl.arange(0, BK)
        a = tl.load(x_ptr + xrow[:, None] + kk[None, :], mask=xmask[:, None], other=0.0, cache_modifier=".cg")
        w = tl.load(w_ptr + (w_row0 + kk)[:, None].to(tl.int64) * w_ld + w_col0 + tl.arange(0, BN)[None, :])
        acc = _dot16(a, w, acc, INTERP)
    return acc


@triton.jit
def _low_rank_bias_residual(acc, z, up_ptr, bias_ptr, R: tl.constexpr, c_ptr, s_ptr, grid_ptr, hr_ptr, h, rows,
                            tmask, c_rl, groups, c0, zrow, DM: tl.constexpr, BT: tl.constexpr, HB: tl.constexpr,
                            GS: tl.constexpr, D: tl.constexpr, BITS: tl.constexpr, WORDS: tl.constexpr,
                            PRED: tl.constexpr, HELD: tl.constexpr, Z8: tl.constexpr, INTERP: tl.constexpr):
    """``acc [BT, HB]`` (fp32, the full-rank prediction: ``PRED`` 1) of columns ``c0 .. c0+HB`` + the low-rank
    prediction ``z [BT, R] @ up[:, cols]`` (``PRED`` 2) + the bias (``PRED`` 1, 2) + the dequantized residual: half a
    head of K̂ or V̂. The prediction accumulates onto the residual, so one ``[BT, HB]`` accumulator is live: two
    spilled the stored kernel's registers (``benchmarks/kernel_registers.py``, decode.md round 18)."""
    cols = c0 + tl.arange(0, HB)
    # Z8: z, up float8, out = (residual / zrow + z @ up) * zrow with zrow [BT] the product's scale per token (else 1)
    out = _deq_fast(c_ptr, s_ptr, grid_ptr, hr_ptr, h, rows, tmask, c_rl, groups, c0, zrow, BT, HB, GS, D, BITS, WORDS,
                    HELD, INTERP)
    if Z8:  # up^T [DM, R] row-major: the [R, HB] operand is K-major, as float8 wgmma reads it
        out = _dot8(z, tl.load(up_ptr + tl.arange(0, R)[:, None] + cols[None, :] * R), out, INTERP) * zrow[:, None]
    if PRED == 1:
        out += acc
    if PRED == 2 and not Z8:
        out = _dot16(z, tl.load(up_ptr + tl.arange(0, R)[:, None] * DM + cols[None, :]), out, INTERP)
    if PRED != 0:
        out += tl.load(bias_ptr + cols)[None, :]
    return out


@triton.jit
def _head_times(xl, xh, w_ptr, c0, R: tl.constexpr, HB: tl.constexpr, acc, INTERP: tl.constexpr):
    """``acc + [xl | xh] @ W[c0 : c0 + 2 HB, 0:R]``: one head's columns of a ``[BT, D]`` row block times the
    matching rows of a row-major ``W [D, R]``."""
    w_rows = (c0 + tl.arange(0, HB))[:, None] * R + tl.arange(0, R)[None, :]
    acc = _dot16(xl, tl.load(w_ptr + w_rows), acc, INTERP)
    return _dot16(xh, tl.load(w_ptr + (w_rows + HB * R)), acc, INTERP)


@triton.jit
def _value_latents(prev_ptr, srow, tmask, zs_ptr, rows, off, RV: tl.constexpr, STORED: tl.constexpr):
    """``[BT, RV]`` float32 value-predictor inputs from ``prev``'s columns ``off .. off + RV``: the previous layer's
    hand-on, or (``STORED``) the tokens' own float8 ``z^V`` times its per-token scale."""
    zv = tl.load(prev_ptr + srow[:, None] + off + tl.arange(0, RV)[None, :], mask=tmask[:, None],
                 other=0.0).to(tl.float32)
    if STORED:
        zv = zv * tl.load(zs_ptr + rows * 2 + 1, mask=tmask, other=0.0)[:, None]
    return zv


# Integers that change from step to step (lengths, tile counts, strides of growing buffers) are not specialized on
# (Triton would compile a variant for each divisibility-by-16 pattern they pass through: seconds of stall mid-decode).
@triton.jit(do_not_specialize=["pos_sb", "C", "NT"])
def _decode_attention_kernel(
    q_ptr, q_sb, q_sh, q_st,
    kc_ptr, kc_rl, ks_ptr, k_groups, kgrid_ptr, khr_ptr,
    vc_ptr, vc_rl, vs_ptr, v_groups, vgrid_ptr, vhr_ptr,
    prev_ptr, cur_ptr, s_sb, s_st, zs_ptr,
    kw_ptr, kb_ptr, ka_ptr, kup_ptr, kup_scale,
    vw_ptr, vb_ptr, va_ptr, vup_ptr, ka2_ptr, va2_ptr,
    pos_ptr, pos_sb, inv_freq_ptr, rope_scale,
    mask_ptr, p_ptr, o_ptr, lse_ptr,
    C, NT, HQ, QLEN, scale_log2,
    DM: tl.constexpr, H: tl.constexpr, HD: tl.constexpr, GQ: tl.constexpr, QM: tl.constexpr, BT: tl.constexpr,
    BK: tl.constexpr,
    KPRED: tl.constexpr, VPRED: tl.constexpr, RK: tl.constexpr, RV: tl.constexpr,
    PROJ: tl.constexpr, RK2: tl.constexpr, RV2: tl.constexpr, STORED: tl.constexpr, DEFER_V: tl.constexpr,
    Z8: tl.constexpr,
    GS_K: tl.constexpr, D_K: tl.constexpr, BITS_K: tl.constexpr, WORDS_K: tl.constexpr,
    GS_V: tl.constexpr, D_V: tl.constexpr, BITS_V: tl.constexpr, WORDS_V: tl.constexpr,
    HAS_MASK: tl.constexpr, INTERP: tl.constexpr,
):
    """Attention of all query heads to one tile of ``BT`` compressed tokens of batch row ``b``.

    Predictors: ``KPRED``/``VPRED`` 0 none, 1 full weight ``[K_in, DM]``, 2 low rank ``a [K_in, R] @ up [R, DM]``;
    the value predictor's input is ``[K̂_l, V̂_{l-1}]``. ``STORED``: the tokens' own projections ``[z^K | z^V]``
    (float8, scales ``zs``) are ``prev`` and nothing is handed on: no layer reads another's reconstruction;
    ``DEFER_V``: the value predictor's low-rank term is left out (:func:`_latent_values_kernel` adds it); ``Z8``:
    stored ``z^K`` times the key predictor's float8 ``up`` (``kup`` is ``up^T [DM, RK]``, ``kup_scale`` its scale)
    on float8 tensor cores (:func:`aquakv.codec.round_factor`).
    Otherwise the scratch hands layer ``l``'s reconstruction to layer
    ``l+1``: ``prev`` holds what layer ``l`` reads, ``cur`` receives what layer ``l+1`` reads (the same buffer unless a
    predictor is full rank: each input is read before its columns are overwritten). Rows are either the full
    reconstruction ``[K̂ (DM columns) | V̂ (DM)]`` pre-RoPE, or, with ``PROJ`` (every predictor low rank or absent),
    only the next layer's low-rank projections of it, ``[K̂ @ a^K_{l+1} (RK2 columns) | V̂ @ a^V_{l+1}[DM:] (RV2)]``
    (``ka2`` / ``va2``; ``RK2 = 0`` / ``RV2 = 0``: nothing to hand on): 16x fewer scratch bytes at rank D/16, and the
    projections are computed from the tiles already in registers.

    Two passes over the heads, each head's tile kept in registers: (1) K̂ of head ``h``, RoPE'd, scored by its
    ``GQ`` query heads; the normalized probabilities ``[QM, BT]`` go to the program's slot of ``p`` (bf16,
    L2-resident) and the log-sum-exp (natural log) to ``lse``; (2) V̂ of head ``h`` times the probabilities read back
    -> the tile's normalized output ``o`` per (query head, query row).
    """
    tile = tl.program_id(0)
    b = tl.program_id(1)
    HB: tl.constexpr = HD // 2
    t = tile * BT + tl.arange(0, BT)
    tmask = t < C
    rows = b * C + t  # rows of the codes / scales
    srow = b.to(tl.int64) * s_sb + t.to(tl.int64) * s_st  # scratch rows
    half = tl.arange(0, HB)
    m = tl.arange(0, QM)
    rvalid = m < GQ * QLEN
    g = m // QLEN
    qi = m % QLEN
    p_prog = p_ptr + (b.to(tl.int64) * NT + tile) * (H * QM * BT)  # this program's probabilities [H, QM, BT]
    pslot = m[:, None] * BT + tl.arange(0, BT)[None, :]
    kvalid = tmask
    if HAS_MASK:
        kvalid = kvalid & (tl.load(mask_ptr + b.to(tl.int64) * C + t, mask=tmask, other=0) != 0)

    # ---- pass 1, keys: K̂_l = P^K(K̂_{l-1}) + deq(R^K) per head; scores and probabilities; hand-on of K̂_l
    zk = 0.0  # the low-rank projections, read only where KPRED / VPRED == 2
    zv = 0.0
    zrow = 1.0  # Z8: the key prediction's scale per token (z^K's times up's)
    if PROJ:  # layer l-1 wrote them: [K̂_{l-1} @ a^K (RK) | V̂_{l-1} @ a^V[DM:] (RV)]; STORED: the tokens' own
        if KPRED == 2:  # [z^K (RK) | z^V (RV)] in fp8, each part times its per-token scale (zs [rows, 2])
            zk = tl.load(prev_ptr + srow[:, None] + tl.arange(0, RK)[None, :], mask=tmask[:, None], other=0.0)
            if Z8:  # z^K as stored, times up8 (float8 tensor cores), then times the scales (kept normal: the
                # residual is divided by it; a token whose z^K is all zero has scale 1)
                zrow = tl.maximum(tl.load(zs_ptr + rows * 2, mask=tmask, other=1.0) * kup_scale, 1e-30)
            else:
                zk = zk.to(tl.float32)
                if STORED:  # times the token's scale and up8's (kup holds up8 exactly)
                    zk = zk * (tl.load(zs_ptr + rows * 2, mask=tmask, other=0.0) * kup_scale)[:, None]
                zk = zk.to(kup_ptr.dtype.element_ty)
        if VPRED == 2 and not STORED:  # (stored: read in pass 2, so it does not live through pass 1)
            zv = _value_latents(prev_ptr, srow, tmask, zs_ptr, rows, RK if KPRED == 2 else 0, RV, False)
    else:
        if KPRED == 2:
            zk = _rows_times(prev_ptr, srow, tmask, ka_ptr, RK, 0, 0, DM, BT, RK, BK,
                             tl.zeros((BT, RK), tl.float32), INTERP).to(kup_ptr.dtype.element_ty)
        tl.debug_barrier()  # every warp has read K̂_{l-1} before any overwrites it with K̂_l
    # every head at the same offsets of its groups: the slices read once (projected / stored: the full hand-on at
    # rank 256 ran 11% slower with them held through its loops, decode.md round 20)
    SAME_K: tl.constexpr = HD % GS_K == 0 and PROJ
    kh_lo, kh_hi = _unrotation(khr_ptr, GS_K, HB, SAME_K)
    kd = cur_ptr.dtype.element_ty if not PROJ else q_ptr.dtype.element_ty  # K̂, V̂ tiles: scratch / model dtype
    nk = tl.zeros((BT, RK2 if RK2 > 0 else 16), tl.float32)  # K̂_l @ a^K_{l+1}
    for h in range(H):
        c0 = h * HD
        acc_l = tl.zeros((BT, HB), tl.float32)
        acc_h = tl.zeros((BT, HB), tl.float32)
        if KPRED == 1:
            acc_l = _rows_times(prev_ptr, srow, tmask, kw_ptr, DM, 0, c0, DM, BT, HB, BK, acc_l, INTERP)
            acc_h = _rows_times(prev_ptr, srow, tmask, kw_ptr, DM, 0, c0 + HB, DM, BT, HB, BK, acc_h, INTERP)
        kl = _low_rank_bias_residual(acc_l, zk, kup_ptr, kb_ptr, RK, kc_ptr, ks_ptr, kgrid_ptr, khr_ptr, kh_lo, rows,
                                     tmask, kc_rl, k_groups, c0, zrow, DM, BT, HB, GS_K, D_K, BITS_K, WORDS_K, KPRED,
                                     SAME_K, Z8, INTERP).to(kd)
        kh = _low_rank_bias_residual(acc_h, zk, kup_ptr, kb_ptr, RK, kc_ptr, ks_ptr, kgrid_ptr, khr_ptr, kh_hi, rows,
                                     tmask, kc_rl, k_groups, c0 + HB, zrow, DM, BT, HB, GS_K, D_K, BITS_K, WORDS_K,
                                     KPRED, SAME_K, Z8, INTERP).to(kd)
        if PROJ:
            if VPRED == 2 and not STORED:  # zv += K̂_l[:, head h] @ a[head h rows]
                zv = _head_times(kl, kh, va_ptr, c0, RV, HB, zv, INTERP)
            if RK2 > 0:
                nk = _head_times(kl, kh, ka2_ptr, c0, RK2, HB, nk, INTERP)
        else:
            tl.store(cur_ptr + srow[:, None] + c0 + half[None, :], kl, mask=tmask[:, None])
            tl.store(cur_ptr + srow[:, None] + c0 + HB + half[None, :], kh, mask=tmask[:, None])
        # RoPE at the tokens' positions (K̂ rounded to kd first, as the reference rounds it), then the scores
        pos = tl.load(pos_ptr + b.to(tl.int64) * pos_sb + t, mask=tmask, other=0).to(tl.float32)
        cos, sin = _rope_cos_sin(pos, tl.load(inv_freq_ptr + half), rope_scale, INTERP)  # (in the loop: not hoisted)
        qhead = h * GQ + g
        qoff = b.to(tl.int64) * q_sb + qhead.to(tl.int64) * q_sh + qi.to(tl.int64) * q_st
        ql = tl.load(q_ptr + qoff[:, None] + half[None, :], mask=rvalid[:, None], other=0.0)
        qh = tl.load(q_ptr + qoff[:, None] + HB + half[None, :], mask=rvalid[:, None], other=0.0)
        rd = tl.float32 if INTERP else q_ptr.dtype.element_ty  # RoPE in the model's dtype, as the model applies it
        rl = kl.to(rd)  # (bf16 tiles: half the registers of fp32, the kernel's peak; the interpreter stays fp32)
        rh = kh.to(rd)
        cos = cos.to(rd)
        sin = sin.to(rd)
        s = _dot16(ql, tl.trans(rl * cos - rh * sin), tl.zeros((QM, BT), tl.float32), INTERP)
        s = _dot16(qh, tl.trans(rh * cos + rl * sin), s, INTERP) * scale_log2
        s = tl.where(kvalid[None, :], s, float("-inf"))
        mx = tl.max(s, axis=1)
        mx = tl.where(mx == float("-inf"), 0.0, mx)
        p = tl.exp2(s - mx[:, None])
        lsum = tl.sum(p, axis=1)
        p = p * tl.where(lsum > 0, 1.0 / lsum, 0.0)[:, None]
        tl.store(p_prog + (h * (QM * BT) + pslot), p.to(p_ptr.dtype.element_ty), mask=rvalid[:, None])
        part = ((b * HQ + qhead).to(tl.int64) * QLEN + qi) * NT + tile
        tl.store(lse_ptr + part, tl.where(lsum > 0, (mx + tl.log2(lsum)) * LN2, float("-inf")), mask=rvalid)
    tl.debug_barrier()  # K̂_l of every head and the probabilities are written (read back through L2: ".cg" loads)
    if PROJ:  # every input of prev was read before the barrier
        if RK2 > 0:
            tl.store(cur_ptr + srow[:, None] + tl.arange(0, RK2)[None, :], nk.to(cur_ptr.dtype.element_ty),
                     mask=tmask[:, None])

    # ---- pass 2, values: V̂_l = P^V([K̂_l, V̂_{l-1}]) + deq(R^V) per head; outputs; hand-on of V̂_l
    SAME_V: tl.constexpr = HD % GS_V == 0 and PROJ
    vh_lo, vh_hi = _unrotation(vhr_ptr, GS_V, HB, SAME_V)
    if STORED and VPRED == 2 and not DEFER_V:
        zv = _value_latents(prev_ptr, srow, tmask, zs_ptr, rows, RK if KPRED == 2 else 0, RV, True)
    # DEFER_V: the value predictor's low-rank term is left to _latent_values_kernel (after the merge), the bias kept
    VP: tl.constexpr = 1 if DEFER_V else VPRED
    if PROJ and RV2 == 0:  # nothing to hand on: attend in the rotated / latent space (_attend_rotated), no V̂ tile
        if VP == 2:
            zv = zv.to(vup_ptr.dtype.element_ty)
        for h in range(H):
            c0 = h * HD
            p = tl.load(p_prog + (h * (QM * BT) + pslot), mask=rvalid[:, None], other=0.0, cache_modifier=".cg")
            psum = tl.sum(p.to(tl.float32), axis=1)
            pz = 0.0
            if VP == 2:
                pz = _dot16(p, zv, tl.zeros((QM, RV), tl.float32), INTERP)
            part = ((b * HQ + h * GQ + g).to(tl.int64) * QLEN + qi) * NT + tile
            ol = _attend_rotated(p, psum, pz, vup_ptr, vb_ptr, RV, vc_ptr, vs_ptr, vgrid_ptr, vhr_ptr, vh_lo, rows,
                                 tmask, vc_rl, v_groups, c0, DM, QM, BT, HB, GS_V, D_V, BITS_V, WORDS_V, VP, SAME_V,
                                 INTERP)
            tl.store(o_ptr + part[:, None] * HD + half[None, :], ol, mask=rvalid[:, None])
            oh = _attend_rotated(p, psum, pz, vup_ptr, vb_ptr, RV, vc_ptr, vs_ptr, vgrid_ptr, vhr_ptr, vh_hi, rows,
                                 tmask, vc_rl, v_groups, c0 + HB, DM, QM, BT, HB, GS_V, D_V, BITS_V, WORDS_V, VP,
                                 SAME_V, INTERP)
            tl.store(o_ptr + part[:, None] * HD + HB + half[None, :], oh, mask=rvalid[:, None])
    else:  # V̂ of each head formed: the next layer reads it
        if VPRED == 2:
            if not PROJ:  # [K̂_l | V̂_{l-1}] @ a from the scratch: no [BT, RV] accumulator live through pass 1
                zv = _rows_times(cur_ptr, srow, tmask, va_ptr, RV, 0, 0, DM, BT, RV, BK, tl.zeros((BT, RV), tl.float32),
                                 INTERP)
                zv = _rows_times(prev_ptr + DM, srow, tmask, va_ptr, RV, DM, 0, DM, BT, RV, BK, zv, INTERP)
                tl.debug_barrier()  # every warp has read V̂_{l-1} before any overwrites it with V̂_l
            zv = zv.to(vup_ptr.dtype.element_ty)  # complete: only its bf16 operand is needed from here on
        nv = tl.zeros((BT, RV2 if RV2 > 0 else 16), tl.float32)  # V̂_l @ a^V_{l+1}[DM:]
        for h in range(H):
            c0 = h * HD
            acc_l = tl.zeros((BT, HB), tl.float32)
            acc_h = tl.zeros((BT, HB), tl.float32)
            if VPRED == 1:  # (reads V̂_{l-1} of every head: the host then gives cur its own buffer)
                acc_l = _rows_times(cur_ptr, srow, tmask, vw_ptr, DM, 0, c0, DM, BT, HB, BK, acc_l, INTERP)
                acc_l = _rows_times(prev_ptr + DM, srow, tmask, vw_ptr, DM, DM, c0, DM, BT, HB, BK, acc_l, INTERP)
                acc_h = _rows_times(cur_ptr, srow, tmask, vw_ptr, DM, 0, c0 + HB, DM, BT, HB, BK, acc_h, INTERP)
                acc_h = _rows_times(prev_ptr + DM, srow, tmask, vw_ptr, DM, DM, c0 + HB, DM, BT, HB, BK, acc_h,
                                    INTERP)
            vl = _low_rank_bias_residual(acc_l, zv, vup_ptr, vb_ptr, RV, vc_ptr, vs_ptr, vgrid_ptr, vhr_ptr, vh_lo,
                                         rows, tmask, vc_rl, v_groups, c0, 1.0, DM, BT, HB, GS_V, D_V, BITS_V,
                                         WORDS_V, VPRED, SAME_V, False, INTERP).to(kd)
            vh = _low_rank_bias_residual(acc_h, zv, vup_ptr, vb_ptr, RV, vc_ptr, vs_ptr, vgrid_ptr, vhr_ptr, vh_hi,
                                         rows, tmask, vc_rl, v_groups, c0 + HB, 1.0, DM, BT, HB, GS_V, D_V, BITS_V,
                                         WORDS_V, VPRED, SAME_V, False, INTERP).to(kd)
            if PROJ:
                if RV2 > 0:
                    nv = _head_times(vl, vh, va2_ptr + DM * RV2, c0, RV2, HB, nv, INTERP)
            else:
                tl.store(cur_ptr + DM + srow[:, None] + c0 + half[None, :], vl, mask=tmask[:, None])
                tl.store(cur_ptr + DM + srow[:, None] + c0 + HB + half[None, :], vh, mask=tmask[:, None])
            p = tl.load(p_prog + (h * (QM * BT) + pslot), mask=rvalid[:, None], other=0.0, cache_modifier=".cg")
            part = ((b * HQ + h * GQ + g).to(tl.int64) * QLEN + qi) * NT + tile
            tl.store(o_ptr + part[:, None] * HD + half[None, :], _dot16(p, vl, tl.zeros((QM, HB), tl.float32), INTERP),
                     mask=rvalid[:, None])
            tl.store(o_ptr + part[:, None] * HD + HB + half[None, :],
                     _dot16(p, vh, tl.zeros((QM, HB), tl.float32), INTERP), mask=rvalid[:, None])
        if PROJ:
            if RV2 > 0:
                tl.store(cur_ptr + srow[:, None] + RK2 + tl.arange(0, RV2)[None, :], nv.to(cur_ptr.dtype.element_ty),
                         mask=tmask[:, None])


@triton.jit
def _softmax_fold(m_i, l_i, acc, s, vals):
    """Online softmax, base 2: fold scores ``s [N]`` (``-inf`` = skip) and their values ``vals [N, HD]`` into the
    running max ``m_i [1]``, sum ``l_i [1]`` and unnormalized output ``acc [HD]``."""
    m_new = tl.maximum(m_i, tl.max(s, 0))
    m_ref = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_ref)
    p = tl.exp2(s - m_ref)
    return m_new, l_i * alpha + tl.sum(p, 0), acc * alpha + tl.sum(p[:, None] * vals, 0)


@triton.jit(do_not_specialize=["k_sb", "k_sh", "k_st", "v_sb", "v_sh", "v_st", "m_sb", "m_sq", "m_sk", "TE", "C",
                               "NT"])
def _exact_merge_kernel(
    q_ptr, q_sb, q_sh, q_st,
    k_ptr, k_sb, k_sh, k_st, v_ptr, v_sb, v_sh, v_st,
    mask_ptr, m_sb, m_sq, m_sk, m_thr,
    po_ptr, plse_ptr, out_ptr, lse_out_ptr,
    TE, te_ptr, SINKS, C, NT, HQ, GQ, QLEN, scale_log2,
    HD: tl.constexpr, DC: tl.constexpr, BE: tl.constexpr, BN: tl.constexpr, HAS_MASK: tl.constexpr,
    CAUSAL: tl.constexpr, LSE_OUT: tl.constexpr, TE_DEVICE: tl.constexpr,
):
    """One query row ``(b, hq, qi)``: attention to the ``TE`` exact keys / values ``[B, Hkv, TE, HD]`` of its KV head
    (``[sinks | window]``; mask column of exact token ``t``: ``t`` for a sink, ``t + C`` after the ``C`` compressed
    tokens), merged with the ``NT`` normalized tile partials ``po [B, HQ, QLEN, NT, HD]`` / ``plse`` (natural log) of
    the compressed tokens -> ``out [B, QLEN, HQ, HD]`` in ``out``'s dtype. Mask: ``mask[b, qi, col] > m_thr``
    (``HAS_MASK``), else causal inside the new tokens (``CAUSAL``), else every key. Each program writes ``DC`` of
    the ``HD`` output columns (program axis 1): the scores need the whole head, the values and partials only those
    columns, so ``HD / DC`` programs share a row's reads (one program per row used 32 SMs at batch 1).
    ``TE_DEVICE``: ``TE`` is read from ``te_ptr`` (int32 ``[1]``): a CUDA graph replays the launch while the exact
    segment grows (:mod:`aquakv.graphs`)."""
    row = tl.program_id(0)  # (b * HQ + hq) * QLEN + qi: the partials' row
    qi = row % QLEN
    hq = (row // QLEN) % HQ
    b = row // (QLEN * HQ)
    d = tl.arange(0, HD)
    dc = tl.program_id(1) * DC + tl.arange(0, DC)  # this program's output columns
    q = tl.load(q_ptr + b.to(tl.int64) * q_sb + hq * q_sh + qi * q_st + d).to(tl.float32) * scale_log2
    m_i = tl.full((1,), float("-inf"), tl.float32)
    l_i = tl.zeros((1,), tl.float32)
    acc = tl.zeros((DC,), tl.float32)
    h = hq // GQ
    if TE_DEVICE:
        TE = tl.load(te_ptr)
    for t0 in range(0, TE, BE):
        t = t0 + tl.arange(0, BE)
        tm = t < TE
        k = tl.load(k_ptr + b.to(tl.int64) * k_sb + h * k_sh + t[:, None] * k_st + d[None, :], mask=tm[:, None],
                    other=0.0).to(tl.float32)
        v = tl.load(v_ptr + b.to(tl.int64) * v_sb + h * v_sh + t[:, None] * v_st + dc[None, :], mask=tm[:, None],
                    other=0.0).to(tl.float32)
        col = tl.where(t < SINKS, t, t + C)
        if HAS_MASK:
            tm = tm & (tl.load(mask_ptr + b.to(tl.int64) * m_sb + qi * m_sq + col * m_sk, mask=tm,
                               other=0).to(tl.float32) > m_thr)
        if CAUSAL:
            tm = tm & (col <= qi + (TE + C - QLEN))
        s = tl.where(tm, tl.sum(k * q[None, :], 1), float("-inf"))
        m_i, l_i, acc = _softmax_fold(m_i, l_i, acc, s, v)
    for n0 in range(0, NT, BN):
        n = n0 + tl.arange(0, BN)
        nm = n < NT
        part = row.to(tl.int64) * NT + n
        lse = tl.load(plse_ptr + part, mask=nm, other=float("-inf")) * LOG2E
        o = tl.load(po_ptr + part[:, None] * HD + dc[None, :], mask=nm[:, None], other=0.0)
        m_i, l_i, acc = _softmax_fold(m_i, l_i, acc, lse, o)
    out = tl.where(l_i > 0, acc / l_i, 0.0)
    tl.store(out_ptr + ((b.to(tl.int64) * QLEN + qi) * HQ + hq) * HD + dc, out.to(out_ptr.dtype.element_ty))
    if LSE_OUT:  # the row's log-sum-exp over every segment (natural log): _latent_values_kernel's normalizer
        one = tl.arange(0, 1)
        tl.store(lse_out_ptr + row + one, tl.where(l_i > 0, (m_i + tl.log2(l_i)) * LN2, float("-inf")),
                 mask=(tl.program_id(1) == 0) & (one == 0))


@triton.jit(do_not_specialize=["z_sb", "z_st", "C", "NT", "CH"])
def _latent_values_kernel(p_ptr, lse_ptr, lsef_ptr, z_ptr, z_sb, z_st, zs_ptr, part_ptr, C, NT, CH, HQ, QLEN,
                          H: tl.constexpr, GQ: tl.constexpr, QM: tl.constexpr, BT: tl.constexpr, MB: tl.constexpr,
                          RV: tl.constexpr, BS: tl.constexpr, INTERP: tl.constexpr):
    """The value predictor's latent term of stored projections, ``sum_t P[row, t] s_t z^V_t`` over the tokens
    ``c*CH .. c*CH + CH`` of batch row ``b`` for query rows ``mb*MB ..`` (row = ``(hq, qi)``), into
    ``part [B, chunks, rows, RV]`` (float32). ``P`` are the final probabilities: the decode kernel's per-tile ones
    ``p`` (its ``[B*NT, H, QM, BT]`` slots) times ``exp(lse_tile - lse_row)`` (the merge's normalizer). Values carry no
    RoPE, so this part of the attention is linear in ``z^V``: summed over every token first, then one ``up`` product
    per row (:func:`_latent_up_kernel`), instead of a ``[BT, RV]`` operand held in every decode program."""
    c = tl.program_id(0)
    b = tl.program_id(1)
    m = tl.program_id(2) * MB + tl.arange(0, MB)
    mvalid = m < HQ * QLEN
    hq = m // QLEN
    qi = m % QLEN
    h = hq // GQ
    row = (b * HQ + hq).to(tl.int64) * QLEN + qi
    lsef = tl.load(lsef_ptr + row, mask=mvalid, other=float("-inf"))
    lsef = tl.where(lsef == float("-inf"), float("inf"), lsef)  # a row with no key: every weight 0
    s = tl.arange(0, BS)
    r = tl.arange(0, RV)
    acc = tl.zeros((MB, RV), tl.float32)
    for t0 in range(c * CH, tl.minimum(c * CH + CH, C), BS):  # BS divides BT: one decode tile per step
        t = t0 + s
        tmask = t < C
        tile = t0 // BT
        w = tl.exp(tl.load(lse_ptr + row * NT + tile, mask=mvalid, other=float("-inf")) - lsef)
        poff = ((b.to(tl.int64) * NT + tile) * H + h) * (QM * BT) + ((hq % GQ) * QLEN + qi) * BT + t0 % BT
        p = tl.load(p_ptr + poff[:, None] + s[None, :], mask=mvalid[:, None] & tmask[None, :], other=0.0)
        zs = tl.load(zs_ptr + (b.to(tl.int64) * C + t) * 2 + 1, mask=tmask, other=0.0)
        z = tl.load(z_ptr + b.to(tl.int64) * z_sb + t.to(tl.int64)[:, None] * z_st + r[None, :], mask=tmask[:, None],
                    other=0.0)
        acc = _dot16(p.to(tl.float32) * w[:, None] * zs[None, :], z, acc, INTERP)
    part = (b.to(tl.int64) * tl.num_programs(0) + c) * (tl.num_programs(2) * MB) + m
    tl.store(part_ptr + part[:, None] * RV + r[None, :], acc)


@triton.jit(do_not_specialize=["CHUNKS", "ROWS"])
def _latent_up_kernel(part_ptr, up_ptr, o_ptr, CHUNKS, ROWS, QLEN, GQ, HD: tl.constexpr, RV: tl.constexpr,
                      DM: tl.constexpr, BR: tl.constexpr, CB: tl.constexpr):
    """Query row ``r = (hq, qi)`` of batch row ``b``, ``up`` rows ``k = kb*BR .. kb*BR + BR``: ``o[b, r, kb] = (sum over
    chunks of part[b, chunk, r, k]) @ up[k, head columns]``, the partial sums of :func:`_latent_values_kernel`
    (``[B, CHUNKS, ROWS, RV]``, ``CB`` chunks per load) through one block of the head's ``up`` rows (``[HD]``
    float32; :func:`_latent_add_kernel` adds the blocks). Split over ``up``'s rows so that batch 1 has enough
    programs: one program per query row (32 at batch 1) took 0.017 ms a layer for 64 chunks (decode.md round 22)."""
    r = tl.program_id(0)
    b = tl.program_id(1)
    kb = tl.program_id(2)
    k = kb * BR + tl.arange(0, BR)
    d = tl.arange(0, HD)
    pz = tl.zeros((BR,), tl.float32)
    for c0 in range(0, CHUNKS, CB):
        c = c0 + tl.arange(0, CB)
        off = ((b.to(tl.int64) * CHUNKS + c) * ROWS + r) * RV
        pz += tl.sum(tl.load(part_ptr + off[:, None] + k[None, :], mask=(c < CHUNKS)[:, None], other=0.0), 0)
    w = tl.load(up_ptr + k[:, None] * DM + ((r // QLEN) // GQ) * HD + d[None, :]).to(tl.float32)
    dst = ((b.to(tl.int64) * tl.num_programs(0) + r) * tl.num_programs(2) + kb) * HD + d
    tl.store(o_ptr + dst, tl.sum(pz[:, None] * w, 0))


@triton.jit
def _latent_add_kernel(o_ptr, out_ptr, QLEN, HQ, HD: tl.constexpr, KB: tl.constexpr):
    """``out[b, qi, hq] += sum over kb of o[b, r, kb]`` (:func:`_latent_up_kernel`'s blocks, in a fixed order)."""
    r = tl.program_id(0)  # hq * QLEN + qi
    b = tl.program_id(1)
    d = tl.arange(0, HD)
    rows = (b.to(tl.int64) * (HQ * QLEN) + r) * KB + tl.arange(0, KB)
    o = tl.sum(tl.load(o_ptr + rows[:, None] * HD + d[None, :]), 0)
    dst = out_ptr + ((b.to(tl.int64) * QLEN + r % QLEN) * HQ + r // QLEN) * HD + d
    tl.store(dst, (tl.load(dst).to(tl.float32) + o).to(out_ptr.dtype.element_ty))
