"""The real deployment paths of the ``calibrate`` flow, end to end on a tiny random Llama.

1. Prefect: a real ``prefect server``, ``prefect work-pool create``, ``prefect deploy`` of ``calibrate-demo``
   from ``prefect.yaml``, a process ``prefect worker`` and ``prefect deployment run --watch``; the published
   bundle then drives ``model.generate``.
2. Ray: ``python flows/calibrate.py --config ...``, which is what ``ray submit cluster/config.yaml
   flows/calibrate.py -- --config ...`` runs on the head node.
"""

from __future__ import annotations

import json
import os
import random
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import torch
import yaml

from aquakv.cache import AquaKVCache
from aquakv.compat import cache_kwargs
from aquakv.registry import load_bundle
from pipeline.testing import write_tiny_llama

pytestmark = pytest.mark.slow

REPO = Path(__file__).resolve().parents[1]
BIN = Path(sys.executable).parent
NAME = "tiny-deploy"
QUIET = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0",
         "HF_HUB_OFFLINE": "1", "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "120", "PYTHONUNBUFFERED": "1",
         "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}  # tiny tensors: one thread avoids oversubscription
_WORDS = ("cache key value layer token model quantize predict grid scale window sink group rotate attention "
          "head shard worker cluster flow task bundle registry publish validate perplexity calibrate sample "
          "the a of and to in is with for on by").split()


def _tail(path: Path, chars: int = 4000) -> str:
    text = path.read_text(errors="replace") if path.exists() else "<no output>"
    return f"--- {path.name} (last {chars} chars) ---\n{text[-chars:]}"


def _env(home: Path, **extra: str) -> dict[str, str]:
    """The children's environment: no inherited Prefect profile, API or Ray cluster; ``home`` as PREFECT_HOME."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("PREFECT_") and k != "RAY_ADDRESS"}
    env.update(QUIET)
    env.update(PREFECT_HOME=str(home), PYTHONPATH=os.pathsep.join(filter(None, [str(REPO), env.get("PYTHONPATH")])))
    env.update(extra)
    return env


def _run(cmd: list[str], env: dict[str, str], log: Path, timeout: float, cwd: Path = REPO) -> str:
    """Run ``cmd`` to completion (output to ``log``); fail with the output's tail unless it exits 0."""
    t0 = time.monotonic()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, cwd=cwd, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
        try:
            rc = proc.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            _stop(proc, signal.SIGTERM, grace=10)
            pytest.fail(f"{' '.join(cmd[:4])} ... timed out after {timeout:.0f} s\n{_tail(log)}")
    print(f"[{time.monotonic() - t0:6.1f} s] {' '.join(Path(c).name if i == 0 else c for i, c in enumerate(cmd))}")
    assert rc == 0, f"{' '.join(cmd)} exited {rc}\n{_tail(log)}"
    return log.read_text(errors="replace")


def _start(cmd: list[str], env: dict[str, str], log: Path) -> subprocess.Popen:
    out = log.open("w")
    try:
        return subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    finally:
        out.close()  # the child holds its own copy


def _stop(proc: subprocess.Popen | None, sig: signal.Signals, grace: float = 30) -> None:
    """Send ``sig`` to ``proc`` (by its PID), wait ``grace`` seconds, then kill its process group."""
    if proc is None or proc.poll() is not None:
        return
    try:
        os.kill(proc.pid, sig)
        proc.wait(timeout=grace)
    except subprocess.TimeoutExpired:
        pass
    except ProcessLookupError:
        return
    try:  # the group of a session this test started (start_new_session): the child and whatever it left behind
        os.killpg(proc.pid, signal.SIGKILL)
    except (ProcessLookupError, PermissionError):
        pass
    proc.wait(timeout=30)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _wait_healthy(url: str, proc: subprocess.Popen, log: Path, timeout: float = 180) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        assert proc.poll() is None, f"prefect server exited {proc.returncode}\n{_tail(log)}"
        try:
            with urllib.request.urlopen(f"{url}/health", timeout=5) as r:
                if r.status == 200:
                    print(f"[{time.monotonic() - t0:6.1f} s] prefect server healthy at {url}")
                    return
        except OSError:
            pass
        time.sleep(1)
    pytest.fail(f"prefect server not healthy after {timeout:.0f} s\n{_tail(log)}")


@pytest.fixture(scope="module")
def assets(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """A tiny model, a text file of short paragraphs and a calibration YAML, shared by this module's tests."""
    root = tmp_path_factory.mktemp("deploy-assets")
    model = write_tiny_llama(root / "model", num_layers=3, max_positions=256)
    rng = random.Random(0)
    paragraphs = [" ".join(rng.choice(_WORDS) for _ in range(rng.randint(8, 30))).capitalize() + "."
                  for _ in range(300)]
    data = root / "data.txt"
    data.write_text("\n\n".join(paragraphs) + "\n")
    config = {
        "name": NAME, "version": "v1", "model": str(model), "data": str(data),
        "seq_len": 64, "num_samples": 4, "heldout_samples": 2, "seed": 0, "workers": 1,
        "keys": {"dim": 2, "size": 16, "group_size": 32},
        "values": {"dim": 2, "size": 16, "group_size": 32},
        "first_layer": {"dim": 2, "size": 256, "group_size": 32},
        "cache": {"sinks": 4, "recent_window": 16},
        "max_ppl_increase": 1.0,
        "registry": str(root / "registry"), "workdir": str(root / "work"),
    }
    path = root / "tiny.yaml"
    path.write_text(yaml.safe_dump(config, sort_keys=False))
    return {"root": root, "model": model, "data": data, "config": path}


def _check_bundle_generates(registry: Path, model_dir: Path) -> None:
    from transformers import AutoModelForCausalLM

    bundle = load_bundle(registry / NAME)  # the `latest` pointer
    assert bundle.cache.recent_window == 16 and bundle.manifest["name"] == NAME
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    assert len(bundle.codecs) == model.config.num_hidden_layers
    cache = AquaKVCache.from_bundle(bundle, model)
    ids = torch.randint(3, model.config.vocab_size, (1, 40), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=24, do_sample=False, pad_token_id=0)
    assert out.shape == (1, 64)
    assert cache.layers[0].compressed_len > 0  # 64 tokens > sinks + recent window: blocks were compressed


def test_prefect_deployment(assets: dict[str, Path], tmp_path: Path) -> None:
    t_start = time.monotonic()
    home, registry, workdir = tmp_path / "prefect-home", tmp_path / "registry", tmp_path / "work"
    home.mkdir()
    port = _free_port()
    api = f"http://127.0.0.1:{port}/api"
    env = _env(home, PREFECT_API_URL=api, AQUAKV_HOME=str(REPO), PREFECT_WORKER_QUERY_SECONDS="2",
               PREFECT_API_DATABASE_CONNECTION_URL=f"sqlite+aiosqlite:///{home / 'prefect.db'}")
    server_env = {k: v for k, v in env.items() if k != "PREFECT_API_URL"} | {"PREFECT_UI_ENABLED": "false"}
    prefect = str(BIN / "prefect")
    server = worker = None
    server_log, worker_log = tmp_path / "server.log", tmp_path / "worker.log"
    try:
        server = _start([prefect, "server", "start", "--host", "127.0.0.1", "--port", str(port)], server_env,
                        server_log)
        _wait_healthy(api, server, server_log)
        _run([prefect, "--no-prompt", "work-pool", "create", "aquakv", "--type", "process"], env,
             tmp_path / "pool.log", timeout=120)
        _run([prefect, "--no-prompt", "deploy", "--name", "calibrate-demo"], env, tmp_path / "deploy.log",
             timeout=180)
        worker = _start([prefect, "worker", "start", "--pool", "aquakv"], env, worker_log)
        params = {"config": str(assets["config"]), "registry": str(registry), "workdir": str(workdir)}
        try:
            out = _run([prefect, "--no-prompt", "deployment", "run", "calibrate/calibrate-demo",
                        "--params", json.dumps(params), "--watch", "--watch-timeout", "300"],
                       env, tmp_path / "run.log", timeout=330)
        except BaseException:
            print(_tail(worker_log, 8000))
            raise
        assert "Flow run finished successfully in 'Completed'" in out, f"flow run not Completed\n{out[-4000:]}"
        worker_out = worker_log.read_text(errors="replace")
        assert "'set_working_directory' completed successfully" in worker_out, _tail(worker_log)  # prefect.yaml pull
        t0 = time.monotonic()
        _check_bundle_generates(registry, assets["model"])
        print(f"[{time.monotonic() - t0:6.1f} s] bundle loaded from {registry / NAME}; generate with AquaKVCache ok")
    finally:
        _stop(worker, signal.SIGINT)
        _stop(server, signal.SIGTERM)
        print(f"[{time.monotonic() - t_start:6.1f} s] prefect deployment test (server, deploy, worker, run) total")


def test_ray_submit_entrypoint(assets: dict[str, Path], tmp_path: Path) -> None:
    """What ``ray submit cluster/config.yaml flows/calibrate.py -- --config ...`` runs on the head node."""
    t_start = time.monotonic()
    home, registry = tmp_path / "prefect-home", tmp_path / "registry"
    home.mkdir()
    out = _run([sys.executable, "flows/calibrate.py", "--config", str(assets["config"]), "--registry", str(registry),
                "--workdir", str(tmp_path / "work")], _env(home), tmp_path / "script.log", timeout=300)
    bundle_dir = registry / NAME / "v1"
    assert f"bundle     {bundle_dir}" in out, f"bundle path not printed\n{out[-4000:]}"
    assert (registry / NAME / "latest").read_text().strip() == "v1"
    assert load_bundle(bundle_dir).codecs
    print(f"[{time.monotonic() - t_start:6.1f} s] python flows/calibrate.py total")
