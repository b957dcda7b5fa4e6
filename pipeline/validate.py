"""Held-out validation of a bundle: perplexity with the exact cache vs the AQUA-KV cache, and a quality gate.

Tokens are fed in ``step``-token chunks so that the AQUA-KV cache really compresses during the pass (a single
full-sequence forward would attend to exact keys and values only). Held-out sequences too short for any prediction
to read a compressed token (they never leave the exact sinks + recent window) are refused: such a validation
measures nothing, and the gate refuses metrics where no prediction read a compressed token.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import torch
from transformers import DynamicCache

from aquakv.bundle import Bundle
from aquakv.cache import AquaKVCache
from aquakv.config import CacheConfig
from aquakv.errors import CalibrationError
from aquakv.eval import window_nll
from pipeline.fit import LayerFit


def compressed_predictions(length: int, cache: CacheConfig, step: int) -> int:
    """How many of the ``length - 1`` predictions of one sequence fed in ``step``-token chunks attend to compressed
    tokens: the cache compresses after the first chunk that fills sinks + recent window; later chunks read them."""
    if not cache.compress:
        return 0
    first = math.ceil((cache.sinks + cache.recent_window) / step) * step
    return max(0, length - 1 - first)


def validate(
    model: torch.nn.Module,
    tokens_heldout: torch.Tensor,
    bundle: Bundle,
    step: int = 32,
    cache: CacheConfig | None = None,
    fits: Sequence[LayerFit] | None = None,
    batch_size: int = 8,
) -> dict:
    """Held-out metrics of ``bundle`` on ``tokens_heldout [n, T]``.

    ``cache`` overrides the bundle's cache layout. Returns ``ppl_exact``, ``ppl_aquakv``, ``ppl_increase``
    (relative: ``ppl_aquakv / ppl_exact - 1``), ``tokens``, ``bits_per_value`` (the codes: index, scales, total),
    ``cache_bits_per_value`` (bits the AQUA-KV cache held per key/value at the end of each sequence, exact sinks
    and recent window included), ``compressed_predictions`` (predictions that read compressed tokens) and, with
    ``fits``, ``layers``: each layer's fit metrics.
    """
    if tokens_heldout.ndim != 2 or tokens_heldout.shape[1] < 2 or tokens_heldout.shape[0] < 1:
        raise CalibrationError(f"held-out tokens must be [n >= 1, T >= 2], got {tuple(tokens_heldout.shape)}")
    layout = cache or bundle.cache
    length = tokens_heldout.shape[1]
    if layout.compress and not compressed_predictions(length, layout, step):
        raise CalibrationError(
            f"held-out sequences of {length} tokens never leave the exact sinks + recent window ({layout.sinks} + "
            f"{layout.recent_window} tokens, fed {step} at a time), so validation would measure nothing: use held-out "
            f"sequences longer than {math.ceil((layout.sinks + layout.recent_window) / step) * step + 1} tokens "
            "(seq_len) or a smaller recent window"
        )
    fingerprint = bundle.fingerprint
    values_per_token = 2 * fingerprint["num_layers"] * fingerprint["num_kv_heads"] * fingerprint["head_dim"]
    nll_exact = nll_aquakv = 0.0
    count = cache_bits = cached_values = 0
    for rows in tokens_heldout.long().split(batch_size):
        exact, _ = window_nll(model, rows, DynamicCache(config=model.config), step)
        aquakv_cache = AquaKVCache.from_bundle(bundle, model, cache=cache)
        aquakv, n = window_nll(model, rows, aquakv_cache, step)
        nll_exact, nll_aquakv, count = nll_exact + exact, nll_aquakv + aquakv, count + n
        cache_bits += 8 * aquakv_cache.nbytes()
        cached_values += values_per_token * rows.numel()
    ppl_exact, ppl_aquakv = math.exp(nll_exact / count), math.exp(nll_aquakv / count)
    metrics = {
        "ppl_exact": ppl_exact,
        "ppl_aquakv": ppl_aquakv,
        "ppl_increase": ppl_aquakv / ppl_exact - 1,
        "tokens": count,
        "step": step,
        "bits_per_value": bundle.bits_per_value(),
        "cache_bits_per_value": cache_bits / cached_values,
        "compressed_predictions": len(tokens_heldout) * compressed_predictions(length, layout, step),
    }
    if fits is not None:
        metrics["layers"] = [{"layer": f.layer, **f.metrics} for f in fits]
    return metrics


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
