"""The calibration flow's fixed costs, each in a fresh process: a local Ray's start (with the slots the flow asks
for, or as many CPU slots as the machine has, and with or without a capped object store), the start of ``workers``
actors that import what a resident shard imports and open their device, and Ray's shutdown. Alternates the variants:

    python benchmarks/fixed_costs.py --workers 2 --reps 2
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
ENV = {"RAY_USAGE_STATS_ENABLED": "0", "DO_NOT_TRACK": "1", "HF_HUB_OFFLINE": "1"}
VARIANTS = {  # name -> ray.init keyword arguments (a function of the machine's CPUs and the workers)
    "all_cpus": lambda cpus, n: {"num_cpus": max(n, cpus)},
    "worker_cpus": lambda cpus, n: {"num_cpus": n},
    "worker_cpus_small_store": lambda cpus, n: {"num_cpus": n, "object_store_memory": 2 << 30},
}


def probe(variant: str, workers: int) -> dict[str, float]:
    """One variant in this process: seconds of ``ray.init``, of the actors' start, of ``ray.shutdown``."""
    t0 = time.perf_counter()
    import ray

    t_import = time.perf_counter()
    ray.init(include_dashboard=False, log_to_driver=False, **VARIANTS[variant](os.cpu_count() or 1, workers))
    t_init = time.perf_counter()
    gpus = ray.cluster_resources().get("GPU", 0) >= workers

    @ray.remote(**({"num_gpus": 1} if gpus else {"num_cpus": 1}))
    class Shard:
        def __init__(self) -> None:
            self.clock = {"enter": time.time()}
            import torch

            self.clock["torch"] = time.time()
            import pipeline.resident  # noqa: F401  (what the resident actor's class pulls in)

            self.clock["resident"] = time.time()
            if torch.cuda.is_available():
                torch.zeros(1, device="cuda")
            self.clock["device"] = time.time()

        def ready(self) -> dict[str, float]:
            return self.clock

    submitted = time.time()
    actors = [Shard.remote() for _ in range(workers)]
    clocks = ray.get([a.ready.remote() for a in actors])
    t_actors = time.perf_counter()
    for a in actors:
        ray.kill(a)
    ray.shutdown()
    t_down = time.perf_counter()
    slow = max(clocks, key=lambda c: c["device"])  # the actor the driver waited for
    return {"import_ray": t_import - t0, "init": t_init - t_import, "actors": t_actors - t_init,
            "actor_process": slow["enter"] - submitted, "actor_torch": slow["torch"] - slow["enter"],
            "actor_imports": slow["resident"] - slow["torch"], "actor_device": slow["device"] - slow["resident"],
            "shutdown": t_down - t_actors}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--reps", type=int, default=2)
    p.add_argument("--variants", nargs="+", default=list(VARIANTS), choices=list(VARIANTS))
    p.add_argument("--probe", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.probe:
        print(json.dumps(probe(args.probe, args.workers)))
        return
    runs: dict[str, list[dict[str, float]]] = {v: [] for v in args.variants}
    for _ in range(args.reps):
        for v in args.variants:
            t0 = time.perf_counter()
            out = subprocess.run([sys.executable, __file__, "--probe", v, "--workers", str(args.workers)],
                                 env={**os.environ, **ENV, "PYTHONPATH": f"{ROOT}:{os.environ.get('PYTHONPATH', '')}"},
                                 capture_output=True, text=True, check=True)
            rec = json.loads(out.stdout.strip().splitlines()[-1])
            rec["process"] = time.perf_counter() - t0
            runs[v].append(rec)
            print(v, {k: round(x, 2) for k, x in rec.items()}, flush=True)
    medians = {v: {k: round(statistics.median(r[k] for r in rs), 2) for k in rs[0]} for v, rs in runs.items()}
    print(json.dumps({"workers": args.workers, "cpus": os.cpu_count(), "medians": medians}, indent=1))


if __name__ == "__main__":
    main()
