"""pipeline.sensitivity: the loss's Fisher sensitivity to each layer's keys and values, streamed one layer at a time,
equals the whole model's autograd."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch
from transformers import DynamicCache, LlamaForCausalLM

from aquakv.compat import cache_kwargs
from aquakv.errors import CalibrationError
from pipeline.checkpoint import Checkpoint
from pipeline.sensitivity import fisher
from pipeline.testing import poison_values, write_tiny_llama


class _Keep(DynamicCache):
    """Hands every layer's keys and values back unchanged and keeps them (graph attached)."""

    def __init__(self) -> None:
        super().__init__()
        self.kept: list[tuple[torch.Tensor, torch.Tensor]] = []

    def update(self, key_states, value_states, layer_idx, *args, **kwargs):
        self.kept.append((key_states, value_states))
        return key_states, value_states


def _whole_model(path: Path, tokens: torch.Tensor, sinks: int) -> dict[str, list[float]]:
    model = LlamaForCausalLM.from_pretrained(path).eval().requires_grad_(False)
    layers = model.config.num_hidden_layers
    out = {"keys": [0.0] * layers, "values": [0.0] * layers}
    n, length = tokens.shape
    for row in tokens:
        cache = _Keep()
        embeds = model.get_input_embeddings()(row[None]).requires_grad_()  # so the keys and values carry a graph
        logits = model(inputs_embeds=embeds, use_cache=True, **cache_kwargs(model, cache)).logits[0, :-1]
        loss = torch.nn.functional.cross_entropy(logits, row[1:])
        grads = torch.autograd.grad(loss, [t for kv in cache.kept for t in kv])
        for i in range(layers):
            for j, kind in enumerate(("keys", "values")):
                g = grads[2 * i + j]
                out[kind][i] += float(g[:, :, sinks:].pow(2).sum()) / (n * (length - sinks))
    return out


@pytest.mark.parametrize("shards", [1, 2])
def test_streamed_fisher_equals_the_whole_models_autograd(tmp_path: Path, shards: int) -> None:
    path = write_tiny_llama(tmp_path / "m", num_layers=3, shards=shards, init_std=0.2)
    tokens = torch.randint(3, 320, (2, 48), generator=torch.Generator().manual_seed(0))
    got = fisher(Checkpoint(path), tokens, sinks=4)
    want = _whole_model(path, tokens, sinks=4)
    for kind in ("keys", "values"):
        assert got[kind] == pytest.approx(want[kind], rel=1e-4), kind
    spread = got["keys"] + got["values"]
    assert min(spread) > 0 and max(spread) > 2 * min(spread)  # layers and kinds differ: the weights say something
    assert fisher(Checkpoint(path), tokens, sinks=0)["keys"] != got["keys"]  # the sinks are left out


def test_too_short_samples_are_refused(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m", num_layers=2, shards=1)
    with pytest.raises(ValueError, match="too few tokens"):
        fisher(Checkpoint(path), torch.zeros(1, 5, dtype=torch.long) + 5, sinks=4)


def test_a_nan_in_the_model_is_refused(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path / "m", num_layers=3, shards=1)
    ckpt = Checkpoint(path)
    poison_values(ckpt, 1)
    with pytest.raises(CalibrationError, match="not finite"):
        fisher(ckpt, torch.randint(3, 320, (1, 24), generator=torch.Generator().manual_seed(0)), sinks=4)
