"""Semi-nonnegative matrix factorisation: A ≈ F Gᵀ, F signed, G >= 0.

A is [d, n_tokens] (the paper's setting is an MLP's hidden activations); F [d, k] are the features, G
[n_tokens, k] >= 0 their coefficients. The fit alternates the two exact block steps of Ding, Li & Jordan
(2010): F = A G (GᵀG)⁻¹, the least-squares features for the current coefficients, and non-negative least
squares for each token's coefficients given F.

With more units than dimensions (k > d, the usual dictionary) the problem is degenerate: any d + 1 columns of F
are linearly dependent, so a token has many non-negative codes and 2d signed axes already reconstruct everything
with zero error, whatever the true features are. Each token's code is therefore restricted to `code_units`
units (default d // 4, well inside the d / 2 below which a sparse code is unique): the k-means-initialised
features most correlated with it, coefficients by NNLS on them. A token keeps its previous code when the new one
is not better, so with F's exact least-squares step the objective never increases.

Winner-take-all (`wta`, Shafran et al. 2025) keeps the largest fraction of |F| per feature: the paper's features
are sparse combinations of *neurons*, so by default it is on (1%) only at an `mlp_hidden` site, where the basis is
neurons, and off elsewhere, where coordinates mean nothing and 1% of d = 128 is a single axis. Rows are processed
in chunks and kept as float32; only the k x k and k x d sufficient statistics are float64. The alternating passes
run on a random subsample of 32k rows (the synthetic world's rarest feature, once in 870 rows, still fires about
38 times in it), then two passes over every row make F the least-squares answer for all of them: on 200k rows,
up to 50 cheap passes and 2 full ones instead of up to 50 full ones. A feature's
residual-stream direction is W_out f. Codes for new inputs are computed the same way: NNLS on the `code_units`
most correlated features (all of them for a dictionary saved before that option existed).
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnitscopeError
from .base import Dictionary, register, require_weights
from .threads import one_thread

CHUNK_FLOATS = 1 << 24  # per-chunk budget for the [rows, s, s] Gram blocks (64 MB of float32)
MAX_CODE_UNITS = 64  # default code support is d // 4, capped: each token costs s² per NNLS iteration
SAMPLE_ROWS = 32_768  # rows the alternating passes run on (enough for each feature's least squares)...
POLISH_PASSES = 2  # ...before this many passes over every row


def default_code_units(d: int, n_units: int) -> int:
    return max(1, min(n_units, d // 4, MAX_CODE_UNITS))


def default_wta(site: str | None) -> float | None:
    """The paper's 1% winner-take-all where the coordinates are neurons (an MLP's hidden layer), else off."""
    return 0.01 if site is not None and site.split(".")[-1] == "mlp_hidden" else None


def _row_loss(x2: torch.Tensor, b: torch.Tensor, gram: torch.Tensor, g: torch.Tensor) -> torch.Tensor:
    """||x - Σ g_i f_i||² per row from ||x||², b = x·f and the Gram block, without forming the reconstruction."""
    return (x2 - 2 * (g * b).sum(1) + (torch.einsum("bi,bij->bj", g, gram) * g).sum(1)).clamp_min(0)


def _gather(xw: torch.Tensor, q: torch.Tensor, idx: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    return xw.gather(1, idx), q[idx.unsqueeze(2), idx.unsqueeze(1)]


def _fista(b: torch.Tensor, gram: torch.Tensor, iters: int, start: torch.Tensor | None = None) -> torch.Tensor:
    """argmin_{g >= 0} ½gᵀ gram g - bᵀg per row by accelerated projected gradient from `start` (or zero); the
    step is 1 / an upper bound of each row's largest eigenvalue (the smaller of the trace and the largest
    absolute row sum)."""
    bound = torch.minimum(gram.diagonal(dim1=1, dim2=2).sum(1), gram.abs().sum(2).amax(1))
    step = (1 / bound.clamp_min(1e-12)).unsqueeze(1)
    g = torch.zeros_like(b) if start is None else start
    y, t = g, 1.0
    for _ in range(iters):
        g_new = (y - step * (torch.einsum("bi,bij->bj", y, gram) - b)).clamp_min(0)
        t_new = (1 + (1 + 4 * t * t) ** 0.5) / 2
        y = g_new + ((t - 1) / t_new) * (g_new - g)
        g, t = g_new, t_new
    return g


def support_codes(x: torch.Tensor, w: torch.Tensor, q: torch.Tensor, s: int, iters: int,
                  xw: torch.Tensor | None = None, previous: tuple[torch.Tensor, torch.Tensor] | None = None
                  ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Each row's code on its `s` most correlated units (cosine with x, so a large unit is not favoured):
    (unit indices [B, s], NNLS coefficients [B, s], squared residual [B]). `previous` (indices, coefficients)
    warm-starts the units a row keeps from its last code."""
    xw = x @ w.t() if xw is None else xw
    norms = q.diagonal().clamp_min(1e-24).sqrt()
    idx = (xw / norms).topk(s, dim=1).indices
    b, gram = _gather(xw, q, idx)
    start = None
    if previous is not None:
        same = idx.unsqueeze(2) == previous[0].unsqueeze(1)  # [B, s new, s old]
        start = (same * previous[1].unsqueeze(1)).sum(2)
    g = _fista(b, gram, iters, start)
    return idx, g, _row_loss(x.pow(2).sum(1), b, gram, g)


def _chunk_rows(s: int) -> int:
    return max(1, min(4096, CHUNK_FLOATS // (s * s + s)))


@register("snmf")
class SNMF(Dictionary):
    def __init__(self, d_in: int, n_units: int, metadata: dict[str, Any] | None = None,
                 directions: torch.Tensor | None = None, nnls_iters: int = 200, code_units: int | None = None,
                 **_: Any):
        super().__init__(d_in, n_units, d_in, metadata)
        self.W_dec = nn.Parameter(torch.zeros(n_units, d_in), requires_grad=False)  # Fᵀ
        dirs = directions if directions is not None else torch.zeros(n_units, d_in)
        self.W_dir = nn.Parameter(dirs.clone(), requires_grad=False)
        self.nnls_iters = nnls_iters
        self.code_units = n_units if code_units is None else min(int(code_units), n_units)  # None: saved before it

    @property
    def directions(self) -> torch.Tensor:
        return self.W_dir

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """argmin_{g >= 0} ||x - Fg||² over the `code_units` features most correlated with x (all of them by
        default), by projected gradient (FISTA), batched over leading dims."""
        self.check_width(x)
        shape = x.shape[:-1]
        a = x.reshape(-1, self.d_in).to(self.W_dec.dtype)
        ft = self.W_dec  # [k, d]
        gram = ft @ ft.t()
        if self.code_units < self.n_units:
            out = torch.zeros(a.shape[0], self.n_units, dtype=a.dtype, device=a.device)
            rows = _chunk_rows(self.code_units)
            for lo in range(0, len(a), rows):
                xw = a[lo:lo + rows] @ ft.t()
                with one_thread():
                    idx, g, _ = support_codes(a[lo:lo + rows], ft, gram, self.code_units, self.nnls_iters, xw=xw)
                out[lo:lo + rows].scatter_(1, idx, g)
            return out.reshape(*shape, self.n_units)
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
        return {"nnls_iters": self.nnls_iters, "code_units": self.code_units}

    @classmethod
    def from_weights(cls, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> Dictionary:
        require_weights(cfg, weights, "W_dec")
        units = cfg.get("code_units")
        if units is not None and (isinstance(units, bool) or not isinstance(units, int) or units < 1):
            raise UnitscopeError(f"the dictionary's code_units must be a positive whole number, not {units!r}")
        d = cls(int(cfg["d_in"]), int(cfg["d_sae"]), cfg.get("metadata", {}), weights.get("W_dir"),
                int(cfg.get("nnls_iters", 200)), units)
        d.W_dec.data.copy_(weights["W_dec"])
        if "W_dir" in weights:
            d.W_dir.data.copy_(weights["W_dir"])
        return d


def _wta(f: torch.Tensor, frac: float) -> torch.Tensor:
    """Keep the largest `frac` of |f| in each feature (row of f [k, d]), at least one coordinate."""
    keep = max(1, int(round(frac * f.shape[1])))
    thresh = f.abs().topk(keep, dim=1).values[:, -1:]
    return f * (f.abs() >= thresh)


def fit_snmf(acts: torch.Tensor, rank: int, iters: int = 50, wta: float | None = None, init: str = "kmeans",
             patience: int = 2, tol: float = 1e-3, seed: int = 0, code_units: int | None = None,
             nnls_iters: int = 20, sample_rows: int = SAMPLE_ROWS, polish: int = POLISH_PASSES,
             callback=None) -> tuple[torch.Tensor, torch.Tensor]:
    """Factorise acts [n_tokens, d] as G Fᵀ; returns (F [d, k], G [n, k] as a sparse COO tensor).

    Each pass is a code step (every token's NNLS on its `code_units` most correlated features, kept only where it
    lowers that token's error) then F's exact least-squares step. Up to `iters` passes run over a random subsample
    of `sample_rows` rows (all of them when there are no more), stopping early after `patience` passes that lower
    the objective by less than `tol` of itself; then up to `polish` passes over every row (warm-started from the
    subsample's codes) make F the least-squares answer for the whole data. `callback(it, loss)` sees the
    objective ||A - F Gᵀ||² over the rows of that pass after each code step; within a stage it never increases
    without winner-take-all."""
    if init not in ("random", "kmeans"):
        raise UnitscopeError(f"unknown SNMF initialisation {init!r}; use random or kmeans")
    if wta is not None and not 0 < wta <= 1:
        raise UnitscopeError(f"SNMF winner-take-all keeps a fraction of each feature in (0, 1], not {wta}")
    x = acts.float().contiguous()
    n, d = x.shape
    if n < rank:
        raise UnitscopeError(f"SNMF with {rank} units needs at least {rank} rows, got {n}")
    s = default_code_units(d, rank) if code_units is None else min(int(code_units), rank)
    if s < 1:
        raise UnitscopeError(f"SNMF needs at least one code unit per token, not {code_units}")
    if sample_rows < rank:
        raise UnitscopeError(f"SNMF's subsample needs at least as many rows as units ({rank}), not {sample_rows}")
    gen = torch.Generator().manual_seed(seed)
    pick = torch.randperm(n, generator=gen)[:sample_rows] if n > sample_rows else None
    sub = x if pick is None else x[pick]
    if init == "random":
        w = sub[torch.randperm(len(sub), generator=gen)[:rank]].clone()
    else:
        from .kmeans import KMeans

        w = KMeans.fit(sub, rank, {}, iters=10, seed=seed).W_dec.detach().clone()
    if wta:
        w = _wta(w, wta)
    idx = torch.zeros(len(sub), s, dtype=torch.long)
    coef = torch.zeros(len(sub), s)  # every token starts from the zero code
    step = dict(s=s, nnls_iters=nnls_iters, wta=wta, patience=patience, tol=tol, callback=callback)
    w, done = _passes(sub, w, idx, coef, iters, start=0, **step)
    if pick is not None:
        full_idx, full_coef = torch.zeros(n, s, dtype=torch.long), torch.zeros(n, s)
        full_idx[pick], full_coef[pick] = idx, coef
        idx, coef = full_idx, full_coef
        w, _ = _passes(x, w, idx, coef, max(1, polish), start=done, **step)
    rows_idx = torch.arange(n).repeat_interleave(s)
    codes = torch.sparse_coo_tensor(torch.stack([rows_idx, idx.flatten()]), coef.flatten(), (n, rank),
                                    check_invariants=False).coalesce()
    return w.t().contiguous(), codes


def _passes(x: torch.Tensor, w: torch.Tensor, idx: torch.Tensor, coef: torch.Tensor, iters: int, start: int,
            s: int, nnls_iters: int, wta: float | None, patience: int, tol: float,
            callback) -> tuple[torch.Tensor, int]:
    """Up to `iters` alternating passes over x, updating the codes (idx, coef) in place; returns the features
    [k, d] and the index of the next pass."""
    rank, d = w.shape
    rows = _chunk_rows(s)
    best, stale, it = float("inf"), 0, start
    for it in range(start, start + iters):
        q = w @ w.t()
        gtg = torch.zeros(rank, rank, dtype=torch.float64)
        gtx = torch.zeros(rank, d, dtype=torch.float64)
        loss = 0.0
        for lo in range(0, len(x), rows):
            xc, ic, cc = x[lo:lo + rows], idx[lo:lo + rows], coef[lo:lo + rows]
            xw = xc @ w.t()
            with one_thread():  # many small ops on [rows, s, s]: a second thread costs more in sync than it gives
                new_idx, new_g, new_err = support_codes(xc, w, q, s, nnls_iters, xw=xw, previous=(ic, cc))
                b, gram = _gather(xw, q, ic)
                old_err = _row_loss(xc.pow(2).sum(1), b, gram, cc)
                better = new_err < old_err
                ic[better] = new_idx[better]
                cc[better] = new_g[better]
                loss += float(torch.where(better, new_err, old_err).double().sum())
                gt = _sparse_t(ic, cc, rank)
                gtg += torch.sparse.mm(gt, _dense(ic, cc, rank)).double()
            gtx += torch.sparse.mm(gt, xc).double()
        if callback:
            callback(it, loss)
        used = gtg.diagonal() > 0
        ridge = 1e-10 * float(gtg.diagonal().mean()) * torch.eye(rank, dtype=torch.float64)
        new_w = torch.linalg.solve(gtg + ridge, gtx).float()  # F = A G (GᵀG)⁻¹
        w = torch.where(used[:, None], new_w, w)  # a unit no token uses keeps its place
        if wta:
            w = _wta(w, wta)
        if loss < best * (1 - tol):
            best, stale = loss, 0
        else:
            best, stale = min(best, loss), stale + 1
            if stale >= patience:
                break
    return w, it + 1


def _sparse_t(idx: torch.Tensor, coef: torch.Tensor, k: int) -> torch.Tensor:
    """Gᵀ [k, rows] of a chunk's sparse codes."""
    rows = torch.arange(len(idx)).repeat_interleave(idx.shape[1])
    return torch.sparse_coo_tensor(torch.stack([idx.flatten(), rows]), coef.flatten(), (k, len(idx)),
                                   check_invariants=False)


def _dense(idx: torch.Tensor, coef: torch.Tensor, k: int) -> torch.Tensor:
    return torch.zeros(len(idx), k).scatter_add_(1, idx, coef)
