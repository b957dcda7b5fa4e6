"""The runtime package stands alone: importing every ``aquakv`` module pulls in no calibration, flow, cluster,
benchmark or CLI code (an inference server installs the runtime, not Prefect or Ray)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

CHECK = """
import importlib, pkgutil, sys
import aquakv
for m in pkgutil.walk_packages(aquakv.__path__, "aquakv."):
    try:
        importlib.import_module(m.name)
    except ModuleNotFoundError as e:  # the Triton kernels, on a machine without Triton
        if e.name != "triton":
            raise
bad = sorted(n for n in sys.modules if n.split(".")[0] in ("pipeline", "flows", "cluster", "benchmarks", "aquakv_cli",
                                                            "prefect", "ray"))
print(",".join(bad))
"""


def test_runtime_imports_no_calibration() -> None:
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", CHECK], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"the runtime imported {done.stdout.strip()}"
