"""Affine predictors fitted in closed form by ridge regression from additive sufficient statistics.

A predictor maps ``x [N, D_in]`` to ``y [N, D_out]`` as ``x @ weight + bias``. The statistics
``XᵀX``, ``XᵀY`` (with a bias column), ``ΣY²`` and the count add up, so any split of the tokens
across chunks or workers reduces to one exact solve.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch

from aquakv.errors import NonFiniteError
from aquakv.pickling import ArrayPickled


@dataclass
class RidgeStats(ArrayPickled):
    """Sufficient statistics in float64: ``xtx [D_in+1, D_in+1]``, ``xty [D_in+1, D_out]``, ``yty`` (ΣY²), ``count``."""

    xtx: torch.Tensor
    xty: torch.Tensor
    yty: float
    count: int

    def __add__(self, other: RidgeStats) -> RidgeStats:
        return RidgeStats(self.xtx + other.xtx, self.xty + other.xty, self.yty + other.yty, self.count + other.count)

    def to_tensors(self) -> dict[str, torch.Tensor]:
        return {"xtx": self.xtx, "xty": self.xty, "yty": torch.tensor(self.yty, dtype=torch.float64),
                "count": torch.tensor(self.count, dtype=torch.int64)}

    @classmethod
    def from_tensors(cls, t: dict[str, torch.Tensor]) -> RidgeStats:
        return cls(t["xtx"], t["xty"], float(t["yty"]), int(t["count"]))


@dataclass
class Predictor(ArrayPickled):
    """``y ≈ x @ weight + bias`` with ``weight [D_in, D_out]``; low rank when ``weight = down @ up``."""

    weight: torch.Tensor
    bias: torch.Tensor
    rank: int | None = None  # the rank :func:`fit_ridge` chose (None when not fitted here, e.g. loaded from a bundle)
    _factors: list = field(default_factory=list, init=False, repr=False, compare=False)  # memo of :meth:`factors`
    _derived: dict = field(default_factory=dict, init=False, repr=False, compare=False)  # memo of :meth:`derived`

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.addmm(self.bias.to(x), x.reshape(-1, x.shape[-1]), self.weight.to(x)).view(
            *x.shape[:-1], self.weight.shape[1]
        )

    def factors(self) -> tuple[torch.Tensor, torch.Tensor] | None:
        """:func:`low_rank_factors` of ``weight``, computed once: every user of the factors (the decode kernels, the
        stored projections of :mod:`aquakv.codec`) works in the same basis."""
        if not self._factors:
            self._factors.append(low_rank_factors(self.weight))
        return self._factors[0]

    def derived(self, name: str, make: Callable[[], tuple[torch.Tensor, ...]]) -> tuple[torch.Tensor, ...]:
        """``make()`` (a tuple of tensors derived from this predictor, e.g. :func:`aquakv.codec.key_factor`'s rounded
        ``up``), computed once per ``name``: every user of it works with the same bits, on every device."""
        if name not in self._derived:
            self._derived[name] = make()
        return self._derived[name]

    def to(self, device: torch.device | str) -> Predictor:
        """This predictor on ``device``, with its factorization and :meth:`derived` tensors if already computed (the
        same basis and bits on every device)."""
        moved = Predictor(self.weight.to(device), self.bias.to(device), self.rank)
        if self._factors:
            f = self._factors[0]
            moved._factors.append(None if f is None else tuple(t.to(device) for t in f))
        moved._derived = {k: tuple(t.to(device) for t in v) for k, v in self._derived.items()}
        return moved


def kernel_rank(rank: int) -> int:
    """The width a rank-``rank`` factorization is padded to (zero directions): a power of two, at least 16, what the
    decode kernel's matmul tiles take."""
    return max(16, 1 << (rank - 1).bit_length())


def low_rank_factors(weight: torch.Tensor, tol: float = 1e-5) -> tuple[torch.Tensor, torch.Tensor] | None:
    """``(down [K, r], up [r, N])`` float32 with ``down @ up == weight`` (to ``tol``) when the weight's rank is at most
    a quarter of ``min(K, N)``, so factoring saves at least half the arithmetic; else ``None``.

    A randomized range finder (float64, on the weight's device) tests the rank cheaply; ``r`` is padded with zero
    directions to :func:`kernel_rank`.
    """
    w = weight.detach().double()
    k_max = min(w.shape) // 4
    if k_max < 1 or not torch.isfinite(w).all():
        return None
    gen = torch.Generator(device=w.device).manual_seed(0)
    probe = torch.randn(w.shape[1], min(k_max + 8, min(w.shape)), generator=gen, dtype=w.dtype, device=w.device)
    q, _ = torch.linalg.qr(w @ probe)
    b = q.T @ w
    norm = float(w.norm())
    if norm == 0 or float((w - q @ b).norm()) > tol * norm:
        return None
    u, s, vh = torch.linalg.svd(b, full_matrices=False)
    r = int((s > tol * s[0]).sum())
    if r > k_max:
        return None
    pad = kernel_rank(r)
    down = torch.zeros(w.shape[0], pad, dtype=w.dtype, device=w.device)
    up = torch.zeros(pad, w.shape[1], dtype=w.dtype, device=w.device)
    down[:, :r] = (q @ u[:, :r]) * s[:r]
    up[:r] = vh[:r]
    return down.float(), up.float()


def _with_bias(x: torch.Tensor) -> torch.Tensor:
    return torch.cat([x, torch.ones_like(x[:, :1])], dim=1)


def ridge_stats(x: torch.Tensor, y: torch.Tensor) -> RidgeStats:
    """Statistics of one chunk of ``x [N, D_in]``, ``y [N, D_out]``."""
    if not (torch.isfinite(x).all() and torch.isfinite(y).all()):
        raise NonFiniteError("NaN or Inf in predictor inputs or targets; check the collected activations")
    xb = _with_bias(x.double())
    yd = y.double()
    return RidgeStats(xb.T @ xb, xb.T @ yd, float((yd * yd).sum()), x.shape[0])


RANK_STEP = 16  # chosen ranks are multiples of this: the decode kernels' matmul tiles


def fit_ridge(stats: RidgeStats, damping: float = 1e-3, rank: int | None = None,
              rank_budget: float | None = None) -> Predictor:
    """Closed-form ridge solve with ``λ = damping · mean(diag(XᵀX))`` (bias not damped).

    With ``rank``, the fitted map is projected to its best rank-``rank`` approximation in the metric of the data
    (reduced-rank regression), so ``weight`` factors as ``[D_in, r] @ [r, D_out]``. With ``rank_budget`` instead, the
    rank is the smallest multiple of :data:`RANK_STEP` whose relative residual MSE on the calibration data is at
    most ``(1 + rank_budget)`` times the full-rank fit's: per decode step a rank-r predictor costs 4r (keys, D->r->D)
    and 6r (values, 2D->r->D) FLOPs per value against 2D and 4D at full rank (docs/design.md §7).
    """
    if rank is not None and rank_budget is not None:
        raise ValueError("give a fixed rank or a rank budget, not both")
    xtx, xty = stats.xtx, stats.xty
    d_in = xtx.shape[0] - 1
    lam = damping * float(torch.diagonal(xtx)[:d_in].mean())
    reg = torch.eye(d_in + 1, dtype=xtx.dtype, device=xtx.device) * lam
    reg[d_in, d_in] = 0.0
    w = torch.linalg.solve(xtx + reg, xty)  # [D_in+1, D_out]
    full = min(d_in, w.shape[1])
    if rank is not None or rank_budget is not None:
        # fitted values' covariance wᵀ XᵀX w; its top-r eigenvectors U_r give the best rank-r map w U_r U_rᵀ
        eigvals, vecs = torch.linalg.eigh(w.T @ xtx @ w)
        eigvals, vecs = eigvals.flip(0), vecs.flip(1)  # descending
        if rank is None:
            rank = _smallest_rank(stats, w, eigvals, vecs, rank_budget, full)
        if rank < full:
            top = vecs[:, :rank]
            w = w @ top @ top.T
    return Predictor(w[:d_in].float().contiguous(), w[d_in].float().contiguous(), min(rank or full, full))


def _smallest_rank(stats: RidgeStats, w: torch.Tensor, eigvals: torch.Tensor, vecs: torch.Tensor, budget: float,
                   full: int) -> int:
    """Smallest multiple of :data:`RANK_STEP` (or ``full``) within ``budget`` of the full-rank residual MSE.

    For ``w_r = w U_r U_rᵀ``: ``‖Y - X w_r‖² = ΣY² - 2 Σ_{i<r} u_iᵀ (wᵀXᵀY) u_i + Σ_{i<r} λ_i``, so every rank's
    error comes from one eigendecomposition.
    """
    gain = torch.einsum("ji,jk,ki->i", vecs, w.T @ stats.xty, vecs)  # u_iᵀ (wᵀXᵀY) u_i, [D_out]
    errors = stats.yty - torch.cumsum(2 * gain - eigvals, 0)  # errors[r-1]: residual energy at rank r
    limit = (1 + budget) * float(errors[-1].clamp_min(0))
    for r in range(RANK_STEP, full, RANK_STEP):
        if float(errors[r - 1]) <= limit:
            return r
    return full


def residual_mse(stats: RidgeStats, predictor: Predictor) -> float:
    """Relative MSE ``‖Y - XW‖² / ‖Y‖²`` of ``predictor`` on the data behind ``stats``."""
    w = torch.cat([predictor.weight, predictor.bias[None]], 0).double()
    err = stats.yty - 2 * float((w * stats.xty).sum()) + float((w * (stats.xtx @ w)).sum())
    return max(err, 0.0) / max(stats.yty, 1e-30)


def relative_mse(y: torch.Tensor, y_hat: torch.Tensor) -> float:
    """``‖y - y_hat‖² / ‖y‖²``."""
    y, y_hat = y.double(), y_hat.double()
    return float(((y - y_hat) ** 2).sum() / (y * y).sum().clamp_min(1e-30))
