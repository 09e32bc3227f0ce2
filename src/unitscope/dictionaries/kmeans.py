"""k-means units: the centroids. Codes are a hard one-hot assignment or a soft, distance-based one."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import torch
from torch import nn

from ..errors import UnitscopeError
from .base import Dictionary, register, require_weights
from .threads import one_thread

CHUNK = 16384  # rows per distance block: 16384 x 1024 float32 is 64 MB


@register("kmeans")
class KMeans(Dictionary):
    """Units are centroids (`W_dec`). Hard codes: 1 at the nearest centroid; soft codes:
    softmax(-||x - c||² / temperature). Decoding gives the (weighted) centroid."""

    def __init__(self, d_in: int, n_units: int, metadata: dict[str, Any] | None = None, assignment: str = "hard",
                 temperature: float = 1.0, **_: Any):
        if assignment not in ("hard", "soft"):
            raise UnitscopeError(f"k-means assignment must be 'hard' or 'soft', not {assignment!r}")
        super().__init__(d_in, n_units, d_in, metadata)
        self.assignment, self.temperature = assignment, float(temperature)
        self.W_dec = nn.Parameter(torch.zeros(n_units, d_in), requires_grad=False)

    def distances(self, x: torch.Tensor) -> torch.Tensor:
        self.check_width(x)
        x = x.to(self.W_dec.dtype)
        return (x.pow(2).sum(-1, keepdim=True) - 2 * x @ self.W_dec.t() + self.W_dec.pow(2).sum(-1)).clamp_min(0)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        d2 = self.distances(x)
        if self.assignment == "soft":
            return torch.softmax(-d2 / self.temperature, dim=-1)
        return torch.zeros_like(d2).scatter_(-1, d2.argmin(-1, keepdim=True), 1.0)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_width(codes, self.n_units, "code")
        return codes.to(self.W_dec.dtype) @ self.W_dec

    @property
    def directions(self) -> torch.Tensor:
        return self.W_dec

    def arch_config(self) -> dict[str, Any]:
        return {"assignment": self.assignment, "temperature": self.temperature}

    @classmethod
    def from_weights(cls, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> Dictionary:
        require_weights(cfg, weights, "W_dec")
        d = cls(int(cfg["d_in"]), int(cfg["d_sae"]), cfg.get("metadata", {}), cfg.get("assignment", "hard"),
                cfg.get("temperature", 1.0))
        d.W_dec.data.copy_(weights["W_dec"])
        return d

    @classmethod
    def fit(cls, x: torch.Tensor, n_units: int, metadata: dict[str, Any], iters: int = 100, seed: int = 0,
            tol: float = 1e-4, callback: Callable[[int, float], None] | None = None) -> KMeans:
        """k-means++ initialisation (on a subsample), then Lloyd iterations until the inertia (sum of squared
        distances to the nearest centroid) improves by less than `tol` of itself. `callback(it, inertia)` sees
        the inertia of each assignment step, which never increases."""
        if x.shape[0] < n_units:
            raise UnitscopeError(f"k-means with {n_units} units needs at least {n_units} rows, got {x.shape[0]}")
        g = torch.Generator().manual_seed(seed)
        x = x.float()
        d = cls(x.shape[1], n_units, metadata)
        cents = kmeans_plus_plus(x, n_units, g)
        prev = float("inf")
        for it in range(iters):
            sums, counts, inertia, far = lloyd_step(x, cents)
            if callback:
                callback(it, inertia)
            cents = _reseed_empty(sums, counts, cents, x, far)
            if inertia >= prev * (1 - tol):
                break
            prev = inertia
        d.W_dec.data.copy_(cents)
        return d


def _chunks(x: torch.Tensor, rows: int = CHUNK) -> Iterator[torch.Tensor]:
    for a in range(0, len(x), rows):
        yield x[a:a + rows]


def nearest(x: torch.Tensor, cents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(index of the nearest centroid, squared distance to it) for each row, in bounded memory."""
    c2 = cents.pow(2).sum(1)
    idx, dist = [], []
    for chunk in _chunks(x):
        d2 = torch.addmm(c2, chunk, cents.t(), alpha=-2)  # ||c||² - 2 x·c: the argmin needs no ||x||²
        with one_thread():  # element-wise passes: a second thread costs more in sync than it gives
            m = d2.min(1)
            idx.append(m.indices)
            dist.append((m.values + chunk.pow(2).sum(1)).clamp_min(0))
    return torch.cat(idx), torch.cat(dist)


def kmeans_plus_plus(x: torch.Tensor, k: int, g: torch.Generator, sample: int = 16) -> torch.Tensor:
    """k-means++ seeding (Arthur & Vassilvitskii 2007) on a random subsample of `sample` rows per centroid: the
    seeds only need to cover the data, and k sequential passes over a subsample stay cheap. Each pass is one
    float64 matrix-vector product (||r - p||² = ||r||² - 2 r·p + ||p||²) and a few small ops, on one thread:
    1024 seeds on 16k rows took 11 s as element-wise numpy, 115 s through a multi-threaded BLAS on busy cores."""
    if len(x) > sample * k:
        x = x[torch.randperm(len(x), generator=g)[: sample * k]]
    with one_thread():
        rows = x.double()
        sq = rows.pow(2).sum(1)
        picks = [int(torch.randint(len(rows), (), generator=g))]

        def dist2(pick: int) -> torch.Tensor:
            return (sq - 2 * (rows @ rows[pick]) + sq[pick]).clamp_min(0)

        best = dist2(picks[0])
        for _ in range(1, k):
            cum = best.cumsum(0)
            # D² sampling; when every row is already a centroid (cum[-1] == 0) any row will do
            u = torch.rand((), generator=g, dtype=torch.float64) * cum[-1]
            pick = min(int(torch.searchsorted(cum, u, right=True)), len(rows) - 1) if cum[-1] > 0 else 0
            picks.append(pick)
            best = torch.minimum(best, dist2(pick))
    return x[torch.tensor(picks)].clone()


def lloyd_step(x: torch.Tensor, cents: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, float, torch.Tensor]:
    """Assign every row to its nearest centroid; return the per-centroid sums and counts (float64, so a
    sum over millions of rows keeps its precision), the inertia, and the rows' squared distances."""
    sums = torch.zeros(cents.shape, dtype=torch.float64)
    counts = torch.zeros(len(cents), dtype=torch.float64)
    inertia, far = 0.0, []
    for chunk in _chunks(x):
        idx, dist = nearest(chunk, cents)
        with one_thread():  # a chunk's sums in float32 (16384 rows), added up in float64: 20x faster
            sums += torch.zeros(cents.shape, dtype=chunk.dtype).index_add_(0, idx, chunk).double()
            counts += torch.bincount(idx, minlength=len(cents)).double()
        inertia += float(dist.double().sum())
        far.append(dist)
    return sums, counts, inertia, torch.cat(far)


def _reseed_empty(sums: torch.Tensor, counts: torch.Tensor, cents: torch.Tensor, x: torch.Tensor,
                  dist: torch.Tensor) -> torch.Tensor:
    """New centroids are the means; an empty cluster takes the row farthest from its centroid (a unit that
    would otherwise stay where it was, a dead unit)."""
    new = (sums / counts.clamp_min(1)[:, None]).to(cents.dtype)
    empty = torch.nonzero(counts == 0).flatten()
    if len(empty):
        far = dist.topk(min(len(empty), len(dist))).indices
        new[empty[: len(far)]] = x[far]
    return new
