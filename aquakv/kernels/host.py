"""Host wrappers of the codec kernels: quantize, dequantize, the predict + dequantize + RoPE epilogue, and the
reconstruct-then-attend read of a layer's compressed tokens (:func:`read_compressed`).

Tensor-level API (codes, scales, grids): this module never imports :mod:`aquakv.quantize`, which dispatches here.
"""

from __future__ import annotations

import weakref
from dataclasses import dataclass

import torch

from aquakv.config import QuantizerConfig
from aquakv.kernels import HAS_TRITON, supports
from aquakv.kernels.settings import INTERPRET, KernelSettings
from aquakv.packing import packed_bytes
from aquakv.predictors import kernel_rank

if HAS_TRITON:
    import triton

    from aquakv.kernels.jit import _dequantize_kernel, _fused_kernel, _quantize_kernel

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



# ------------------------------------------------------------------------------------------------------ host wrappers


def _block_rows(group_size: int) -> int:
    """Rows per program of the group-tiled kernels: about 4096 values in flight."""
    return max(16, min(128, 4096 // group_size))


def quantize(x: torch.Tensor, grid: torch.Tensor, signs: torch.Tensor,
             cfg: QuantizerConfig) -> tuple[torch.Tensor, torch.Tensor]:
    """Kernel version of :func:`aquakv.quantize.quantize_reference` (same codes but for near-ties, same byte layout):
    ``(codes [..., row_bytes] uint8, scales [..., groups])``.

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
            x2, x2.stride(0), n, C, rot, gr, codes, row_bytes, scales, groups, cfg.scale_max,
            BM=bm, GS=g, D=d, NPTS=gr.shape[0], BITS=bits, INTERP=INTERPRET, num_warps=4)
    return codes.view(*lead, row_bytes), scales.view(*lead, groups)


def dequantize(codes: torch.Tensor, scales: torch.Tensor, channels: int, grid: torch.Tensor, signs: torch.Tensor,
               cfg: QuantizerConfig, add: torch.Tensor | None = None,
               out_dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """Kernel version of :func:`aquakv.quantize.dequantize_reference` of ``codes [..., row_bytes]``, ``scales [...,
    groups]`` -> ``[..., channels]``, optionally fused with ``+ add`` (``[..., channels]``)."""
    if not supports(cfg):
        raise ValueError(f"kernels do not support {cfg}")
    lead, groups, C = scales.shape[:-1], scales.shape[-1], channels
    g, d, bits = cfg.group_size, cfg.dim, cfg.index_bits
    n = scales.numel() // groups if groups else 0
    codes = codes.reshape(n, codes.shape[-1]).contiguous()
    scales = scales.reshape(n, groups).contiguous()
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
    q=None, grid: torch.Tensor | None = None, signs: torch.Tensor | None = None,
    cfg: QuantizerConfig | None = None,
    out: View | None = None, out2: View | None = None, rope: bool = False,
    positions: torch.Tensor | None = None, inv_freq: torch.Tensor | None = None, rope_scale: float = 1.0,
    precision: str = "bf16", block_n: int | None = None, k1: int | None = None,
    tile: tuple[int, int] | None = None,
) -> None:
    """``[a1, a2] @ weight + bias + add + deq(q)`` over ``batch * tokens`` rows and ``channels`` columns, written to
    ``out`` and/or ``out2`` (with ``rope``: RoPE at ``positions [B, >=T]`` applied there; tiles of ``head_dim``
    columns).

    ``weight [K1 + K2, channels]`` in the operand dtype (bf16 for ``precision="bf16"``, else fp32); its first ``k1``
    rows (default: all, or half with ``a2``) multiply ``a1``. Any part may be absent: no ``a1`` means no prediction,
    no ``q`` no residual; ``q`` has ``codes`` and ``scales``. ``tile``: ``(rows, warps)`` of an epilogue (no matmul).
    """
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
    else:  # an epilogue (add + residual + RoPE): `tile` or the measured default
        bm, warps = tile or (128, 8)
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


def prepare(predictor, dtype: torch.dtype, device: torch.device, low_rank: str = "auto",
            rank_multiple: int = 32) -> PreparedPredictor:
    """Kernel operands of ``predictor`` (cached per weight tensor); low-rank factors are zero-padded to a rank that is
    a multiple of ``rank_multiple`` (a power of two when ``rank_multiple`` is 0)."""
    key = (dtype, str(device), low_rank, rank_multiple)
    per = _PREPARED.get(predictor.weight)
    if key in per:
        return per[key]
    factors = predictor.factors() if low_rank == "auto" else None
    bias = predictor.bias.to(device, torch.float32).contiguous()
    bias_op = bias.to(dtype)
    if factors is None:
        prep = PreparedPredictor(bias, bias_op, weight=predictor.weight.to(device, dtype).contiguous())
    else:
        down, up = factors
        r = down.shape[1]
        target = -(-r // rank_multiple) * rank_multiple if rank_multiple else kernel_rank(r)
        if target != r:
            down = torch.cat([down, down.new_zeros(down.shape[0], target - r)], 1)
            up = torch.cat([up, up.new_zeros(target - r, up.shape[1])], 0)
        prep = PreparedPredictor(bias, bias_op, down=down.to(device, dtype).contiguous(),
                                 up=up.to(device, dtype).contiguous())
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
                 inputs: list[torch.Tensor], residual, q, out: torch.Tensor, out2: torch.Tensor | None,
                 rope: tuple | None, precision: str, gemm: str, tile: tuple[int, int] | None) -> None:
    """One of K̂ / V̂ into ``out [B, T, D]`` (and RoPE'd into ``out2 [B, H, T, hd]``): prediction from ``inputs``
    (``[B, T, D]`` each) plus the dequantized residual."""
    rope_kw = {} if rope is None else {"rope": True, "positions": rope[0], "inv_freq": rope[1], "rope_scale": rope[2]}
    common = {"q": q, "grid": residual.grid, "signs": residual.signs, "cfg": residual.config,
              "out": View.plain(out, head_dim), "out2": None if out2 is None else View.heads(out2),
              "precision": precision, "tile": tile, **rope_kw}
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


def read_compressed(layer, settings: KernelSettings, start: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Reconstruct-then-attend read of ``layer``'s compressed tokens ``start:`` on CUDA. Keys: predictor matmul
    (cuBLAS, or fused with ``settings.gemm == "triton"``), then one kernel adds the dequantized residual and writes
    both ``K̂`` (pre-RoPE, ``[B, T, D]``, for the next layer) and RoPE(``K̂``) in the attention layout. Values likewise,
    written once as ``[B, T, D]`` (returned as a ``[B, H, T, hd]`` view). ``shared.prev_old`` holds ``(K̂, V̂)``
    ``[B, T, D]`` of the same tokens in the model dtype (bf16 precision, default) or float32 (``"tf32"`` /
    ``"ieee"``); every layer of a pass must be read through this function.
    """
    shared = layer.shared
    t = layer.compressed_len - start
    if t == 0:
        shared.prev_old = None
        return layer.sink_keys[:, :, :0], layer.sink_values[:, :, :0]
    codec, block = layer.codec, layer.compressed.tail(start)
    b, h, _, hd = layer.keys.shape
    d = h * hd
    dev, dt = layer.device, layer.dtype
    precision, gemm, tile = settings.predictor, settings.gemm, settings.epilogue_tile
    operand = torch.bfloat16 if precision == "bf16" else torch.float32
    scratch = operand  # the next layer multiplies it by its predictor in this dtype
    prev = shared.prev_old
    keys_pre = torch.empty(b, t, d, dtype=scratch, device=dev)
    keys = torch.empty(b, h, t, hd, dtype=dt, device=dev)
    values_pre = torch.empty(b, t, d, dtype=scratch, device=dev)
    rotary = shared.rotary
    rope = (shared.positions[:, start:start + t].to(dev, torch.int32),
            rotary.inv_freq.to(dev, torch.float32).contiguous(), float(getattr(rotary, "attention_scaling", 1.0)))
    kp = None if codec.key_predictor is None else prepare(codec.key_predictor, operand, dev, settings.low_rank)
    vp = None if codec.value_predictor is None else prepare(codec.value_predictor, operand, dev, settings.low_rank)
    if (kp is not None or vp is not None) and prev is None:
        raise ValueError("this layer's predictors need the previous layer's reconstruction")
    tf32 = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = precision == "tf32"
    try:
        _reconstruct(b, t, d, hd, kp, [prev[0]] if kp else [], codec.keys, block.keys, keys_pre, keys, rope,
                     precision, gemm, tile)
        _reconstruct(b, t, d, hd, vp, [keys_pre, prev[1]] if vp else [], codec.values, block.values, values_pre,
                     None, None, precision, gemm, tile)
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
