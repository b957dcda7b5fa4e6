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

log = logging.getLogger(__name__)


@torch.no_grad()
def window_nll(model: torch.nn.Module, ids: torch.Tensor, cache: Cache, step: int) -> tuple[float, int]:
    """Summed next-token NLL of ``ids [B, T]`` fed through ``model`` in ``step``-token chunks with ``cache``.

    Returns ``(sum_nll, count)`` with ``count = B * (T - 1)``: every token but the first is predicted once.
    """
    if step < 1:
        raise ValueError(f"step must be >= 1, got {step}")
    device = next(model.parameters()).device
    ids = ids.to(device)
    total, count = 0.0, 0
    for start in range(0, ids.shape[1] - 1, step):
        chunk = ids[:, start : start + step]
        targets = ids[:, start + 1 : start + step + 1]
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
                    cache: CacheConfig | None = None) -> list[dict]:
    """Perplexity, measured held bytes and bits/value per method on the same windows."""
    rows = []
    exact_ppl = None
    for method in methods:
        try:
            factory = make_cache(method, model, bundle, cache)
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
