"""The whole calibration flow on GPUs: Llama-3.1-70B-shaped synthetic checkpoint, Prefect + Ray, 1 and N workers.

``write`` makes the checkpoint (``--layers`` 70B-shaped decoder layers of random bf16 weights, one safetensors shard
per layer, :func:`benchmarks.multigpu.write_checkpoint`), a tokenizer trained locally and a synthetic text; ``run``
calibrates it with ``python flows/calibrate.py --config ...`` in a fresh process per worker count (so every run pays
Prefect's ephemeral API and Ray's start-up, as a user's does), each in its own work directory (nothing resumed), and
records the outer wall time, the flow's own stage seconds, and whether the N-worker bundle's tensors equal the
1-worker bundle's. The projection to 80 layers x 2M calibration tokens (:func:`project`) scales the per-layer work
(collect+fit by layers x tokens, validation by layers: the held-out size stays the run's) and keeps what is paid once
(start-up, worker start, the first layer's compilation, data, publish) as measured.

    python benchmarks/calibration.py --sections write run --gpus 1,2 --mode resident --out $OUT
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import random
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import torch
import yaml

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.multigpu import add_run_arguments, write_checkpoint  # noqa: E402
from pipeline.testing import tiny_tokenizer  # noqa: E402

TARGET_LAYERS, TARGET_TOKENS = 80, 2_000_000
ENV = {"PREFECT_SERVER_ANALYTICS_ENABLED": "false", "DO_NOT_TRACK": "1", "RAY_USAGE_STATS_ENABLED": "0",
       "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180", "HF_HUB_OFFLINE": "1"}


def write(args: argparse.Namespace) -> None:
    """Checkpoint + tokenizer + a text long enough for the samples and the held-out windows."""
    root = Path(args.workdir)
    ckpt = write_checkpoint(root / "model", args.layers, args.hidden, args.heads, args.kv_heads, args.mlp, args.vocab)
    tiny_tokenizer(min(args.vocab, 512)).save_pretrained(ckpt)
    rng = random.Random(0)
    words = [w for w in "the fox river cache keys values model layer token bright morning silver over under "
             "north south quickly slowly every number seven eleven forty quiet loud green".split()]
    need = (args.samples + args.heldout) * args.seq_len * 6  # characters: a few per token
    with open(root / "text.txt", "w") as f:
        written = 0
        while written < need:
            line = " ".join(rng.choice(words) for _ in range(200)) + f" {rng.randrange(10**6)}.\n\n"
            f.write(line)
            written += 260
    print(f"wrote {ckpt} ({args.layers} layers) and {root / 'text.txt'}", flush=True)


@contextmanager
def prefect_server(root: Path) -> Iterator[str]:
    """A ``prefect server`` for the flows (what a deployment's flow runs talk to), its API URL while it runs. Its
    start-up is not timed: a deployment's server is up before any flow run."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    home = root / "prefect-server"
    shutil.rmtree(home, ignore_errors=True)
    home.mkdir(parents=True)
    env = {**os.environ, **ENV, "PREFECT_HOME": str(home), "PREFECT_UI_ENABLED": "false",
           "PREFECT_API_DATABASE_CONNECTION_URL": f"sqlite+aiosqlite:///{home / 'prefect.db'}"}
    api = f"http://127.0.0.1:{port}/api"
    with open(home / "server.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "prefect", "server", "start", "--host", "127.0.0.1", "--port",
                                 str(port)], env=env, stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + 180
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"prefect server exited {proc.returncode}: see {home / 'server.log'}")
                try:
                    with urllib.request.urlopen(f"{api}/health", timeout=5) as r:
                        if r.status == 200:
                            break
                except OSError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"prefect server not healthy after 180 s: see {home / 'server.log'}")
                time.sleep(1)
            print(f"prefect server at {api}", flush=True)
            yield api
        finally:
            proc.terminate()
            proc.wait(timeout=60)


def run_flow(args: argparse.Namespace, workers: int) -> dict:
    root = Path(args.workdir) / f"run-{args.mode}-{workers}"
    cfg = {"name": "llama70b-shape", "model": str(Path(args.workdir) / "model"), "data": str(Path(args.workdir) /
           "text.txt"), "seq_len": args.seq_len, "num_samples": args.samples, "heldout_samples": args.heldout,
           "dtype": "bfloat16", "workers": workers, "resident": args.mode == "resident", "max_ppl_increase": 10.0,
           "write_activations": args.write_activations,
           **({"heldout_seq_len": args.heldout_seq_len} if args.heldout_seq_len else {}),
           "registry": str(root / "registry"), "workdir": str(root / "work")}
    shutil.rmtree(root, ignore_errors=True)  # nothing resumed: every run does the whole flow
    root.mkdir(parents=True)
    (root / "config.yaml").write_text(yaml.safe_dump(cfg))
    env = {**os.environ, **ENV, "PREFECT_HOME": str(root / "prefect"),
           **({"PREFECT_API_URL": args.api} if args.api else {})}
    start, epoch = time.perf_counter(), time.time()
    proc = subprocess.run([sys.executable, "flows/calibrate.py", "--config", str(root / "config.yaml")], env=env,
                          capture_output=True, text=True, cwd=Path(__file__).resolve().parents[1])
    wall, exited = time.perf_counter() - start, time.time()
    (root / "flow.log").write_text(proc.stdout + proc.stderr)
    if proc.returncode:
        print(proc.stdout[-3000:], proc.stderr[-6000:], flush=True)
        return {"workers": workers, "mode": args.mode, "error": proc.returncode, "wall_s": wall}
    lines = proc.stdout.splitlines()
    first = max(i for i, line in enumerate(lines) if line == "{")  # the flow's summary, printed as indented JSON
    summary = json.JSONDecoder().raw_decode("\n".join(lines[first:]))[0]
    rec = {"workers": workers, "mode": args.mode, "whole_flow_s": round(wall, 1), **summary}
    if "clock" in summary:  # the process's start to the flow's, and the flow's return to the process's exit
        rec["before_flow_s"] = round(summary["clock"]["flow_start"] - epoch, 2)
        rec["after_flow_s"] = round(exited - summary["clock"]["flow_end"], 2)
    print(json.dumps(rec), flush=True)
    return rec


def bundle_tensors(uri: str) -> dict[str, bytes]:
    return {p.name: p.read_bytes() for p in sorted(Path(uri).iterdir()) if p.suffix == ".safetensors"}


def project(rec: dict, args: argparse.Namespace) -> float:
    """Minutes for 80 layers x 2M tokens. Resident collect+fit: the steady per-layer time (the median of layers 1..L-1,
    from the stage's own breakdown) scales with layers x tokens, except the driver's solve in it (its median,
    ``median_solve``), which depends on D and scales with layers only (a record without it scales the solve with the
    tokens too: an upper bound); the rest of the stage (worker
    start-up, layer 0 without prefetch, kernel compilation, the driver's first solve) is paid once. Validation: each
    of its two passes' steady layer (the median of layers 1..L-1) scales with layers (the held-out size stays the
    run's), the rest of the pass (its first layer's start-up, probes, kernel loads) and the workers' start once;
    when the held-out passes ran along the resident chain, their steady layer is inside collect+fit's and scales
    with layers only. Staged stages scale whole. Start-up, data and publish as measured (the data stage runs while
    Ray starts: the two stages' seconds overlap, and start-up, the whole flow less every stage, is short by that
    overlap, so the sum is the wall time).
    """
    s, detail = rec["seconds"], rec.get("stage_seconds", {})
    tokens = args.samples * args.seq_len
    scale = (TARGET_LAYERS / args.layers) * (TARGET_TOKENS / tokens)
    cf, v = detail.get("collect_fit", {}), detail.get("validate", {})
    heldout = v.get("exact_median_layer", 0.0) + v.get("aquakv_median_layer", 0.0)  # a held-out layer, steady
    along = bool(v.get("along_chain"))  # the held-out passes ran inside collect+fit's layers
    if "median_layer" in cf:
        steady = cf["median_layer"]
        once = s["collect_fit"] - steady * args.layers  # worker start, layer 0's and the first solve's extra
        solve = cf.get("median_solve", 0.0)  # the driver's: D, not tokens (a record without it: scaled as tokens)
        per_layer = solve + (heldout if along else 0.0)  # scales with layers only
        calib = steady - per_layer  # scales with tokens too; the held-out size stays the run's
        work = once + calib * TARGET_LAYERS * TARGET_TOKENS / tokens + per_layer * TARGET_LAYERS
    else:
        work = sum(s.get(k, 0.0) for k in ("collect", "fit", "collect_fit")) * scale
    passes = v.get("exact", 0.0) + v.get("aquakv", 0.0) if v else s["validate"]
    if along:  # the stage only reads the sums out
        validate = s["validate"]
    elif "exact_median_layer" in v:
        validate = s["validate"] + heldout * (TARGET_LAYERS - args.layers)
    else:
        validate = s["validate"] - passes + passes * TARGET_LAYERS / args.layers
    fixed = sum(s.get(k, 0.0) for k in ("ray", "data", "publish"))
    startup = rec["whole_flow_s"] - sum(s.values())  # interpreter, Prefect's API, imports
    return (work + validate + fixed + startup) / 60


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--sections", nargs="+", default=["write", "run"], choices=["write", "run"])
    p.add_argument("--gpus", default="1,2", help="worker counts, one flow each (the first is the baseline)")
    p.add_argument("--mode", default="resident", choices=["resident", "staged"])
    p.add_argument("--write-activations", action="store_true",
                   help="resident mode: also write K/V to Zarr for later re-fits (off: a one-shot run)")
    add_run_arguments(p, layers=8)
    p.add_argument("--heldout-seq-len", type=int, default=None,
                   help="cut the held-out sequences into windows of this many tokens (default: --seq-len)")
    p.add_argument("--warmup", action="store_true",
                   help="run the first worker count once before the measured runs and drop it: Triton compiles its "
                        "kernels on a machine's first flow (into its on-disk cache), and the projection would "
                        "multiply the validation pass that paid it by the layer ratio")
    p.add_argument("--prefect-server", action="store_true",
                   help="run every flow against one running `prefect server` started first (as a deployment's flow "
                        "runs are), instead of each flow starting Prefect's temporary server (~14 s on an H100 host)")
    p.add_argument("--workdir", default="/tmp/aquakv-flow")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--reproject", metavar="JSON", help="no run: each recorded flow pair in this file (a result of "
                   "this script, or docs/benchmarks/calibration.json's keys) projected again with project() as it is "
                   "now, and with the mean solve per layer where its median was not recorded (an estimate)")
    args = p.parse_args(argv)
    args.api = None
    if args.reproject:
        reproject(Path(args.reproject))
        return
    if "write" in args.sections:
        write(args)
    if "run" not in args.sections:
        return
    if args.prefect_server:
        with prefect_server(Path(args.workdir)) as args.api:
            run_all(args, argv)
    else:
        run_all(args, argv)


def run_all(args: argparse.Namespace, argv: list[str] | None) -> None:
    """The flows of ``--gpus`` (after a dropped warm-up with ``--warmup``); writes the summary after each."""
    runs: list[dict] = []
    if args.warmup:
        warm = run_flow(args, int(args.gpus.split(",")[0]))
        print(f"warm-up flow done in {warm.get('whole_flow_s', warm.get('wall_s'))} s (not recorded)", flush=True)
    for n in args.gpus.split(","):  # the results so far are written after every run (a cut-off run keeps them)
        runs.append(run_flow(args, int(n)))
        result = summarize(args, runs, argv)
        out = Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        (out / f"calibration-flow-{args.mode}.json").write_text(json.dumps(result, indent=1))
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=1))


def reproject(path: Path) -> None:
    """Print, for every record of ``path`` with two resident runs and its settings (the top level and each key), the
    projections on 1 and 2 GPUs and their ratio as :func:`project` computes them now, and with the solve estimated
    by :func:`_with_mean_solve`."""
    data = json.loads(path.read_text())
    for key, rec in [("(top level)", data), *data.items()]:
        runs, settings = (rec.get("runs"), rec.get("settings")) if isinstance(rec, dict) else (None, None)
        if not runs or len(runs) < 2 or not settings or not all("median_layer" in r.get("stage_seconds", {}).get(
                "collect_fit", {}) for r in runs[:2]):
            continue
        args = argparse.Namespace(**{k: settings[k] for k in ("layers", "samples", "seq_len")})
        out = {"key": key}
        for name, records in (("now", runs[:2]), ("mean_solve", [_with_mean_solve(r, args.layers) for r in runs[:2]])):
            one, two = (project(r, args) for r in records)
            out[name] = [round(one, 2), round(two, 2), round(one / two, 3)]
        print(json.dumps(out))


def _with_mean_solve(rec: dict, layers: int) -> dict:
    """``rec`` with ``median_solve`` estimated as the mean solve per layer where it was not recorded (the mean includes
    the first layer's solve, so it can only overstate the part that does not scale with tokens)."""
    cf = rec["stage_seconds"]["collect_fit"]
    if "median_solve" in cf:
        return rec
    cf = cf | {"median_solve": cf.get("solve", 0.0) / layers}
    return rec | {"stage_seconds": rec["stage_seconds"] | {"collect_fit": cf}}


def summarize(args: argparse.Namespace, runs: list[dict], argv: list[str] | None) -> dict:
    """Projection of the first (baseline) run, and each other run's speed-ups and bundle identity against it."""
    ok = [r for r in runs if "error" not in r]
    result = {"date": datetime.date.today().isoformat(), "command": "python benchmarks/calibration.py " +
              " ".join(sys.argv[1:] if argv is None else argv),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "gpus_visible": torch.cuda.device_count(), "settings": vars(args), "runs": runs,
              "prefect": "one running `prefect server`" if args.api else "each flow starts Prefect's temporary server"}
    if ok and ok[0]["workers"] == int(args.gpus.split(",")[0]):
        base = ok[0]
        result["projected_70b_minutes"] = round(project(base, args), 2)
        result["whole_flow_s"] = base["whole_flow_s"]
        reference = bundle_tensors(base["bundle"])
        for r in ok[1:]:
            r["projected_70b_minutes"] = round(project(r, args), 2)
            r["bundle_matches_1gpu"] = bundle_tensors(r["bundle"]) == reference
            work = [sum(x["seconds"].get(k, 0.0) for k in ("collect", "fit", "collect_fit")) for x in (base, r)]
            r["speedup_collect_fit"] = round(work[0] / work[1], 3)
            r["speedup_whole_flow"] = round(base["whole_flow_s"] / r["whole_flow_s"], 3)
            r["speedup_projected"] = round(result["projected_70b_minutes"] / r["projected_70b_minutes"], 3)
        if len(ok) > 1:
            result["speedup_2gpu"] = ok[1]["speedup_projected"]
            result["bundle_matches_1gpu"] = ok[1]["bundle_matches_1gpu"]
    return result

if __name__ == "__main__":
    main()
