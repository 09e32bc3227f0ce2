"""k-means units: the centroids. Codes are a hard one-hot assignment or a soft, distance-based one."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnitscopeError
from .base import Dictionary, register, require_weights


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
    def fit(cls, x: torch.Tensor, n_units: int, metadata: dict[str, Any], iters: int = 50, seed: int = 0) -> KMeans:
        """k-means++ initialisation, then Lloyd iterations until assignments stop changing."""
        if x.shape[0] < n_units:
            raise UnitscopeError(f"k-means with {n_units} units needs at least {n_units} rows, got {x.shape[0]}")
        g = torch.Generator().manual_seed(seed)
        x = x.float()
        d = cls(x.shape[1], n_units, metadata)
        cents = x[torch.randint(len(x), (1,), generator=g)]
        best = (x - cents[0]).pow(2).sum(1)
        for _ in range(1, n_units):
            nxt = x[torch.multinomial(best / best.sum(), 1, generator=g)]
            cents = torch.cat([cents, nxt])
            best = torch.minimum(best, (x - nxt[0]).pow(2).sum(1))
        assign = None
        for _ in range(iters):
            d.W_dec.data.copy_(cents)
            new = d.distances(x).argmin(1)
            if assign is not None and torch.equal(new, assign):
                break
            assign = new
            sums = torch.zeros_like(cents).index_add_(0, assign, x)
            counts = torch.bincount(assign, minlength=n_units).float()
            empty = counts == 0
            cents = torch.where(empty[:, None], cents, sums / counts.clamp_min(1)[:, None])
        d.W_dec.data.copy_(cents)
        return d
