"""Host (CPU) time of uncaptured batch-1 decode steps at 32k, without a profiler: per step, the time spent inside
Triton's ``JITFunction.run`` (kernel launches, with their count), ``TritonBackend.attend`` and
``AquaKVCache.update``, measured by timers wrapped around them in this process, over 10 steps after 3 warm-up steps.
The model and caches are :mod:`benchmarks.decode`'s (Llama-3.1-8B shape, random weights). docs/benchmarks/decode.md,
round 25.

    python benchmarks/host_time.py aquakv-r256-stored aquakv-r64-stored [--out FILE]
"""

from __future__ import annotations

import argparse
import collections
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import decode as bench  # noqa: E402
import torch  # noqa: E402
import triton.runtime.jit as triton_jit  # noqa: E402

from aquakv import attention  # noqa: E402
from aquakv import cache as cache_module  # noqa: E402
from aquakv.compat import cache_kwargs  # noqa: E402
from aquakv.kernels import KernelSettings  # noqa: E402

SPENT: collections.defaultdict[str, float] = collections.defaultdict(float)
CALLS: collections.Counter[str] = collections.Counter()


def timed(owner: type, name: str, key: str) -> None:
    """Wrap ``owner.name`` so that each call adds its duration to ``SPENT[key]`` (this process only)."""
    inner = getattr(owner, name)

    def wrapper(*args, **kwargs):
        t = time.perf_counter()
        try:
            return inner(*args, **kwargs)
        finally:
            SPENT[key] += time.perf_counter() - t
            CALLS[key] += 1

    setattr(owner, name, wrapper)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("caches", nargs="+", help="aquakv kinds of benchmarks/decode.py, e.g. aquakv-r256-stored")
    p.add_argument("--steps", type=int, default=10)
    p.add_argument("--out", default=None, help="write the results as JSON here")
    args = p.parse_args()
    timed(triton_jit.JITFunction, "run", "triton_launches")
    timed(attention.TritonBackend, "attend", "attend")
    timed(cache_module.AquaKVCache, "update", "update")
    torch.backends.cuda.enable_cudnn_sdp(False)  # as benchmarks/decode.py
    model = bench.build_model(32)
    results = {}
    for kind in args.caches:
        cache, _, _ = bench.make_cache(kind, model, 1, 32768, 32, KernelSettings())
        ids = torch.randint(0, model.config.vocab_size, (1, 1), device=bench.DEV)
        with torch.no_grad():
            for _ in range(3):
                model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
            torch.cuda.synchronize()
            SPENT.clear()
            CALLS.clear()
            t0 = time.perf_counter()
            for _ in range(args.steps):
                model(input_ids=ids, use_cache=True, **cache_kwargs(model, cache))
            host = time.perf_counter() - t0
            torch.cuda.synchronize()
        n = args.steps
        r = {"host_ms_per_step": host / n * 1e3, "wall_ms_per_step": (time.perf_counter() - t0) / n * 1e3}
        r |= {f"{k}_ms_per_step": v / n * 1e3 for k, v in SPENT.items()}
        r |= {f"{k}_per_step": c / n for k, c in CALLS.items()}
        if CALLS["triton_launches"]:
            r["us_per_triton_launch"] = SPENT["triton_launches"] / CALLS["triton_launches"] * 1e6
        print(kind, json.dumps({k: round(v, 3) for k, v in r.items()}), flush=True)
        results[kind] = r
        del cache
        bench.free()
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=1))


if __name__ == "__main__":
    main()
