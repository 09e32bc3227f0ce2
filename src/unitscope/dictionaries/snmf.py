"""Semi-nonnegative matrix factorisation of MLP activations: A ≈ F Gᵀ, F signed, G >= 0.

A is [d_mlp, n_tokens]; F [d_mlp, k] are the features (in neuron space), G [n_tokens, k] >= 0 their
coefficients. Updates follow Ding, Li & Jordan (2010): F = A G (GᵀG)⁻¹, then the multiplicative rule
G ← G ⊙ sqrt(((AᵀF)⁺ + G(FᵀF)⁻) / ((AᵀF)⁻ + G(FᵀF)⁺)), each of which does not increase ||A - F Gᵀ||².
Winner-take-all sparsity keeps the largest `wta` fraction of |F| per feature; columns of G are rescaled to
unit max (F absorbs the scale). A feature's residual-stream direction is W_out f. Codes for new inputs
are non-negative least squares against F (projected gradient with step 1/||FᵀF||).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnitscopeError
from .base import Dictionary, register, require_weights


def _pos(m: torch.Tensor) -> torch.Tensor:
    return (m.abs() + m) / 2


def _neg(m: torch.Tensor) -> torch.Tensor:
    return (m.abs() - m) / 2


@register("snmf")
class SNMF(Dictionary):
    def __init__(self, d_in: int, n_units: int, metadata: dict[str, Any] | None = None,
                 directions: torch.Tensor | None = None, nnls_iters: int = 200, **_: Any):
        super().__init__(d_in, n_units, d_in, metadata)
        self.W_dec = nn.Parameter(torch.zeros(n_units, d_in), requires_grad=False)  # Fᵀ
        dirs = directions if directions is not None else torch.zeros(n_units, d_in)
        self.W_dir = nn.Parameter(dirs.clone(), requires_grad=False)
        self.nnls_iters = nnls_iters

    @property
    def directions(self) -> torch.Tensor:
        return self.W_dir

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """argmin_{g >= 0} ||x - Fg||² by projected gradient (FISTA), batched over leading dims."""
        self.check_width(x)
        shape = x.shape[:-1]
        a = x.reshape(-1, self.d_in).to(self.W_dec.dtype)
        ft = self.W_dec  # [k, d]
        gram = ft @ ft.t()
        step = 1.0 / torch.linalg.matrix_norm(gram, ord=2).clamp_min(1e-12)
        b = a @ ft.t()
        g = torch.zeros(a.shape[0], self.n_units, dtype=a.dtype, device=a.device)
        y, t = g, 1.0
        for _ in range(self.nnls_iters):
            g_new = (y - step * (y @ gram - b)).clamp_min(0)
            t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
            y = g_new + ((t - 1) / t_new) * (g_new - g)
            g, t = g_new, t_new
        return g.reshape(*shape, self.n_units)

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_width(codes, self.n_units, "code")
        return codes.to(self.W_dec.dtype) @ self.W_dec

    def arch_config(self) -> dict[str, Any]:
        return {"nnls_iters": self.nnls_iters}

    @classmethod
    def from_weights(cls, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> Dictionary:
        require_weights(cfg, weights, "W_dec")
        d = cls(int(cfg["d_in"]), int(cfg["d_sae"]), cfg.get("metadata", {}), weights.get("W_dir"),
                int(cfg.get("nnls_iters", 200)))
        d.W_dec.data.copy_(weights["W_dec"])
        if "W_dir" in weights:
            d.W_dir.data.copy_(weights["W_dir"])
        return d


def fit_snmf(acts: torch.Tensor, rank: int, iters: int = 200, wta: float | None = 0.01, init: str = "kmeans",
             patience: int = 10, tol: float = 1e-5, seed: int = 0, callback=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factorise acts [n_tokens, d] as G Fᵀ; returns (F [d, k], G [n, k]). `callback(it, loss)` sees each loss."""
    if init not in ("random", "svd", "kmeans"):
        raise UnitscopeError(f"unknown SNMF initialisation {init!r}; use random, svd or kmeans")
    gen = torch.Generator().manual_seed(seed)
    A = acts.double().t()  # [d, n]
    n = A.shape[1]
    if init == "random":
        G = torch.rand(n, rank, generator=gen, dtype=torch.float64)
    elif init == "svd":
        _, _, V = torch.linalg.svd(A, full_matrices=False)
        G = V[:rank].t().abs() + 1e-3
    else:
        from .kmeans import KMeans

        km = KMeans.fit(acts.float(), rank, {}, iters=20, seed=seed)
        assign = km.distances(acts.float()).argmin(1)
        G = torch.full((n, rank), 0.2, dtype=torch.float64)
        G[torch.arange(n), assign] += 1.0
    eps = 1e-12
    best, stale = float("inf"), 0
    F = None
    for it in range(iters):
        GtG = G.t() @ G
        F = torch.linalg.solve(GtG + 1e-10 * torch.eye(rank, dtype=G.dtype), (A @ G).t()).t()  # A G (GᵀG)⁻¹
        if wta:
            keep = max(1, int(round(wta * F.shape[0])))
            thresh = F.abs().topk(keep, dim=0).values[-1]
            F = F * (F.abs() >= thresh)
        AtF = A.t() @ F
        FtF = F.t() @ F
        G = G * torch.sqrt((_pos(AtF) + G @ _neg(FtF)) / (_neg(AtF) + G @ _pos(FtF) + eps))
        scale = G.amax(0).clamp_min(eps)  # rescale columns of G; F absorbs the scale
        G, F = G / scale, F * scale
        loss = float((A - F @ G.t()).pow(2).sum())
        if callback:
            callback(it, loss)
        if loss < best * (1 - tol):
            best, stale = loss, 0
        else:
            stale += 1
            if stale >= patience:
                break
    return F.float(), G.float()
