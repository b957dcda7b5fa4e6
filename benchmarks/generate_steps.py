"""Where the wall time of ``model.generate(..., custom_generate=captured_decoding)`` goes, step by step.

Each one-token step of :class:`aquakv.graphs.CapturedDecode` is timed (synchronized before and after) and filed
under its kind: eager (a compression or a sink), uncaptured (the first step of a layout), capture, or replay. The
time before the first step is the prompt's pass. ``--runs`` repeats the whole generate in one process: the first run
also pays the kernels' first compilations, which later runs do not (docs/benchmarks/decode.md round 27).
``--profile`` prints a cProfile of the first three steps of the last run.

    python benchmarks/generate_steps.py --batches 1 8 --prompt 8192 --tokens 65 --runs 2 [--cache aquakv-r256-stored]
"""

from __future__ import annotations

import argparse
import cProfile
import io
import pstats
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import benchmarks.decode as bench  # noqa: E402
from aquakv.cache import AquaKVCache  # noqa: E402
from aquakv.config import CacheConfig  # noqa: E402
from aquakv.graphs import CapturedDecode, captured_decoding  # noqa: E402
from aquakv.kernels.settings import KernelSettings  # noqa: E402


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--cache", default="aquakv-r256-stored", help="an aquakv kind of benchmarks/decode.py")
    p.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    p.add_argument("--prompt", type=int, default=8192)
    p.add_argument("--tokens", type=int, default=65)
    p.add_argument("--runs", type=int, default=2, help="generates per batch size, in one process")
    p.add_argument("--layers", type=int, default=32)
    p.add_argument("--profile", action="store_true")
    args = p.parse_args()

    torch.backends.cuda.enable_cudnn_sdp(False)  # as benchmarks/decode.py
    model = bench.build_model(args.layers)
    cfg = model.config
    rank, grids, prediction, key_residual = bench.aquakv_kind(args.cache)
    codecs = bench.make_codecs(cfg.num_hidden_layers, cfg.num_key_value_heads * cfg.head_dim, rank, grids=grids)
    settings = KernelSettings.from_env(prediction=prediction, key_residual=key_residual)
    steps: list[tuple[str, float, float]] = []  # (kind, start, ms)
    profile = {"on": False}
    call = CapturedDecode.__call__

    def timed(self: CapturedDecode, input_ids: torch.Tensor) -> torch.Tensor:
        before = dict(self.counts)
        torch.cuda.synchronize()
        start = time.perf_counter()
        prof = cProfile.Profile() if profile["on"] and len(steps) < 3 else None
        if prof is not None:
            prof.enable()
        out = call(self, input_ids)
        torch.cuda.synchronize()
        if prof is not None:
            prof.disable()
            buf = io.StringIO()
            pstats.Stats(prof, stream=buf).sort_stats("cumulative").print_stats(20)
            print(f"--- step {len(steps) + 1}\n" + "\n".join(x[:150] for x in buf.getvalue().splitlines()[:40]))
        kind = next(k for k in self.counts if self.counts[k] != before[k])
        steps.append((kind, start, (time.perf_counter() - start) * 1e3))
        return out

    CapturedDecode.__call__ = timed
    for batch in args.batches:
        for run in range(args.runs):
            profile["on"] = args.profile and run == args.runs - 1
            ids = torch.randint(1, cfg.vocab_size, (batch, args.prompt), device="cuda")  # no pad token (0)
            cache = AquaKVCache(codecs, CacheConfig(), model.model.rotary_emb, kernels=settings, model=model)
            steps.clear()
            torch.cuda.synchronize()
            t0 = time.perf_counter()
            with torch.no_grad():
                model.generate(ids, max_new_tokens=args.tokens, min_new_tokens=args.tokens, do_sample=False,
                               pad_token_id=0, custom_generate=captured_decoding, **bench.cache_kwargs(model, cache))
            torch.cuda.synchronize()
            total = (time.perf_counter() - t0) * 1e3
            prompt = (steps[0][1] - t0) * 1e3
            decode = total - prompt
            rate = batch * len(steps) / decode * 1e3
            print(f"batch {batch} run {run + 1}: {total:.0f} ms = prompt {prompt:.0f} + {len(steps)} steps "
                  f"{decode:.0f} ({decode / len(steps):.2f} ms a step, {rate:.1f} tokens/s)", flush=True)
            for kind in ("eager", "uncaptured", "captures", "replays"):
                ms = [s[2] for s in steps if s[0] == kind]
                if ms:
                    first = ", ".join(f"{m:.1f}" for m in ms[:3])
                    print(f"    {kind:10s} {len(ms):3d} steps, {sum(ms):8.1f} ms, "
                          f"median {sorted(ms)[len(ms) // 2]:7.2f}, first {first}", flush=True)


if __name__ == "__main__":
    main()
