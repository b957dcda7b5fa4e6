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

Padded batches: the prompt's attention mask is given once (``attention_mask=``); each row's positions count its own
tokens, and a captured step masks the pads with a per-layout copy of that mask over the cache's keys
(:attr:`aquakv.attention.Segments.valid`), not with the mask the model builds (its length is the host's).

:func:`generate` is a greedy / sampling loop over these steps; :func:`captured_decoding` is transformers' own, for
``model.generate(..., custom_generate=captured_decoding)``.
"""

from __future__ import annotations

from collections.abc import Callable

import torch

from aquakv.cache import AquaKVCache
from aquakv.compat import cache_kwarg_name, cache_kwargs, last_logits_kwargs, position_kwargs


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
    the default on a CPU). ``attention_mask [B, T]``: which of the ``T`` tokens already in the cache are attended
    (1) or padding (0); every token after them is attended."""

    def __init__(self, model: torch.nn.Module, cache: AquaKVCache, graphs: bool | None = None,
                 attention_mask: torch.Tensor | None = None):
        self.model, self.cache = model, cache
        self.graphs = graphs if graphs is not None else torch.cuda.is_available()
        if self.graphs and not torch.cuda.is_available():
            raise ValueError("CUDA graphs need a CUDA device: pass graphs=False (or leave it to the default)")
        self.padding: torch.Tensor | None = None  # [B, T] bool, the prompt's mask (None: no padding)
        self.pads: torch.Tensor | None = None  # [B, 1] pad tokens per row: a row's position = tokens seen - pads
        if attention_mask is not None:
            seen = cache.get_seq_length()
            if attention_mask.dim() != 2 or attention_mask.shape[1] != seen:
                raise ValueError(f"attention_mask must be [B, {seen}] (one column per token in the cache); got "
                                 f"{list(attention_mask.shape)}")
            if not bool(attention_mask.all()):
                self.padding = attention_mask.bool()
                self.pads = (~self.padding).sum(-1, keepdim=True)
        self.graph: torch.cuda.CUDAGraph | None = None
        self.layout: tuple | None = None  # the layout the graph was captured on, or the last uncaptured step ran on
        self.static: dict[str, torch.Tensor] = {}
        self.held: torch.Tensor | None = None  # the token positions the graph reads (advance replaces the tensor)
        self.counts = {"eager": 0, "uncaptured": 0, "captures": 0, "replays": 0}

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Logits ``[B, 1, vocab]`` after ``input_ids [B, 1]`` (a new tensor); the cache advances by one token."""
        if input_ids.dim() != 2 or input_ids.shape[1] != 1:
            raise ValueError(f"CapturedDecode takes one token per sequence, [B, 1]; got {list(input_ids.shape)}")
        if self.padding is not None and input_ids.shape[0] != self.padding.shape[0]:
            raise ValueError(f"{input_ids.shape[0]} sequences, but the attention mask has {self.padding.shape[0]}")
        if self.cache.capturable(input_ids.shape[0], self.graphs) is not None:
            self.graph = self.layout = None
            self.counts["eager"] += 1
            with torch.no_grad():
                return self.model(input_ids=input_ids, use_cache=True, **cache_kwargs(self.model, self.cache),
                                  **self._eager_masks()).logits
        layout = _layout(self.cache)
        self._inputs(input_ids)
        if self.graph is not None and layout == self.layout:
            self.graph.replay()
            logits = self.static["logits"]
            self.counts["replays"] += 1
        elif not self.graphs or layout != self.layout:  # the first steady step of a layout warms its code paths
            self.graph, self.layout = None, layout
            self._padding_of_layout()
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
                     exact=torch.empty(1, dtype=torch.int32, device=dev),
                     cache_position=torch.empty(1, dtype=torch.long, device=dev))  # (padded batches)
            self.graph = None
        held, seen = self.cache.layers[0].exact.length, self.cache.get_seq_length()
        s["input_ids"].copy_(input_ids)
        if self.pads is None:
            s["position_ids"].fill_(seen)
        else:
            torch.sub(seen, self.pads, out=s["position_ids"])
            s["cache_position"].fill_(seen)
        s["slot"].fill_(held)
        s["exact"].fill_(held + 1)

    def _eager_masks(self) -> dict[str, torch.Tensor]:
        """An eager step's attention mask and positions for a padded batch (else none: the model's defaults)."""
        if self.padding is None:
            return {}
        b, seen, dev = self.padding.shape[0], self.cache.get_seq_length(), self.padding.device
        mask = torch.cat([self.padding.long(), self.padding.new_ones(b, seen + 1 - self.padding.shape[1],
                                                                     dtype=torch.long)], 1)
        return {"attention_mask": mask, **position_kwargs(self.model, seen - self.pads,
                                                          torch.arange(seen, seen + 1, device=dev))}

    def _padding_of_layout(self) -> None:
        """For a padded batch, the keys a step of this layout attends: ``[B, 1, 1, compressed + exact buffer]``,
        the prompt's mask over its tokens and every later one attended (:attr:`aquakv.attention.Segments.valid`;
        the cache keeps every token in order, so key column ``j`` is token ``j``)."""
        if self.padding is None:
            return
        widths = {layer.compressed_len + layer.exact.keys.shape[2] for layer in self.cache.layers}
        if len(widths) != 1:
            raise ValueError(f"the layers' key spans differ ({sorted(widths)}): a padded batch needs ordinary steps")
        valid = self.padding.new_ones(self.padding.shape[0], 1, 1, widths.pop())
        valid[:, 0, 0, : self.padding.shape[1]] = self.padding
        self.static["valid"] = valid

    def _forward(self) -> torch.Tensor:
        s, shared = self.static, self.cache.shared
        shared.step_slot, shared.step_exact, shared.step_valid = s["slot"], s["exact"], s.get("valid")
        cache_position = s["position_ids"][0] if self.pads is None else s["cache_position"]
        try:
            with torch.no_grad():
                out = self.model(input_ids=s["input_ids"], use_cache=True, **cache_kwargs(self.model, self.cache),
                                 **position_kwargs(self.model, s["position_ids"], cache_position))
        finally:
            shared.step_slot = shared.step_exact = shared.step_valid = None
        return out.logits


def _prefill(model: torch.nn.Module, cache: AquaKVCache, input_ids: torch.Tensor,
             attention_mask: torch.Tensor | None, chunk: int | None = None) -> torch.Tensor:
    """The prompt's forward passes into ``cache``, ``chunk`` tokens at a time (None: one pass; a long prompt's
    activations scale with the tokens per pass): the last position's logits ``[B, 1, vocab]`` (all of the last
    pass's where the model cannot keep fewer). With a padding mask the positions count each row's own tokens (as
    ``model.generate`` computes them)."""
    b, t = input_ids.shape
    if attention_mask is not None and attention_mask.shape != input_ids.shape:
        raise ValueError(f"attention_mask {list(attention_mask.shape)} must match input_ids {list(input_ids.shape)}")
    if chunk is not None and chunk < 1:
        raise ValueError(f"the prompt's chunk must be >= 1 token; got {chunk}")
    if attention_mask is not None:
        positions = (attention_mask.long().cumsum(-1) - 1).masked_fill(attention_mask == 0, 0)
    else:
        positions = torch.arange(t, device=input_ids.device).expand(b, t)
    step = chunk or t
    with torch.no_grad():
        for start in range(0, t, step):
            end = min(start + step, t)
            masks = {} if attention_mask is None else {"attention_mask": attention_mask[:, :end]}
            cache_position = torch.arange(start, end, device=input_ids.device)
            logits = model(input_ids=input_ids[:, start:end], use_cache=True, **cache_kwargs(model, cache), **masks,
                           **position_kwargs(model, positions[:, start:end], cache_position),
                           **last_logits_kwargs(model)).logits
    return logits


def captured_decoding(model: torch.nn.Module, input_ids: torch.Tensor, logits_processor, stopping_criteria,
                      generation_config, synced_gpus: bool = False, streamer=None, **model_kwargs) -> torch.Tensor:
    """transformers' greedy / sampling loop with the steady steps replayed from CUDA graphs (:class:`CapturedDecode`):
    ``model.generate(input_ids, custom_generate=captured_decoding, ...)`` with an empty :class:`AquaKVCache` as its
    cache. ``generate`` prepares the logits processors, stopping criteria and padding as usual (and
    ``prefill_chunk_size`` splits the prompt's pass); this loop applies them
    as its own greedy / sampling loop does (a finished sequence goes on with the pad token). Returns the token ids
    ``[B, T + new]``."""
    cache = model_kwargs.get(cache_kwarg_name(model))
    if not isinstance(cache, AquaKVCache) or cache.get_seq_length():
        raise ValueError("captured_decoding decodes into an empty AquaKVCache given to generate as its cache; got "
                         f"{type(cache).__name__}" + (" holding tokens" if isinstance(cache, AquaKVCache) else ""))
    if synced_gpus or generation_config.return_dict_in_generate:
        raise ValueError("captured_decoding returns the token ids of one process: no return_dict_in_generate, no "
                         "synced_gpus")
    attention_mask = model_kwargs.get("attention_mask")
    logits = _prefill(model, cache, input_ids, attention_mask, generation_config.prefill_chunk_size)
    step = CapturedDecode(model, cache, attention_mask=attention_mask)
    pad = generation_config._pad_token_tensor
    pads_finished = any(hasattr(c, "eos_token_id") for c in stopping_criteria)
    unfinished = torch.ones(input_ids.shape[0], dtype=torch.long, device=input_ids.device)
    while True:
        scores = logits_processor(input_ids, logits[:, -1].to(torch.float32))
        if generation_config.do_sample:
            tokens = torch.multinomial(torch.softmax(scores, -1), num_samples=1).squeeze(1)
        else:
            tokens = scores.argmax(-1)
        if pads_finished:
            tokens = tokens * unfinished + pad * (1 - unfinished)
        input_ids = torch.cat([input_ids, tokens[:, None]], -1)
        if streamer is not None:
            streamer.put(tokens.cpu())
        unfinished = unfinished & ~stopping_criteria(input_ids, None)
        if not bool(unfinished.any()):
            break
        logits = step(tokens[:, None])
    if streamer is not None:
        streamer.end()
    return input_ids


def greedy(logits: torch.Tensor) -> torch.Tensor:
    """The most likely next tokens ``[B, 1]`` from the last position's logits ``[B, vocab]``."""
    return logits.argmax(-1, keepdim=True)


def generate(model: torch.nn.Module, cache: AquaKVCache, input_ids: torch.Tensor, max_new_tokens: int,
             graphs: bool | None = None, sample: Callable[[torch.Tensor], torch.Tensor] = greedy,
             eos_token_id: int | None = None, attention_mask: torch.Tensor | None = None,
             prefill_chunk: int | None = None) -> torch.Tensor:
    """Decoding with ``cache``: the prompt ``input_ids [B, T]`` in one forward pass, then one token per step through
    :class:`CapturedDecode`, each picked by ``sample`` from the last position's logits ``[B, vocab]`` (-> ``[B, 1]``;
    default :func:`greedy`, the tokens ``model.generate(..., do_sample=False)`` picks). ``attention_mask [B, T]``: the
    prompt's padding (0), as for ``model.generate``; ``prefill_chunk``: the prompt in passes of that many tokens (as
    ``model.generate``'s ``prefill_chunk_size``). Returns ``[B, T + n]``, ``n = max_new_tokens``, or fewer with
    ``eos_token_id``: a sequence that produced it goes on with it, and decoding stops once every sequence has (as
    ``model.generate`` with ``pad_token_id=eos_token_id``; one host read per step)."""
    if input_ids.dim() != 2 or input_ids.shape[1] == 0 or max_new_tokens < 0:
        raise ValueError(f"generate takes a prompt [B, T >= 1] and max_new_tokens >= 0; got {list(input_ids.shape)} "
                         f"and {max_new_tokens}")
    logits = _prefill(model, cache, input_ids, attention_mask, prefill_chunk)
    step = CapturedDecode(model, cache, graphs, attention_mask)
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
