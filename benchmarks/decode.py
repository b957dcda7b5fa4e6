"""Decode speed of a Llama-3.1-8B-shaped model (random bf16 weights) with DynamicCache, StaticCache, quanto (if
installed) and AQUA-KV at 2 bits (full-rank and low-rank predictors, fused decode attention): GPU time per step.

    PYTHONUNBUFFERED=1 PYTHONPATH=$PWD python benchmarks/decode.py --out docs/benchmarks/decode.json

Every cache runs the same model with sdpa attention (cuDNN SDPA off: it re-plans per KV length on the host); AQUA-KV
switches the model to its ``"aquakv"`` attention function, which hands untagged inputs to that same sdpa. Caches are
filled directly (random keys / values / codes of the right shapes, no prefill); ``--warmup`` steps, then ``--steps``
timed steps: **GPU ms** = the sum of kernel durations of one step from ``torch.profiler`` (median over the profiled
steps), **wall ms** = CUDA events around ``model(...)`` (median). Quality is not measured here.

Sections: ``ceilings`` (copy bandwidth, bf16 matmul), ``sweep`` (the decode kernel alone: scratch hand-on and launch
configs), ``layer`` (one layer: flash SDPA over bf16 KV vs AQUA-KV's fused attention vs reconstruct-then-SDPA),
``e2e`` (decode steps), ``budget`` (tokens/s at a fixed KV-memory budget), ``host`` (``cProfile`` of batch-1 steps:
where the host time of an uncaptured step goes). The ``layer`` section also times the
fused attention's kernels as one CUDA-graph replay (**graph ms**: no launch gaps).
"""

from __future__ import annotations

import argparse
import datetime
import functools
import gc
import json
import os
import platform
import statistics
import sys
import time
import traceback
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aquakv.attention import Segments, TorchBackend, TritonBackend  # noqa: E402
from aquakv.cache import AquaKVCache, dynamic_cache_nbytes  # noqa: E402
from aquakv.codec import PROJECTION_DTYPE, EncodedBlock, LayerCodec, Projections, gaussian_residual  # noqa: E402
from aquakv.compat import cache_kwargs, position_kwargs  # noqa: E402
from aquakv.config import CacheConfig, QuantizerConfig  # noqa: E402
from aquakv.graphs import CapturedDecode  # noqa: E402
from aquakv.kernels import KernelSettings  # noqa: E402
from aquakv.kernels.host import copy_bandwidth, read_compressed  # noqa: E402
from aquakv.packing import packed_bytes  # noqa: E402
from aquakv.predictors import Predictor  # noqa: E402
from aquakv.quantize import Quantized  # noqa: E402

DEV = "cuda"
T0 = time.time()
SHAPE = {"hidden": 4096, "heads": 32, "kv_heads": 8, "head_dim": 128, "mlp": 14336, "vocab": 128256}
RANKS = {"aquakv-full": None, "aquakv-r64": 64, "aquakv-r128": 128, "aquakv-r256": 256}
# residual quantizers of layers >= 1 (keys, values): the paper's 2-bit d=2 grid, and the d=4 grids of the quality
# bench's best config at <= 2.5 bits (aquakv-d4-k2.25v2: keys 9-bit codes per 4 values, values 8-bit); a cache kind
# "aquakv-r64-d4" is rank 64 with the d=4 grids
GRIDS = {"d2": ((2, 16), (2, 16)), "d4": ((4, 512), (4, 256))}


def aquakv_kind(kind: str) -> tuple[int | None, str, str, str]:
    """``(predictor rank, grids, prediction, key residual)`` of a cache kind ``aquakv-<rank>[-d4][-stored[-post]]``
    (``-stored``: each token keeps its predictor projections, :class:`~aquakv.kernels.KernelSettings`
    ``prediction="stored"``; ``-post``: ``key_residual="post_rope"``, the CUDA decode kernel's format)."""
    kind, post, _ = kind.partition("-post")
    kind, stored, _ = kind.partition("-stored")
    base, _, grids = kind.partition("-d")
    return RANKS[base], f"d{grids or 2}", "stored" if stored else "chained", "post_rope" if post else "pre_rope"


def log(*a: object) -> None:
    print(f"[{time.time() - T0:7.1f}s]", *a, flush=True)


def free() -> None:
    gc.collect()
    torch.cuda.empty_cache()


def event_times(fn, warmup: int = 2, reps: int = 10) -> list[float]:
    """Wall milliseconds of each of ``reps`` calls of ``fn()`` between CUDA events (launch gaps included)."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        b.synchronize()
        times.append(a.elapsed_time(b))
    return times


def events_ms(fn, warmup: int = 2, reps: int = 10) -> float:
    """Median of :func:`event_times`."""
    return statistics.median(event_times(fn, warmup, reps))


def gpu_ms(fn, reps: int = 3, kernels_out: list | None = None) -> float:
    """GPU milliseconds per ``fn()``: the sum of device kernel durations from ``torch.profiler`` over ``reps`` calls,
    divided by ``reps``; ``kernels_out`` receives ``(name, ms per call, calls per call)`` sorted by time."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    fn()
    torch.cuda.synchronize()
    with profile(activities=[ProfilerActivity.CUDA]) as prof:
        for _ in range(reps):
            fn()
        torch.cuda.synchronize()
    total = 0.0
    rows = []
    for evt in prof.key_averages():
        if evt.device_type != DeviceType.CUDA:
            continue
        us = evt.self_device_time_total
        total += us
        rows.append((evt.key[:90], us / 1e3 / reps, evt.count / reps))
    if kernels_out is not None:
        kernels_out.extend(sorted(rows, key=lambda r: -r[1]))
    return total / 1e3 / reps


# ------------------------------------------------------------------------------------------------- synthetic caches


def make_codecs(layers: int, d: int, rank: int | None, seed: int = 0, grids: str = "d2",
                device: str = DEV) -> list[LayerCodec]:
    """Gaussian grids (4-bit d=2 n=256 for layer 0, :data:`GRIDS` for the rest), group 64, random predictors."""
    gen = torch.Generator().manual_seed(seed)

    def predictor(d_in: int) -> Predictor:
        if rank:
            w = torch.randn(d_in, rank, generator=gen) @ torch.randn(rank, d, generator=gen) / (d_in * rank) ** 0.5
        else:
            w = torch.randn(d_in, d, generator=gen) / d_in**0.5
        return Predictor((0.5 * w).to(device), (0.1 * torch.randn(d, generator=gen)).to(device))

    codecs = []
    for i in range(layers):
        kq, vq = (QuantizerConfig(dim=dim, size=size, group_size=64)
                  for dim, size in (((2, 256), (2, 256)) if i == 0 else GRIDS[grids]))
        codec = LayerCodec(gaussian_residual(kq, 2 * i), gaussian_residual(vq, 2 * i + 1)).to(device)
        if i:
            codec.key_predictor, codec.value_predictor = predictor(d), predictor(2 * d)
        codecs.append(codec)
    return codecs


def random_block(batch: int, tokens: int, d: int, cfg: QuantizerConfig) -> Quantized:
    groups = d // 64
    codes = torch.randint(0, 256, (batch, tokens, packed_bytes(groups * 64 // cfg.dim, cfg.index_bits)),
                          dtype=torch.uint8, device=DEV)
    scales = (torch.rand(batch, tokens, groups, device=DEV) * 16 + 4).half()
    return Quantized(codes, scales, d)


def random_projections(batch: int, tokens: int, width: int) -> torch.Tensor:
    """Random stored projections ``[batch, tokens, width]`` in their float8 dtype, drawn a row at a time: a float32
    ``[B, T, RK + RV]`` would not fit next to a 64 GB budget."""
    out = torch.empty(batch, tokens, width, device=DEV, dtype=PROJECTION_DTYPE)
    for row in out:
        row.copy_(torch.randn(row.shape, device=DEV))
    return out


def fill_aquakv(cache: AquaKVCache, batch: int, kv_heads: int, head_dim: int, context: int, window: int) -> None:
    """Give every layer 4 exact sinks, ``context - 4 - window`` compressed tokens and an exact window."""
    d = kv_heads * head_dim
    tokens = context - 4 - window
    for layer in cache.layers:
        empty = torch.empty(batch, kv_heads, 0, head_dim, dtype=torch.bfloat16, device=DEV)
        layer.lazy_initialization(empty, empty)

        def rnd(n: int) -> torch.Tensor:
            return torch.randn(batch, kv_heads, n, head_dim, device=DEV, dtype=torch.bfloat16)

        layer.exact.append(rnd(4), rnd(4), 4)
        layer.exact.append(rnd(window), rnd(window), 0)
        layer._refresh()
        layer.compressed = EncodedBlock(random_block(batch, tokens, d, layer.codec.keys.config),
                                        random_block(batch, tokens, d, layer.codec.values.config))
        predictors = (layer.codec.key_predictor, layer.codec.value_predictor)
        if cache.shared.settings.prediction == "stored" and predictors[0] is not None:
            widths = [p.factors()[0].shape[1] for p in predictors]
            scales = torch.rand(batch, tokens, 2, device=DEV) * 0.01 + 1e-4  # > 0, as encode's are
            layer.compressed.projections = Projections(random_projections(batch, tokens, sum(widths)), scales,
                                                       widths[0])
        layer.compressed_len = tokens
        layer.cumulative = context  # tokens seen: the next step is position `context`, a window token (not a sink)
    pos = torch.arange(4, context + 512, dtype=torch.int32, device=DEV)
    cache.shared.positions = pos[None, : context - 4].expand(batch, -1).contiguous()


def rotary_module(layers: int = 2):
    from transformers.models.llama.modeling_llama import LlamaRotaryEmbedding

    return LlamaRotaryEmbedding(llama_config(layers)).to(DEV)


def llama_config(layers: int):
    from transformers import LlamaConfig

    cfg = LlamaConfig(hidden_size=SHAPE["hidden"], intermediate_size=SHAPE["mlp"], num_hidden_layers=layers,
                      num_attention_heads=SHAPE["heads"], num_key_value_heads=SHAPE["kv_heads"],
                      head_dim=SHAPE["head_dim"], vocab_size=SHAPE["vocab"], max_position_embeddings=131072,
                      rope_theta=500000.0,
                      rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                    "high_freq_factor": 4.0, "original_max_position_embeddings": 8192})
    cfg._attn_implementation = "sdpa"
    return cfg


# ---------------------------------------------------------------------------------------------------------- layer


def layer_costs(batch: int, tokens: int, settings: KernelSettings, kinds: list[str]) -> list[dict]:
    """One layer at ``tokens`` context: flash SDPA over bf16 KV vs AQUA-KV (fused; reconstruct-then-SDPA)."""
    kvh, hd, hq = SHAPE["kv_heads"], SHAPE["head_dim"], SHAPE["heads"]
    out = []
    sdpa = torch.nn.functional.scaled_dot_product_attention
    q = torch.randn(batch, hq, 1, hd, device=DEV, dtype=torch.bfloat16)
    k = torch.randn(batch, kvh, tokens, hd, device=DEV, dtype=torch.bfloat16)
    v = torch.randn_like(k)
    with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
        def fn(k=k, v=v):
            return sdpa(q, k, v, enable_gqa=True)

        flash = {"method": "flash SDPA over bf16 KV", "gpu_ms": gpu_ms(fn, 10), "wall_ms": events_ms(fn)}
    out.append(flash)
    del fn, k, v
    free()
    rotary = rotary_module()
    for kind in kinds:
        rank, grids, prediction, _ = aquakv_kind(kind)  # layer 1 is timed: it reads layer 0's hand-on, hands on its own
        codecs = make_codecs(3, kvh * hd, rank, grids=grids)
        layer_settings = settings.with_(prediction=prediction)
        cache = AquaKVCache(codecs, CacheConfig(), rotary, kernels=layer_settings)
        fill_aquakv(cache, batch, kvh, hd, tokens + 4 + 16, 16)
        shared = cache.shared
        triton_b = TritonBackend(layer_settings)
        segs = [Segments(layer, layer.compressed, layer.compressed_len, 4) for layer in cache.layers]
        exact = [(torch.cat([la.sink_keys, la.keys], -2), torch.cat([la.sink_values, la.values], -2))
                 for la in cache.layers]
        triton_b.attend(segs[0], q, *exact[0], None, hd**-0.5)  # layer 0 fills the scratch
        src = shared.scratch_src

        def fused(src=src, triton_b=triton_b, segs=segs, exact=exact, shared=shared):
            shared.scratch_src = src
            return triton_b.attend(segs[1], q, *exact[1], None, hd**-0.5)

        rows = []
        try:
            g = gpu_ms(fused, 10, rows)
        except Exception as e:  # noqa: BLE001
            out.append({"method": f"aquakv fused attention, {kind}", "error": f"{type(e).__name__}: {e}"[:300]})
            del cache, segs, exact
            free()
            continue
        out.append({"method": f"aquakv fused attention, {kind}", "gpu_ms": g, "wall_ms": events_ms(fused),
                    "graph_ms": graph_replay_ms(fused), "kernels": rows[:8]})
        # reconstruct-then-attend on the same layer (Triton reconstruction, then flash SDPA over the result)
        read_compressed(cache.layers[0], settings)
        prev = shared.prev_old

        def recon(prev=prev, cache=cache, shared=shared):
            shared.prev_old = prev
            keys, values = read_compressed(cache.layers[1], settings)
            with torch.nn.attention.sdpa_kernel([torch.nn.attention.SDPBackend.FLASH_ATTENTION]):
                return sdpa(q, keys, values, enable_gqa=True)

        try:
            out.append({"method": f"reconstruct + flash SDPA (previous runtime), {kind}", "gpu_ms": gpu_ms(recon, 3),
                        "wall_ms": events_ms(recon, 1, 3)})
        except Exception as e:  # noqa: BLE001
            out.append({"method": f"reconstruct + flash SDPA (previous runtime), {kind}", "error": repr(e)[:300]})
        # accuracy of the fused layer against the PyTorch reference (fp32 reconstruction)
        shared.prev_old = None
        ref = TorchBackend(KernelSettings(enabled=False, prediction=prediction))
        ref.attend(segs[0], q, *exact[0], None, hd**-0.5)
        want = ref.attend(segs[1], q, *exact[1], None, hd**-0.5)
        triton_b.attend(segs[0], q, *exact[0], None, hd**-0.5)  # a fresh layer-0 scratch (low rank works in place)
        got = triton_b.attend(segs[1], q, *exact[1], None, hd**-0.5)
        out[-2]["rel_err_vs_fp32_reference"] = float((got.float() - want.float()).norm() / want.float().norm())
        del cache, segs, exact, prev, ref, want, got
        free()
    for r in out:
        r.update(batch=batch, tokens=tokens, ratio_to_flash=r.get("gpu_ms", 0) / flash["gpu_ms"])
        log(f"layer B={batch} T={tokens} {r['method']:58s} GPU {r.get('gpu_ms', float('nan')):7.3f} ms  "
            f"wall {r.get('wall_ms', float('nan')):7.3f} ms  x{r['ratio_to_flash']:.1f} flash "
            f"{r.get('rel_err_vs_fp32_reference', '')}")
    return out


def graph_replay_ms(fn, reps: int = 20) -> float | str:
    """Milliseconds per replay of ``fn()`` captured in a CUDA graph (no launch gaps), or why capture failed."""
    try:
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            fn()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            fn()
        ms = events_ms(graph.replay, 3, reps)
        del graph
        return ms
    except Exception as e:  # noqa: BLE001
        torch.cuda.synchronize()
        return f"{type(e).__name__}: {e}"[:300]


def timed_launch(section: str, fn, rec: dict, reference: torch.Tensor | None = None) -> dict:
    """``rec`` with ``gpu_ms`` of ``fn()`` (and its largest difference from ``reference``), or the error that stopped
    it (an explicit launch that does not fit the SM does not fall back); logged as one JSON line."""
    try:
        if reference is not None:
            rec["max_abs_diff"] = float((fn().float() - reference.float()).abs().max())
        rec["gpu_ms"] = gpu_ms(fn, 10)
    except Exception as e:  # noqa: BLE001
        rec["error"] = f"{type(e).__name__}: {e}"[:300]
    log(section, json.dumps(rec))
    return rec


STORED_LAUNCHES = [(128, 4, 1), (128, 8, 1), (128, 4, 2), (64, 4, 1), (64, 4, 2), (64, 2, 1), (256, 8, 1),
                   (128, 4, 1, 168), (128, 4, 1, 128), (64, 4, 1, 168)]  # (..., register cap per thread)
FULL_HANDON_LAUNCHES = [(64, 4, 4), (64, 4, 2), (64, 4, 1), (64, 8, 2), (64, 8, 1), (32, 4, 3), (32, 4, 2),
                        (32, 4, 1), (128, 8, 1)]


def launch_arg(text: str) -> tuple[int, ...]:
    """``'128,4,1'`` or ``'64,4,1,168'`` -> a launch tuple (command lines)."""
    parts = tuple(int(x) for x in text.split(","))
    if len(parts) not in (3, 4):
        raise argparse.ArgumentTypeError(f"a launch is tokens,warps,stages[,register cap], got {text!r}")
    return parts


def sweep(batch: int, tokens: int, settings: KernelSettings, rank: int = 64, grids: str = "d2",
          once: bool = False, kinds: tuple[str, ...] = ("chained", "stored"),
          stored_launches: list[tuple[int, ...]] | None = None, floors: bool = True) -> list:
    """``_decode_attention_kernel`` alone on a middle rank-``rank`` layer at ``tokens``, over launch configs ``(tokens
    per program, warps, stages)``: the full-reconstruction hand-on (every rank) and, up to
    :data:`~aquakv.kernels.decode.MAX_PROJECTED_RANK`, the projected one; the stored projections (every rank) and
    their two floors (the value predictor's term in the kernel: ``value_latents="fused"``, unless ``settings`` asks
    for ``"deferred"``). A config that does not fit the SM's shared memory is recorded as an error (explicit launches
    do not fall back). ``kinds``: which of the two families to run; ``stored_launches``: the stored family's launches
    instead of :data:`STORED_LAUNCHES`; ``floors``: also the stored kernel's two floors. ``once``: no timing;
    ``(name, call)`` of each variant with its first launch is returned (the chained hand-ons, the stored kernel and
    its two floors: sections ``stored`` / ``stored_once``, ``benchmarks/kernel_registers.py``)."""
    from aquakv.kernels.decode import MAX_PROJECTED_RANK, decode_attention

    kvh, hd, hq = SHAPE["kv_heads"], SHAPE["head_dim"], SHAPE["heads"]
    d = kvh * hd
    codecs = make_codecs(3, d, rank, grids=grids)
    cache = AquaKVCache(codecs, CacheConfig(), rotary_module(), kernels=settings)
    fill_aquakv(cache, batch, kvh, hd, tokens + 4 + 16, 16)
    layer = cache.layers[1]
    q = torch.randn(batch, hq, 1, hd, device=DEV, dtype=torch.bfloat16)
    inv_freq, positions = cache.shared.inv_freq(torch.device(DEV)), cache.shared.positions
    out = []
    variants = []  # (projected hand-on, scratch columns, launches)
    if "chained" in kinds:
        launches = FULL_HANDON_LAUNCHES if rank > MAX_PROJECTED_RANK else [(128, 8, 1), (64, 4, 4)]
        variants.append((False, 2 * d, launches))
        if rank <= MAX_PROJECTED_RANK:
            variants.append((True, 2 * rank, [(128, 8, 1), (128, 8, 2), (128, 4, 1), (64, 4, 1)]))
    for projected, cols, configs in variants:
        scratch = torch.randn(batch, tokens + 64, cols, device=DEV, dtype=torch.bfloat16)
        for launch in configs:
            def fn(scratch=scratch, projected=projected, launch=launch):
                return decode_attention(q, layer.compressed.keys, layer.compressed.values, layer.compressed_len,
                                        layer.codec, scratch, scratch, positions, inv_freq, 1.0, None,
                                        hd**-0.5, settings, projected, codecs[2], launch)
            name = "chained, " + ("projected" if projected else "full") + " hand-on"
            if once:
                out.append((name, fn))
                break
            out.append(timed_launch("sweep", fn, {"batch": batch, "tokens": tokens, "rank": rank,
                                                  "handoff": "projected" if projected else "full",
                                                  "launch": list(launch)}))
        del scratch
    # stored projections (any rank), and the floors without the value / any predictor
    full = layer.codec
    stored = (("stored", full), ("stored, no value predictor", LayerCodec(full.keys, full.values, full.key_predictor)),
              ("no predictors", LayerCodec(full.keys, full.values)))
    # the decode kernel alone times the whole layer's work only with the value term fused; "deferred" (asked for)
    # times the kernel the runtime runs at high ranks / batches, without the three small kernels after the merge
    kernel_settings = settings if settings.value_latents == "deferred" else settings.with_(value_latents="fused")
    for name, codec in (stored if floors else stored[:1]) if "stored" in kinds else ():
        widths = sum(p.factors()[0].shape[1] for p in (codec.key_predictor, codec.value_predictor) if p)
        latents = random_projections(batch, tokens + 64, max(widths, 16))
        scales = torch.rand(batch, layer.compressed_len, 2, device=DEV) * 0.05 + 1e-3  # [B, length, 2], > 0
        for launch in stored_launches or STORED_LAUNCHES:
            def fn(codec=codec, latents=latents, scales=scales, launch=launch):
                return decode_attention(q, layer.compressed.keys, layer.compressed.values, layer.compressed_len,
                                        codec, latents, latents, positions, inv_freq, 1.0, None, hd**-0.5,
                                        kernel_settings, False, None, launch, stored=scales)
            if once:
                out.append((name, fn))
                break
            out.append(timed_launch("sweep", fn, {"batch": batch, "tokens": tokens, "rank": rank,
                                                  "grids": grids, "handoff": name, "launch": list(launch)}))
    free()
    return out


def compiled_kernels(kernel) -> list:
    """Triton's compilations of ``kernel`` so far, on every device (each with ``n_regs``, ``n_spills``)."""
    return [k for cache in kernel.device_caches.values() for k in cache[0].values()]


MERGE_LAUNCHES = [(be, bn, w, dc) for be in (64, 128) for bn in (64, 128, 256) for w in (4, 8) for dc in (32, 64, 128)]


def merge_sweep(batch: int, tokens: int) -> list[dict]:
    """``_exact_merge_kernel`` alone (sinks + a full recent window, the partials of ``tokens`` compressed tokens in
    128-token tiles), over launch configs ``(exact tokens per block, partials per block, warps, output columns)``."""
    from aquakv.kernels.decode import attend_exact

    kvh, hd, hq = SHAPE["kv_heads"], SHAPE["head_dim"], SHAPE["heads"]
    nt, te = tokens // 128, 4 + 128
    q = torch.randn(batch, hq, 1, hd, device=DEV, dtype=torch.bfloat16)
    keys = torch.randn(batch, kvh, te, hd, device=DEV, dtype=torch.bfloat16)
    values = torch.randn_like(keys)
    parts = (torch.randn(batch, hq, 1, nt, hd, device=DEV), torch.randn(batch, hq, 1, nt, device=DEV))
    want = attend_exact(q, keys, values, 4, tokens, None, hd**-0.5, parts)
    out = []
    for launch in [None, *MERGE_LAUNCHES]:
        def fn(launch=launch):
            return attend_exact(q, keys, values, 4, tokens, None, hd**-0.5, parts, launch)
        out.append(timed_launch("merge_sweep", fn, {"batch": batch, "tokens": tokens,
                                                    "launch": list(launch) if launch else "default"}, want))
    return out


# --------------------------------------------------------------------------------------------------------- e2e


def build_model(layers: int):
    from transformers import LlamaForCausalLM

    old = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)
    try:
        with torch.device(DEV):
            model = LlamaForCausalLM(llama_config(layers))
    finally:
        torch.set_default_dtype(old)
    return model.eval()


def quanto_note() -> str | None:
    try:
        import optimum.quanto  # noqa: F401
    except Exception as e:  # noqa: BLE001
        return f"optimum-quanto not installed on the device image ({type(e).__name__})"
    return None


def make_cache(kind: str, model, batch: int, context: int, window: int, settings: KernelSettings):
    """A filled cache of ``context`` tokens, its KV bytes and extra facts."""
    cfg = model.config
    layers, kvh, hd = cfg.num_hidden_layers, cfg.num_key_value_heads, cfg.head_dim
    if kind in ("dynamic", "static"):
        from transformers import DynamicCache, StaticCache

        cache = DynamicCache(config=cfg) if kind == "dynamic" else StaticCache(config=cfg, max_cache_len=context + 64)
        pos = torch.arange(context, device=DEV)
        for i in range(layers):
            k = torch.randn(batch, kvh, context, hd, device=DEV, dtype=torch.bfloat16)
            cache.update(k, torch.randn_like(k), i, {"cache_position": pos})
            del k
        nbytes = dynamic_cache_nbytes(cache)
        return cache, nbytes, {}
    if kind.startswith("quanto"):
        from transformers import QuantizedCache

        cache = QuantizedCache(backend="quanto", config=cfg, nbits=int(kind[-1]))
        for i in range(layers):
            k = torch.randn(batch, kvh, context, hd, device=DEV, dtype=torch.bfloat16)
            cache.update(k, torch.randn_like(k), i)
            del k
        return cache, None, {}
    rank, grids, prediction, key_residual = aquakv_kind(kind)
    cache = AquaKVCache(make_codecs(layers, kvh * hd, rank, grids=grids), CacheConfig(), model.model.rotary_emb,
                        kernels=settings.with_(prediction=prediction, key_residual=key_residual), model=model)
    fill_aquakv(cache, batch, kvh, hd, context, window)
    return cache, cache.nbytes(), {"backend": cache.backend.name, "predictor_rank": rank, "grids": grids,
                                   "prediction": prediction, "key_residual": key_residual}


def static_graph_step(model, cache, ids: torch.Tensor, state: dict):
    """One-token steps of a ``StaticCache`` replayed from a CUDA graph (its writes and mask follow a device
    ``cache_position``): the graph-captured baseline of :class:`aquakv.graphs.CapturedDecode`."""
    pos = torch.full((ids.shape[0], 1), state["pos"], dtype=torch.long, device=DEV)
    cpos = torch.full((1,), state["pos"], dtype=torch.long, device=DEV)

    def forward():
        with torch.no_grad():
            return model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache),
                         **position_kwargs(model, pos, cpos)).logits

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up steps (they write the same slot the graph's first replay writes again)
        for _ in range(2):
            forward()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        logits = forward()

    def step():
        pos.fill_(state["pos"])
        cpos.fill_(state["pos"])
        graph.replay()
        state["pos"] += 1
        return logits

    return step


PADS = 1000  # kinds ending -padded: every other row's first PADS tokens are padding


def decode_steps(model, cache, batch: int, context: int, warmup: int, steps: int, profile_steps: int,
                 kernels_out: list | None = None, graphs: bool = False, padded: bool = False) -> dict:
    """Wall and GPU time of one-token steps; ``graphs``: replayed from CUDA graphs (aquakv: :class:`CapturedDecode`,
    which also runs the eager steps a compression needs; StaticCache: one captured step); ``padded``: every other
    row starts with :data:`PADS` padding tokens (steps get the attention mask and each row's positions)."""
    ids = torch.randint(0, model.config.vocab_size, (batch, 1), device=DEV)
    state = {"pos": context}
    static = type(cache).__name__ == "StaticCache"
    padding = None
    if padded:
        padding = torch.ones(batch, context, dtype=torch.long, device=DEV)
        padding[1::2, :PADS] = 0

    def step():
        kw = {}
        if static:
            kw["cache_position"] = torch.tensor([state["pos"]], device=DEV)
        if padding is not None:
            full = torch.cat([padding, padding.new_ones(batch, state["pos"] + 1 - context)], 1)
            kw.update(attention_mask=full, position_ids=full.sum(-1, keepdim=True) - 1)
        with torch.no_grad():
            out = model(input_ids=ids, use_cache=True, **kw, **cache_kwargs(model, cache))
        state["pos"] += 1
        return out

    runner = None
    if graphs and static:
        step = static_graph_step(model, cache, ids, state)
    elif graphs and not isinstance(cache, AquaKVCache):
        raise ValueError(f"no CUDA-graph steps for a {type(cache).__name__} (its update concatenates)")
    elif graphs:
        runner = CapturedDecode(model, cache, attention_mask=padding)
        step = functools.partial(runner, ids)

    walls = event_times(step, warmup, steps)
    g = gpu_ms(step, profile_steps, kernels_out)
    rec = {"wall_ms_per_token": statistics.median(walls), "wall_ms_mean": statistics.fmean(walls),
           "gpu_ms_per_token": g, "wall_step_ms": walls}
    if runner is not None:
        rec["captured_steps"] = runner.counts
    return rec


def e2e(args, model, settings: KernelSettings, records: list, save, result: dict) -> None:
    note = quanto_note()
    for context in args.contexts:
        for batch in args.batches:
            for kind in args.caches:
                rec = {"cache": kind, "context": context, "batch": batch}
                if kind.startswith("quanto") and note:
                    rec["unavailable"] = note
                    records.append(rec)
                    continue
                if time.time() - T0 > args.budget_s:
                    rec["skipped"] = "time budget"
                    records.append(rec)
                    continue
                cache = None
                try:
                    free()
                    torch.cuda.reset_peak_memory_stats()
                    base, padded = kind.removesuffix("-padded"), kind.endswith("-padded")
                    base, graphs = base.removesuffix("-graphs"), base.endswith("-graphs")
                    cache, nbytes, extra = make_cache(base, model, batch, context, args.window, settings)
                    rec.update(kv_bytes=nbytes, **extra)
                    rows: list = []
                    rec.update(decode_steps(model, cache, batch, context, args.warmup, args.steps, 3, rows, graphs,
                                            padded))
                    rec["top_kernels"] = rows[:12]
                    if kind.startswith("aquakv"):
                        rec["scratch_bytes"] = cache.shared.scratch_nbytes()
                    rec["peak_gpu_bytes"] = torch.cuda.max_memory_allocated()
                except torch.OutOfMemoryError as e:
                    rec.update(oom=True, error=str(e).splitlines()[0][:200])
                except Exception as e:  # noqa: BLE001
                    rec.update(error=f"{type(e).__name__}: {e}"[:400])
                    traceback.print_exc()
                finally:
                    del cache
                    free()
                log("e2e", json.dumps({k: v for k, v in rec.items() if k not in ("wall_step_ms", "top_kernels")}))
                records.append(rec)
                save()


def host_profile(args, model, settings: KernelSettings, result: dict, save) -> None:
    """Where a batch-1 step's host (CPU) time goes: ``cProfile`` over 10 decode steps per cache at the first context
    (the wall time of an uncaptured step is host-bound at batch 1; the GPU time is the e2e section's)."""
    import cProfile
    import pstats

    context, out = args.contexts[0], []
    for kind in args.caches:
        cache = None
        try:
            free()
            cache, _, _ = make_cache(kind, model, 1, context, args.window, settings)
            decode_steps(model, cache, 1, context, 3, 1, 1)  # warm: compiled kernels, scratch, cached operands
            ids = torch.randint(0, model.config.vocab_size, (1, 1), device=DEV)
            prof = cProfile.Profile()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            prof.enable()
            with torch.no_grad():
                for _ in range(10):
                    model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
                torch.cuda.synchronize()
            prof.disable()
            ms = (time.perf_counter() - t0) * 100  # per step (ms)
            stats = pstats.Stats(prof)
            rows = sorted(((f"{Path(fn).name}:{line}({name})", st[2] / 10 * 1e3, st[3] / 10 * 1e3, st[1] / 10)
                           for (fn, line, name), st in stats.stats.items()), key=lambda r: -r[1])
            out.append({"cache": kind, "context": context, "host_ms_per_step": ms,
                        "top_self": rows[:25], "top_cumulative": sorted(rows, key=lambda r: -r[2])[:40]})
            log("host", kind, f"{ms:.2f} ms/step;", ", ".join(f"{r[0]} {r[1]:.2f}" for r in rows[:8]))
        except Exception as e:  # noqa: BLE001
            traceback.print_exc()
            out.append({"cache": kind, "error": f"{type(e).__name__}: {e}"[:400]})
        finally:
            del cache
            free()
        result["host"] = out
        save()


def generate_speed(args, model, settings: KernelSettings, result: dict, save) -> None:
    """transformers' ``model.generate`` end to end (a real prefill of ``--gen-prompt`` random tokens, then
    ``--gen-tokens`` greedy tokens): DynamicCache, an AQUA-KV kind's ordinary steps, and with a ``-graphs`` suffix
    the same through ``custom_generate=captured_decoding`` (steady steps replayed from CUDA graphs). Decode wall ms
    per step = (whole generate - a 1-token generate) / (new tokens - 1), CUDA events; GPU ms per step the same
    difference of profiler kernel sums."""
    from transformers import DynamicCache

    from aquakv.graphs import captured_decoding

    out = result.setdefault("generate", [])
    cfg = model.config
    for batch in args.batches:
        # no pad token (0) in the prompt: generate would mask it as padding (sdpa's masked kernels, the padded steps)
        ids = torch.randint(1, cfg.vocab_size, (batch, args.gen_prompt), device=DEV)
        for kind in args.gen_caches:
            rec = {"cache": kind, "batch": batch, "prompt": args.gen_prompt, "new_tokens": args.gen_tokens,
                   "prefill_chunk": args.gen_prefill_chunk}
            try:
                base, graphs = kind.removesuffix("-graphs"), kind.endswith("-graphs")
                codecs = prediction = key_residual = None
                if base != "dynamic":  # drawn once, outside the timed runs (each run gets a fresh cache)
                    rank, grids, prediction, key_residual = aquakv_kind(base)
                    codecs = make_codecs(cfg.num_hidden_layers, cfg.num_key_value_heads * cfg.head_dim, rank,
                                         grids=grids)

                def run(n: int, graphs=graphs, ids=ids, codecs=codecs, prediction=prediction,
                        key_residual=key_residual):
                    if codecs is None:
                        cache = DynamicCache(config=cfg)
                    else:
                        cache = AquaKVCache(codecs, CacheConfig(), model.model.rotary_emb, model=model,
                                            kernels=settings.with_(prediction=prediction, key_residual=key_residual))
                    extra = {"custom_generate": captured_decoding} if graphs else {}
                    with torch.no_grad():
                        return model.generate(ids, max_new_tokens=n, min_new_tokens=n, do_sample=False,
                                              pad_token_id=0, prefill_chunk_size=args.gen_prefill_chunk,
                                              **cache_kwargs(model, cache), **extra)

                run(args.gen_tokens)  # every kind of step once: first compilations stay out of the timings
                walls = [events_ms(lambda n=n: run(n), 0, 2) for n in (1, args.gen_tokens)]
                tables: list[list] = [[], []]
                gpus = [gpu_ms(lambda n=n: run(n), 1, t) for n, t in zip((1, args.gen_tokens), tables, strict=True)]
                rec["kernels"] = [[{"name": k, "ms": ms, "calls": calls} for k, ms, calls in t[:12]] for t in tables]
                steps = args.gen_tokens - 1
                rec.update(prefill_wall_ms=walls[0], decode_wall_ms_per_step=(walls[1] - walls[0]) / steps,
                           decode_gpu_ms_per_step=(gpus[1] - gpus[0]) / steps,
                           decode_tokens_per_s=batch * steps / ((walls[1] - walls[0]) / 1e3))
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                rec["error"] = f"{type(e).__name__}: {e}"[:400]
            free()
            log("generate", json.dumps(rec))
            out.append(rec)
            save()


def budget(args, model, settings: KernelSettings, result: dict, save) -> None:
    """Tokens/s at a fixed KV budget with 32k contexts: as many sequences as fit (KV bytes + AQUA-KV's scratch)."""
    context = 32768
    out = []
    for kind in args.budget_caches:
        rec = {"cache": kind, "context": context, "budget_bytes": args.kv_budget}
        try:
            free()
            cache, nbytes, _ = make_cache(kind, model, 1, context, args.window, settings)
            per_seq = nbytes
            if kind.startswith("aquakv"):
                decode_steps(model, cache, 1, context, 1, 1, 1)  # materializes the scratch
                per_seq += cache.shared.scratch_nbytes()
            del cache
            free()
            n = int(args.kv_budget // per_seq)
            rec.update(bytes_per_sequence=per_seq, max_batch_at_budget=n)
            cache, _, _ = make_cache(kind, model, n, context, args.window, settings)
            kernels: list = []
            r = decode_steps(model, cache, n, context, 2, 3, 2, kernels_out=kernels)
            rec["kernels"] = [{"name": k, "ms": ms, "calls": calls} for k, ms, calls in kernels[:20]]
            rec.update(batch=n, gpu_ms_per_token=r["gpu_ms_per_token"], wall_ms_per_token=r["wall_ms_per_token"],
                       tokens_per_s_at_budget=n / (r["gpu_ms_per_token"] / 1e3),
                       tokens_per_s_at_budget_wall=n / (r["wall_ms_per_token"] / 1e3),
                       peak_gpu_bytes=torch.cuda.max_memory_allocated())
            del cache
        except torch.OutOfMemoryError as e:
            rec.update(oom=True, error=str(e).splitlines()[0][:200])
        except Exception as e:  # noqa: BLE001
            rec.update(error=f"{type(e).__name__}: {e}"[:400])
            traceback.print_exc()
        free()
        log("budget", json.dumps(rec))
        out.append(rec)
        result["budget"] = out
        save()


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--out", default="docs/benchmarks/decode.json")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--contexts", type=int, nargs="+", default=[32768, 8192])
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--caches", nargs="+", default=["dynamic", "static", "quanto-int4", "quanto-int2",
                                                   "aquakv-full", "aquakv-r64", "aquakv-r128"],
                   help="e2e caches: dynamic, static, quanto-int4|int2, aquakv-<full|r64|r128|r256>[-d4][-stored]; "
                        "a '-graphs' suffix (static, aquakv) replays the steps from CUDA graphs; a last '-padded' "
                        "pads every other row's first 1000 tokens")
    p.add_argument("--budget-caches", nargs="+", default=["dynamic", "aquakv-r64"])
    p.add_argument("--layer-caches", nargs="+", default=list(RANKS),
                   help="AQUA-KV kinds of the layer section (aquakv-<full|r64|r128|r256>[-d4][-stored])")
    p.add_argument("--kv-budget", type=float, default=64e9)
    p.add_argument("--gen-caches", nargs="+", default=["dynamic", "aquakv-r256-stored", "aquakv-r256-stored-graphs"],
                   help="generate section: dynamic, or aquakv kinds; '-graphs': custom_generate=captured_decoding")
    p.add_argument("--gen-prompt", type=int, default=4096, help="generate section: prompt tokens")
    p.add_argument("--gen-tokens", type=int, default=129, help="generate section: new tokens")
    p.add_argument("--gen-prefill-chunk", type=int, default=None,
                   help="generate section: the prompt in passes of this many tokens (prefill_chunk_size; a 32k "
                        "prompt at batch 8 ran out of memory in one pass on an H100)")
    p.add_argument("--window", type=int, default=32, help="exact recent tokens at the start (< 128 - steps)")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--steps", type=int, default=8)
    p.add_argument("--layer-batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--sections", nargs="+", default=["ceilings", "layer", "e2e", "budget"],
                   help="ceilings sweep stored stored_once merge_sweep layer e2e host budget generate (stored: each "
                        "kernel variant of the sweep with its first launch: registers, spills, GPU ms; stored_once: "
                        "the same without timing, for a kernel profiler)")
    p.add_argument("--sweep-rank", type=int, default=64, help="predictor rank of the sweep section's layer")
    p.add_argument("--sweep-kinds", nargs="+", default=["chained", "stored"], choices=("chained", "stored"),
                   help="kernel families of the sweep / stored sections (default both)")
    p.add_argument("--sweep-launches", nargs="+", type=launch_arg, default=None,
                   help="the stored family's launches, each 'tokens,warps,stages[,register cap]' (default: "
                        "STORED_LAUNCHES)")
    p.add_argument("--no-floors", action="store_true", help="sweep the stored kernel without its two floors")
    p.add_argument("--sweep-grids", default="d2", choices=sorted(GRIDS), help="grids of the sweep section's layer")
    p.add_argument("--scratch", default="bf16", choices=["bf16", "fp8"])
    p.add_argument("--value-latents", default="auto", choices=["auto", "fused", "deferred"],
                   help="stored projections: where the value predictor's low-rank term is computed (KernelSettings)")
    p.add_argument("--budget-s", type=float, default=480.0, help="skip remaining e2e configs after this many seconds")
    args = p.parse_args()

    import transformers
    import triton

    torch.backends.cuda.enable_cudnn_sdp(False)  # same sdpa backends (flash / efficient / math) for every cache
    settings = KernelSettings.from_env(scratch=args.scratch, value_latents=args.value_latents)
    result: dict = {
        "device": torch.cuda.get_device_name(0), "date": datetime.datetime.now(datetime.UTC).date().isoformat(),
        "command": "python benchmarks/decode.py " + " ".join(sys.argv[1:]),
        "versions": {"torch": torch.__version__, "transformers": transformers.__version__,
                     "triton": triton.__version__, "python": platform.python_version()},
        "model": {"shape": "Llama-3.1-8B (hidden 4096, 32 heads, 8 KV heads, head_dim 128, MLP 14336, vocab 128256)",
                  "layers": args.layers, "weights": "random bf16", "attention": "sdpa, cuDNN SDPA disabled"},
        "aquakv": {"quantizer": "HIGGS g=64, fp16 scale per group; layer 0 d=2 n=256 (4 bits); layers >= 1 d=2 n=16 "
                                "(2 bits), kinds with -d4: keys d=4 n=512 (2.25 bits), values d=4 n=256 (2 bits); "
                                "kinds ending -stored: prediction=\"stored\" (float8 projections per token)",
                   "sinks": 4, "window_at_start": args.window, "settings": repr(settings),
                   "note": "random codes and predictors; the fused kernel reconstructs every compressed token of "
                           "every layer every step from the previous layer's scratch"},
        "timing": "gpu_ms = sum of CUDA kernel durations per step (torch.profiler); wall_ms = CUDA events",
        "records": [], "layer": [], "budget": [],
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)

    def save() -> None:
        out.write_text(json.dumps(result, indent=1))
        if os.environ.get("OUT"):
            Path(os.environ["OUT"], out.name).write_text(json.dumps(result, indent=1))

    log(result["device"], result["versions"], settings)
    if "ceilings" in args.sections:
        bw = copy_bandwidth(1 << 32)
        a = torch.randn(8192, 8192, device=DEV, dtype=torch.bfloat16)
        ms = events_ms(lambda: a @ a, 3, 10)
        result["ceilings"] = {"copy_bytes_per_s": bw, "bf16_matmul_flops_per_s": 2 * 8192**3 / (ms / 1e3)}
        log("ceilings", result["ceilings"])
        del a
        free()
        save()
    if "sweep" in args.sections:
        result["sweep"] = []
        for batch in args.layer_batches:
            result["sweep"] += sweep(batch, 32768, settings, args.sweep_rank, args.sweep_grids,
                                     kinds=tuple(args.sweep_kinds), stored_launches=args.sweep_launches,
                                     floors=not args.no_floors)
            save()
    stored = [s for s in ("stored", "stored_once") if s in args.sections]
    if stored:  # stored_once: three launches, no timing (for a kernel profiler: `ncu --kernel-name regex:_decode`)
        from aquakv.kernels.jit import _decode_attention_kernel

        result[stored[0]] = []
        for batch in args.layer_batches:
            for name, fn in sweep(batch, 32768, settings, args.sweep_rank, args.sweep_grids, once=True,
                                 kinds=tuple(args.sweep_kinds)):
                rec = {"batch": batch, "grids": args.sweep_grids, "kernel": name}
                try:
                    before = {id(k) for k in compiled_kernels(_decode_attention_kernel)}
                    for _ in range(3):
                        fn()
                    torch.cuda.synchronize()
                    new = [k for k in compiled_kernels(_decode_attention_kernel) if id(k) not in before]
                    if len(new) == 1:  # fn's own compilation (one reused from an earlier variant is not attributed)
                        rec |= {"registers": new[0].n_regs, "spills": new[0].n_spills}
                    if stored[0] == "stored":
                        rec["gpu_ms"] = gpu_ms(fn, 10)
                except Exception as e:  # noqa: BLE001  (a launch that does not fit is recorded, as in the sweep)
                    rec["error"] = f"{type(e).__name__}: {e}"[:300]
                result[stored[0]].append(rec)
                log(stored[0], json.dumps(rec))
            save()
    if "merge_sweep" in args.sections:
        result["merge_sweep"] = []
        for batch in args.layer_batches:
            result["merge_sweep"] += merge_sweep(batch, 32768)
            save()
    if "layer" in args.sections:
        for batch in args.layer_batches:
            try:
                result["layer"] += layer_costs(batch, 32768, settings, args.layer_caches)
            except Exception as e:  # noqa: BLE001
                traceback.print_exc()
                result["layer"].append({"batch": batch, "error": f"{type(e).__name__}: {e}"[:400]})
            free()
            save()
    model = None
    if {"e2e", "budget", "host", "generate"} & set(args.sections):
        model = build_model(args.layers)
        log(f"model: {args.layers} layers, {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B params")
    if "e2e" in args.sections:
        e2e(args, model, settings, result["records"], save, result)
    if "budget" in args.sections:
        budget(args, model, settings, result, save)
    if "generate" in args.sections:
        generate_speed(args, model, settings, result, save)
    if "host" in args.sections:
        host_profile(args, model, settings, result, save)
    save()
    print(f"{'cache':14s} {'ctx':>6s} {'B':>2s} {'GPU ms':>8s} {'wall ms':>8s} {'KV MB':>9s}")
    for r in result["records"]:
        if "gpu_ms_per_token" in r:
            print(f"{r['cache']:14s} {r['context']:6d} {r['batch']:2d} {r['gpu_ms_per_token']:8.2f} "
                  f"{r['wall_ms_per_token']:8.2f} {(r['kv_bytes'] or 0) / 1e6:9.1f}")
        else:
            print(f"{r['cache']:14s} {r['context']:6d} {r['batch']:2d} {r.get('error') or r.get('unavailable') or r}")


if __name__ == "__main__":
    main()
