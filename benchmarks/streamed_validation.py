"""Streamed validation (the flow's, one decoder layer at a time) vs whole-model validation, on SmolLM2-135M.

Takes a published bundle and the held-out tokens of the calibration run that made it, and prints both sets of
metrics (they should be equal) with the seconds each took:

    python benchmarks/streamed_validation.py ~/.cache/aquakv/bench/registry/smollm2-aquakv-2bit \\
        --tokens ~/.cache/aquakv/bench/work/activations-8e59bbe926c7141b/tokens.zarr
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
import zarr
from transformers import AutoModelForCausalLM

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from aquakv.registry import load_bundle  # noqa: E402
from pipeline.checkpoint import Checkpoint  # noqa: E402
from pipeline.sources import prepare_smollm2  # noqa: E402
from pipeline.validate import metrics_from, streamed_sums, validate  # noqa: E402

KEYS = ("ppl_exact", "ppl_aquakv", "ppl_increase", "cache_bits_per_value", "tokens")


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("bundle", help="a published bundle of SmolLM2-135M-Instruct (directory or URI)")
    p.add_argument("--tokens", required=True, help="tokens.zarr of the calibration run (its `heldout` array is used)")
    args = p.parse_args(argv)
    bundle = load_bundle(args.bundle)
    heldout = torch.from_numpy(zarr.open_group(args.tokens, mode="r")["heldout"][:]).long()
    model_dir = prepare_smollm2()
    t = time.perf_counter()
    sums, fingerprint = streamed_sums(Checkpoint(model_dir), heldout, bundle.codecs, bundle.cache)
    kv_dim = fingerprint["num_kv_heads"] * fingerprint["head_dim"]
    streamed = metrics_from([sums], bundle.codecs, kv_dim, bundle.cache, tuple(heldout.shape))
    streamed_s = time.perf_counter() - t
    t = time.perf_counter()
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    whole = validate(model, heldout, bundle)
    whole_s = time.perf_counter() - t
    print(json.dumps({"bundle": args.bundle, "heldout": list(heldout.shape),
                      "streamed": {k: streamed[k] for k in KEYS}, "whole": {k: whole[k] for k in KEYS},
                      "equal": all(streamed[k] == whole[k] for k in KEYS),
                      "seconds": {"streamed": round(streamed_s), "whole": round(whole_s)}}, indent=1))


if __name__ == "__main__":
    main()
