"""Host side of the CUDA decode kernel (``cuda_decode.cu``): attention straight from stored projections whose key
residual is kept after RoPE (``KernelSettings(prediction="stored", key_residual="post_rope")``).

What the kernel reads, and this module prepares:

- code words in the kernel's order (:func:`kernel_order` at encode, :func:`natural_order` to read them back with
  :func:`aquakv.codec.decode`): each thread finds the codes of its tensor-core fragments in one 32-bit word;
- per layer (:func:`layer_operands`, once per codec): the key predictor's float8 ``up^T``, its bias, both grids as
  f16 pairs, the Hadamard matrices that turn the query into the key residual's rotated space and the values' partial
  sums back;
- per cache (:class:`RopeTable`): bf16 cos / sin pairs by position, grown when compressed tokens reach further.

It returns per-tile partials with the values still rotated and the value predictor's latent term summed
(``P z^V``); a second kernel of the same source merges the tiles and applies the un-rotation, ``up^V`` and the bias
once per query row (:func:`partials` launches both).
The kernel is specialized to Llama-shaped attention: head size 128, 4 or 8 KV heads, groups of 64, 16-point d=2
grids (2 bits a value), float16 scales, bf16 activations, low-rank stored predictors of rank <= 128 (:func:`fits`).
"""

from __future__ import annotations

import functools
import math
from pathlib import Path
from typing import NamedTuple

import torch

from aquakv.codec import EncodedBlock, LayerCodec, key_factor, stored_factors
from aquakv.packing import pack, unpack
from aquakv.quantize import Quantized

SOURCE = Path(__file__).with_name("cuda_decode.cu")
HEAD_DIM, GROUP = 128, 64
KV_HEADS = (4, 8)  # warps per CTA; the scale rows' copies need NG = 2 * heads to be a multiple of 8
MAX_RANK = 128
MAX_ROWS = 8  # query rows per KV head (query heads x query tokens): one tensor-core fragment's columns
STAGE = 64  # tokens per shared-memory stage; a tile is a multiple of it
TILES = (1024, 512, 256, 128, 64)
MERGE_SLICES = 4  # threads per output dim of the merge kernel (MS in the source)
MERGE_SMEM = 40 * 1024  # the merge kernel's tile weights (under 48 KB with its static arrays): 10240 tiles


def _key_permutation() -> list[int]:
    """Packed position ``8c + 2i + j`` of a key group (word ``c``, nibble ``2i + j``) holds code ``8i + 4j + c``: the
    codes at rotated dims ``16i + 2c`` and ``16i + 8 + 2c``, thread ``c``'s fragment in k-block ``i``."""
    return [8 * ((p % 8) // 2) + 4 * (p % 2) + p // 8 for p in range(32)]


def _value_permutation() -> list[int]:
    """Packed position ``8g + 4gr + m`` of a head's 64 value codes (word ``g``, nibble ``4gr + m``) holds code
    ``8m + g`` of the head's group ``gr``: rows ``g, g + 8`` of the values' m-tile ``4gr + m``."""
    return [32 * ((p % 8) // 4) + 8 * (p % 4) + p // 8 for p in range(64)]


@functools.cache
def _permutation(values: bool, inverse: bool, device: torch.device) -> torch.Tensor:
    """The key or value permutation (or its inverse) on ``device``, made once: encode and read run per compression."""
    perm = torch.tensor(_value_permutation() if values else _key_permutation())
    return (torch.argsort(perm) if inverse else perm).to(device)


def _permute(q: Quantized, values: bool, inverse: bool) -> Quantized:
    """Codes ``[..., bytes]`` of 4-bit indices, each run of a group's (keys) or a head's (values) codes reordered: new
    position ``p`` takes code ``perm[p]``."""
    perm = _permutation(values, inverse, q.codes.device)
    n = q.codes.shape[-1] * 2
    codes = unpack(q.codes, 4, n).view(*q.codes.shape[:-1], n // len(perm), len(perm))
    return Quantized(pack(codes[..., perm].flatten(-2), 4), q.scales, q.channels)


def kernel_order(block: EncodedBlock) -> EncodedBlock:
    """A block's codes in the order the kernel reads them."""
    return EncodedBlock(_permute(block.keys, False, False), _permute(block.values, True, False), block.projections)


def natural_order(block: EncodedBlock) -> EncodedBlock:
    """Inverse of :func:`kernel_order`."""
    return EncodedBlock(_permute(block.keys, False, True), _permute(block.values, True, True), block.projections)


def compiler_available() -> bool:
    """Whether this torch build compiles CUDA source at run time (NVRTC)."""
    return hasattr(torch.cuda, "_compile_kernel")


def device_fits(device: torch.device) -> bool:
    """A CUDA device with float8 tensor cores (compute capability 8.9 and up) and a runtime compiler."""
    return (device.type == "cuda" and torch.cuda.is_available() and compiler_available()
            and torch.cuda.get_device_capability(device) >= (8, 9))


def fits(codec: LayerCodec, heads: int, head_dim: int) -> bool:
    """Whether the kernel reads this layer: both predictors stored at a rank it takes, its quantizers' format, the
    model's shape. (A layer without predictors is read by the Triton kernel: see ``CudaBackend``.)"""
    if codec.key_predictor is None or codec.value_predictor is None:
        return False
    if head_dim != HEAD_DIM or heads not in KV_HEADS:
        return False
    for r in (codec.keys, codec.values):
        c = r.config
        if (c.dim, c.size, c.group_size, c.scale_dtype) != (2, 16, GROUP, "float16"):
            return False
    factors = [p.factors() for p in (codec.key_predictor, codec.value_predictor)]
    if None in factors:  # full rank: no stored projections
        return False
    rk, rv = (down.shape[1] for down, _ in factors)
    return rk % 32 == 0 and rv % 16 == 0 and max(rk, rv) <= MAX_RANK


def _stage_bytes(heads: int, rk: int, rv: int) -> int:
    """Bytes of one stage (``StageRows`` in the source)."""
    ng = 2 * heads
    return STAGE * ((ng * 4 + 4) * 4 * 2 + ng * 2 * 2 + (rk + 16) + (rv + 16) + 8 + (HEAD_DIM // 4 + 2) * 8)


class Kernel(NamedTuple):
    """The compiled decode kernel and its dynamic shared memory (``ups``: ``up8^T`` and the key bias in it), and the
    tiles' merge kernel."""

    launch: object
    smem: int
    ups: bool
    merge: object


def source(heads: int, rk: int, rv: int, ups: bool) -> str:
    """The kernel's source specialized to a shape (its compile-time parameters prepended)."""
    return (f"#define NH {heads}\n#define RK {rk}\n#define RV {rv}\n#define ZLD {rk + rv}\n#define MINB 1\n"
            f"#define STG {STAGE}\n#define UPS {int(ups)}\n") + SOURCE.read_text()


def shared_bytes(heads: int, rk: int, rv: int, ups: bool) -> int:
    """Dynamic shared memory: two stages, then (``ups``) ``up8^T`` with padded rows and the key bias."""
    return 2 * _stage_bytes(heads, rk, rv) + (heads * HEAD_DIM * (rk + 16 + 4) if ups else 0)


@functools.cache
def compile_kernel(heads: int, rk: int, rv: int, smem_limit: int) -> Kernel:
    """NVRTC-compiled once per process and shape; ``up8^T`` goes to shared memory where it fits in ``smem_limit``."""
    ups = shared_bytes(heads, rk, rv, True) <= smem_limit
    code = source(heads, rk, rv, ups)
    launch = torch.cuda._compile_kernel(code, "aquakv_decode_mma")
    smem = shared_bytes(heads, rk, rv, ups)
    launch.set_shared_memory_config(smem)
    return Kernel(launch, smem, ups, torch.cuda._compile_kernel(code, "aquakv_decode_merge"))


def _grid_pairs(grid: torch.Tensor) -> torch.Tensor:
    """Grid points ``[16, 2]`` -> ``[16]`` int32 holding each as f16x2 (low half = coordinate 0)."""
    return grid.to(torch.float16).contiguous().view(torch.int32).view(16)


def _rotation(signs: torch.Tensor) -> torch.Tensor:
    """``S = diag(signs) H`` ``[g, g]`` float32: a group's quantized units ``u`` are ``x @ S / sqrt(g)`` up to the
    scale (:func:`aquakv.hadamard.rotate`)."""
    from aquakv.kernels.host import hadamard_pm1

    return signs.float()[:, None] * hadamard_pm1(signs.shape[0]).to(signs.device)


class LayerOperands(NamedTuple):
    """One layer's constant operands on the device."""

    up8t: torch.Tensor  # e4m3 [D, RK]: the key predictor's rounded up^T
    up_scale: float
    key_bias: torch.Tensor  # [D] float32
    key_grid: torch.Tensor  # [16] int32 (f16x2)
    value_grid: torch.Tensor
    key_rotation: torch.Tensor  # [64, 64] float32: S_K / GS, the query's map into the key residual's space
    value_unrotation: torch.Tensor  # [64, 64] float32: S_V^T / GS, the values' partial sums back
    value_up: torch.Tensor  # [RV, D] float32
    value_bias: torch.Tensor  # [D] float32
    rk: int
    rv: int


def layer_operands(codec: LayerCodec) -> LayerOperands:
    """The constant operands of a layer the kernel reads (:func:`fits`), on the codec's device."""
    up8, scale = key_factor(codec.key_predictor)
    device = codec.keys.grid.device
    _, up_v = stored_factors(codec.value_predictor)
    g = codec.keys.config.group_size
    return LayerOperands(
        up8.t().contiguous().to(device), float(scale), codec.key_predictor.bias.float().contiguous().to(device),
        _grid_pairs(codec.keys.grid).to(device), _grid_pairs(codec.values.grid).to(device),
        _rotation(codec.keys.signs) / g, _rotation(codec.values.signs).t().contiguous() / g,
        up_v.float().contiguous().to(device), codec.value_predictor.bias.float().contiguous().to(device),
        up8.shape[0], up_v.shape[0])


class RopeTable:
    """bf16 cos / sin of one rotary module by position, ``[positions, HD / 4, 2]`` int32 (per frequency pair: its two
    cosines, then its two sines, as bf16x2), from the model's own rotary module (:meth:`aquakv.family.Rope.cos_sin`,
    scaling included). Grown, by doubling, to cover the positions of every compressed token: checked on the host when
    the compressed length changes (once per compression, outside CUDA-graph capture)."""

    def __init__(self, rope: object, device: torch.device):
        self.rope, self.device = rope, device
        self.table: torch.Tensor | None = None
        self.covered = 0  # compressed tokens whose positions the table covers

    def ensure(self, positions: torch.Tensor, length: int) -> torch.Tensor:
        """The table, covering ``positions [B, >= length]`` of the compressed tokens."""
        if length != self.covered:
            if torch.cuda.is_current_stream_capturing():
                raise RuntimeError("the RoPE table is checked outside CUDA-graph capture: run a step with these "
                                   "compressed tokens uncaptured first")
            need = int(positions[:, :length].max()) + 1
            have = 0 if self.table is None else self.table.shape[0]
            if need > have:
                size = max(need, 2 * have, 4096)
                cos, sin = self.rope.cos_sin(torch.arange(size, device=self.device)[None], self.device)
                pairs = [t[0, :, : HEAD_DIM // 2].to(torch.bfloat16).contiguous().view(torch.int32)
                         for t in (cos, sin)]  # [size, HD / 4]: frequencies 2j, 2j + 1
                self.table = torch.stack(pairs, -1).contiguous()
            self.covered = length
        return self.table


def tile_tokens(batch: int, length: int, device: torch.device) -> int:
    """Tokens per CTA: the largest tile that still gives two CTAs per SM."""
    sms = torch.cuda.get_device_properties(device).multi_processor_count
    for t in TILES:
        if batch * -(-length // t) >= 2 * sms:
            return t
    return TILES[-1]


def partials(query: torch.Tensor, block: EncodedBlock, length: int, ops: LayerOperands, positions: torch.Tensor,
             valid: torch.Tensor | None, scaling: float, table: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Attention partials of ``query [B, Hq, Q, 128]`` (bf16, post-RoPE) over ``length`` compressed tokens of
    ``block`` (codes in kernel order, ``[B, length, ...]``) at ``positions [B, >= length]`` (int32), ``valid [B,
    length]`` bool or None: ``(o [B, Hq, Q, 1, 128], lse [B, Hq, Q, 1])`` float32, the tiles merged (the shape
    :func:`aquakv.kernels.decode.attend_exact` takes)."""
    b, hq, q_len, hd = query.shape
    heads = block.keys.scales.shape[-1] // 2
    groups = hq // heads
    rows = groups * q_len
    kern = compile_kernel(heads, ops.rk, ops.rv, torch.cuda.get_device_properties(query.device)
                          .shared_memory_per_block_optin)
    q = query.reshape(b, heads, rows, hd).contiguous()  # row g * Q + t: query head h * G + g, token t
    qrot = (q.float().view(b, heads, rows, hd // GROUP, GROUP) @ ops.key_rotation).view(q.shape).half()
    bt = tile_tokens(b, length, query.device)
    nt = -(-length // bt)
    orot = torch.empty(b, heads, rows, nt, hd, dtype=torch.float32, device=query.device)
    pz = torch.empty(b, heads, rows, nt, ops.rv, dtype=torch.float32, device=query.device)
    lse = torch.empty(b, heads, rows, nt, dtype=torch.float32, device=query.device)
    proj = block.projections
    if block.keys.codes.shape[1] != length or not block.keys.codes.is_contiguous() or positions.stride(-1) != 1:
        raise ValueError("the CUDA decode kernel reads a whole contiguous block and positions with unit stride")
    latents = proj.latents.view(torch.uint8)
    if valid is not None:
        valid = (valid if valid.stride(-1) == 1 else valid.contiguous()).view(torch.uint8)
    kern.launch(grid=(nt, b, 1), block=(32 * heads, 1, 1), shared_mem=kern.smem, args=[
        q, qrot, block.keys.codes, block.keys.scales, block.values.codes, block.values.scales,
        latents, latents[..., ops.rk:], proj.scales, ops.up8t.view(torch.uint8), ops.key_bias, ops.key_grid,
        ops.value_grid, table, positions, valid if valid is not None else lse,
        orot, pz, lse, length, nt, bt, rows, positions.stride(0), int(valid is not None),
        valid.stride(0) if valid is not None else 0, ops.up_scale, scaling * math.log2(math.e)])
    o = torch.empty(b, heads, rows, hd, dtype=torch.float32, device=query.device)
    lse_row = torch.empty(b, heads, rows, dtype=torch.float32, device=query.device)
    if nt * 4 > MERGE_SMEM:  # 655k tokens a batch row at the smallest tile
        raise ValueError(f"{nt} tiles per batch row: more than the merge kernel holds ({MERGE_SMEM // 4})")
    kern.merge(grid=(heads, b, rows), block=(MERGE_SLICES * hd, 1, 1), shared_mem=nt * 4, args=[
        orot, pz, lse, ops.value_unrotation, ops.value_up, ops.value_bias, o, lse_row, nt, rows])
    return o.view(b, hq, q_len, 1, hd), lse_row.view(b, hq, q_len, 1)
