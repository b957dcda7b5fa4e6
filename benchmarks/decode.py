"""Decode speed and KV bytes of a Llama-3.1-8B-shaped model with DynamicCache, transformers' QuantizedCache (quanto
int2/int4) and AQUA-KV at 2 bits; per-layer cost of the predictors; codec kernel throughput vs copy bandwidth.

Random bf16 weights built on the GPU; caches are filled directly (random keys / values / codes of the right shapes,
no prefill), then ``--steps`` decode steps are timed with CUDA events after ``--warmup`` steps (median). Quality is
not measured here: only speed and bytes.

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python benchmarks/decode.py --out docs/benchmarks/decode.json

Sections: ``ceilings`` (copy bandwidth, bf16 matmul rate), ``kernels`` (quantize / dequantize / fused throughput),
``layer`` (one layer's reconstruction at T tokens: reference, matmul precisions, low rank, fused), ``e2e`` (decode).
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
import types
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aquakv import kernels  # noqa: E402
from aquakv.cache import AquaKVCache, AquaKVLayer, dynamic_cache_nbytes  # noqa: E402
from aquakv.codec import EncodedBlock, LayerCodec, gaussian_residual  # noqa: E402
from aquakv.config import CacheConfig, QuantizerConfig  # noqa: E402
from aquakv.packing import packed_bytes  # noqa: E402
from aquakv.predictors import Predictor  # noqa: E402
from aquakv.quantize import Quantized  # noqa: E402

DEV = "cuda"
T0 = time.time()
# Llama-3.1-8B; --smoke shrinks it to run on the CPU under TRITON_INTERPRET=1
SHAPE = {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "mlp": 14336, "vocab": 128256}


def log(*a: object) -> None:
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


class Timer:
    """Milliseconds between ``start()`` and ``stop()``: CUDA events on the GPU, the host clock on the CPU (smoke)."""

    def start(self) -> None:
        if DEV == "cuda":
            self.a, self.b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.a.record()
        else:
            self.t = time.perf_counter()

    def stop(self) -> float:
        if DEV == "cuda":
            self.b.record()
            self.b.synchronize()
            return self.a.elapsed_time(self.b)
        return (time.perf_counter() - self.t) * 1e3


def bench(fn, warmup: int = 2, reps: int = 10) -> float:
    """Median milliseconds of ``fn()``."""
    for _ in range(warmup):
        fn()
    if DEV == "cuda":
        torch.cuda.synchronize()
    times = []
    timer = Timer()
    for _ in range(reps):
        timer.start()
        fn()
        times.append(timer.stop())
    return statistics.median(times)


def free() -> None:
    gc.collect()
    if DEV == "cuda":
        torch.cuda.empty_cache()


# ---------------------------------------------------------------------------------------------------------- ceilings


def ceilings() -> dict:
    bw = kernels.copy_bandwidth(1 << 32)
    a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    b = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
    ms = bench(lambda: a @ b, 3, 10)
    free()
    return {"copy_bytes_per_s": bw, "bf16_matmul_flops_per_s": 2 * 8192**3 / (ms / 1e3)}


# ------------------------------------------------------------------------------------------------- synthetic caches


def make_codecs(layers: int, d: int, rank: int | None, predictors: bool = True, seed: int = 0) -> list[LayerCodec]:
    """Gaussian grids (4-bit d=2 n=256 for layer 0, 2-bit d=2 n=16 for the rest), group 64, random predictors."""
    gen = torch.Generator().manual_seed(seed)

    def predictor(d_in: int) -> Predictor:
        if rank:
            w = torch.randn(d_in, rank, generator=gen) @ torch.randn(rank, d, generator=gen) / (d_in * rank) ** 0.5
        else:
            w = torch.randn(d_in, d, generator=gen) / d_in**0.5
        return Predictor((0.5 * w).to(DEV), (0.1 * torch.randn(d, generator=gen)).to(DEV))

    codecs = []
    for i in range(layers):
        q = QuantizerConfig(dim=2, size=256 if i == 0 else 16, group_size=64)
        codec = LayerCodec(gaussian_residual(q, 2 * i), gaussian_residual(q, 2 * i + 1)).to(DEV)
        if i and predictors:
            codec.key_predictor, codec.value_predictor = predictor(d), predictor(2 * d)
        codecs.append(codec)
    return codecs


def random_block(batch: int, tokens: int, d: int, bits: int) -> Quantized:
    groups = d // 64
    codes = torch.randint(0, 256, (batch, tokens, packed_bytes(groups * 32, bits)), dtype=torch.uint8, device=DEV)
    scales = (torch.rand(batch, tokens, groups, device=DEV) * 16 + 4).half()
    return Quantized(codes, scales, d)


def fill_aquakv(cache: AquaKVCache, batch: int, kv_heads: int, head_dim: int, context: int, window: int) -> None:
    """Give every layer ``4`` exact sinks, ``context - 4 - window`` compressed tokens and an exact window."""
    d = kv_heads * head_dim
    tokens = context - 4 - window
    for layer in cache.layers:
        empty = torch.empty(batch, kv_heads, 0, head_dim, dtype=torch.bfloat16, device=DEV)
        layer.lazy_initialization(empty, empty)

        def rnd(n: int) -> torch.Tensor:
            return torch.randn(batch, kv_heads, n, head_dim, device=DEV, dtype=torch.bfloat16)

        layer.sink_keys, layer.sink_values, layer.keys, layer.values = rnd(4), rnd(4), rnd(window), rnd(window)
        bits = layer.codec.keys.config.index_bits
        layer.compressed = EncodedBlock(random_block(batch, tokens, d, bits), random_block(batch, tokens, d, bits))
        layer.compressed_len = tokens
    pos = torch.arange(4, context, dtype=torch.int32, device=DEV)
    cache.shared.positions = pos[None].expand(batch, -1).contiguous()


@contextlib.contextmanager
def fused_reads(on: bool):
    """Route ``AquaKVLayer._read_compressed`` through the fused kernels, or run everything on the PyTorch reference."""
    if not on:
        with kernels.disabled():
            yield
        return
    orig = AquaKVLayer._read_compressed
    AquaKVLayer._read_compressed = kernels.read_compressed
    try:
        yield
    finally:
        AquaKVLayer._read_compressed = orig


# ----------------------------------------------------------------------------------------------------------- kernels


def kernel_throughput(rows: int, d: int, bw: float) -> list[dict]:
    """Quantize / dequantize / fused reconstruction of ``rows x d`` values vs the copy bandwidth."""
    out = []
    codecs = make_codecs(2, d, None)
    res2, res4 = codecs[1].keys, codecs[0].keys
    x32 = torch.randn(rows, d, device=DEV) * 3
    x16 = x32.bfloat16()

    def rec(name: str, ms: float, nbytes: int, flops: float = 0.0, note: str = "") -> None:
        r = {"kernel": name, "rows": rows, "channels": d, "ms": ms, "bytes": nbytes,
             "bytes_per_s": nbytes / (ms / 1e3), "fraction_of_copy_bw": nbytes / (ms / 1e3) / bw,
             "flops_per_s": flops / (ms / 1e3) if flops else None, "note": note}
        out.append(r)
        log(f"kernel {name:42s} {ms:8.3f} ms  {r['bytes_per_s'] / 1e9:7.0f} GB/s  "
            f"{100 * r['fraction_of_copy_bw']:5.1f}% of copy bw {note}")

    for res, tag in ((res2, "2bit d2 n16 g64"), (res4, "4bit d2 n256 g64")):
        q = res.quantize(x32)
        cb = q.codes.numel() + q.scales.numel() * 2
        for x, xt in ((x32, "fp32"), (x16, "bf16")):
            ms = bench(lambda x=x, res=res: kernels.quantize(x, res.grid, res.signs, res.config))
            rec(f"quantize {tag} in={xt}", ms, x.numel() * x.element_size() + cb)
        for dt in (torch.float32, torch.bfloat16):
            ms = bench(lambda res=res, q=q, dt=dt: kernels.dequantize(q, res.grid, res.signs, res.config, out_dtype=dt))
            rec(f"dequantize {tag} out={str(dt)[6:]}", ms, cb + rows * d * torch.finfo(dt).bits // 8)
        if rows <= 1 << 18:
            with kernels.disabled():
                ms = bench(lambda res=res: res.quantize(x32), 1, 3)
                rec(f"torch reference quantize {tag}", ms, x32.numel() * 4 + cb)
                ms = bench(lambda res=res, q=q: res.dequantize(q), 1, 3)
                rec(f"torch reference dequantize {tag}", ms, cb + rows * d * 4)
    # fused: K̂ = prev @ W + b + deq, RoPE'd bf16 heads out + bf16 scratch out; bytes = the minimum this must move
    q = res2.quantize(x32)
    cb = q.codes.numel() + q.scales.numel() * 2
    hd, h = 128, d // 128
    prev = x16.view(1, rows, d)
    scratch = torch.empty(1, rows, d, dtype=torch.bfloat16, device=DEV)
    heads = torch.empty(1, h, rows, hd, dtype=torch.bfloat16, device=DEV)
    pos = (torch.arange(rows, dtype=torch.int32, device=DEV) % 32768)[None]  # decode-like positions
    inv = 1.0 / (500000 ** (torch.arange(0, hd, 2, device=DEV).float() / hd))
    q1 = Quantized(q.codes.view(1, rows, -1), q.scales.view(1, rows, -1), d)
    common = {"q": q1, "grid": res2.grid, "signs": res2.signs, "cfg": res2.config,
              "out": kernels.View.plain(scratch, hd), "out2": kernels.View.heads(heads), "rope": True,
              "positions": pos, "inv_freq": inv}
    ms = bench(lambda: kernels.predict_dequantize(1, rows, d, hd, **common))
    rec("fused deq+RoPE (no predictor)", ms, cb + 2 * rows * d * 2)
    # the epilogue kernel of the default read path: + prediction (bf16), deq, K̂ and RoPE(K̂) out; tile sweep
    add = kernels.View.plain(prev, hd)
    best = None
    for bm, warps in ((32, 4), (64, 4), (64, 8), (128, 8), (128, 4)):
        with kernels.settings(tile=(bm, warps)):
            ms = bench(lambda: kernels.predict_dequantize(1, rows, d, hd, add=add, **common))
        rec(f"epilogue add+deq+RoPE tile ({bm}, {warps} warps)", ms, cb + 3 * rows * d * 2)
        if best is None or ms < best[0]:
            best = (ms, (bm, warps))
    kernels._STATE["tile"] = best[1]
    log(f"epilogue tile chosen: {best[1]}")
    w = (torch.randn(d, d, device=DEV) / d**0.5).bfloat16()
    bias = torch.zeros(d, device=DEV)
    ms = bench(lambda: kernels.predict_dequantize(1, rows, d, hd, a1=kernels.View.plain(prev, hd), weight=w,
                                                  bias=bias, precision="bf16", **common))
    rec("triton GEMM predict(full, bf16)+deq+RoPE", ms, cb + 3 * rows * d * 2, 2 * rows * d * d)
    ms = bench(lambda: torch.addmm(bias.bfloat16(), prev.view(rows, d), w))
    rec("cuBLAS addmm full-rank bf16 (same matmul)", ms, 3 * rows * d * 2, 2 * rows * d * d)
    down = (torch.randn(d, 128, device=DEV) / d**0.5).bfloat16()
    z = torch.empty(1, rows, 128, dtype=torch.bfloat16, device=DEV)
    ms = bench(lambda: kernels.predict_dequantize(1, rows, 128, hd, a1=kernels.View.plain(prev, hd), weight=down,
                                                  out=kernels.View.plain(z, hd), precision="bf16"))
    rec("low-rank down-projection x@A (r=128), triton", ms, rows * d * 2 + rows * 128 * 2, 2 * rows * d * 128)
    ms = bench(lambda: prev.view(rows, d) @ down)
    rec("low-rank down-projection x@A (r=128), cuBLAS", ms, rows * d * 2 + rows * 128 * 2, 2 * rows * d * 128)
    free()
    try:
        for fn in (kernels._quantize_kernel, kernels._dequantize_kernel, kernels._fused_kernel):
            for cache in fn.device_caches.values():
                for ck in cache[0].values():
                    log(f"compiled {fn.__name__}: regs {ck.n_regs} spills {ck.n_spills} "
                        f"shared {ck.metadata.shared} warps {ck.metadata.num_warps}")
    except Exception as e:  # noqa: BLE001
        log(f"no compile stats: {e!r}")
    return out


# ------------------------------------------------------------------------------------------------- per-layer costs


def layer_costs(batch: int, tokens: int, kv_heads: int, head_dim: int, peak: float, bw: float) -> list[dict]:
    """One layer's read of ``tokens`` compressed tokens (keys and values) by every method."""
    d = kv_heads * head_dim
    n = batch * tokens
    out = []

    def rec(name: str, ms: float, flops: float, nbytes: float, err: tuple | None = None, note: str = "") -> None:
        floor = max(flops / peak, nbytes / bw) * 1e3
        r = {"method": name, "batch": batch, "tokens": tokens, "ms": ms, "flops": flops, "bytes": nbytes,
             "floor_ms": floor, "rel_err_keys": None if err is None else err[0],
             "rel_err_values": None if err is None else err[1], "note": note}
        out.append(r)
        e = "" if err is None else f" err K {err[0]:.1e} V {err[1]:.1e}"
        log(f"layer B={batch} T={tokens} {name:46s} {ms:8.3f} ms (floor {floor:6.3f}){e} {note}")

    from transformers import LlamaConfig
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    cfg = LlamaConfig(hidden_size=SHAPE["hidden"], num_attention_heads=SHAPE["heads"], num_key_value_heads=kv_heads,
                      head_dim=head_dim, num_hidden_layers=2, rope_theta=500000.0, max_position_embeddings=131072,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    rotary = LlamaRotaryEmbedding(cfg).to(DEV)
    kv_bytes = 2 * n * d * 2  # this layer's bf16 keys + values

    k = torch.randn(batch, kv_heads, tokens, head_dim, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    rec("copy bf16 K,V (DynamicCache cat, per layer)", bench(lambda k=k, v=v: (k.clone(), v.clone())), 0,
        2 * kv_bytes)
    qh = torch.randn(batch, SHAPE["heads"], 1, head_dim, device=DEV, dtype=torch.bfloat16)
    sdpa = torch.nn.functional.scaled_dot_product_attention
    rec("sdpa decode attention (enable_gqa)", bench(lambda k=k, v=v: sdpa(qh, k, v, enable_gqa=True)), 0, kv_bytes)
    rep = SHAPE["heads"] // kv_heads
    rec("sdpa decode attention (repeat_kv + mask)",
        bench(lambda k=k, v=v: sdpa(qh, k.repeat_interleave(rep, 1), v.repeat_interleave(rep, 1),
                                    attn_mask=torch.ones(1, 1, 1, tokens, dtype=torch.bool, device=DEV))), 0,
        kv_bytes * (1 + 2 * rep))
    del k, v

    # isolated predictor matmuls, K: [n, D] @ [D, D], V: [n, 2D] @ [2D, D]
    flops_full = 2 * n * d * d * 3
    xk32 = torch.randn(n, d, device=DEV)
    xv32 = torch.randn(n, 2 * d, device=DEV)
    wk32 = torch.randn(d, d, device=DEV) / d**0.5
    wv32 = torch.randn(2 * d, d, device=DEV) / (2 * d) ** 0.5
    for tf32 in (False, True):
        torch.backends.cuda.matmul.allow_tf32 = tf32
        ms = bench(lambda xk32=xk32, xv32=xv32: (xk32 @ wk32, xv32 @ wv32))
        rec(f"torch matmuls full-rank fp32 (tf32={tf32})", ms, flops_full, 4 * (3 * n * d + n * d * 2))
    torch.backends.cuda.matmul.allow_tf32 = False
    xk, xv, wk, wv = xk32.bfloat16(), xv32.bfloat16(), wk32.bfloat16(), wv32.bfloat16()
    del xk32, xv32
    free()
    ms = bench(lambda xk=xk, xv=xv: (xk @ wk, xv @ wv))
    rec("torch matmuls full-rank bf16", ms, flops_full, 2 * (3 * n * d + 2 * n * d))
    for r in (64, 128, 256):
        dk, uk = wk[:, :r].contiguous(), wk[:r].contiguous()
        dv, uv = wv[:, :r].contiguous(), wv[:r].contiguous()
        ms = bench(lambda dk=dk, uk=uk, dv=dv, uv=uv, xk=xk, xv=xv: ((xk @ dk) @ uk, (xv @ dv) @ uv))
        rec(f"torch matmuls low-rank r={r} bf16 (factored)", ms, 2 * n * r * (d + d + 2 * d + d),
            2 * (3 * n * d + 2 * n * d + 4 * n * r))
    del xk, xv
    free()

    # whole-layer reads: a 2-layer cache, time layer 1 given layer 0's reconstruction
    def cache_for(rank: int | None, predictors: bool = True) -> AquaKVCache:
        c = AquaKVCache(make_codecs(2, d, rank, predictors), CacheConfig(), rotary)
        fill_aquakv(c, batch, kv_heads, head_dim, tokens + 4 + 16, 16)
        return c

    codes_bytes = 2 * n * (d // 4 + d // 64 * 2)  # 2-bit codes + fp16 scales of K and V

    def ref_read(c: AquaKVCache):
        c.shared.prev_old = None
        c.shared.rope_memo = None
        c.layers[0]._read_compressed()
        return lambda: c.layers[1]._read_compressed()

    def fused_read(c: AquaKVCache, precision: str, gemm: str = "cublas"):
        c.shared.prev_old = None
        with kernels.settings(predictor=precision, gemm=gemm):
            kernels.read_compressed(c.layers[0])
        prev = c.shared.prev_old

        def run():
            c.shared.prev_old = prev
            with kernels.settings(predictor=precision, gemm=gemm):
                return kernels.read_compressed(c.layers[1])
        return run

    def rel(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.float() - b.float()).norm() / b.float().norm())

    cache = cache_for(None)
    with kernels.disabled():
        fn = ref_read(cache)
        ref_k, ref_v = fn()
        ms = bench(fn, 1, 3 if n > 100_000 else 5)
    rec("reference torch (fp32 dequant + fp32 matmul + RoPE)", ms, flops_full, 4 * (3 * n * d + 4 * n * d),
        note="aquakv.codec.decode, kernels off")
    fn = ref_read(cache)
    with kernels.settings(predictor="bf16"):
        ms = bench(fn, 1, 5)
    rec("torch fp32 matmul + kernel dequant (quantize.py dispatch)", ms, flops_full, 4 * (3 * n * d + 4 * n * d))
    del fn
    free()
    for precision, gemm in (("bf16", "cublas"), ("bf16", "triton"), ("tf32", "cublas"), ("ieee", "cublas")):
        fn = fused_read(cache, precision, gemm)
        ok, ov = fn()
        err = (rel(ok, ref_k), rel(ov, ref_v))
        del ok, ov
        ms = bench(fn, 1, 5) if precision == "ieee" else bench(fn)
        # floor: reads K̂_{l-1}, V̂_{l-1}, K̂_l and writes K̂_l, RoPE(K̂_l), V̂_l (6 x 2 bytes); fp32 scratch: 24
        moved = 12 * n * d if precision == "bf16" else 24 * n * d
        name = "cuBLAS matmul + fused add/deq/RoPE kernel" if gemm == "cublas" else "Triton matmul fused with deq/RoPE"
        rec(f"{name}, full-rank {precision}", ms, flops_full, codes_bytes + moved, err)
        del fn
        free()
    del cache, ref_k, ref_v
    free()
    for r in (128, 256):
        cache = cache_for(r)
        for gemm in ("cublas", "triton"):
            fn = fused_read(cache, "bf16", gemm)
            fn()
            ms = bench(fn)
            rec(f"low-rank r={r} bf16 ({gemm} matmuls + fused deq/RoPE)", ms, 2 * n * r * 5 * d,
                codes_bytes + 12 * n * d + 2 * 2 * 2 * n * r,
                note="rank detected from the stored weight, factored once")
            del fn
        del cache
        free()
    cache = cache_for(None, predictors=False)
    fn = fused_read(cache, "bf16")
    fn()
    rec("fused kernels, no predictor (quantizer only)", bench(fn), 0, codes_bytes + 2 * 3 * n * d)
    del cache, fn
    free()
    return out


# --------------------------------------------------------------------------------------------------------------- e2e


def build_model(layers: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    cfg = LlamaConfig(hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["mlp"], num_hidden_layers=layers,
                      num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["kv_heads"],
                      head_dim=SHAPE["head_dim"], vocab_size=SHAPE["vocab"], max_position_embeddings=131072,
                      rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg._attn_implementation = "sdpa"
    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = LlamaForCausalLM(cfg)
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def quanto_available() -> str | None:
    try:
        import optimum.quanto  # noqa: F401
        from optimum.quanto.library.extensions import get_extension
        from optimum.quanto.library.unpack import unpack as py_unpack
    except Exception as e:  # noqa: BLE001
        return f"optimum-quanto unavailable: {e!r}"
    # quanto's CUDA unpack would JIT-build its whole CUDA extension (minutes, with marlin/awq kernels); use quanto's
    # own PyTorch unpack instead (same result, on the GPU)
    del py_unpack

    def unpack(packed: torch.Tensor, bits: int) -> torch.Tensor:  # optimum/quanto/library/unpack.py, verbatim math
        parts = [(packed & (2 ** (bits * (i + 1)) - 1)) >> (bits * i) for i in range(8 // bits)]
        return torch.cat(parts).to(torch.uint8)

    try:
        get_extension("quanto_cuda")._lib = types.SimpleNamespace(unpack=unpack)
    except Exception:  # noqa: BLE001
        pass
    return None


def tensor_bytes(t) -> int:
    if t is None:
        return 0
    if type(t) is torch.Tensor or type(t) is torch.nn.Parameter:
        return t.numel() * t.element_size()
    if hasattr(t, "__tensor_flatten__"):
        names, _ = t.__tensor_flatten__()
        return sum(tensor_bytes(getattr(t, n)) for n in names)
    return t.numel() * t.element_size()


def quanto_bytes(cache) -> int:
    total = 0
    for layer in cache.layers:
        total += tensor_bytes(getattr(layer, "_quantized_keys", None)) + tensor_bytes(
            getattr(layer, "_quantized_values", None))
        for t in (layer.keys, layer.values):
            if isinstance(t, torch.Tensor):
                total += t.numel() * t.element_size()
    return total


def make_cache(kind: str, model, batch: int, context: int, window: int):
    """A filled cache of ``context`` tokens and its KV bytes; AQUA-KV variants also return predictor bytes."""
    cfg = model.config
    layers, kvh, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    extra: dict = {}
    if kind == "dynamic":
        from transformers import DynamicCache

        cache = DynamicCache(config=cfg)
        for i in range(layers):
            k = torch.randn(batch, kvh, context, hd, device=DEV, dtype=torch.bfloat16)
            cache.update(k, torch.randn_like(k), i)
        return cache, dynamic_cache_nbytes(cache), extra
    if kind.startswith("quanto"):
        from transformers import QuantizedCache

        cache = QuantizedCache(backend="quanto", config=cfg, nbits=int(kind[-1]))
        for i in range(layers):
            k = torch.randn(batch, kvh, context, hd, device=DEV, dtype=torch.bfloat16)
            cache.update(k, torch.randn_like(k), i)
            del k
        return cache, quanto_bytes(cache), extra
    rank = {"aquakv-2bit": None, "aquakv-2bit-ref": None, "aquakv-2bit-r128": 128, "aquakv-2bit-r256": 256,
            "aquakv-2bit-nopred": None}[kind]
    codecs = make_codecs(layers, kvh * hd, rank, predictors=kind != "aquakv-2bit-nopred")
    cache = AquaKVCache(codecs, CacheConfig(), model.model.rotary_emb)
    fill_aquakv(cache, batch, kvh, hd, context, window)
    pb = 0
    for c in codecs:
        for p in (c.key_predictor, c.value_predictor):
            if p is not None:
                if rank:
                    pb += 2 * (p.weight.shape[0] + p.weight.shape[1]) * rank + 4 * p.bias.numel()
                else:
                    pb += 2 * p.weight.numel() + 4 * p.bias.numel()
    extra["predictor_bytes_bf16"] = pb
    return cache, cache.nbytes(), extra


def time_decode(model, cache, batch: int, warmup: int, steps: int) -> tuple[float, list[float]]:
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=DEV)
    times = []
    timer = Timer()
    with torch.no_grad():
        for s in range(warmup + steps):
            timer.start()
            out = model(input_ids=ids, past_key_values=cache, use_cache=True)
            ms = timer.stop()
            ids = out.logits[:, -1:].argmax(-1)
            if s >= warmup:
                times.append(ms)
    return statistics.median(times), times


def compress_block_ms(cache: AquaKVCache, batch: int, kvh: int, hd: int) -> float:
    """One 128-token block compressed through every layer (kernels for the quantizer, torch fp32 predictors)."""
    def run():
        cache.shared.prev_new = None
        saved = [(layer.keys, layer.values, layer.compressed, layer.compressed_len) for layer in cache.layers]
        for layer in cache.layers:
            layer.keys = torch.randn(batch, kvh, 128, hd, device=DEV, dtype=torch.bfloat16)
            layer.values = torch.randn_like(layer.keys)
        cache.shared.rope_memo = None
        pos_before = cache.shared.positions
        cache.shared.positions = torch.cat([pos_before, pos_before[:, -128:] + 128], 1)
        timer = Timer()
        timer.start()
        for layer in cache.layers:
            layer._compress_window(128)
        ms = timer.stop()
        for layer, s in zip(cache.layers, saved, strict=True):
            layer.keys, layer.values, layer.compressed, layer.compressed_len = s
        cache.shared.positions = pos_before
        cache.shared.rope_memo = None
        return ms

    run()
    return statistics.median([run() for _ in range(3)])


def profile_step(model, cache, batch: int, label: str) -> None:
    """Print the top GPU kernels of one decode step."""
    from torch.profiler import ProfilerActivity, profile

    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=DEV)
    with torch.no_grad(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        model(input_ids=ids, past_key_values=cache, use_cache=True)
        torch.cuda.synchronize()
    for key in ("self_cuda_time_total", "self_device_time_total"):
        try:
            table = prof.key_averages().table(sort_by=key, row_limit=14, max_name_column_width=60)
        except Exception:  # noqa: BLE001
            continue
        log(f"profile of one decode step, {label}:\n{table}")
        return


def e2e(args, records: list, save) -> None:
    model = build_model(args.layers)
    log(f"model: {args.layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")
    quanto_note = quanto_available()
    for context in args.contexts:
        for batch in args.batches:
            for kind in args.caches:
                if time.time() - T0 > args.budget_s:
                    records.append({"cache": kind, "context": context, "batch": batch, "skipped": "time budget"})
                    continue
                if kind.startswith("quanto") and quanto_note:
                    records.append({"cache": kind, "context": context, "batch": batch, "unavailable": quanto_note})
                    continue
                rec = {"cache": kind, "context": context, "batch": batch, "layers": args.layers}
                cache = None
                try:
                    free()
                    if DEV == "cuda":
                        torch.cuda.reset_peak_memory_stats()
                    cache, nbytes, extra = make_cache(kind, model, batch, context, args.window)
                    rec.update(kv_bytes=nbytes, **extra)
                    ctx = fused_reads(kind != "aquakv-2bit-ref") if kind.startswith("aquakv") else (
                        contextlib.nullcontext())
                    steps = args.steps if kind != "aquakv-2bit-ref" else max(3, args.steps // 2)
                    with ctx:
                        ms, times = time_decode(model, cache, batch, args.warmup, steps)
                        rec.update(ms_per_token=ms, step_ms=times)
                        if (context, batch) == (args.contexts[0], args.batches[0]) and kind in args.profile:
                            try:
                                profile_step(model, cache, batch, f"{kind} context {context} batch {batch}")
                            except Exception as e:  # noqa: BLE001
                                log(f"profiling failed: {e!r}")
                        if kind.startswith("aquakv") and kind != "aquakv-2bit-ref":
                            cb = compress_block_ms(cache, batch, model.config.num_key_value_heads,
                                                   model.config.head_dim)
                            rec.update(compress_128_block_ms=cb, compress_amortized_ms_per_token=cb / 128)
                    rec["peak_gpu_bytes"] = torch.cuda.max_memory_allocated() if DEV == "cuda" else None
                except torch.OutOfMemoryError as e:
                    rec.update(oom=True, error=str(e).splitlines()[0][:200])
                except Exception as e:  # noqa: BLE001
                    rec.update(error=f"{type(e).__name__}: {e}"[:400])
                    traceback.print_exc()
                finally:
                    del cache
                    free()
                log("e2e", json.dumps({k: v for k, v in rec.items() if k != "step_ms"}))
                records.append(rec)
                save()
    del model
    free()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/benchmarks/decode.json")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--caches", nargs="+", default=["dynamic", "quanto-int4", "quanto-int2", "aquakv-2bit",
                                                   "aquakv-2bit-r128", "aquakv-2bit-nopred", "aquakv-2bit-ref"])
    p.add_argument("--window", type=int, default=32, help="exact recent tokens at the start (< 128 - steps)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--kernel-rows", type=int, default=1 << 18)
    p.add_argument("--layer-tokens", type=int, nargs="+", default=[32768])
    p.add_argument("--layer-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--sections", nargs="+", default=["ceilings", "kernels", "layer", "e2e"])
    p.add_argument("--budget-s", type=float, default=540.0, help="skip remaining e2e configs after this many seconds")
    p.add_argument("--profile", nargs="*", default=["dynamic", "aquakv-2bit"],
                   help="caches whose first (context, batch) decode step is profiled")
    p.add_argument("--no-cudnn-sdpa", action="store_true",
                   help="disable the cuDNN SDPA backend: with torch 2.11 it re-plans for every new KV length, about "
                        "1.5-2 ms of host time per attention call, which makes every cache host-bound in decode")
    p.add_argument("--smoke", action="store_true", help="tiny shapes on the CPU (TRITON_INTERPRET=1): a code check")
    args = p.parse_args()
    global DEV
    if args.smoke:
        DEV = "cpu"
        SHAPE.update(hidden=256, heads=4, kv_heads=2, mlp=512, vocab=500)
        args.sections = [s for s in args.sections if s != "ceilings"]

    import transformers

    result: dict = {
        "device": torch.cuda.get_device_name(0) if DEV == "cuda" else "cpu (smoke)",
        "date": datetime.datetime.now(datetime.UTC).isoformat(timespec="seconds"),
        "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "triton": getattr(kernels.triton, "__version__", None), "python": platform.python_version()},
        "model": {"shape": "Llama-3.1-8B (hidden 4096, 32 heads, 8 KV heads, head_dim 128, MLP 14336, vocab 128256)",
                  "layers": args.layers, "weights": "random bf16", "attention": "sdpa"},
        "aquakv": {"quantizer": "HIGGS d=2 n=16 g=64 (2 bits + fp16 scale/64), layer 0 d=2 n=256 (4 bits)",
                   "sinks": 4, "window_at_start": args.window,
                   "note": "caches filled directly with random codes; decode reconstructs every compressed token of "
                           "every layer every step (one-layer scratch)"},
        "records": [], "kernels": {}, "layer": [],
    }
    if args.no_cudnn_sdpa:
        torch.backends.cuda.enable_cudnn_sdp(False)
    result["sdpa_cudnn_enabled"] = not args.no_cudnn_sdpa
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], out.name).write_text(json.dumps(result, indent=1))

    log(result["device"], result["versions"])
    bw, peak = 3.0e12, 7.5e14
    if "ceilings" in args.sections:
        c = ceilings()
        bw, peak = c["copy_bytes_per_s"], c["bf16_matmul_flops_per_s"]
        result["kernels"]["ceilings"] = c
        log(f"copy {bw / 1e12:.2f} TB/s, bf16 matmul {peak / 1e12:.0f} TFLOP/s")
        save()
    if "kernels" in args.sections:
        try:
            result["kernels"]["throughput"] = kernel_throughput(args.kernel_rows, SHAPE["kv_heads"] * 128, bw)
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            result["kernels"]["error"] = f"{type(e).__name__}: {e}"[:400]
        save()
    if "layer" in args.sections:
        for tokens in args.layer_tokens:
            for batch in args.layer_batches:
                try:
                    result["layer"] += layer_costs(batch, tokens, SHAPE["kv_heads"], SHAPE["head_dim"], peak, bw)
                except torch.OutOfMemoryError as e:
                    result["layer"].append({"batch": batch, "tokens": tokens, "oom": str(e)[:200]})
                except Exception as e:  # noqa: BLE001
                    traceback.print_exc()
                    result["layer"].append({"batch": batch, "tokens": tokens,
                                            "error": f"{type(e).__name__}: {e}"[:400]})
                free()
                save()
    if "e2e" in args.sections:
        e2e(args, result["records"], save)
    save()
    log("done")
    rows = [r for r in result["records"] if "ms_per_token" in r]
    print(f"{'cache':22s} {'ctx':>6s} {'B':>2s} {'ms/tok':>9s} {'KV MB':>10s}")
    for r in rows:
        print(f"{r['cache']:22s} {r['context']:6d} {r['batch']:2d} {r['ms_per_token']:9.2f} "
              f"{r['kv_bytes'] / 1e6:10.1f}")


if __name__ == "__main__":
    main()
