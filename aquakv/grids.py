"""Vector quantization grids: EDEN-style MSE-optimal grids for a Gaussian source.

A grid is ``[n, d]`` float32: ``n`` points in ``d`` dimensions, fitted by Lloyd iterations
on standard normal samples (fixed seed), so indices cost ``log2(n) / d`` bits per value.
Grids are cached on disk under ``$AQUAKV_CACHE/grids`` (default ``~/.cache/aquakv``).
"""

from __future__ import annotations

import functools
import math
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

GRID_SEED = 0x5EED


def cache_dir() -> Path:
    return Path(os.environ.get("AQUAKV_CACHE", Path.home() / ".cache" / "aquakv"))


CPU_DISTANCES = 1 << 20  # distances per chunk on a CPU (4 MB of float32: stays in cache between matmul and argmin)
ARGMIN_BLOCK = 32  # grid points per block of the CPU's two-step argmin


def nearest(vectors: torch.Tensor, grid: torch.Tensor, chunk: int | None = None) -> torch.Tensor:
    """Index of the nearest grid point for each ``[..., d]`` vector -> ``[...]`` int64: the argmin over grid points
    of ``|g|^2 - 2 x.g`` (the first index on a tie).

    Distances are computed ``chunk`` vectors at a time (default: ~256 MB of distances on a GPU; on a CPU
    :data:`CPU_DISTANCES` distances, 1024 vectors for a 1024-point grid, 64k at most). On a CPU each chunk's
    distances go into one reused buffer, in place: the same matmul, then ``-2 x.g + |g|^2``, which is ``|g|^2 - 2 x.g``
    to the bit (IEEE subtraction is the addition of the negation; the factor 2 is exact), then the argmin in two steps
    (per block of :data:`ARGMIN_BLOCK` points, then within the first block holding the minimum: the same first
    index). The codes are the ones one large chunk and one argmin give (``tests/test_quantize.py``), ~5x sooner for
    256-1024-point grids (the distances of a large chunk went to memory and back twice per pass, and PyTorch's CPU
    argmin is not vectorized).
    """
    n, d = grid.shape
    flat = vectors.reshape(-1, d).to(grid.dtype)
    norms = (grid * grid).sum(-1)
    out = torch.empty(flat.shape[0], dtype=torch.long, device=flat.device)
    if vectors.is_cuda:
        chunk = chunk or (1 << 26) // n
        for start in range(0, flat.shape[0], chunk):
            block = flat[start : start + chunk]
            out[start : start + chunk] = torch.argmin(norms - 2 * block @ grid.T, dim=-1)
        return out.view(vectors.shape[:-1])
    chunk = chunk or max(256, min(1 << 16, CPU_DISTANCES // n))
    buf = torch.empty(min(chunk, flat.shape[0]), n, dtype=grid.dtype, device=flat.device)
    for start in range(0, flat.shape[0], chunk):
        block = flat[start : start + chunk]
        dist = buf[: block.shape[0]]
        torch.mm(block, grid.T, out=dist)
        dist.mul_(-2).add_(norms)
        if n % ARGMIN_BLOCK or n < 2 * ARGMIN_BLOCK:
            torch.argmin(dist, dim=-1, out=out[start : start + chunk])
            continue
        # argmin in two steps, ~2x sooner for n >= 256 on a CPU (amin is vectorized, argmin is not): the first block
        # of ARGMIN_BLOCK points whose minimum is the row's, then the first point of that block at it; that is the
        # first index of the row's minimum, as argmin returns it
        cells = dist.view(dist.shape[0], n // ARGMIN_BLOCK, ARGMIN_BLOCK)
        first = cells.amin(-1).argmin(-1, keepdim=True)  # [m, 1]
        inner = cells.gather(1, first.unsqueeze(-1).expand(-1, 1, ARGMIN_BLOCK)).squeeze(1).argmin(-1)
        torch.add(inner, first.squeeze(1), alpha=ARGMIN_BLOCK, out=out[start : start + chunk])
    return out.view(vectors.shape[:-1])


def lloyd(samples: torch.Tensor, grid: torch.Tensor, iters: int, weights: torch.Tensor | None = None) -> torch.Tensor:
    """Lloyd (k-means) refinement of ``grid`` ``[n, d]`` on ``samples`` ``[N, d]`` (optionally ``weights [N]``: a
    weighted mean per cell); empty cells keep their point."""
    n = grid.shape[0]
    w = torch.ones(samples.shape[0], dtype=grid.dtype) if weights is None else weights.to(grid.dtype)
    weighted = samples * w[:, None]
    for _ in range(iters):
        idx = nearest(samples, grid)
        sums = torch.zeros_like(grid).index_add_(0, idx, weighted)
        mass = torch.zeros(n, dtype=grid.dtype).index_add_(0, idx, w).unsqueeze(1)
        grid = torch.where(mass > 0, sums / mass.clamp(min=1e-30), grid)
    return grid


def fit_grid(vectors: torch.Tensor, weights: torch.Tensor, init: torch.Tensor, iters: int = 25) -> torch.Tensor:
    """A grid fitted to the vectors a layer will really quantize (``[N, d]``, see
    :func:`aquakv.quantize.unit_vectors`), each weighted by its group's squared scale ``[N]`` (a vector's error costs
    that much in the layer's output): Lloyd iterations from ``init`` (the Gaussian grid), so a cell the data never
    reaches keeps its Gaussian point. Deterministic: no sampling inside."""
    return lloyd(vectors.float(), init.float().clone(), iters, weights.float()).contiguous()


def distortion(grid: torch.Tensor, samples: torch.Tensor) -> float:
    """Mean squared error per coordinate of quantizing ``samples`` ``[N, d]`` to ``grid``."""
    q = grid[nearest(samples, grid)]
    return float(((samples - q) ** 2).mean())


def fit_gaussian_grid(dim: int, size: int, samples_per_point: int = 1024, iters: int = 60) -> torch.Tensor:
    """Lloyd grid for ``N(0, I_dim)`` with ``size`` points, canonically ordered (deterministic)."""
    gen = torch.Generator().manual_seed(GRID_SEED + 1000 * dim + size)
    samples = torch.randn(size * samples_per_point, dim, generator=gen)
    init = samples[torch.randperm(samples.shape[0], generator=gen)[:size]].clone()
    grid = lloyd(samples, init, iters)
    order = sorted(range(size), key=lambda i: tuple(round(v, 6) for v in grid[i].tolist()))
    return grid[order].contiguous()


@functools.cache
def gaussian_grid(dim: int, size: int) -> torch.Tensor:
    """The project's grid for ``(d, n)``, computed once and cached on disk."""
    if dim < 1 or size < 2 or size & (size - 1):
        raise ValueError(f"grid needs dim >= 1 and a power-of-two size >= 2, got d={dim} n={size}")
    path = cache_dir() / "grids" / f"gaussian_d{dim}_n{size}.safetensors"
    if path.exists():
        try:
            return load_file(path)["grid"]
        except Exception:  # a corrupt cache file is regenerated, never trusted
            path.unlink(missing_ok=True)
    grid = fit_gaussian_grid(dim, size)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    save_file({"grid": grid}, tmp)
    os.replace(tmp, path)
    return grid


def expected_distortion(grid: torch.Tensor, samples: int = 1 << 18, seed: int = 1) -> float:
    """Per-coordinate MSE of ``grid`` on fresh standard normal samples."""
    gen = torch.Generator().manual_seed(seed)
    return distortion(grid, torch.randn(samples, grid.shape[1], generator=gen))


def bits_per_index(size: int) -> int:
    return int(math.log2(size))
