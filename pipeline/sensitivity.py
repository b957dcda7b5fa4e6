"""How much the model's loss feels an error in each layer's keys and values: the Fisher sensitivity a bit budget
weighs each layer's quantization error with (:func:`pipeline.solve.allocate_bits`).

For quantization noise ``δ`` of variance ``σ²`` per coordinate, independent of the data, the expected loss increase is
``½ σ² Σ_t |g_t|²`` to second order, with ``g_t = ∂L/∂x_t`` the gradient of the next-token loss with respect to the
keys or values ``x_t`` a layer hands its cache (the empirical Fisher; KVQuant weighs KV quantization the same way).
The gradients come from the model's own code on calibration samples, streamed like collect: a forward pass one
decoder layer at a time keeps each layer's input, then a backward pass in reverse layer order loads each layer again,
re-runs it on its input with gradients on and back-propagates the gradient of its output. The whole model is never in
memory; every layer's input is, on the host: ``layers x samples x seq_len x hidden`` values in the run's dtype.

RoPE rotates pairs of channels, so ``|g_t|`` is the same before and after it: the post-RoPE keys' gradients price the
pre-RoPE keys that are quantized. Sink tokens are exact at inference and left out of the sums.
"""

from __future__ import annotations

import math

import torch
from torch import nn

from aquakv.errors import CalibrationError
from aquakv.family import cached_kv
from pipeline.budget import Sensitivity
from pipeline.checkpoint import Checkpoint, LayerStream


def fisher(ckpt: Checkpoint, tokens: torch.Tensor, sinks: int, device: str | torch.device = "cpu",
           dtype: torch.dtype = torch.float32) -> Sensitivity:
    """Mean squared gradient ``mean_t |∂L/∂x_t|²`` of every layer's keys and values (``x_t``: one token's keys or
    values, all KV heads; ``L``: a sequence's mean next-token NLL) over the tokens of ``tokens [n, T]`` after the
    first ``sinks``; each layer is loaded once per direction, the sequences run through it one at a time."""
    n, length = tokens.shape
    if length - sinks < 2:
        raise ValueError(f"{length}-token samples leave too few tokens after {sinks} sinks")
    sums: Sensitivity = {"keys": [0.0] * ckpt.num_layers, "values": [0.0] * ckpt.num_layers}
    ids = tokens.long().to(device)
    hidden = [ckpt.embed(ids[r:r + 1], device, dtype) for r in range(n)]
    inputs: list[list[torch.Tensor]] = []  # [layer][row] on the host
    tuple_out = False
    with torch.no_grad():  # forward, each layer loaded once for every sequence: keep every layer's input
        for i, layer in LayerStream(ckpt, range(ckpt.num_layers), device, dtype):
            inputs.append([h.to("cpu") for h in hidden])
            for r, h in enumerate(hidden):
                call = ckpt.layer_call(i, h)
                out = layer(h, *call.args, **call.kwargs)
                tuple_out = isinstance(out, tuple)
                hidden[r] = out[0] if tuple_out else out
    grads = []
    with torch.enable_grad():
        for r, last in enumerate(hidden):
            h = last.detach().requires_grad_()
            logits = ckpt.head_forward(h, tuple_out)[0, :-1].float()
            grads.append(torch.autograd.grad(nn.functional.cross_entropy(logits, ids[r, 1:]), h)[0])
    del hidden
    for i, layer in LayerStream(ckpt, reversed(range(ckpt.num_layers)), device, dtype):
        for r in range(n):
            h = inputs[i][r].to(device)
            with torch.enable_grad():  # backward: the layer again, on its input, with gradients on
                h.requires_grad_()
                out, keys, values = cached_kv(layer, h, ckpt.layer_call(i, h))
                grads[r], g_keys, g_values = torch.autograd.grad(out, (h, keys, values), grads[r])
            for kind, g in (("keys", g_keys), ("values", g_values)):  # [1, H, T, hd]
                sums[kind][i] += float(g[:, :, sinks:].float().pow(2).sum()) / (n * (length - sinks))
        inputs[i] = []
    bad = [(kind, i) for kind, values in sums.items() for i, v in enumerate(values) if not math.isfinite(v)]
    if bad:
        kind, i = bad[0]
        raise CalibrationError(f"the loss's gradient with respect to layer {i}'s {kind} is not finite on the "
                               "calibration samples: the model's weights or data hold NaN/inf")
    return sums
