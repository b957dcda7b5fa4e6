"""The one place that knows how the installed ``transformers`` takes a cache.

transformers 5.24 renamed the ``past_key_values=`` argument of ``forward``/``generate`` to ``cache=`` (the old name
warns, and is to be removed in 5.40 / 6.0); the GPU image has 5.17, which only knows ``past_key_values=``. Call sites
write ``model(ids, **cache_kwargs(model, cache))`` and never spell either name.
"""

from __future__ import annotations

import inspect
from functools import cache as _memo

import torch


@_memo
def _cache_name(forward_type: type) -> str:
    params = inspect.signature(forward_type.forward).parameters
    return "cache" if "cache" in params else "past_key_values"


def cache_kwarg_name(model: torch.nn.Module) -> str:
    """``"cache"`` where ``model.forward`` takes ``cache=`` (transformers >= 5.24), else ``"past_key_values"``."""
    return _cache_name(type(model))


def cache_kwargs(model: torch.nn.Module, cache: object) -> dict[str, object]:
    """``{name: cache}`` for ``model(...)`` / ``model.generate(...)`` under the installed transformers."""
    return {cache_kwarg_name(model): cache}


@_memo
def _takes_cache_position(forward_type: type) -> bool:
    return "cache_position" in inspect.signature(forward_type.forward).parameters


def position_kwargs(model: torch.nn.Module, position_ids: torch.Tensor,
                    cache_position: torch.Tensor) -> dict[str, torch.Tensor]:
    """The positions of a step for ``model(...)``: ``position_ids [B, Q]``, and ``cache_position [Q]`` where
    ``forward`` still takes it (transformers < 5.24 derives it from the cache's length on the host otherwise)."""
    kw = {"position_ids": position_ids}
    if _takes_cache_position(type(model)):
        kw["cache_position"] = cache_position
    return kw


@_memo
def _takes_logits_to_keep(forward_type: type) -> bool:
    return "logits_to_keep" in inspect.signature(forward_type.forward).parameters


def last_logits_kwargs(model: torch.nn.Module) -> dict[str, int]:
    """``{"logits_to_keep": 1}`` where ``forward`` takes it: a prompt's pass computes only its last position's logits
    (``[B, T, vocab]`` of a 32k prompt and a 128k vocabulary is 8 GiB per sequence in bf16)."""
    return {"logits_to_keep": 1} if _takes_logits_to_keep(type(model)) else {}
