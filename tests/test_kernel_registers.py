"""The fused decode kernel compiled for sm_90 without a GPU (``benchmarks/kernel_registers.py``): each variant of the
benchmark's sweep (chained hand-ons, stored, its floors) fits its registers without spilling (decode.md round 18:
spills cost the stored kernel its speed). Needs Triton (its compiler and ptxas), not a GPU; skipped without it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


def compiled(*args: str) -> list[dict]:
    """``benchmarks/kernel_registers.py``'s report for ``args``: one dict per compiled variant."""
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_registers.py"), *args],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    return [json.loads(line) for line in out.stdout.strip().splitlines()]


@pytest.mark.parametrize("grids", ["d2", "d4"])
def test_the_decode_kernels_do_not_spill_registers_on_sm90(grids):
    counts = compiled("--grids", grids)
    assert {c["kernel"] for c in counts} >= {"stored", "chained, projected hand-on"}
    for c in counts:
        assert c["registers"] <= 255 and c["stack_bytes"] == 0 and c["spill_store_bytes"] == 0, c


def test_the_stored_kernel_runs_its_products_on_wgmma_without_local_memory():
    (c,) = compiled("--grids", "d2", "--kernels", "stored", "--instructions")
    # the [128, 64] x [64, 64] un-rotations and predictions are Hopper wgmma; no spill traffic to local memory
    assert c["HGMMA"] > 0 and c["LDL"] == 0 and c["STL"] == 0, c
    assert c["instructions"] > sum(c[op] for op in ("BAR", "STS", "LDS", "HGMMA", "HMMA", "MUFU", "LDG")), c


def test_rank_256_full_hand_on_at_its_runtime_launch_does_not_spill_at_d2():
    """The shipped 70B rank (D/4 = 256) goes through the full hand-on with 128-token tiles, 8 warps, 1 stage
    (``aquakv.kernels.decode._launch_config``): that launch, not the sweep's first, is the one to keep free of spills
    (the sweep's first, 64 tokens x 4 warps x 4 stages, spills 176 bytes at rank 256)."""
    (c,) = compiled("--grids", "d2", "--rank", "256", "--tokens", "128", "--warps", "8", "--stages", "1", "--kernels",
                    "chained, full hand-on")
    assert (c["kernel"], c["rank"], c["tokens_per_program"], c["num_warps"], c["num_stages"]) == (
        "chained, full hand-on", 256, 128, 8, 1)
    assert c["stack_bytes"] == 0 and c["spill_store_bytes"] == 0, c


def test_the_rank_256_stored_kernel_multiplies_the_key_prediction_on_float8_tensor_cores():
    """At rank D/4 = 256 (``aquakv.kernels.decode.FP8_KEY_RANK``) the stored kernel multiplies float8 ``z^K`` by the
    float8 ``up`` factor with float8 ``wgmma`` (QGMMA); the un-rotations stay fp16 ``wgmma``."""
    (c,) = compiled("--grids", "d2", "--rank", "256", "--kernels", "stored", "--instructions", "--deferred")
    assert c["QGMMA"] > 0 and c["HGMMA"] > 0, c
    (c64,) = compiled("--grids", "d2", "--kernels", "stored", "--instructions")
    assert c64["QGMMA"] == 0, c64  # below the rank, the same rounded factor in bf16
