"""pipeline.collect: pre-RoPE K/V collection, sharding, resume, non-finite detection."""

from __future__ import annotations

from collections import Counter
from pathlib import Path

import pytest
import torch
import zarr
from torch import nn
from transformers import LlamaForCausalLM

from aquakv.errors import CalibrationError, NonFiniteError
from aquakv.family import PROBE_TOKENS
from pipeline.checkpoint import Checkpoint
from pipeline.collect import KINDS, collect_shard, layer_complete, open_activations, read_activations
from pipeline.testing import poison_values, write_tiny_llama

SAMPLES, SEQ = 6, 32


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"), num_layers=4, shards=2)


@pytest.fixture(scope="module")
def tokens() -> torch.Tensor:
    return torch.randint(0, 320, (SAMPLES, SEQ), generator=torch.Generator().manual_seed(0))


def new_store(path: Path, ckpt: Checkpoint, dtype: str = "float32") -> zarr.Group:
    return open_activations(path, ckpt.num_layers, SAMPLES, SEQ, ckpt.kv_dim, dtype=dtype)


def collect(
    ckpt: Checkpoint, tokens: torch.Tensor, store: Path, split: list[int], **kw: object
) -> dict[str, torch.Tensor]:
    """Collect ``tokens`` as consecutive shards of sizes ``split``; return every array read back."""
    group = new_store(store, ckpt)
    offset = 0
    for n in split:
        collect_shard(ckpt, tokens[offset : offset + n], offset, store, progress=False, **kw)
        offset += n
    return {f"{k}/{i}": read_activations(group, k, i) for k in KINDS for i in range(ckpt.num_layers)}


def counting(ckpt: Checkpoint, fail_at: int | None = None) -> Counter:
    """Count forward calls per layer index over samples (not the few-token RoPE probes of
    :func:`aquakv.family.describe_layer`); optionally make layer ``fail_at`` crash."""
    calls: Counter = Counter()
    load = ckpt.load_layer

    def load_layer(i: int, *args: object) -> nn.Module:
        layer = load(i, *args)

        def hook(_: nn.Module, args: tuple) -> None:
            if args[0].shape[1] == PROBE_TOKENS:
                return
            if i == fail_at:
                raise RuntimeError("worker lost")
            calls[i] += 1

        layer.register_forward_pre_hook(hook)
        return layer

    ckpt.load_layer = load_layer
    return calls


def test_matches_full_model_forward(model_dir: Path, tokens: torch.Tensor, tmp_path: Path) -> None:
    ckpt = Checkpoint(model_dir)
    got = collect(ckpt, tokens, tmp_path / "a.zarr", [SAMPLES], micro_batch=4)
    model = LlamaForCausalLM.from_pretrained(model_dir).eval()
    want: dict[str, torch.Tensor] = {}
    for i, layer in enumerate(model.model.layers):
        for kind in KINDS:
            proj = getattr(layer.self_attn, f"{kind[0]}_proj")
            proj.register_forward_hook(lambda _m, _a, out, key=f"{kind}/{i}": want.__setitem__(key, out))
    with torch.no_grad():
        model(tokens)
    assert got.keys() == want.keys()
    for key in want:
        assert got[key].shape == (SAMPLES, SEQ, ckpt.kv_dim)
        torch.testing.assert_close(got[key], want[key], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("micro_batch", [1, 2])
def test_two_shards_equal_one(model_dir: Path, tokens: torch.Tensor, tmp_path: Path, micro_batch: int) -> None:
    ckpt = Checkpoint(model_dir)
    one = collect(ckpt, tokens, tmp_path / "one.zarr", [SAMPLES], micro_batch=micro_batch)
    two = collect(ckpt, tokens, tmp_path / "two.zarr", [2, 4], micro_batch=micro_batch)
    assert all(torch.equal(one[k], two[k]) for k in one)
    group = zarr.open_group(tmp_path / "two.zarr", mode="r")
    assert all(layer_complete(group, i) for i in range(ckpt.num_layers))
    assert "hidden/0-2" not in group and "hidden/2-6" not in group  # cleaned up after the last layer


def test_resume_skips_done_layers(model_dir: Path, tokens: torch.Tensor, tmp_path: Path) -> None:
    reference = collect(Checkpoint(model_dir), tokens, tmp_path / "ref.zarr", [SAMPLES])
    store = tmp_path / "act.zarr"
    new_store(store, Checkpoint(model_dir))

    ckpt = Checkpoint(model_dir)
    calls = counting(ckpt)
    assert collect_shard(ckpt, tokens, 0, store, layers=2, progress=False) == [0, 1]
    assert calls == {0: SAMPLES, 1: SAMPLES}
    group = zarr.open_group(store, mode="r")
    assert [layer_complete(group, i) for i in range(4)] == [True, True, False, False]

    ckpt = Checkpoint(model_dir)
    calls = counting(ckpt, fail_at=3)  # dies in layer 3 after layer 2 is committed
    with pytest.raises(RuntimeError, match="worker lost"):
        collect_shard(ckpt, tokens, 0, store, progress=False)
    assert calls == {2: SAMPLES}

    ckpt = Checkpoint(model_dir)
    calls = counting(ckpt)
    assert collect_shard(ckpt, tokens, 0, store, progress=False) == [3]
    assert calls == {3: SAMPLES}
    assert collect_shard(ckpt, tokens, 0, store, progress=False) == []
    got = {f"{k}/{i}": read_activations(group, k, i) for k in KINDS for i in range(4)}
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_sparse_hidden_checkpoints_resume_from_the_last_saved(model_dir: Path, tokens: torch.Tensor,
                                                               tmp_path: Path) -> None:
    reference = collect(Checkpoint(model_dir), tokens, tmp_path / "ref.zarr", [SAMPLES])
    store = tmp_path / "act.zarr"
    new_store(store, Checkpoint(model_dir))
    ckpt = Checkpoint(model_dir)
    calls = counting(ckpt, fail_at=3)  # layers 0-2 done, hidden states saved only after layer 1
    with pytest.raises(RuntimeError, match="worker lost"):
        collect_shard(ckpt, tokens, 0, store, progress=False, hidden_every=2)
    group = zarr.open_group(store, mode="r")
    assert sorted(group[f"hidden/0-{SAMPLES}"].keys()) == ["1"]
    ckpt = Checkpoint(model_dir)
    calls = counting(ckpt)
    assert collect_shard(ckpt, tokens, 0, store, progress=False, hidden_every=2) == [2, 3]
    assert calls == {2: SAMPLES, 3: SAMPLES}
    got = {f"{k}/{i}": read_activations(group, k, i) for k in KINDS for i in range(4)}
    assert all(torch.equal(got[k], reference[k]) for k in reference)


def test_non_finite_activations_raise(model_dir: Path, tokens: torch.Tensor, tmp_path: Path) -> None:
    ckpt = Checkpoint(model_dir)
    poison_values(ckpt, 2)
    new_store(tmp_path / "nan.zarr", ckpt)
    with pytest.raises(NonFiniteError, match="layer 2: non-finite"):
        collect_shard(ckpt, tokens, 0, tmp_path / "nan.zarr", progress=False)
    group = zarr.open_group(tmp_path / "nan.zarr", mode="r")
    assert layer_complete(group, 1) and not layer_complete(group, 2)


def test_bfloat16_round_trip(model_dir: Path, tokens: torch.Tensor, tmp_path: Path) -> None:
    ckpt = Checkpoint(model_dir)
    reference = collect(ckpt, tokens[:2], tmp_path / "f32.zarr", [2])
    group = new_store(tmp_path / "bf16.zarr", ckpt, dtype="bfloat16")
    collect_shard(ckpt, tokens, 0, tmp_path / "bf16.zarr", dtype="bfloat16", layers=1, progress=False)
    keys = read_activations(group, "keys", 0, 0, 2)
    assert keys.dtype == torch.bfloat16
    torch.testing.assert_close(keys.float(), reference["keys/0"][:2], rtol=0.05, atol=0.02)


def test_store_layout_checks(model_dir: Path, tokens: torch.Tensor, tmp_path: Path) -> None:
    ckpt = Checkpoint(model_dir)
    group = new_store(tmp_path / "a.zarr", ckpt)
    assert group["keys/3"].chunks == (1, SEQ, ckpt.kv_dim)
    assert new_store(tmp_path / "a.zarr", ckpt).attrs["num_samples"] == SAMPLES  # reopens
    with pytest.raises(CalibrationError, match="another layout"):
        open_activations(tmp_path / "a.zarr", ckpt.num_layers, SAMPLES + 1, SEQ, ckpt.kv_dim)
    with pytest.raises(CalibrationError, match="does not fit"):
        collect_shard(ckpt, tokens, 2, tmp_path / "a.zarr", progress=False)
