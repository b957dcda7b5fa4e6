"""The CUDA decode kernel's host side (:mod:`aquakv.kernels.cuda`) on the CPU: its code-word orders put each code where
the kernel's fragments read it and come back, its math (``benchmarks/cuda_kernel.reference``) on the runtime's own
post-RoPE encoding gives the cache's attention, the backend rule takes it only where it reads every layer, and (with
``nvcc``) the source compiles for sm_90. On a GPU with float8 tensor cores: the kernel through ``AquaKVCache`` gives
the PyTorch reference's logits."""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Callable

import pytest
import torch

from aquakv.attention import select_backend
from aquakv.cache import AquaKVCache
from aquakv.codec import EncodedBlock
from aquakv.compat import cache_kwargs
from aquakv.config import CacheConfig, QuantizerConfig
from aquakv.family import Rope
from aquakv.kernels import KernelSettings, cuda
from aquakv.packing import pack, unpack
from aquakv.quantize import Quantized
from aquakv.rope import apply_rotary_pos_emb
from benchmarks import cuda_kernel
from benchmarks.decode import make_codecs

GPU = torch.cuda.is_available() and cuda.device_fits(torch.device("cuda"))
POST = KernelSettings(prediction="stored", key_residual="post_rope")


def _block(gen: torch.Generator, n: int, groups: int) -> EncodedBlock:
    codes = [torch.randint(0, 16, (2, n, groups * 32), generator=gen) for _ in range(2)]
    return EncodedBlock(*(Quantized(pack(c, 4), torch.rand(2, n, groups).half(), groups * 64) for c in codes))


def _codes_and_words(part: str, seed: int) -> tuple[torch.Tensor, Callable[[int, int], torch.Tensor]]:
    """A random block's codes of ``part`` (``[2, 5, 16 groups, 32]``) and ``nibble(word, k)``: nibble ``k`` of the
    32-bit word ``word`` of each token's codes in the kernel's order."""
    block = _block(torch.Generator().manual_seed(seed), 5, 16)
    codes = unpack(getattr(block, part).codes, 4, 16 * 32).view(2, 5, 16, 32)
    raw = getattr(cuda.kernel_order(block), part).codes
    bytes_ = raw.view(*raw.shape[:-1], -1, 4).long()  # little-endian bytes of each 32-bit word
    words = sum(bytes_[..., i] << (8 * i) for i in range(4))
    return codes, lambda word, k: (words[..., word] >> (4 * k)) & 15


def test_key_words_hold_the_codes_each_thread_reads():
    """Word ``4g + c`` (group ``g``, thread ``c``): nibbles ``2i, 2i + 1`` are the group's codes ``8i + c`` and
    ``8i + 4 + c`` (rotated dims ``16i + 2c``, ``16i + 8 + 2c``: thread ``c``'s fragment in k-block ``i``)."""
    codes, nibble = _codes_and_words("keys", 0)
    for g in (0, 7, 15):
        for c in range(4):
            for i in range(4):
                assert torch.equal(nibble(4 * g + c, 2 * i), codes[..., g, 8 * i + c])
                assert torch.equal(nibble(4 * g + c, 2 * i + 1), codes[..., g, 8 * i + 4 + c])


def test_value_words_hold_the_codes_each_thread_reads():
    """Word ``8h + g`` (head ``h``): nibble ``4 gr + m`` is code ``8m + g`` of the head's group ``gr`` (rotated dims
    ``16m + 2g, + 1``: rows ``g, g + 8`` of the values' m-tile ``4 gr + m``)."""
    codes, nibble = _codes_and_words("values", 1)
    for h in (0, 5, 7):
        for g in range(8):
            for gr in range(2):
                for m in range(4):
                    assert torch.equal(nibble(8 * h + g, 4 * gr + m), codes[..., 2 * h + gr, 8 * m + g])


def test_natural_order_reads_back_what_kernel_order_wrote():
    block = _block(torch.Generator().manual_seed(2), 7, 8)
    permuted = cuda.kernel_order(block)
    assert not torch.equal(permuted.keys.codes, block.keys.codes)
    back = cuda.natural_order(permuted)
    assert torch.equal(back.keys.codes, block.keys.codes) and torch.equal(back.values.codes, block.values.codes)
    assert back.keys.scales is block.keys.scales


def test_the_kernel_math_on_the_runtime_post_rope_encoding_is_the_cache_attention():
    """``benchmarks/cuda_kernel.check`` on the CPU: a rank-64 stored layer encoded in the post-RoPE format, read by
    the kernel's math in float32 (float8 key prediction, bf16 RoPE tables, scores of the rotated residual, values
    un-rotated after the sum, the value predictor's latent term), some tokens masked: the attention over
    ``codec.decode``'s reconstruction. The same layer with its codes out of order is far off."""
    errs = cuda_kernel.check("cpu", t=300)
    assert errs["rel_err"] < 1e-2 and errs["rel_err_codes_misordered"] > 0.1, errs


def test_the_backend_rule_takes_the_cuda_kernel_only_where_it_reads_every_layer(monkeypatch, caplog):
    """Post-RoPE key residuals with stored projections take the CUDA backend where the device has float8 tensor cores
    and the kernel reads every layer with predictors (layer 0, without, goes to Triton); anything else it cannot read
    falls back to PyTorch, with a warning where the kernels run. Pre-RoPE ones take Triton as before."""
    from aquakv import kernels

    monkeypatch.setattr(kernels, "available", lambda device, settings: True)
    monkeypatch.setattr(cuda, "device_fits", lambda device: True)
    cpu, rope = torch.device("cpu"), Rope(None, apply_rotary_pos_emb, standard=True)
    codecs = make_codecs(3, 1024, 64, device="cpu")

    def pick(codecs=codecs, settings=POST, heads=8, dtype=torch.bfloat16, head_dim=128, rope=rope) -> str:
        return select_backend(cpu, codecs, head_dim, settings, heads, dtype, rope).name

    with caplog.at_level("WARNING", logger="aquakv.attention"):
        assert pick() == "cuda"
        assert not caplog.records
        assert pick(dtype=torch.float16) == "torch"  # the kernel's products are bf16
        assert "CUDA decode kernel does not read this cache" in caplog.text
    assert pick(settings=POST.with_(key_residual="pre_rope")) == "triton"
    assert pick(settings=POST.with_(prediction="chained")) == "torch"
    assert pick(heads=2) == "torch" and pick(codecs=make_codecs(3, 256, 64, device="cpu"), heads=2) == "torch"
    assert pick(rope=Rope(None, apply_rotary_pos_emb, standard=False)) == "torch"
    assert pick(codecs=make_codecs(3, 1024, 256, device="cpu")) == "torch"  # rank 256: beyond the kernel
    d4 = make_codecs(3, 1024, 64, grids="d4", device="cpu")
    assert pick(codecs=d4) == "torch"  # d=4 grids
    monkeypatch.setattr(cuda, "device_fits", lambda device: False)
    assert pick() == "torch"


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize(("heads", "rank", "ups"), [(8, 64, True), (4, 64, True), (8, 128, False)])
def test_the_kernel_compiles_for_sm90(tmp_path, heads, rank, ups):
    src = tmp_path / "k.cu"
    src.write_text(cuda.source(heads, rank, rank, ups))
    out = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    if (heads, rank) == (8, 64):  # the measured shape: no spills
        assert " 0 bytes spill stores" in out.stderr, out.stderr[-2000:]
    assert cuda.shared_bytes(heads, rank, rank, ups) <= 227 * 1024


@pytest.mark.skipif(not GPU, reason="needs a CUDA GPU with float8 tensor cores and NVRTC")
def test_cuda_backend_logits_match_the_reference_path():
    """A tiny Llama of the kernel's shape through AquaKVCache: the CUDA backend (layer 0 on Triton, the rest on the
    kernel; the exact segments merged by the Triton kernel) against reconstruct-then-attend in PyTorch, with the
    same post-RoPE stored format; batch 2 with left padding, prefill chunks (one of 2 tokens: 8 query rows, the
    kernel's limit; longer ones reconstruct), then one-token steps over several compressions."""
    from conftest import calibrate_in_memory, wide_llama

    model = wide_llama()
    q = QuantizerConfig(dim=2, size=16, group_size=64)
    ids = torch.randint(0, 128, (2, 420), generator=torch.Generator().manual_seed(0))
    bundle = calibrate_in_memory(model, ids[:, :200], q, QuantizerConfig(dim=2, size=256, group_size=64),
                                 cache=CacheConfig(recent_window=64), rank=64)
    model, ids = model.to("cuda", torch.bfloat16), ids.to("cuda")
    mask = torch.ones_like(ids)
    mask[1, :6] = 0
    chunks = [(0, 100), (100, 20), (120, 2), (122, 35)] + [(157 + i, 1) for i in range(263)]
    logits = {}
    for name, settings in (("ref", POST.with_(enabled=False, attention="full")), ("cuda", POST)):
        cache = AquaKVCache.from_bundle(bundle, model, kernels=settings)
        with torch.no_grad():
            logits[name] = torch.cat([model(ids[:, s : s + n], attention_mask=mask[:, : s + n],
                                            **cache_kwargs(model, cache)).logits for s, n in chunks], 1).float()
        assert cache.layers[2].compressed_len == 384
    assert cache.backend.name == "cuda"
    for row in (0, 1):
        want, got = logits["ref"][row, 6 * row :], logits["cuda"][row, 6 * row :]
        assert float((got - want).norm() / want.norm()) < 2e-2


def test_a_reset_cache_drops_the_rope_table_checked_against_its_positions(model_and_bundle):
    """The CUDA backend's RoPE table covers the positions it was checked against: a reset cache (new sequences,
    perhaps the same compressed length at other positions) builds and checks a new one."""
    model, bundle = model_and_bundle
    cache = AquaKVCache.from_bundle(bundle, model)
    with torch.no_grad():
        model(torch.arange(1, 41)[None], **cache_kwargs(model, cache))
    cache.shared.rope_table = cuda.RopeTable(None, torch.device("cpu"))
    cache.reset()
    assert cache.shared.rope_table is None and cache.shared.positions is None
