"""Ridge statistics through Ray, as the chain fit moves them: a local actor returns one layer's value-predictor
statistics (``xtx [2D+1, 2D+1]``, ``xty [2D+1, D]`` float64; D = 1024, a Llama-3.1-70B layer: ~50 MB) to the
driver, pickled the way :class:`aquakv.predictors.RidgeStats` pickles (NumPy arrays, out of band) or as torch tensors
(in band, what it did before ``aquakv.pickling``). Prints the milliseconds of each ``ray.get``, alternating the two:

    python benchmarks/ray_transfer.py --reps 5
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

import ray  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aquakv.predictors import RidgeStats  # noqa: E402


class TensorStats:
    """The statistics as plain torch tensors: Ray pickles their storages into the message."""

    def __init__(self, stats: RidgeStats) -> None:
        self.xtx, self.xty, self.yty, self.count = stats.xtx, stats.xty, stats.yty, stats.count


@ray.remote
class Shard:
    def __init__(self, d: int) -> None:
        gen = torch.Generator().manual_seed(0)
        self.stats = RidgeStats(torch.randn(2 * d + 1, 2 * d + 1, generator=gen, dtype=torch.float64),
                                torch.randn(2 * d + 1, d, generator=gen, dtype=torch.float64), 1.0, 1)

    def as_arrays(self) -> RidgeStats:
        return self.stats

    def as_tensors(self) -> TensorStats:
        return TensorStats(self.stats)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--d", type=int, default=1024, help="the layer's K/V width D")
    p.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    shard = Shard.remote(args.d)
    ms: dict[str, list[float]] = {"as_arrays": [], "as_tensors": []}
    for name in ms:  # warm-up
        ray.get(getattr(shard, name).remote())
    for _ in range(args.reps):
        for name, times in ms.items():
            t0 = time.perf_counter()
            ray.get(getattr(shard, name).remote())
            times.append(round((time.perf_counter() - t0) * 1e3, 1))
    mb = ((2 * args.d + 1) ** 2 + (2 * args.d + 1) * args.d) * 8 / 1e6
    print(json.dumps({"megabytes": round(mb, 1), "ms": ms,
                      "median_ms": {k: statistics.median(v) for k, v in ms.items()}}))
    ray.shutdown()


if __name__ == "__main__":
    main()
