"""Ray workers for calibration: one per GPU (CPU workers where there is none).

The functions Ray runs are thin: each opens the stores it is given by path and calls a pipeline stage,
so a worker holds only its own shard of samples and streams the model one layer at a time.
"""

from __future__ import annotations

import logging
import os
from collections.abc import Callable, Iterable
from typing import Any

import ray

from aquakv.errors import AquaKVError

log = logging.getLogger("aquakv.cluster")


def connect(address: str | None = None, workers: int = 1) -> dict[str, float]:
    """Join the Ray cluster at ``address`` (``auto``: the one this node belongs to; default ``$RAY_ADDRESS``),
    else start a local one with ``workers`` CPU slots at least; returns the cluster's resources."""
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    if not ray.is_initialized():
        address = address or os.environ.get("RAY_ADDRESS")
        if address:
            ray.init(address=address, log_to_driver=True)
        else:  # light: no dashboard, no runtime environment to build (local workers inherit this environment)
            ray.init(num_cpus=max(workers, os.cpu_count() or 1), include_dashboard=False, log_to_driver=True)
    resources = ray.cluster_resources()
    log.info("Ray cluster: %s CPUs, %s GPUs", resources.get("CPU", 0), resources.get("GPU", 0))
    return resources


def worker_options() -> dict[str, Any]:
    """One GPU per worker when the cluster has GPUs, else one CPU."""
    return {"num_gpus": 1} if worker_device() == "cuda" else {"num_cpus": 1}


def worker_device() -> str:
    """Where a task of :func:`ray_map` computes: ``"cuda"`` (its one GPU) when the cluster has GPUs, else ``"cpu"``."""
    return "cuda" if ray.cluster_resources().get("GPU", 0) >= 1 else "cpu"


def ray_get(refs: list[Any]) -> list[Any]:
    """``ray.get`` that raises an expected :class:`AquaKVError` as itself, not wrapped in Ray's ``RayTaskError``
    (whose message carries the remote traceback into every log line); that traceback stays attached as a note."""
    try:
        return ray.get(refs)
    except ray.exceptions.RayTaskError as e:
        if not isinstance(e.cause, AquaKVError):
            raise
        e.cause.add_note(f"raised in a Ray worker:\n{e}")
        raise e.cause from None


def ray_map(fn: Callable[..., Any], *iterables: Iterable[Any]) -> list[Any]:
    """Builtin ``map`` semantics (results in order), each call a Ray task on its own worker."""
    remote = ray.remote(fn).options(**worker_options())
    return ray_get([remote.remote(*args) for args in zip(*iterables, strict=True)])


def collect_worker(model_dir: str, tokens_path: str, start: int, stop: int, store_path: str, dtype: str,
                   hidden_every: int = 1) -> list[int]:
    """Collect pre-RoPE keys/values of samples ``[start, stop)`` for every layer (one worker's shard)."""
    import torch
    import zarr

    from pipeline.checkpoint import Checkpoint
    from pipeline.collect import collect_shard

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = zarr.open_group(tokens_path, mode="r")["calib"][start:stop]
    return collect_shard(Checkpoint(model_dir), tokens, start, store_path, device=device, dtype=dtype,
                         progress=False, hidden_every=hidden_every)


def validate_worker(model_dir: str, tokens_path: str, start: int, stop: int, codecs: list, cache: Any,
                    dtype: str) -> tuple[dict, dict]:
    """Held-out sequences ``[start, stop)``: exact and AQUA-KV NLL sums on the checkpoint streamed one layer at a
    time (:func:`pipeline.validate.streamed_sums`, decode's chunks), and the model fingerprint."""
    import torch

    from pipeline.checkpoint import Checkpoint
    from pipeline.validate import heldout_sums

    device = "cuda" if torch.cuda.is_available() else "cpu"
    return heldout_sums(Checkpoint(model_dir), tokens_path, start, stop, codecs, cache, device, getattr(torch, dtype))


def sensitivity_worker(model_dir: str, tokens_path: str, samples: int, sinks: int, dtype: str) -> dict:
    """The loss's Fisher sensitivity to every layer's keys and values on the first ``samples`` calibration samples
    (:func:`pipeline.sensitivity.fisher`, the checkpoint streamed forward then backward)."""
    import torch
    import zarr

    from pipeline.checkpoint import Checkpoint
    from pipeline.sensitivity import fisher

    device = "cuda" if torch.cuda.is_available() else "cpu"
    tokens = torch.from_numpy(zarr.open_group(tokens_path, mode="r")["calib"][:samples]).long()
    return fisher(Checkpoint(model_dir), tokens, sinks, device=device, dtype=getattr(torch, dtype))


# ---------------------------------------------------------------------------------------------------------------
# resident mode: one long-lived actor per shard (pipeline.resident), its samples kept on its GPU


class ShardWorker:
    """The process of one resident shard (:class:`pipeline.resident.ResidentShard`), started before the shard exists.

    Its start is the flow's largest fixed cost: importing torch, transformers and the pipeline takes ~17 s on a
    2-GPU H100 host (``benchmarks/fixed_costs.py``). So the flow starts the workers as soon as Ray is up, while it
    checks its inputs and tokenizes the data (a local checkpoint is opened then too), then :meth:`open` builds each
    worker's shard and :meth:`call` runs the shard's methods (:func:`ray_shards_call`).
    """

    def __init__(self, model_dir: str | None = None, dtype: str = "float32") -> None:
        """``model_dir``: the checkpoint, when known before the data stage is done (a local directory), is opened now,
        and its embedding and layer 0 start loading (:func:`pipeline.resident.warm_start`)."""
        import torch

        from pipeline.resident import warm_start  # (the import is the cost this process pays up front)

        if torch.cuda.is_available():
            torch.zeros(1, device="cuda")  # the device's context starts here too
        self.shard: Any = None
        self.warm = None
        if model_dir is not None:
            try:
                self.warm = warm_start(model_dir, "auto", dtype)
            except Exception:  # noqa: BLE001  (only a head start: open() opens the checkpoint and says what is wrong)
                log.debug("warm start of %s failed; the shard opens it itself", model_dir, exc_info=True)

    def open(self, model_dir: str, tokens_path: str, start: int, stop: int, dtype: str,
             activations_path: str | None) -> None:
        """Samples ``[start, stop)`` of ``tokens_path`` become this worker's shard."""
        from pipeline.resident import ResidentShard

        warm, self.warm = self.warm, None
        self.shard = ResidentShard(model_dir, tokens_path, start, stop, "auto", dtype, activations_path, warm=warm)

    def call(self, method: str, *args: Any) -> Any:
        """The shard's ``method(*args)``."""
        if self.shard is None:
            raise AquaKVError(f"shard worker asked for {method}() before open()")
        return getattr(self.shard, method)(*args)


def start_shard_workers(n: int, model_dir: str | None = None, dtype: str = "float32") -> list[Any]:
    """``n`` :class:`ShardWorker` actors with :func:`worker_options` (one GPU each when the cluster has GPUs), starting
    in the background (``model_dir``: opened as they start). Free them with ``ray.kill``."""
    actor = ray.remote(ShardWorker).options(**worker_options())
    return [actor.remote(model_dir, dtype) for _ in range(n)]


def open_shards(workers: list[Any], model_dir: str, tokens_path: str, shards: list[tuple[int, int]],
                dtype: str = "float32", activations_path: str | None = None) -> None:
    """Give each worker its ``(start, stop)`` shard; waits for the workers' start."""
    ray_get([w.open.remote(model_dir, tokens_path, a, b, dtype, activations_path)
             for w, (a, b) in zip(workers, shards, strict=True)])


def ray_shards_call(workers: list[Any]) -> Callable[..., list[Any]]:
    """``shards_call(method, *args)`` for :func:`pipeline.chain.fit_chain`: ``method`` on every worker's shard,
    results in worker order (arguments are put in the object store once, not once per worker)."""
    def call(method: str, *args: Any) -> list[Any]:
        refs = [ray.put(a) for a in args]
        return ray_get([worker.call.remote(method, *refs) for worker in workers])

    return call
