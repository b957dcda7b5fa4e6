"""Held-out validation of a bundle: perplexity with the exact cache vs the AQUA-KV cache, and a quality gate.

Tokens are fed in chunks so that the AQUA-KV cache really compresses during the pass (a single full-sequence forward
would attend to exact keys and values only). By default the chunks end where the recent window fills
(:func:`aquakv.eval.decode_chunking`: one recent window per chunk after a first chunk of sinks + one window), so every
held-out token attends to exactly the compressed and exact tokens it would see decoded alone, in the fewest layer
calls; an explicit ``step`` feeds fixed ``step``-token chunks instead (tests, the quality benchmark's protocol).
Held-out sequences too short for any prediction to read a compressed token (they never leave the exact sinks + recent
window) are refused: such a validation measures nothing, and the gate refuses metrics where no prediction read a
compressed token.

Two ways to run the same passes: :func:`validate` on a model in memory (tests, benchmarks), and
:func:`streamed_sums` on a :class:`pipeline.checkpoint.Checkpoint` read one decoder layer at a time, what the flow's
Ray workers run (a 70B model never sits whole on one device or on the flow's host): every chunk of every held-out
sequence goes through layer ``l`` before layer ``l + 1`` is loaded, each layer called with the arguments the model's
own forward gives it for that chunk and cache, and the cache's step state (:meth:`AquaKVCache.step_state`) carried
from layer to layer per chunk; both reduce to the same sums (:func:`metrics_from`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from contextlib import AbstractContextManager
from pathlib import Path

import torch
import zarr
from torch import nn
from torch.nn.attention import SDPBackend, sdpa_kernel
from transformers import DynamicCache
from transformers.cache_utils import Cache

from aquakv.bundle import Bundle, attention_weights, bits_per_value, model_fingerprint
from aquakv.cache import AquaKVCache
from aquakv.codec import LayerCodec
from aquakv.compat import cache_kwargs
from aquakv.config import CacheConfig
from aquakv.errors import CalibrationError
from aquakv.eval import chunk_starts, decode_chunking, window_nll
from aquakv.family import LayerSpec, cache_kwarg, kv_heads, layer_inputs, rotary_module
from aquakv.kernels.settings import KernelSettings
from aquakv.rope import remember_positions
from pipeline.checkpoint import Checkpoint, LayerStream
from pipeline.solve import LayerFit

EXACT_STEP = 256  # the exact pass's chunk: its NLL does not depend on the chunking, so fewer, larger chunks


def validation_kernels() -> KernelSettings:
    """The AQUA-KV pass's cache settings: reconstruct-then-attend (the layers' step state is handed on between
    chunks) keeping each layer's reconstruction across chunks, so each token is reconstructed once per layer
    instead of at every later chunk (the O(T²) reconstruction work and step-state memory of a 32-token-step pass)."""
    return KernelSettings.from_env(attention="full", keep_reconstructions=True)


def attention_backends() -> AbstractContextManager:
    """SDPA without the cuDNN backend for validation's passes: cuDNN plans anew for every key length (24 ms of CPU
    per layer call on an H100, 2026-11-26: ``benchmarks/calibration_stages.py --profile``) and each held-out chunk
    meets a new length. Flash, memory-efficient and math attention compute the same softmax."""
    return sdpa_kernel([SDPBackend.FLASH_ATTENTION, SDPBackend.EFFICIENT_ATTENTION, SDPBackend.MATH])


def chunking(layout: CacheConfig, step: int | None) -> tuple[int, int | None]:
    """``(step, first)`` of the AQUA-KV pass (:func:`aquakv.eval.chunk_starts`): fixed ``step``-token chunks, or with
    ``step=None`` the chunks of token-by-token decode (:func:`aquakv.eval.decode_chunking`)."""
    return decode_chunking(layout) if step is None else (step, None)


def _first_compressed_read(layout: CacheConfig, step: int | None) -> int:
    """Where the first chunk that reads compressed tokens starts: the cache compresses after the first chunk that
    fills sinks + recent window."""
    step, first = chunking(layout, step)
    end = step if first is None else first
    while end - layout.sinks < layout.recent_window:
        end += step
    return end


def compressed_predictions(length: int, cache: CacheConfig, step: int | None = None) -> int:
    """How many of the ``length - 1`` predictions of one sequence fed in chunks (:func:`chunking`) attend to
    compressed tokens."""
    if not cache.compress:
        return 0
    return max(0, length - 1 - _first_compressed_read(cache, step))


def check_heldout_length(length: int, layout: CacheConfig, step: int | None = None) -> None:
    """Refuse held-out rows too short for any prediction to read a compressed token (the flow checks it up front)."""
    if layout.compress and not compressed_predictions(length, layout, step):
        raise CalibrationError(
            f"held-out sequences of {length} tokens never leave the exact sinks + recent window ({layout.sinks} + "
            f"{layout.recent_window} tokens), so validation would measure nothing: use held-out sequences longer "
            f"than {_first_compressed_read(layout, step) + 1} tokens (seq_len, heldout_seq_len) or a smaller recent "
            "window"
        )


def _check_heldout(tokens_heldout: torch.Tensor, layout: CacheConfig, step: int | None) -> None:
    if tokens_heldout.ndim != 2 or tokens_heldout.shape[1] < 2 or tokens_heldout.shape[0] < 1:
        raise CalibrationError(f"held-out tokens must be [n >= 1, T >= 2], got {tuple(tokens_heldout.shape)}")
    check_heldout_length(tokens_heldout.shape[1], layout, step)


def metrics_from(sums: Sequence[dict], codecs: Sequence[LayerCodec], kv_dim: int, layout: CacheConfig,
                 heldout_shape: tuple[int, int], step: int | None = None,
                 fits: Sequence[LayerFit] | None = None) -> dict:
    """Held-out metrics from per-batch sums ``{nll_exact, nll_aquakv, count, cache_bits, cached_values}``: see
    :func:`validate`."""
    total = {k: sum(p[k] for p in sums) for k in ("nll_exact", "nll_aquakv", "count", "cache_bits", "cached_values")}
    chunk, first = chunking(layout, step)
    ppl_exact = math.exp(total["nll_exact"] / total["count"])
    ppl_aquakv = math.exp(total["nll_aquakv"] / total["count"])
    metrics = {
        "ppl_exact": ppl_exact,
        "ppl_aquakv": ppl_aquakv,
        "ppl_increase": ppl_aquakv / ppl_exact - 1,
        "tokens": total["count"],
        "step": chunk,
        "first_chunk": first or chunk,
        "bits_per_value": bits_per_value(list(codecs), kv_dim),
        "cache_bits_per_value": total["cache_bits"] / total["cached_values"],
        "compressed_predictions": heldout_shape[0] * compressed_predictions(heldout_shape[1], layout, step),
    }
    if fits is not None:
        metrics["layers"] = [{"layer": f.layer, **f.metrics} for f in fits]
    return metrics


def validate(
    model: torch.nn.Module,
    tokens_heldout: torch.Tensor,
    bundle: Bundle,
    step: int | None = None,
    cache: CacheConfig | None = None,
    fits: Sequence[LayerFit] | None = None,
    batch_size: int = 8,
) -> dict:
    """Held-out metrics of ``bundle`` on ``tokens_heldout [n, T]`` with ``model`` in memory.

    ``cache`` overrides the bundle's cache layout; ``step``: see :func:`chunking`. Returns ``ppl_exact``,
    ``ppl_aquakv``, ``ppl_increase`` (relative: ``ppl_aquakv / ppl_exact - 1``), ``tokens``, ``bits_per_value`` (the
    codes: index, scales, total), ``cache_bits_per_value`` (bits the AQUA-KV cache held per key/value at the end of each
    sequence, exact sinks and recent window included), ``compressed_predictions`` (predictions that read compressed
    tokens) and, with ``fits``, ``layers``: each layer's fit metrics.
    """
    layout = cache or bundle.cache
    _check_heldout(tokens_heldout, layout, step)
    fingerprint = bundle.fingerprint
    values_per_token = 2 * fingerprint["num_layers"] * fingerprint["num_kv_heads"] * fingerprint["head_dim"]
    sums = []
    for rows in tokens_heldout.long().split(batch_size):
        with attention_backends():
            sums.append(_window_sums(model, rows, bundle, layout, step, values_per_token))
    kv_dim = fingerprint["num_kv_heads"] * fingerprint["head_dim"]
    return metrics_from(sums, bundle.codecs, kv_dim, layout, tuple(tokens_heldout.shape), step, fits)


def _window_sums(model: torch.nn.Module, rows: torch.Tensor, bundle: Bundle, layout: CacheConfig, step: int | None,
                 values_per_token: int) -> dict:
    exact, _ = window_nll(model, rows, DynamicCache(config=model.config), EXACT_STEP)
    aquakv_cache = AquaKVCache.from_bundle(bundle, model, cache=layout, kernels=validation_kernels())
    aquakv, n = window_nll(model, rows, aquakv_cache, *chunking(layout, step))
    return {"nll_exact": exact, "nll_aquakv": aquakv, "count": n, "cache_bits": 8 * aquakv_cache.nbytes(),
            "cached_values": values_per_token * rows.numel()}


@torch.no_grad()
def streamed_nll(ckpt: Checkpoint, ids: torch.Tensor, cache: Cache, step: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, on_layer: Callable[[int, nn.Module], None] | None = None,
                 first: int | None = None, layer_seconds: list[float] | None = None) -> tuple[float, int]:
    """:func:`aquakv.eval.window_nll`'s sums for ``ids [B, T]`` fed in ``step``-token chunks (the first ``first``)
    through ``cache``, with the checkpoint streamed one decoder layer at a time (each loaded once; ``on_layer(i,
    layer)`` sees it first).

    A first pass records, per chunk, the hidden states entering layer 0 and every layer's call (mask, position
    embeddings, cache position) from the model's own forward, against a ``DynamicCache`` of zeros advanced chunk by
    chunk (masks depend only on how many tokens each layer's cache holds). Then every chunk goes through layer
    ``l`` in order with the real ``cache``; an ``AquaKVCache``'s step state after layer ``l`` of chunk ``c`` is
    restored before layer ``l + 1`` of chunk ``c``, so each layer compresses and reconstructs exactly as in a
    whole-model pass. Logits come from the model's own forward after its last layer (:meth:`Checkpoint.logits`).
    ``layer_seconds`` receives each layer's wall seconds (its load wait included; the device synchronized after it)."""
    with attention_backends():
        return _streamed_nll(ckpt, ids, cache, chunk_starts(ids.shape[1], step, first), device, dtype, on_layer,
                             layer_seconds)


def _streamed_nll(ckpt: Checkpoint, ids: torch.Tensor, cache: Cache, starts: list[int], device: str | torch.device,
                  dtype: torch.dtype, on_layer: Callable[[int, nn.Module], None] | None,
                  layer_seconds: list[float] | None) -> tuple[float, int]:
    ids = ids.to(device)
    base = ckpt.base(torch.device(device), dtype)
    rotary = rotary_module(base)
    tracker = DynamicCache(config=ckpt.config)
    stops = [*starts[1:], ids.shape[1]]
    hidden, calls, positions = [], [], []
    for start, stop in zip(starts, stops, strict=True):
        chunk = ids[:, start:stop]
        pos = torch.arange(start, start + chunk.shape[1], device=device)[None]
        h, layer_calls = layer_inputs(base, input_ids=chunk, position_ids=pos, use_cache=True,
                                      **cache_kwargs(base, tracker))
        hidden.append(h.to(dtype))
        calls.append(layer_calls)
        positions.append(pos)
        zeros = torch.zeros(1, kv_heads(ckpt.config), chunk.shape[1], ckpt.head_dim, device=device, dtype=dtype)
        for i in range(ckpt.num_layers):
            tracker.update(zeros, zeros, i)
    del tracker
    stateful = isinstance(cache, AquaKVCache)
    states: list[dict] | None = None
    tuple_out = False
    mark = time.perf_counter()
    for i, layer in LayerStream(ckpt, range(ckpt.num_layers), device, dtype):
        if on_layer is not None:
            on_layer(i, layer)
        saved = []
        for c in range(len(starts)):
            if states is not None:
                cache.restore_step_state(states[c])
            if i == 0:  # what the pass's rotary call told the cache: the chunk's token positions
                remember_positions(rotary, positions[c])
            call = calls[c][i]
            kwargs = {**call.kwargs, cache_kwarg(call): cache}
            out = layer(hidden[c], *call.args, **kwargs)
            tuple_out = isinstance(out, tuple)
            hidden[c] = out[0] if tuple_out else out
            if stateful:
                saved.append(cache.step_state())
        if stateful:
            cache.forget_reconstructions(i)
        states = saved if stateful else None
        if layer_seconds is not None:
            if torch.device(device).type == "cuda":
                torch.cuda.synchronize(device)
            layer_seconds.append(time.perf_counter() - mark)
            mark = time.perf_counter()
    total, count = 0.0, 0
    for c, (start, stop) in enumerate(zip(starts, stops, strict=True)):
        targets = ids[:, start + 1:stop + 1]
        logits = ckpt.logits(hidden[c], tuple_out)[:, :targets.shape[1]]
        total += float(torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                         targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return total, count


def streamed_sums(ckpt: Checkpoint, tokens_heldout: torch.Tensor, codecs: Sequence[LayerCodec], layout: CacheConfig,
                  step: int | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """One worker's validation of ``tokens_heldout [n, T]`` (all rows in one pass) on a streamed checkpoint: the
    exact pass (``DynamicCache``, :data:`EXACT_STEP`-token chunks) also probes each layer's :class:`LayerSpec` and
    the model fingerprint, then the AQUA-KV pass (reconstruct-then-attend: the fused path's scratch is handed on in
    place; chunks: :func:`chunking`). Returns the sums :func:`metrics_from` takes (with ``seconds`` of each pass and
    the median of its layers after the first) and the fingerprint."""
    _check_heldout(tokens_heldout, layout, step)
    specs: dict[int, LayerSpec] = {}
    probes: dict[str, torch.Tensor] = {}

    def probe(i: int, layer: nn.Module) -> None:
        specs[i] = ckpt.spec(i, layer)
        if i == 0:
            probes["first"] = attention_weights(layer)[0].float().cpu()
        if i == ckpt.num_layers - 1:
            probes["last"] = attention_weights(layer)[-1].float().cpu()

    rows = tokens_heldout.long()
    per_layer: dict[str, list[float]] = {"exact": [], "aquakv": []}
    t0 = time.perf_counter()
    exact, count = streamed_nll(ckpt, rows, DynamicCache(config=ckpt.config), EXACT_STEP, device, dtype, probe,
                                layer_seconds=per_layer["exact"])
    t1 = time.perf_counter()
    spec_list = [specs[i] for i in range(ckpt.num_layers)]
    fingerprint = model_fingerprint(ckpt.config, probes["first"], probes["last"], spec_list)
    cache = AquaKVCache(list(codecs), layout, rotary_module(ckpt.skeleton), kernels=validation_kernels(),
                        specs=spec_list)
    step, first = chunking(layout, step)
    aquakv, _ = streamed_nll(ckpt, rows, cache, step, device, dtype, first=first, layer_seconds=per_layer["aquakv"])
    seconds = {"exact": round(t1 - t0, 3), "aquakv": round(time.perf_counter() - t1, 3)}
    for name, times in per_layer.items():  # the steady cost of a layer: the first also pays start-up and probes
        steady = sorted(times[1:] or times)
        seconds[f"{name}_median_layer"] = round(steady[len(steady) // 2], 3)
    return ({"nll_exact": exact, "nll_aquakv": aquakv, "count": count, "cache_bits": 8 * cache.nbytes(),
             "cached_values": 2 * ckpt.num_layers * ckpt.kv_dim * rows.numel(), "seconds": seconds}, fingerprint)


def heldout_sums(ckpt: Checkpoint, tokens_path: str | Path, start: int, stop: int, codecs: Sequence[LayerCodec],
                 layout: CacheConfig, device: str | torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """:func:`streamed_sums` of the held-out sequences ``[start, stop)`` of a tokens store (``heldout``): one
    worker's share of the flow's validation."""
    heldout = torch.from_numpy(zarr.open_group(str(tokens_path), mode="r")["heldout"][start:stop]).long()
    return streamed_sums(ckpt, heldout, codecs, layout, device=device, dtype=dtype)


def check_gate(metrics: dict, max_ppl_increase: float) -> None:
    """Raise :class:`CalibrationError` when the relative perplexity increase exceeds ``max_ppl_increase``, or when
    no prediction read a compressed token (nothing was measured)."""
    if not metrics["compressed_predictions"]:
        raise CalibrationError(
            "validation measured nothing: no held-out prediction read a compressed token (sequences within the "
            "sinks + recent window, or compression off); use longer held-out sequences or a smaller recent window"
        )
    increase = metrics["ppl_increase"]
    if not math.isfinite(increase) or increase > max_ppl_increase:
        raise CalibrationError(
            f"validation gate missed: held-out perplexity {metrics['ppl_aquakv']:.4g} with AQUA-KV vs "
            f"{metrics['ppl_exact']:.4g} exact (+{increase:.2%}), the gate allows +{max_ppl_increase:.2%}; "
            "use more bits (keys/values quantizers), a larger recent window or more calibration samples, "
            "or raise max_ppl_increase"
        )
