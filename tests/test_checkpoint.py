"""pipeline.checkpoint: layer-by-layer streaming of a sharded safetensors checkpoint."""

from __future__ import annotations

import threading
from pathlib import Path

import pytest
import torch
from transformers import LlamaForCausalLM
from transformers.models.llama.modeling_llama import LlamaDecoderLayer

from aquakv.errors import CalibrationError
from pipeline.checkpoint import INDEX_FILE, SINGLE_FILE, Checkpoint, LayerStream
from pipeline.testing import write_tiny_llama


@pytest.fixture(scope="module")
def sharded(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return write_tiny_llama(tmp_path_factory.mktemp("tiny"), num_layers=3, shards=2)


def test_sharded_layout_and_metadata(sharded: Path) -> None:
    assert (sharded / INDEX_FILE).is_file()
    assert len(list(sharded.glob("model-*.safetensors"))) == 2
    ckpt = Checkpoint(sharded)
    assert ckpt.layer_cls is LlamaDecoderLayer
    assert ckpt.num_layers == 3
    assert ckpt.kv_dim == 2 * 16


def test_layer_tensors_hold_only_that_layer(sharded: Path) -> None:
    tensors = Checkpoint(sharded).layer_tensors(1)
    full = LlamaForCausalLM.from_pretrained(sharded).model.layers[1].state_dict()
    assert tensors.keys() == full.keys()
    for name, t in tensors.items():
        assert torch.equal(t, full[name]), name
    with pytest.raises(IndexError):
        Checkpoint(sharded).layer_tensors(3)


@pytest.mark.parametrize("shards", [1, 2])
def test_streamed_layers_reproduce_full_forward(tmp_path: Path, shards: int) -> None:
    path = write_tiny_llama(tmp_path, num_layers=3, shards=shards)
    assert (path / SINGLE_FILE).is_file() == (shards == 1)
    ckpt = Checkpoint(path)
    model = LlamaForCausalLM.from_pretrained(path).eval()
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = model(ids, output_hidden_states=True).hidden_states
        hidden = ckpt.embed(ids)
        torch.testing.assert_close(hidden, expected[0], rtol=0, atol=0)
        for i, layer in LayerStream(ckpt, range(ckpt.num_layers)):
            hidden, _, _ = ckpt.forward_layer(i, layer, hidden)
            if i + 1 < ckpt.num_layers:  # the last entry of hidden_states is after the final norm
                torch.testing.assert_close(hidden, expected[i + 1], rtol=1e-6, atol=1e-6)
        torch.testing.assert_close(model.model.norm(hidden), expected[-1], rtol=1e-6, atol=1e-6)


def test_load_layer_casts_and_freezes(sharded: Path) -> None:
    layer = Checkpoint(sharded).load_layer(0, dtype=torch.bfloat16)
    params = list(layer.parameters())
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad and not p.is_meta for p in params)
    assert not layer.training


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_gpu_loads_through_pinned_memory_give_the_same_layers(sharded: Path) -> None:
    """The pinned, side-stream copies land the checkpoint's bytes (cast like the CPU path), and layers streamed onto
    the GPU while the previous one runs compute what the CPU layers compute."""
    ckpt = Checkpoint(sharded)
    for dtype in (torch.float32, torch.bfloat16):
        gpu, cpu = ckpt.load_layer(1, "cuda", dtype), ckpt.load_layer(1, "cpu", dtype)
        for (name, a), (_, b) in zip(gpu.state_dict().items(), cpu.state_dict().items(), strict=True):
            assert a.is_cuda and a.dtype == b.dtype and torch.equal(a.cpu(), b), name
    ids = torch.randint(0, 320, (2, 24), generator=torch.Generator().manual_seed(0))
    outs = {}
    with torch.no_grad():
        for device in ("cpu", "cuda"):
            ckpt = Checkpoint(sharded)
            hidden = ckpt.embed(ids, device)
            for _ in range(3):  # several passes: freed layers' memory is reused by the next loads
                h = hidden
                for i, layer in LayerStream(ckpt, range(ckpt.num_layers), device):
                    h, _, _ = ckpt.forward_layer(i, layer, h)
            outs[device] = h.cpu()
    torch.testing.assert_close(outs["cuda"], outs["cpu"], rtol=1e-4, atol=1e-4)


def test_missing_shard_is_named(tmp_path: Path) -> None:
    path = write_tiny_llama(tmp_path, num_layers=2, shards=2)
    shard = sorted(path.glob("model-*.safetensors"))[1]
    shard.unlink()
    with pytest.raises(CalibrationError, match=shard.name):
        Checkpoint(path)


def test_no_weights_or_config(tmp_path: Path) -> None:
    with pytest.raises(CalibrationError, match="config.json"):
        Checkpoint(tmp_path)
    path = write_tiny_llama(tmp_path / "m", num_layers=2, shards=1)
    (path / SINGLE_FILE).unlink()
    with pytest.raises(CalibrationError, match="neither"):
        Checkpoint(path)


def test_layer_stream_prefetches_next_layer(sharded: Path) -> None:
    ckpt = Checkpoint(sharded)
    load = ckpt.load_layer
    loaded: dict[int, threading.Event] = {i: threading.Event() for i in range(ckpt.num_layers)}
    threads: set[str] = set()

    def recording_load(i: int, *args: object) -> torch.nn.Module:
        threads.add(threading.current_thread().name)
        layer = load(i, *args)
        loaded[i].set()
        return layer

    ckpt.load_layer = recording_load
    order = []
    for i, _ in LayerStream(ckpt, range(ckpt.num_layers)):
        if i + 1 < ckpt.num_layers:  # the next layer loads while this one is in use
            assert loaded[i + 1].wait(timeout=10)
        order.append(i)
    assert order == [0, 1, 2]
    assert all(name.startswith("layer-prefetch") for name in threads)


def test_output_head_is_read_once_per_placement(sharded: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Validation asks for logits once per chunk: the head is read and placed at the first call, reused after, and
    placed again for another dtype (the model's own logits every time)."""
    ckpt = Checkpoint(sharded)
    model = LlamaForCausalLM.from_pretrained(sharded).eval()
    reads: list[list[str]] = []
    read = ckpt._read
    monkeypatch.setattr(ckpt, "_read", lambda keys: reads.append(sorted(keys)) or read(keys))
    hidden = torch.randn(2, 5, model.config.hidden_size, generator=torch.Generator().manual_seed(1))
    want = model.lm_head(model.model.norm(hidden))
    with torch.no_grad():
        for _ in range(3):
            torch.testing.assert_close(ckpt.logits(hidden), want, rtol=1e-6, atol=1e-6)
        head_reads = [r for r in reads if "weight" in r]
        assert len(head_reads) == 1, reads  # the lm_head's tensor, once
        half = ckpt.logits(hidden.to(torch.bfloat16))
    assert half.dtype == torch.bfloat16 and len([r for r in reads if "weight" in r]) == 2
    torch.testing.assert_close(half.float(), want, rtol=5e-2, atol=5e-2)
