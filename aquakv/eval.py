"""Perplexity with a cache that really compresses during the pass: each window is fed in ``step``-token chunks."""

from __future__ import annotations

import logging
import math
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm.auto import tqdm
from transformers.cache_utils import Cache

from aquakv.baselines import held_bytes, make_cache
from aquakv.bundle import Bundle
from aquakv.compat import cache_kwargs
from aquakv.config import CacheConfig
from aquakv.errors import DataError
from aquakv.family import head_dim, kv_heads
from aquakv.kernels.settings import KernelSettings

log = logging.getLogger(__name__)


def chunk_starts(length: int, step: int, first: int | None = None) -> list[int]:
    """Where each chunk starts when a ``length``-token sequence is fed ``step`` tokens at a time after a first chunk
    of ``first`` (default ``step``) tokens; the last token is only a target, so no chunk starts at it (the last
    chunk runs to the end)."""
    if step < 1 or (first is not None and first < 1):
        raise ValueError(f"chunks must hold >= 1 token, got step={step}, first={first}")
    first = step if first is None else first
    return [0, *range(first, length - 1, step)] if length > 1 else []


def decode_chunking(layout: CacheConfig) -> tuple[int, int]:
    """``(step, first)`` under which a chunked pass through an AQUA-KV cache compresses exactly as token-by-token
    decode does: every chunk ends where the recent window fills (the first one after the sinks and one window), so
    each token attends to the same compressed and exact tokens as it would decoded alone. Chunks of one recent window
    are the fewest that do (a 32-token step would also end chunks where the window is part full, and let some tokens
    see up to ``recent_window + 31`` exact ones)."""
    return layout.recent_window, layout.sinks + layout.recent_window


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, cache: Cache, step: int,
               first: int | None = None) -> tuple[float, int]:
    """Summed next-token NLL of ``ids [B, T]`` fed through ``model`` in ``step``-token chunks (the first ``first``
    tokens, default ``step``: :func:`chunk_starts`) with ``cache``.

    Returns ``(sum_nll, count)`` with ``count = B * (T - 1)``: every token but the first is predicted once.
    """
    device = next(model.parameters()).device
    ids = ids.to(device)
    starts = chunk_starts(ids.shape[1], step, first)
    total, count = 0.0, 0
    for start, stop in zip(starts, [*starts[1:], ids.shape[1]], strict=True):
        chunk = ids[:, start:stop]
        targets = ids[:, start + 1 : stop + 1]
        logits = model(input_ids=chunk, **cache_kwargs(model, cache), use_cache=True).logits[:, : targets.shape[1]]
        total += float(torch.nn.functional.cross_entropy(logits.float().reshape(-1, logits.shape[-1]),
                                                         targets.reshape(-1), reduction="sum"))
        count += targets.numel()
    return total, count


def perplexity(model: torch.nn.Module, windows: torch.Tensor, cache_factory: Callable[[], Cache], step: int = 32,
               batch: int = 1, desc: str | None = None) -> float:
    """Perplexity over ``windows [N, T]`` (non-overlapping), a fresh cache per batch of windows."""
    nll, count = 0.0, 0
    for i in tqdm(range(0, len(windows), batch), desc=desc, disable=desc is None, leave=False):
        n, c = window_nll(model, windows[i : i + batch], cache_factory(), step)
        nll, count = nll + n, count + c
    return math.exp(nll / count)


def text_windows(tokenizer: object, path: Path, length: int, count: int) -> torch.Tensor:
    """``count`` non-overlapping ``length``-token windows spread evenly over a text file -> ``[count, length]``."""
    ids = tokenizer(path.read_text(), return_tensors="pt").input_ids[0]
    n = len(ids) // length
    if n == 0:
        raise DataError(f"{path} has {len(ids)} tokens, fewer than one {length}-token window; pass a longer text or a "
                        "smaller --window")
    picks = torch.linspace(0, n - 1, min(count, n)).round().long().unique()
    return torch.stack([ids[i * length : (i + 1) * length] for i in picks.tolist()])


def compare_methods(model: torch.nn.Module, bundle: Bundle, windows: torch.Tensor, methods: list[str], step: int,
                    cache: CacheConfig | None = None, kernels: KernelSettings | None = None) -> list[dict]:
    """Perplexity, measured held bytes and bits/value per method on the same windows (``kernels``: the AQUA-KV
    caches' settings, e.g. ``prediction="stored"``)."""
    rows = []
    exact_ppl = None
    for method in methods:
        try:
            factory = make_cache(method, model, bundle, cache, kernels)
        except ValueError as e:
            log.warning("skipping %s: %s", method, e)
            continue
        ppl = perplexity(model, windows, factory, step, desc=method)
        held = factory()
        window_nll(model, windows[:1], held, step)
        nbytes = held_bytes(held)
        cfg = model.config
        values = 2 * cfg.num_hidden_layers * kv_heads(cfg) * head_dim(cfg) * windows.shape[1]
        exact_ppl = ppl if method == "exact" else exact_ppl
        rows.append({"method": method, "ppl": ppl, "held_bytes": nbytes, "measured_bits_per_value": 8 * nbytes / values,
                     "rel_increase": None if exact_ppl is None else ppl / exact_ppl - 1})
    return rows
