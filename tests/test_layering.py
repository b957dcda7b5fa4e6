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


LIGHT = """
import sys, contextlib, io
import aquakv.config, aquakv.errors
from aquakv_cli.main import main
with contextlib.redirect_stdout(io.StringIO()), contextlib.suppress(SystemExit):
    main(["--help"])
print(",".join(sorted(n for n in sys.modules if n.split(".")[0] in ("torch", "transformers", "prefect", "ray"))))
"""


def test_cli_help_and_the_config_import_no_torch() -> None:
    """``aquakv --help`` and a config (what the flow's process and the CLI read first) load neither torch nor
    transformers: ``aquakv`` resolves its top-level names on first use (``--help`` took 5.5-6 s on a 2-core CPU
    when the package imported the cache eagerly, 2026-11-27)."""
    root = Path(__file__).resolve().parents[1]
    done = subprocess.run([sys.executable, "-c", LIGHT], cwd=root, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr
    assert done.stdout.strip() == "", f"imported {done.stdout.strip()}"
