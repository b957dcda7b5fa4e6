"""Where the calibration flow's GPU time goes, stage by stage, on one GPU in this process (no Ray, no Prefect).

Runs what the flow's workers run, on a Llama-3.1-70B-shaped synthetic checkpoint (:func:`benchmarks.multigpu.
write_checkpoint`): the resident collect+fit (:func:`pipeline.chain.fit_chain` over one
:class:`~pipeline.resident.ResidentShard`) with its per-method seconds, then the streamed validation
(:func:`pipeline.validate.streamed_sums`) with the seconds of its exact and AQUA-KV passes; ``--compare-step N``
also times the AQUA-KV pass fed fixed ``N``-token chunks (the flow's protocol before decode's chunks) and the exact
pass fed the AQUA-KV pass's chunks (instead of :data:`~pipeline.validate.EXACT_STEP`). ``--profile`` adds
``torch.profiler`` tables (top operators by GPU and by CPU time) of the validation passes over a short held-out slice,
``--profile-fit`` of one layer of collect+fit.

    python benchmarks/calibration_stages.py --layers 3 --profile --out $OUT
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
from typing import Any

import torch
import zarr

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aquakv.config import CalibrationConfig  # noqa: E402
from benchmarks.multigpu import add_run_arguments, write_checkpoint, write_tokens  # noqa: E402
from pipeline.chain import fit_chain, shards_call  # noqa: E402
from pipeline.checkpoint import Checkpoint  # noqa: E402
from pipeline.resident import ResidentShard  # noqa: E402
from pipeline.validate import chunking, streamed_nll, streamed_sums, validation_kernels  # noqa: E402

TARGET_LAYERS, TARGET_TOKENS = 80, 2_000_000


def sync() -> None:
    if torch.cuda.is_available():
        torch.cuda.synchronize()


def profiler() -> torch.profiler.profile:
    """CPU (and CUDA, where there is one) activity profiler."""
    activities = [torch.profiler.ProfilerActivity.CPU]
    if torch.cuda.is_available():
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    return torch.profiler.profile(activities=activities)


def tables(prof: Any, rows: int = 25) -> dict[str, str]:
    """Top operators by self GPU time and by self CPU time, plus the totals."""
    events = prof.key_averages()
    gpu = "self_device_time_total" if torch.cuda.is_available() else "self_cpu_time_total"
    return {"by_gpu": events.table(sort_by=gpu, row_limit=rows),
            "by_cpu": events.table(sort_by="self_cpu_time_total", row_limit=rows),
            "gpu_ms": sum(getattr(e, "self_device_time_total", 0.0) for e in events) / 1e3,
            "cpu_ms": sum(e.self_cpu_time_total for e in events) / 1e3,
            "ops": sum(e.count for e in events)}


def collect_fit(args: argparse.Namespace, ckpt: Path, tokens: Path) -> tuple[dict, list]:
    """The resident collect+fit over all samples on one device; ``--profile``: layer ``--profile-layer`` under
    the profiler."""
    cfg = CalibrationConfig(model=str(ckpt), data="synthetic", seq_len=args.seq_len, num_samples=args.samples,
                            workers=1, dtype="bfloat16", resident=True, heldout_samples=args.heldout)
    t = time.perf_counter()
    shard = ResidentShard(ckpt, tokens, 0, args.samples, "auto", "bfloat16")
    start_s = time.perf_counter() - t
    call = shards_call([shard])
    prof, out = None, {}

    def profiled(method: str, *a: Any) -> list:
        nonlocal prof
        layer = a[0] if a else None
        if args.profile_fit and method == "forward" and layer == args.profile_layer:
            prof = profiler()
            prof.__enter__()
        result = call(method, *a)
        if prof is not None and method == "reconstruct" and layer == args.profile_layer:
            sync()
            prof.__exit__(None, None, None)
            out["profile_layer"] = tables(prof)
            prof = None
        return result

    seconds: dict[str, float] = {}
    shutil.rmtree(Path(args.workdir) / "fit", ignore_errors=True)  # nothing resumed
    t = time.perf_counter()
    fits = fit_chain(profiled, cfg, Path(args.workdir) / "fit", args.layers, progress=True, seconds=seconds)
    total = time.perf_counter() - t
    out.update({"shard_start_s": start_s, "total_s": total, "seconds": seconds, "shard_seconds": shard.timings()})
    shard.close()
    return out, fits


def validation(args: argparse.Namespace, ckpt_path: Path, tokens: Path, fits: list) -> dict:
    ckpt = Checkpoint(ckpt_path)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    heldout = torch.from_numpy(zarr.open_group(tokens, mode="r")["heldout"][:]).long()
    if args.heldout_seq_len:  # as pipeline.data cuts them: the same tokens in more, shorter rows
        heldout = heldout.reshape(-1, args.heldout_seq_len)
    codecs = [f.codec for f in fits]
    layout = CalibrationConfig(model="m", data="d").cache
    step, first = chunking(layout, None)
    t = time.perf_counter()
    sums, _ = streamed_sums(ckpt, heldout, codecs, layout, device=device, dtype=torch.bfloat16)
    out: dict[str, Any] = {"total_s": time.perf_counter() - t, "seconds": sums["seconds"],
                           "heldout": list(heldout.shape), "chunks": {"step": step, "first": first},
                           "nll": {"exact": sums["nll_exact"], "aquakv": sums["nll_aquakv"], "count": sums["count"]}}
    from transformers import DynamicCache

    from aquakv.cache import AquaKVCache
    from aquakv.family import rotary_module

    specs, load_s = [], []  # each layer's spec (probed by streamed_sums' exact pass) and a timed load of it
    for i in range(ckpt.num_layers):
        sync()
        t = time.perf_counter()
        layer = ckpt.load_layer(i, device, torch.bfloat16)
        sync()
        load_s.append(round(time.perf_counter() - t, 3))
        specs.append(ckpt.spec(i, layer))
        del layer
    out["load_layer_s"] = load_s

    def aquakv_cache() -> AquaKVCache:
        return AquaKVCache(codecs, layout, rotary_module(ckpt.skeleton), kernels=validation_kernels(), specs=specs)

    if args.compare_step:  # after streamed_sums: its first pass also compiled the kernels
        for name, (n, f) in (("aquakv_at_step", (args.compare_step, None)), ("aquakv_at_decode_chunks", (step, first))):
            sync()
            t = time.perf_counter()
            nll, _ = streamed_nll(ckpt, heldout, aquakv_cache(), n, device, torch.bfloat16, first=f)
            sync()
            out[name] = {"step": n, "first": f, "seconds": time.perf_counter() - t, "nll": nll}
        t = time.perf_counter()
        streamed_nll(ckpt, heldout, DynamicCache(config=ckpt.config), step, device, torch.bfloat16, first=first)
        sync()
        out["exact_at_aquakv_chunks_s"] = time.perf_counter() - t
    if args.profile:
        rows = heldout[:args.profile_rows, :args.profile_tokens]
        with profiler() as prof:
            t = time.perf_counter()
            streamed_nll(ckpt, rows, aquakv_cache(), step, device, torch.bfloat16, first=first)
            sync()
        out["profile_aquakv"] = {"rows": list(rows.shape), "wall_s": time.perf_counter() - t, **tables(prof)}
        with profiler() as prof:
            t = time.perf_counter()
            streamed_nll(ckpt, rows, DynamicCache(config=ckpt.config), step, device, torch.bfloat16, first=first)
            sync()
        out["profile_exact_at_aquakv_chunks"] = {"rows": list(rows.shape), "wall_s": time.perf_counter() - t,
                                                 **tables(prof)}
    return out


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    add_run_arguments(p, layers=3)
    p.add_argument("--profile", action="store_true", help="add torch.profiler tables of the validation passes")
    p.add_argument("--profile-fit", action="store_true",
                   help="add a torch.profiler table of collect+fit's layer --profile-layer (slows that layer)")
    p.add_argument("--compare-step", type=int, default=0, metavar="N",
                   help="also time the AQUA-KV pass fed N tokens at a time (the flow's chunks before 2026-11-27: 32) "
                        "and the exact pass fed the AQUA-KV pass's chunks")
    p.add_argument("--heldout-seq-len", type=int, default=0, help="cut the held-out rows into rows of this many tokens")
    p.add_argument("--profile-layer", type=int, default=1)
    p.add_argument("--profile-tokens", type=int, default=1024, help="held-out tokens per row of the profiled pass")
    p.add_argument("--profile-rows", type=int, default=1, help="held-out rows of the profiled pass")
    p.add_argument("--workdir", default="/tmp/aquakv-stages")
    p.add_argument("--out", default="docs/benchmarks")
    args = p.parse_args(argv)
    work = Path(args.workdir)
    t = time.perf_counter()
    ckpt = work / "model"
    if not (ckpt / "config.json").exists():
        write_checkpoint(ckpt, args.layers, args.hidden, args.heads, args.kv_heads, args.mlp, args.vocab)
    write_s = time.perf_counter() - t
    tokens = write_tokens(work / "tokens.zarr", args.samples, args.seq_len, args.vocab, args.heldout)
    fit_out, fits = collect_fit(args, ckpt, tokens)
    print(json.dumps({k: v for k, v in fit_out.items() if k != "profile_layer"}, indent=1), flush=True)
    val_out = validation(args, ckpt, tokens, fits)
    fs = fit_out["seconds"]  # the first layer (no prefetch, kernel compilation) is paid once
    steady = fs.get("median_layer", fs["layers"])
    per_layer = steady * TARGET_TOKENS / (args.samples * args.seq_len)
    val_per_layer = (val_out["seconds"]["exact"] + val_out["seconds"]["aquakv"]) / args.layers
    result = {"date": datetime.date.today().isoformat(),
              "command": "python benchmarks/calibration_stages.py " + " ".join(sys.argv[1:] if argv is None else argv),
              "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu",
              "settings": vars(args), "checkpoint_write_s": write_s, "collect_fit": fit_out, "validate": val_out,
              "collect_fit_s_per_layer_steady": steady, "collect_fit_s_per_70b_layer": per_layer,
              "validate_s_per_layer": val_per_layer,
              "projected_70b_minutes_layers_only": TARGET_LAYERS * (per_layer + val_per_layer) / 60}
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / "calibration-stages.json").write_text(json.dumps(result, indent=1))
    for section in (fit_out.get("profile_layer"), val_out.get("profile_aquakv"),
                    val_out.get("profile_exact_at_aquakv_chunks")):
        if section:
            print(section["by_gpu"], section["by_cpu"], sep="\n", flush=True)
    print(json.dumps({k: v for k, v in result.items() if k not in ("collect_fit", "validate")}, indent=1))


if __name__ == "__main__":
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    main()
