"""Calibration scaling across GPUs through Ray, on Llama-3.1-70B-shaped synthetic layers.

Writes a synthetic bf16 safetensors checkpoint (a few 70B-shaped decoder layers, one shard per layer) and
random calibration tokens, then runs the real collect stage (Ray workers, ``cluster.workers.collect_worker``)
and fit stage (``pipeline.fit.fit_all`` with statistics as Ray tasks) with 1 worker/GPU and with N. Reports
per-stage times, the speed-up, calibration throughput projected to 80 layers x 2M tokens, and whether the
N-GPU predictors match the 1-GPU ones. Prefect is not involved (the flow's tasks call exactly these functions).
With ``--resident`` it also times the fused, device-resident collect+fit (``pipeline.chain.fit_chain`` over
``cluster.workers`` shard actors, as the flow's ``collect_fit`` task runs it) and checks its predictors against
the staged 1-GPU fit.

    python benchmarks/multigpu.py --gpus 1,2 --out docs/benchmarks --resident
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch
import zarr
from safetensors.torch import save_file
from transformers import LlamaConfig

from aquakv.config import CalibrationConfig
from cluster.workers import collect_worker, connect, open_shards, ray_map, ray_shards_call, start_shard_workers
from pipeline.chain import shard_ranges
from pipeline.collect import open_activations
from pipeline.fit import fit_all


def write_checkpoint(path: Path, layers: int, hidden: int, heads: int, kv_heads: int, mlp: int, vocab: int) -> Path:
    """A Llama checkpoint with random bf16 weights (std 0.02), one safetensors shard per decoder layer."""
    path.mkdir(parents=True, exist_ok=True)
    cfg = LlamaConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                      num_key_value_heads=kv_heads, intermediate_size=mlp, vocab_size=vocab,
                      max_position_embeddings=131072, rope_theta=500000.0, architectures=["LlamaForCausalLM"])
    cfg.save_pretrained(path)
    hd = hidden // heads
    dev = "cuda" if torch.cuda.is_available() else "cpu"
    gen = torch.Generator(dev).manual_seed(0)

    def rnd(*shape: int) -> torch.Tensor:
        return (torch.randn(*shape, generator=gen, device=dev, dtype=torch.bfloat16) * 0.02).cpu()

    weight_map = {}
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (kv_heads * hd, hidden),
              "self_attn.v_proj": (kv_heads * hd, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (mlp, hidden), "mlp.up_proj": (mlp, hidden), "mlp.down_proj": (hidden, mlp)}
    for i in range(layers):
        tensors = {f"model.layers.{i}.{n}.weight": rnd(*s) for n, s in shapes.items()}
        for norm in ("input_layernorm", "post_attention_layernorm"):
            tensors[f"model.layers.{i}.{norm}.weight"] = torch.ones(hidden, dtype=torch.bfloat16)
        name = f"model-layer{i:03d}.safetensors"
        save_file(tensors, path / name)
        weight_map.update(dict.fromkeys(tensors, name))
    rest = {"model.embed_tokens.weight": rnd(vocab, hidden), "model.norm.weight": torch.ones(hidden).bfloat16(),
            "lm_head.weight": rnd(vocab, hidden)}
    save_file(rest, path / "model-rest.safetensors")
    weight_map.update(dict.fromkeys(rest, "model-rest.safetensors"))
    (path / "model.safetensors.index.json").write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    return path


def add_run_arguments(p: argparse.ArgumentParser, layers: int, heldout: bool = True) -> None:
    """``--layers --samples --seq-len [--heldout]`` of a run and the checkpoint shape (:func:`add_shape_arguments`)."""
    p.add_argument("--layers", type=int, default=layers)
    p.add_argument("--samples", type=int, default=32)
    p.add_argument("--seq-len", type=int, default=8192)
    if heldout:
        p.add_argument("--heldout", type=int, default=4, help="held-out sequences of --seq-len tokens")
    add_shape_arguments(p)


def add_shape_arguments(p: argparse.ArgumentParser) -> None:
    """``--hidden --heads --kv-heads --mlp --vocab`` of the synthetic checkpoint, Llama-3.1-70B's by default."""
    p.add_argument("--hidden", type=int, default=8192)
    p.add_argument("--heads", type=int, default=64)
    p.add_argument("--kv-heads", type=int, default=8)
    p.add_argument("--mlp", type=int, default=28672)
    p.add_argument("--vocab", type=int, default=32000)


def write_tokens(path: Path, samples: int, seq_len: int, vocab: int, heldout: int = 0) -> Path:
    """Random token ids: ``calib [samples, seq_len]`` and, with ``heldout``, ``heldout [heldout, seq_len]``."""
    group = zarr.open_group(path, mode="w")
    rng = np.random.default_rng(0)
    for name, n in (("calib", samples), ("heldout", heldout)):
        if n:
            group.create_array(name, data=rng.integers(0, vocab, (n, seq_len), dtype=np.int32), chunks=(1, seq_len))
    return path


def warm(n: int) -> None:
    """Start the Ray workers (and their torch/CUDA imports) before timing."""
    ray_map(_touch_cuda, list(range(n)))


def _touch_cuda(_: int) -> str:
    import pipeline.collect  # noqa: F401
    import pipeline.staged  # noqa: F401

    return str(torch.zeros(1, device="cuda" if torch.cuda.is_available() else "cpu").device)


def run(n: int, args: argparse.Namespace, ckpt: Path, tokens: Path, kv_dim: int) -> dict:
    root = Path(args.workdir) / f"gpus{n}"
    shutil.rmtree(root, ignore_errors=True)  # a rerun must not resume (and time) a finished collect and fit
    act = root / "activations.zarr"
    open_activations(act, args.layers, args.samples, args.seq_len, kv_dim, dtype="bfloat16")
    shards = shard_ranges(args.samples, n)
    warm(n)
    t = time.perf_counter()
    ray_map(collect_worker, [str(ckpt)] * n, [str(tokens)] * n, [a for a, _ in shards], [b for _, b in shards],
            [str(act)] * n, ["bfloat16"] * n, [args.layers] * n)
    collect_s = time.perf_counter() - t
    cfg = CalibrationConfig(model=str(ckpt), data="synthetic", seq_len=args.seq_len, num_samples=args.samples,
                            workers=n, dtype="bfloat16")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    t = time.perf_counter()
    fits = fit_all(act, root, cfg, map_fn=ray_map, num_shards=n, device=device, progress=False)
    fit_s = time.perf_counter() - t
    return {"gpus": n, "collect_s": collect_s, "fit_s": fit_s, "total_s": collect_s + fit_s, "fits": fits}


def run_resident(n: int, args: argparse.Namespace, ckpt: Path, tokens: Path, kv_dim: int, write: bool = False) -> dict:
    """The resident path with ``n`` shard actors (``write``: K/V also written to activations.zarr, as the flow
    does by default): actors started (and CUDA up) before timing, killed after."""
    import ray

    from pipeline.chain import fit_chain

    root = Path(args.workdir) / f"resident{n}{'-write' if write else ''}"
    shutil.rmtree(root, ignore_errors=True)
    act = None
    if write:
        act = root / "activations.zarr"
        open_activations(act, args.layers, args.samples, args.seq_len, kv_dim, dtype="bfloat16")
    cfg = CalibrationConfig(model=str(ckpt), data="synthetic", seq_len=args.seq_len, num_samples=args.samples,
                            workers=n, dtype="bfloat16", resident=True)
    t = time.perf_counter()
    actors = start_shard_workers(n)
    open_shards(actors, str(ckpt), str(tokens), shard_ranges(args.samples, n), "bfloat16",
                None if act is None else str(act))
    call = ray_shards_call(actors)
    start_s = time.perf_counter() - t
    try:
        t = time.perf_counter()
        fits = fit_chain(call, cfg, root, args.layers, progress=False)
        total_s = time.perf_counter() - t
        phases = call("timings")
    finally:
        for actor in actors:
            ray.kill(actor)
    return {"gpus": n, "actor_start_s": start_s, "total_s": total_s, "write_activations": act is not None,
            "phase_s": {k: max(p.get(k, 0.0) for p in phases) for k in phases[0]}, "fits": fits}


def compare(a: list, b: list) -> dict:
    """Largest relative difference of predictor weights and of per-layer metrics between two fits."""
    w = m = 0.0
    for fa, fb in zip(a, b, strict=True):
        for p, q in ((fa.codec.key_predictor, fb.codec.key_predictor), (fa.codec.value_predictor,
                                                                        fb.codec.value_predictor)):
            if p is not None:
                w = max(w, float((p.weight - q.weight).norm() / p.weight.norm()))
        for k in ("keys_rel_mse", "values_rel_mse"):
            m = max(m, abs(fa.metrics[k] - fb.metrics[k]) / max(fa.metrics[k], 1e-12))
    return {"max_rel_weight_diff": w, "max_rel_metric_diff": m}


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--gpus", default="1,2", help="worker counts to compare (first is the baseline)")
    add_run_arguments(p, layers=3, heldout=False)
    p.add_argument("--workdir", default="/tmp/aquakv-multigpu")
    p.add_argument("--out", default="docs/benchmarks")
    p.add_argument("--resident", action="store_true", help="also time the resident (fused collect+fit) path")
    p.add_argument("--resident-write", action="store_true",
                   help="also time resident runs that write K/V to activations.zarr (the flow's default)")
    args = p.parse_args(argv)
    counts = [int(x) for x in args.gpus.split(",")]
    work = Path(args.workdir)
    t = time.perf_counter()
    ckpt = write_checkpoint(work / "ckpt", args.layers, args.hidden, args.heads, args.kv_heads, args.mlp, args.vocab)
    write_s = time.perf_counter() - t
    tokens = write_tokens(work / "tokens.zarr", args.samples, args.seq_len, args.vocab)
    kv_dim = args.kv_heads * args.hidden // args.heads
    connect(None, max(counts))
    runs = [run(n, args, ckpt, tokens, kv_dim) for n in counts]
    base = runs[0]
    tokens_total = args.samples * args.seq_len
    result = {
        "device": torch.cuda.get_device_name(0) if torch.cuda.is_available() else "cpu",
        "gpus_available": torch.cuda.device_count(),
        "date": datetime.date.today().isoformat(),
        "command": "python benchmarks/multigpu.py " + " ".join(sys.argv[1:] if argv is None else argv),
        "shape": {"layers": args.layers, "hidden": args.hidden, "heads": args.heads, "kv_heads": args.kv_heads,
                  "mlp": args.mlp, "samples": args.samples, "seq_len": args.seq_len},
        "checkpoint_write_s": write_s,
        "runs": [{k: v for k, v in r.items() if k != "fits"} for r in runs],
        "tokens_per_s_per_layer": tokens_total * args.layers / base["collect_s"],
        "fit_s_per_layer": base["fit_s"] / args.layers,
    }
    per_layer_s = (base["collect_s"] + base["fit_s"]) / args.layers
    result["projected_70b_minutes"] = per_layer_s * 80 * (2 * 1024 * 1024 / tokens_total) / 60
    for r in runs[1:]:
        key = f"speedup_{r['gpus']}gpu"
        result[key] = base["total_s"] / r["total_s"]
        result[f"collect_{key}"] = base["collect_s"] / r["collect_s"]
        result[f"fit_{key}"] = base["fit_s"] / r["fit_s"]
        diff = compare(base["fits"], r["fits"])
        result[f"diff_{r['gpus']}gpu"] = diff
        result["bundle_matches_1gpu"] = diff["max_rel_weight_diff"] < 1e-3 and diff["max_rel_metric_diff"] < 1e-2
    if args.resident:
        resident = [run_resident(n, args, ckpt, tokens, kv_dim) for n in counts]
        scale = 80 * (2 * 1024 * 1024 / tokens_total) / 60 / args.layers
        result["runs_resident"] = [{**{k: v for k, v in r.items() if k != "fits"},
                                    "projected_70b_minutes": r["total_s"] * scale} for r in resident]
        result["projected_70b_minutes_resident"] = resident[0]["total_s"] * scale
        for r in resident:
            result[f"resident_vs_staged_{r['gpus']}gpu"] = next(
                s["total_s"] for s in runs if s["gpus"] == r["gpus"]) / r["total_s"]
            if r is not resident[0]:
                result[f"speedup_{r['gpus']}gpu_resident"] = resident[0]["total_s"] / r["total_s"]
            diff = compare(base["fits"], r["fits"])
            result[f"diff_resident_{r['gpus']}gpu"] = diff
        if args.resident_write:
            written = [run_resident(n, args, ckpt, tokens, kv_dim, write=True) for n in counts]
            result["runs_resident"] += [{**{k: v for k, v in r.items() if k != "fits"},
                                         "projected_70b_minutes": r["total_s"] * scale} for r in written]
            result["projected_70b_minutes_resident_write"] = written[0]["total_s"] * scale
            for r in written:
                result[f"diff_resident_write_{r['gpus']}gpu"] = compare(base["fits"], r["fits"])
        result["resident_matches_1gpu"] = all(
            d["max_rel_weight_diff"] < 1e-3 and d["max_rel_metric_diff"] < 1e-2
            for k, d in result.items() if k.startswith("diff_resident"))
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "multigpu.json").write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
