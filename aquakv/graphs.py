"""One-token decode steps replayed from CUDA graphs.

An uncaptured decode step of a small batch is host-bound: Python and ~160 kernel launches per step of an 8B model
cost ~45 ms of CPU time against ~12 ms of GPU time at 32k on an H100 (docs/benchmarks/decode.md, round 25). Between
two compressions of the recent window every step launches the same kernels on the same buffers; only the window's
length grows. :class:`CapturedDecode` captures such a step once and replays it:

- the cache writes the step's token at a device index and the kernels read the exact length from the device
  (:meth:`aquakv.cache.AquaKVCache.capturable`), so one graph serves every window length;
- the host counters (tokens seen, window lengths, positions) move after each replay
  (:meth:`~aquakv.cache.AquaKVCache.advance`);
- a step that changes the cache's layout (a sink, the compression of a full window, another batch) runs eagerly, and
  the next steady step captures again: about once per ``recent_window`` steps.

Batches without padding only (every row at the same position, no attention mask).
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from aquakv.cache import AquaKVCache
from aquakv.compat import cache_kwargs, position_kwargs


def _layout(cache: AquaKVCache) -> tuple:
    """What a captured graph's launches depend on besides the device-side lengths: each layer's compressed length
    and the buffers it reads (exact tokens, codes), the scratch buffers."""
    layers = tuple((layer.compressed_len, layer.exact.keys.data_ptr(),
                    layer.compressed.keys.codes.data_ptr() if layer.compressed is not None else 0)
                   for layer in cache.layers)
    return layers, tuple(t.data_ptr() for t in cache.shared.scratch or [] if t is not None)


class CapturedDecode:
    """``model`` decoding one token per call with ``cache``, steady steps replayed from a CUDA graph (module
    docstring). ``graphs=False`` runs the same captured-step protocol without graphs (the PyTorch reference of it;
    the default on a CPU)."""

    def __init__(self, model: torch.nn.Module, cache: AquaKVCache, graphs: bool | None = None):
        self.model, self.cache = model, cache
        self.graphs = graphs if graphs is not None else torch.cuda.is_available()
        if self.graphs and not torch.cuda.is_available():
            raise ValueError("CUDA graphs need a CUDA device: pass graphs=False (or leave it to the default)")
        self.graph: torch.cuda.CUDAGraph | None = None
        self.layout: tuple | None = None  # the layout the graph was captured on, or the last uncaptured step ran on
        self.static: dict[str, torch.Tensor] = {}
        self.held: torch.Tensor | None = None  # the token positions the graph reads (advance replaces the tensor)
        self.counts = {"eager": 0, "uncaptured": 0, "captures": 0, "replays": 0}

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, vocab]`` after ``input_ids [B, 1]`` (a new tensor); the cache advances by one token."""
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"CapturedDecode takes one token per sequence, [B, 1]; got {list(input_ids.shape)}")
        if self.cache.capturable(input_ids.shape[0], self.graphs) is not None:
            self.graph = self.layout = None
            self.counts["eager"] += 1
            with torch.no_grad():
                return self.model(input_ids=input_ids, use_cache=True, **cache_kwargs(self.model, self.cache)).logits
        layout = _layout(self.cache)
        self._inputs(input_ids)
        if self.graph is not None and layout == self.layout:
            self.graph.replay()
            logits = self.static["logits"]
            self.counts["replays"] += 1
        elif not self.graphs or layout != self.layout:  # the first steady step of a layout warms its code paths
            self.graph, self.layout = None, layout
            logits = self._forward()
            self.counts["uncaptured"] += 1
        else:
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph):
                self.static["logits"] = self._forward()
            self.graph, self.held = graph, self.cache.shared.positions  # (a capture that raised leaves no graph)
            self.graph.replay()  # capturing ran nothing
            logits = self.static["logits"]
            self.counts["captures"] += 1
        self.cache.advance(self.static["position_ids"])
        return logits.clone()

    def _inputs(self, input_ids: torch.Tensor) -> None:
        """The step's inputs written into the static buffers the graph reads."""
        b, dev = input_ids.shape[0], input_ids.device
        s = self.static
        if "input_ids" not in s or s["input_ids"].shape[0] != b:
            s.clear()
            s.update(input_ids=torch.empty_like(input_ids),
                     position_ids=torch.empty(b, 1, dtype=torch.long, device=dev),
                     slot=torch.empty(1, dtype=torch.long, device=dev),
                     exact=torch.empty(1, dtype=torch.int32, device=dev))
            self.graph = None
        held = self.cache.layers[0].exact.length
        s["input_ids"].copy_(input_ids)
        s["position_ids"].fill_(self.cache.get_seq_length())
        s["slot"].fill_(held)
        s["exact"].fill_(held + 1)

    def _forward(self) -> torch.Tensor:
        s, shared = self.static, self.cache.shared
        shared.step_slot, shared.step_exact = s["slot"], s["exact"]
        try:
            with torch.no_grad():
                out = self.model(input_ids=s["input_ids"], use_cache=True, **cache_kwargs(self.model, self.cache),
                                 **position_kwargs(self.model, s["position_ids"], s["position_ids"][0]))
        finally:
            shared.step_slot = shared.step_exact = None
        return out.logits


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely next tokens ``[B, 1]`` from the last position's logits ``[B, vocab]``."""
    return logits.argmax(-1, keepdim=True)


def generate(model: torch.nn.Module, cache: AquaKVCache, input_ids: torch.Tensor, max_new_tokens: int,
             graphs: bool | None = None, sample: Callable[[torch.Tensor], torch.Tensor] = greedy,
             eos_token_id: int | None = None) -> torch.Tensor:
    """Decoding with ``cache``: the prompt ``input_ids [B, T]`` (no padding) in one forward pass, then one token per
    step through :class:`CapturedDecode`, each picked by ``sample`` from the last position's logits ``[B, vocab]``
    (-> ``[B, 1]``; default :func:`greedy`, the tokens ``model.generate(..., do_sample=False)`` picks). Returns
    ``[B, T + n]``, ``n = max_new_tokens``, or fewer with ``eos_token_id``: a sequence that produced it goes on with
    it, and decoding stops once every sequence has (as ``model.generate`` with ``pad_token_id=eos_token_id``; one
    host read per step)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or max_new_tokens < 0:
        raise ValueError(f"generate takes a prompt [B, T >= 1] and max_new_tokens >= 0; got {list(input_ids.shape)} "
                         f"and {max_new_tokens}")
    with torch.no_grad():
        logits = model(input_ids=input_ids, use_cache=True, **cache_kwargs(model, cache)).logits
    step = CapturedDecode(model, cache, graphs)
    out = [input_ids]
    done = torch.zeros(input_ids.shape[0], 1, dtype=torch.bool, device=input_ids.device)
    for i in range(max_new_tokens):
        tokens = sample(logits[:, -1])
        if eos_token_id is not None:
            tokens = torch.where(done, eos_token_id, tokens)
            done |= tokens == eos_token_id
        out.append(tokens)
        if i + 1 == max_new_tokens or (eos_token_id is not None and bool(done.all())):
            break
        logits = step(tokens)
    return torch.cat(out, 1)
