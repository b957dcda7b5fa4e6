"""The CUDA decode-kernel prototype (``benchmarks/cuda_decode``) without a GPU: its code-word orders put each code
where the kernel's fragments read it, its reference keeps the attention's invariants and reads the runtime's own
post-RoPE encoding, and (where ``nvcc`` is installed) its variants compile for sm_90, the rotated format's without
spilling registers."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1] / "benchmarks" / "cuda_decode"
sys.path.insert(0, str(ROOT))
import proto  # noqa: E402


def _nibble(words: torch.Tensor, index: torch.Tensor | int, nib: int) -> torch.Tensor:
    return ((words.long() & 0xFFFFFFFF)[..., index] >> (4 * nib)) & 15


def test_key_words_hold_the_codes_each_thread_reads():
    """Word ``c`` of a group: nibbles ``2i, 2i + 1`` are codes ``8i + c`` and ``8i + 4 + c`` (the pairs at rotated dims
    ``16i + 2c`` and ``16i + 8 + 2c``: the mma fragment of thread ``c`` in k-block ``i``)."""
    codes = torch.randint(0, 16, (5, proto.NG, 32), generator=torch.Generator().manual_seed(0))
    words = proto.pack_keys(codes).view(5, proto.NG, 4)
    for c in range(4):
        for i in range(4):
            assert torch.equal(_nibble(words, c, 2 * i), codes[:, :, 8 * i + c])
            assert torch.equal(_nibble(words, c, 2 * i + 1), codes[:, :, 8 * i + 4 + c])


def test_value_words_hold_the_codes_each_thread_reads():
    """Word ``g`` of head ``h``: nibble ``4 * gr + m`` is code ``8m + g`` of the head's group ``gr`` (rotated dims
    ``16m + 2g, + 1``: rows ``g, g + 8`` of the values' m-tile ``4 gr + m``)."""
    codes = torch.randint(0, 16, (5, proto.NG, 32), generator=torch.Generator().manual_seed(1))
    words = proto.pack_values(codes).view(5, proto.NH, 8)
    for h in (0, 5, 7):
        for g in range(8):
            for gr in range(2):
                for m in range(4):
                    assert torch.equal(_nibble(words[:, h], g, 4 * gr + m), codes[:, 2 * h + gr, 8 * m + g])


def test_reference_partials_merge_to_one_softmax():
    """Merged by their log-sum-exps, the per-tile partials are the attention over all tokens: the tiling is exact."""
    x = proto.make_inputs(1, 300, 64, 64, "cpu", seed=3, pos0=5)
    tiled, whole = proto.reference(x, 1, 64), proto.reference(x, 1, 512)
    w = torch.softmax(tiled["lse"], -1)[..., None]
    assert torch.allclose((w * tiled["orot"]).sum(-2), whole["orot"][..., 0, :], atol=1e-4)
    assert torch.allclose(torch.logsumexp(tiled["lse"], -1), whole["lse"][..., 0], atol=1e-4)
    # the rotated residual's scores are part of the attention: dropping them changes it
    x["ks"] = torch.zeros_like(x["ks"])
    assert not torch.allclose(proto.reference(x, 1, 512)["orot"], whole["orot"], atol=1e-3)


def test_the_runtime_post_rope_encoding_feeds_the_kernel_operands():
    """``codec_check``'s CPU form: a rank-64 stored layer encoded with ``key_residual="post_rope"``, its block turned
    into the kernel's operands and run through the kernel's math (``reference``), merged and un-rotated, gives the
    attention over ``codec.decode``'s reconstruction (on the GPU the same check runs the kernel itself)."""
    errs = proto.codec_check(None, 128, device="cpu", T=300)
    assert errs["out"] < 1e-2, errs


@pytest.mark.skipif(shutil.which("nvcc") is None, reason="needs nvcc")
@pytest.mark.parametrize(("variant", "spill_free"), [("1,1024,1,1,1", True), ("1,256,1,0,0", True),
                                                     ("0,512,1,1,1", False)])  # (the shipped format spills 20 B)
def test_variants_compile_for_sm90(tmp_path, variant, spill_free):
    krot, bt, minb, staged, ups = proto.parse_variant(variant)
    head = (f"#define KROT {krot}\n#define RK 64\n#define RV 64\n#define BT {bt}\n#define MINB {minb}\n"
            f"#define STAGED {staged}\n#define STG {proto.STG}\n#define UPS {ups}\n")
    src = tmp_path / "k.cu"
    src.write_text(head + proto.SRC)
    out = subprocess.run(["nvcc", "-cubin", "-arch=sm_90", "-Xptxas", "-v", "-o", str(tmp_path / "k.cubin"), str(src)],
                         capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr[-2000:]
    assert (" 0 bytes spill stores" in out.stderr) == spill_free, out.stderr[-2000:]
