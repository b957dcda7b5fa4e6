"""The fused decode kernel compiled for sm_90 without a GPU (``benchmarks/kernel_registers.py``): the stored layer's
kernel fits its 255 registers without spilling (decode.md round 18: spills cost it its speed). Needs Triton (its
compiler and ptxas), not a GPU; skipped without it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")
ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("grids", ["d2", "d4"])
def test_the_stored_decode_kernel_does_not_spill_registers_on_sm90(grids):
    out = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "kernel_registers.py"), "--grids", grids],
                         capture_output=True, text=True, check=True, cwd=ROOT)
    counts = json.loads(out.stdout.strip().splitlines()[-1])
    assert counts["registers"] <= 255 and counts["stack_bytes"] == 0 and counts["spill_store_bytes"] == 0, counts
