"""Quality of stored projections rounded to fewer levels than float8, simulated in encode (CPU, no GPU).

Stored projections go into the residual (encode predicts from the rounded ``z``), so their precision may matter little.
This runs ``aquakv bench quality`` with :func:`aquakv.codec.round_projection` replaced for the run: each row of ``z``
is rounded to the levels below and the values are kept exactly in the float8 format, so the stored layout, the
kernels and the PyTorch decode path are unchanged. A measurement tool only: the shipped format stays float8.

    python benchmarks/projection_levels.py --levels int4 --part both -- bench quality --published \\
        --prediction stored --configs aquakv-2bit-r48 --baselines '' --passkey-lengths '' --long-tasks '' \\
        --texts britannica,kjv-heldout --windows 8 --workdir W --stem r48-stored-int4

Levels: ``int4`` (-7..7), ``int3`` (-3..3), ``ternary`` (-1..1), each times ``max |z| / top`` per row; ``fp4`` (e2m1:
0, 0.5, 1, 1.5, 2, 3, 4, 6 and their negatives, times ``max |z| / 6``). ``--part`` rounds only the key or value
projections. Results: docs/benchmarks/decode.md round 24.
"""

from __future__ import annotations

import argparse
import sys

import torch

import aquakv.codec as codec

TOPS = {"int4": 7.0, "int3": 3.0, "ternary": 1.0, "fp4": 6.0}
E2M1 = (0.0, 0.5, 1.0, 1.5, 2.0, 3.0, 4.0, 6.0)


def round_levels(z: torch.Tensor, levels: str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """``z [..., R]`` -> ``(z8 float8, scale [..., 1], z8 * scale)`` as :func:`aquakv.codec.round_projection` returns
    them, with each row rounded to ``levels`` (exact in float8)."""
    amax = z.abs().amax(-1, keepdim=True)
    top = TOPS[levels]
    scale = torch.where(amax > 0, amax / top, torch.ones_like(amax))
    x = z / scale
    if levels == "fp4":
        grid = torch.tensor(E2M1, device=x.device)
        q = grid[(x.abs()[..., None] - grid).abs().argmin(-1)] * x.sign()
    else:
        q = x.round().clamp(-top, top)
    z8 = q.to(codec.PROJECTION_DTYPE)
    return z8, scale, z8.float() * scale


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--levels", choices=sorted(TOPS), required=True)
    p.add_argument("--part", choices=["both", "keys", "values"], default="both")
    p.add_argument("cli", nargs=argparse.REMAINDER, help="after --: the aquakv command line to run")
    args = p.parse_args()
    float8_round, projected = codec.round_projection, codec._projected
    part = {"keys": False}

    def rounded(z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if args.part != "both" and (args.part == "keys") != part["keys"]:
            return float8_round(z)
        return round_levels(z, args.levels)

    def tracked(predictor, inputs, like, keys):  # which part round_projection is called for
        part["keys"] = keys
        return projected(predictor, inputs, like, keys)

    codec.round_projection, codec._projected = rounded, tracked
    from aquakv_cli.main import main as cli

    cli([a for a in args.cli if a != "--"])


if __name__ == "__main__":
    sys.exit(main())
