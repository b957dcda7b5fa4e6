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
:class:`HeldoutValidation` on a :class:`pipeline.checkpoint.Checkpoint` one decoder layer at a time, what the flow's
Ray workers run (a 70B model never sits whole on one device or on the flow's host): every chunk of every held-out
sequence goes through layer ``l`` before layer ``l + 1`` (:class:`LayerMajorPass`), each layer called with the
arguments the model's own forward gives it for that chunk and cache, and the cache's step state
(:meth:`AquaKVCache.step_state`) carried from layer to layer per chunk. The layers come either from a stream of the
checkpoint (:func:`streamed_sums`, each layer loaded once for both passes) or from the resident calibration chain,
which hands each layer and its freshly fitted codec to the passes while the layer is loaded for calibration. All
reduce to the same sums (:func:`metrics_from`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Sequence
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


class LayerMajorPass:
    """One pass of ``ids [B, T]`` fed in chunks (``starts``) through a checkpoint's decoder layers one layer at a time:
    every chunk goes through layer ``l`` before layer ``l + 1``, so each layer is loaded once.

    The constructor records, per chunk, the hidden states entering layer 0 and every layer's call (mask, position
    embeddings, cache position) from the model's own forward, against a ``DynamicCache`` of zeros advanced chunk by
    chunk (masks depend only on how many tokens each layer's cache holds). :meth:`layer` then runs the chunks through
    one layer with the real cache; an ``AquaKVCache``'s step state after layer ``l`` of chunk ``c`` is restored before
    layer ``l + 1`` of chunk ``c``, so each layer compresses and reconstructs exactly as in a whole-model pass.
    :meth:`nll` takes the logits from the model's own forward after the last layer (:meth:`Checkpoint.logits`).
    """

    @torch.no_grad()
    def __init__(self, ckpt: Checkpoint, ids: torch.Tensor, starts: list[int], device: str | torch.device,
                 dtype: torch.dtype) -> None:
        self.ckpt, self.starts, self.ids = ckpt, starts, ids.to(device)
        base = ckpt.base(torch.device(device), dtype)
        self.rotary = rotary_module(base)
        tracker = DynamicCache(config=ckpt.config)
        self.stops = [*starts[1:], ids.shape[1]]
        self.hidden, self.calls, self.positions = [], [], []
        for start, stop in zip(starts, self.stops, strict=True):
            chunk = self.ids[:, start:stop]
            pos = torch.arange(start, start + chunk.shape[1], device=device)[None]
            h, layer_calls = layer_inputs(base, input_ids=chunk, position_ids=pos, use_cache=True,
                                          **cache_kwargs(base, tracker))
            self.hidden.append(h.to(dtype))
            self.calls.append(layer_calls)
            self.positions.append(pos)
            zeros = torch.zeros(1, kv_heads(ckpt.config), chunk.shape[1], ckpt.head_dim, device=device, dtype=dtype)
            for i in range(ckpt.num_layers):
                tracker.update(zeros, zeros, i)
        self.states: list[dict] | None = None
        self.tuple_out = False

    @torch.no_grad()
    def layer(self, i: int, layer: nn.Module, cache: Cache) -> None:
        """Every chunk through layer ``i`` (layers come in order) with ``cache``."""
        stateful = isinstance(cache, AquaKVCache)
        saved = []
        with attention_backends():
            for c in range(len(self.starts)):
                if self.states is not None:
                    cache.restore_step_state(self.states[c])
                if i == 0:  # what the pass's rotary call told the cache: the chunk's token positions
                    remember_positions(self.rotary, self.positions[c])
                call = self.calls[c][i]
                out = layer(self.hidden[c], *call.args, **{**call.kwargs, cache_kwarg(call): cache})
                self.tuple_out = isinstance(out, tuple)
                self.hidden[c] = out[0] if self.tuple_out else out
                if stateful:
                    saved.append(cache.step_state())
        if stateful:
            cache.forget_reconstructions(i)
        self.states = saved if stateful else None

    @torch.no_grad()
    def nll(self) -> tuple[float, int]:
        """:func:`aquakv.eval.window_nll`'s sums (summed NLL, predictions) once every layer has run."""
        total, count = 0.0, 0
        for c, (start, stop) in enumerate(zip(self.starts, self.stops, strict=True)):
            targets = self.ids[:, start + 1:stop + 1]
            logits = self.ckpt.logits(self.hidden[c], self.tuple_out)[:, :targets.shape[1]]
            total += float(torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                             targets.reshape(-1), reduction="sum"))
            count += targets.numel()
        return total, count


def streamed_nll(ckpt: Checkpoint, ids: torch.Tensor, cache: Cache, step: int, device: str | torch.device = "cpu",
                 dtype: torch.dtype = torch.float32, first: int | None = None) -> tuple[float, int]:
    """:func:`aquakv.eval.window_nll`'s sums for ``ids [B, T]`` fed in ``step``-token chunks (the first ``first``)
    through ``cache``, with the checkpoint streamed one decoder layer at a time (:class:`LayerMajorPass`)."""
    run = LayerMajorPass(ckpt, ids, chunk_starts(ids.shape[1], step, first), device, dtype)
    for i, layer in LayerStream(ckpt, range(ckpt.num_layers), device, dtype):
        run.layer(i, layer, cache)
    return run.nll()


class HeldoutValidation:
    """Validation of held-out rows ``[n, T]`` driven one decoder layer at a time by whoever holds the layers: the
    exact pass (``DynamicCache``, :data:`EXACT_STEP`-token chunks; it also probes each layer's :class:`LayerSpec` and
    the model fingerprint) and the AQUA-KV pass (reconstruct-then-attend, chunks: :func:`chunking`), each a
    :class:`LayerMajorPass`. Call :meth:`exact_layer` then :meth:`aquakv_layer` for layers 0, 1, ... in order, then
    :meth:`sums`.

    Layer ``l``'s codec is needed only when the AQUA-KV pass reaches layer ``l``: the resident chain
    (:class:`pipeline.resident.ResidentShard`) hands it over right after fitting it, while the layer is still loaded,
    so validation rides along calibration and loads no layer again; :func:`streamed_sums` streams the checkpoint once
    for both passes. The AQUA-KV pass reads layer ``l`` through a cache of layers ``0..l`` (the codecs and RoPE of
    later layers are not known yet); the step state hands each chunk's reconstructions from one to the next.
    """

    def __init__(self, ckpt: Checkpoint, rows: torch.Tensor, layout: CacheConfig, step: int | None = None,
                 device: str | torch.device = "cpu", dtype: torch.dtype = torch.float32) -> None:
        _check_heldout(rows, layout, step)
        self.ckpt, self.layout, self.device, self.rows = ckpt, layout, torch.device(device), rows.long()
        length = rows.shape[1]
        self.exact = LayerMajorPass(ckpt, self.rows, chunk_starts(length, EXACT_STEP), device, dtype)
        self.aquakv = LayerMajorPass(ckpt, self.rows, chunk_starts(length, *chunking(layout, step)), device, dtype)
        self.exact_cache = DynamicCache(config=ckpt.config)
        self.specs: list[LayerSpec] = []
        self.codecs: list[LayerCodec] = []
        self.probes: dict[str, torch.Tensor] = {}
        self.cache_bytes = self.positions_bytes = 0
        self.layer_seconds: dict[str, list[float]] = {"exact": [], "aquakv": []}

    @property
    def done(self) -> bool:
        """Whether both passes went through every layer."""
        return len(self.codecs) == self.ckpt.num_layers

    def _timed(self, name: str, t0: float) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        self.layer_seconds[name].append(time.perf_counter() - t0)

    def exact_layer(self, i: int, layer: nn.Module) -> None:
        """The exact pass through layer ``i`` (the next one), probing its spec (and the fingerprint's weights)."""
        if i != len(self.specs):
            raise CalibrationError(f"held-out exact pass: layer {i} out of order (expected {len(self.specs)})")
        t0 = time.perf_counter()
        self.specs.append(self.ckpt.spec(i, layer))
        if i == 0:
            self.probes["first"] = attention_weights(layer)[0].float().cpu()
        if i == self.ckpt.num_layers - 1:
            self.probes["last"] = attention_weights(layer)[-1].float().cpu()
        self.exact.layer(i, layer, self.exact_cache)
        self._timed("exact", t0)

    def aquakv_layer(self, i: int, layer: nn.Module, codec: LayerCodec) -> None:
        """The AQUA-KV pass through layer ``i`` (after :meth:`exact_layer` of it) with layer ``i``'s ``codec``."""
        if i != len(self.codecs) or i >= len(self.specs):
            raise CalibrationError(f"held-out AQUA-KV pass: layer {i} out of order (expected {len(self.codecs)}, "
                                   f"exact pass at {len(self.specs)})")
        t0 = time.perf_counter()
        self.codecs.append(codec)
        cache = AquaKVCache(self.codecs, self.layout, rotary_module(self.ckpt.skeleton), kernels=validation_kernels(),
                            specs=self.specs[:i + 1])
        self.aquakv.layer(i, layer, cache)
        self.cache_bytes += cache.layers[i].nbytes()
        self.positions_bytes = cache.positions_nbytes()
        self._timed("aquakv", t0)

    def sums(self) -> tuple[dict, dict]:
        """The sums :func:`metrics_from` takes (with ``seconds``: each pass's total and the median of its layers after
        the first, layer loads not included) and the model fingerprint."""
        if not self.done:
            raise CalibrationError(f"held-out validation ran {len(self.codecs)} of {self.ckpt.num_layers} layers")
        fingerprint = model_fingerprint(self.ckpt.config, self.probes["first"], self.probes["last"], self.specs)
        exact, count = self.exact.nll()
        aquakv, _ = self.aquakv.nll()
        seconds: dict[str, float] = {}
        for name, times in self.layer_seconds.items():  # the steady cost of a layer: the first also pays start-up
            steady = sorted(times[1:] or times)
            seconds[name] = round(sum(times), 3)
            seconds[f"{name}_median_layer"] = round(steady[len(steady) // 2], 3)
        return ({"nll_exact": exact, "nll_aquakv": aquakv, "count": count,
                 "cache_bits": 8 * (self.cache_bytes + self.positions_bytes),
                 "cached_values": 2 * self.ckpt.num_layers * self.ckpt.kv_dim * self.rows.numel(),
                 "seconds": seconds}, fingerprint)


def streamed_sums(ckpt: Checkpoint, tokens_heldout: torch.Tensor, codecs: Sequence[LayerCodec], layout: CacheConfig,
                  step: int | None = None, device: str | torch.device = "cpu",
                  dtype: torch.dtype = torch.float32) -> tuple[dict, dict]:
    """One worker's validation of ``tokens_heldout [n, T]`` (all rows in one pass) on a checkpoint streamed once:
    each layer is loaded once and goes through both passes of :class:`HeldoutValidation`. Returns its sums and the
    model fingerprint."""
    if len(codecs) != ckpt.num_layers:
        raise CalibrationError(f"{len(codecs)} layer codecs for a checkpoint of {ckpt.num_layers} layers")
    run = HeldoutValidation(ckpt, tokens_heldout, layout, step, device, dtype)
    for i, layer in LayerStream(ckpt, range(ckpt.num_layers), device, dtype):
        run.exact_layer(i, layer)
        run.aquakv_layer(i, layer, codecs[i])
    return run.sums()


def heldout_rows(tokens_path: str | Path, start: int, stop: int) -> torch.Tensor:
    """Held-out sequences ``[start, stop)`` of a tokens store (``heldout``)."""
    return torch.from_numpy(zarr.open_group(str(tokens_path), mode="r")["heldout"][start:stop]).long()


def heldout_sums(ckpt: Checkpoint, tokens_path: str | Path, start: int, stop: int, codecs: Sequence[LayerCodec],
                 layout: CacheConfig, device: str | torch.device, dtype: torch.dtype) -> tuple[dict, dict]:
    """:func:`streamed_sums` of the held-out sequences ``[start, stop)`` of a tokens store (``heldout``): one
    worker's share of the flow's validation."""
    return streamed_sums(ckpt, heldout_rows(tokens_path, start, stop), codecs, layout, device=device, dtype=dtype)


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
