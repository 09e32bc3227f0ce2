"""Geometry of a dictionary's directions and of the activations it codes, after "Towards Atoms of LLMs".

A unit's code is well posed only if the sparse code that reconstructs an activation is the unique sparsest one.
For directions d_i (unit-normalised) and a code with active set A (K = |A| units, its L0), with
μ_A = max_{i≠j ∈ A} |⟨d_i, d_j⟩| the coherence among the active directions:
  uniqueness     (2K − 1) μ_A < 1    (i.e. μ_A < 1/(2K−1): no other code with ≤ K atoms gives the same point)
  RIP-style      (K − 1) μ_A < 1     (the Gram matrix of the active atoms is well conditioned, Gershgorin)
Both hold trivially for K ≤ 1, so an all-zero code counts as satisfying them (`zero_code_fraction` says how
often that happens). Every inner product is computed twice: Euclidean, and whitened,
⟨u, v⟩_S = uᵀ S v / (‖u‖_S ‖v‖_S) with S the inverse second-moment matrix of the activations in the
directions' space, which undoes the anisotropy of the representation (the paper's atomic inner product).

S is estimated from the same activations: Σ = E[z zᵀ] (uncentred, float64) over the rows, regularised as
Σ + ridge · (tr Σ / D) · I (ridge = 1e-3 by default) before inverting, so that S stays finite when the
activations span fewer than D dimensions (or there are fewer rows than D); directions in which the activations
have under ~0.1% of the mean variance are then not blown up. The whitened inner product is the Euclidean one
after mapping every direction through Σ_reg^(-1/2).

The directions' space is the output site's (`directions()` rows). For most kinds it is the site itself; for
transcoders it is the output site (pass its activations as `outputs`); for neurons at `mlp_hidden`, whose
directions are the down projection's rows in the residual stream, the activations in that space are the codes
decoded through the directions (codes @ directions: the MLP's output without its bias).

Cost stays bounded at 16k units: the n × n cosine matrix is never held; it is computed in row blocks of its
upper triangle, from which the maximum, the angle histogram and the P largest pairs are kept. A row's μ_A is
the value of the first of those pairs (in decreasing order) with both units active, found for a block of rows
at once; rows that hit none of them (sparse codes) get μ_A from the Gram matrix of their own K directions,
batched by K. Both are exact.

Intrinsic dimension: TwoNN (Facco et al., Sci. Rep. 2017) on a random subsample of the site's activations:
μ_i = r2/r1 (distances to the second and first nearest neighbour), d = slope through the origin of
−log(1 − F(μ)) against log μ over the 90% smallest μ, F the empirical distribution; duplicate rows are dropped.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator, Sequence
from typing import Any

import torch
import torch.nn.functional as F

from ..dictionaries import Dictionary
from ..errors import UnitscopeError


def geometry(dictionary: Dictionary, activations: torch.Tensor, outputs: torch.Tensor | None = None, *,
             max_rows: int = 16384, twonn_rows: int = 2048, ridge: float = 1e-3, bins: int = 180,
             top_pairs: int = 4096, seed: int = 0) -> dict[str, Any]:
    """Coherence, angle histograms and code uniqueness (Euclidean and whitened), and TwoNN intrinsic dimension.

    `activations`: [N, d_in] rows at the dictionary's input site; `outputs`: the same rows at its output site
    (transcoders; defaults to `activations` when the two sites are one). Only the first `max_rows` rows are used.
    """
    start = time.perf_counter()
    if activations.ndim != 2 or activations.shape[1] != dictionary.d_in:
        raise UnitscopeError(f"geometry needs activations of shape [rows, {dictionary.d_in}], "
                             f"not {list(activations.shape)}")
    if len(activations) < 2:
        raise UnitscopeError("geometry needs at least 2 activation rows")
    x = activations[:max_rows]
    same_site = dictionary.output_site == dictionary.input_site
    if outputs is None and same_site:
        outputs = activations
    dirs = dictionary.directions.detach().float().cpu()
    keep = dirs.norm(dim=1) > 0
    width = dirs.shape[1]
    if outputs is not None and outputs.shape[1] == width:
        z, source = outputs[:max_rows].float().cpu(), "output site" if not same_site else "site"
    else:
        z = torch.cat([c.float() @ dirs for c in _codes(dictionary, x)])
        source = "codes @ directions (the directions' space is not the site's)"
    transform, whitening = _whitening(z, ridge)
    whitening["source"] = source
    variants = {"euclidean": F.normalize(dirs[keep], dim=1), "whitened": F.normalize(dirs[keep] @ transform, dim=1)}
    pairs = {name: pairwise(w, bins=bins, top_pairs=top_pairs) for name, w in variants.items()}
    sums = {name: {"unique": 0, "rip": 0, "mu": 0.0, "ratio": []} for name in variants}
    l0 = zero = 0
    for codes in _codes(dictionary, x):  # row blocks, so the [rows, units] mask is never held whole
        active = codes != 0
        if not bool(keep.all()):
            active = active[:, keep]
        k = active.sum(1, dtype=torch.int32)
        l0 += int(k.sum())
        zero += int((k == 0).sum())
        mus = active_coherence(active, [(w, pairs[name]["top_values"], pairs[name]["top_i"], pairs[name]["top_j"])
                                        for name, w in variants.items()])
        for name, mu in zip(variants, mus):
            sums[name]["unique"] += int(((2 * k - 1) * mu < 1).sum())
            sums[name]["rip"] += int(((k - 1) * mu < 1).sum())
            sums[name]["mu"] += float(mu.double().sum())
            sums[name]["ratio"].append((2 * k - 1).clamp_min(0) * mu)
    n = len(x)
    result: dict[str, Any] = {
        "n_units": int(dirs.shape[0]), "n_zero_directions": int((~keep).sum()), "directions_width": width,
        "rows": n, "mean_l0": l0 / n, "zero_code_fraction": zero / n,
        "conditions": {"uniqueness": "(2K-1)*mu < 1", "rip": "(K-1)*mu < 1",
                       "K": "active units (non-zero code, non-zero direction)",
                       "mu": "max |cos| between two active directions (0 when K < 2)",
                       "median_uniqueness_ratio": "lower median of (2K-1)*mu over rows: below 1 for a unique code, "
                                                  "and how far from it when not"},
        "whitening": whitening,
    }
    for name in variants:
        result[name] = {
            "mutual_coherence": pairs[name]["coherence"],
            "uniqueness_fraction": sums[name]["unique"] / n,
            "rip_fraction": sums[name]["rip"] / n,
            "mean_active_coherence": sums[name]["mu"] / n,
            "median_uniqueness_ratio": float(torch.cat(sums[name]["ratio"]).median()),
            "angle_histogram": {"bin_edges_degrees": [180.0 * i / bins for i in range(bins + 1)],
                                "counts": pairs[name]["counts"]},
        }
    result["intrinsic_dimension"] = {"method": "TwoNN (Facco et al. 2017), 10% largest ratios discarded",
                                     "value": two_nn(x, max_rows=twonn_rows, seed=seed),
                                     "rows": int(min(n, twonn_rows))}
    result["seconds"] = round(time.perf_counter() - start, 3)
    return result


def _codes(dictionary: Dictionary, x: torch.Tensor, chunk: int = 1024) -> Iterator[torch.Tensor]:
    """The codes of the rows of `x`, a block of rows at a time, on the CPU."""
    param = next(dictionary.parameters(), None)
    dtype, device = (param.dtype, param.device) if param is not None else (torch.float32, torch.device("cpu"))
    for i in range(0, len(x), chunk):
        with torch.inference_mode():
            codes = dictionary.encode(x[i:i + chunk].to(device, dtype)).cpu()
        yield codes


def _whitening(z: torch.Tensor, ridge: float) -> tuple[torch.Tensor, dict[str, Any]]:
    """A map T with T Tᵀ = S = Σ_reg⁻¹ (so ⟨u, v⟩_S = (uT)·(vT)) for the second moment Σ of the rows of `z`.

    T = L⁻ᵀ for the Cholesky factor Σ_reg = L Lᵀ: a triangular solve, not an eigendecomposition (which MKL runs
    up to 25× slower on a busy machine).
    """
    z = z.double()
    sigma = z.T @ z / len(z)
    floor = ridge * float(sigma.diagonal().mean())
    if not floor > 0:
        raise UnitscopeError("the activations are all zero (or not finite); their second moment cannot be whitened")
    eye = torch.eye(len(sigma), dtype=torch.float64)
    chol = torch.linalg.cholesky(sigma + floor * eye)
    transform = torch.linalg.solve_triangular(chol, eye, upper=False).T
    info = {"matrix": "S = (Sigma + ridge * tr(Sigma)/D * I)^-1, Sigma = E[z z^T] (uncentred)", "ridge": ridge,
            "rows": int(len(z)), "dimensions": int(z.shape[1])}
    return transform.float(), info


@torch.inference_mode()
def pairwise(w: torch.Tensor, bins: int = 180, top_pairs: int = 4096, per_row: int = 32,
             chunk: int = 512) -> dict[str, Any]:
    """Over all pairs i < j of the unit rows of `w`: max |cos|, the histogram of angles (degrees, `bins` equal
    bins over [0, 180]) and the largest |cos| with their pairs (i, j), in decreasing order.

    Computed in blocks of rows of the upper triangle, so memory is O(chunk · n), never O(n²). The pairs returned
    are an exact prefix of all pairs sorted by |cos| (at most `top_pairs`): each row keeps its `per_row` largest,
    and only those above every row's `per_row`-th largest are returned, since no pair left out can exceed that.
    """
    n = len(w)
    chunk = max(1, min(chunk, (1 << 23) // max(n, 1)))  # float32 histogram counts stay exact below 2**24
    counts = torch.zeros(bins, dtype=torch.float64)
    cand_v, cand_i, cand_j = [], [], []
    floor = -1.0  # no pair left out of the candidates has a larger |cos|
    for a in range(0, n - 1, chunk):
        b = min(n, a + chunk)
        cos = (w[a:b] @ w[a:].T).clamp_(-1, 1)  # rows a..b, columns a..n; its first b-a columns hold the diagonal
        upper = torch.ones(b - a, b - a, dtype=torch.bool).triu_(1)
        counts += torch.histc(torch.acos(cos[:, b - a:]), bins, 0, math.pi).double()
        counts += torch.histc(torch.acos(cos[:, :b - a][upper]), bins, 0, math.pi).double()
        absc = cos.abs_()
        absc[:, :b - a].masked_fill_(~upper, -1.0)
        v, j = absc.topk(min(per_row, n - a), dim=1)
        if v.shape[1] == per_row:
            floor = max(floor, float(v[:, -1].max()))
        ok = v >= 0
        cand_v.append(v[ok])
        cand_i.append((a + torch.arange(b - a))[:, None].expand_as(v)[ok])
        cand_j.append(a + j[ok])
    top_v = torch.cat(cand_v) if cand_v else torch.empty(0)
    top_i = torch.cat(cand_i) if cand_i else torch.empty(0, dtype=torch.long)
    top_j = torch.cat(cand_j) if cand_j else torch.empty(0, dtype=torch.long)
    coherence = float(top_v.max()) if len(top_v) else None
    above = top_v > floor
    top_v, top_i, top_j = top_v[above], top_i[above], top_j[above]
    order = top_v.argsort(descending=True, stable=True)[:top_pairs]
    return {"coherence": coherence, "counts": [int(c) for c in counts.tolist()],
            "top_values": top_v[order], "top_i": top_i[order], "top_j": top_j[order]}


Variant = tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]  # (w, top_values, top_i, top_j)


@torch.inference_mode()
def active_coherence(active: torch.Tensor, variants: Sequence[Variant], sparse_k: int = 64,
                     budget: int = 1 << 24) -> list[torch.Tensor]:
    """μ_A per row for each variant: max |cos| between two active directions (0 when fewer than two are active).

    `active` [N, n] bool; each variant is `w` [n, D] (unit rows) with the top pairs from `pairwise`, in
    decreasing order. Rows with at most `sparse_k` active units take the maximum of the Gram matrix of their own
    directions (their indices found once for all variants); denser rows take the value of the first top pair
    whose two units are both active, and those that hold none of them fall back to their Gram matrix.
    """
    k = active.sum(1, dtype=torch.int32)
    mus = []
    sparse = torch.nonzero((k >= 2) & (k <= sparse_k)).flatten()
    groups = list(_groups(sparse, k, active, budget, max(w.shape[1] for w, *_ in variants)))
    for w, top_values, top_i, top_j in variants:
        mu = torch.zeros(len(active))
        for r, idx, valid in groups:
            mu[r] = _gram_max(w, idx, valid)
        dense = torch.nonzero(k > sparse_k).flatten()
        if len(dense) and len(top_values):
            m = active[dense]
            hit = m[:, top_i] & m[:, top_j]
            has = hit.any(1)
            mu[dense[has]] = top_values[hit[has].to(torch.uint8).argmax(1)]
            dense = dense[~has]
        for r, idx, valid in _groups(dense, k, active, budget, w.shape[1]):
            mu[r] = _gram_max(w, idx, valid)
        mus.append(mu)
    return mus


def _groups(rows: torch.Tensor, k: torch.Tensor, active: torch.Tensor, budget: int,
            width: int) -> Iterator[tuple[torch.Tensor, torch.Tensor, torch.Tensor]]:
    """Rows in groups of similar K, each with its active units' indices [g, K] (padded) and which are real."""
    rows = rows[k[rows].argsort(stable=True)]
    s = 0
    while s < len(rows):  # sorted by K: a group's largest K is its last row's
        ks = int(k[rows[s]])
        end = min(len(rows), s + max(1, budget // (ks * max(width, ks))))
        kmax = int(k[rows[end - 1]])
        end = min(end, s + max(1, budget // (kmax * max(width, kmax))))
        r = rows[s:end]
        kmax = int(k[r].max())
        vals, idx = active[r].to(torch.uint8).topk(kmax, dim=1)  # active units first, then padding
        yield r, idx, vals.bool()
        s = end


def _gram_max(w: torch.Tensor, idx: torch.Tensor, valid: torch.Tensor) -> torch.Tensor:
    v = w[idx]  # [g, K, D]
    g = (v @ v.transpose(1, 2)).abs_()
    pair = valid[:, :, None] & valid[:, None, :] & ~torch.eye(idx.shape[1], dtype=torch.bool)
    return g.masked_fill_(~pair, 0).flatten(1).amax(1)


@torch.inference_mode()
def two_nn(x: torch.Tensor, max_rows: int = 2048, seed: int = 0, discard: float = 0.1) -> float | None:
    """TwoNN intrinsic dimension of the rows of `x` (a random subsample of `max_rows`); None with too few rows."""
    g = torch.Generator().manual_seed(seed)
    if len(x) > max_rows:
        x = x[torch.randperm(len(x), generator=g)[:max_rows]]
    x = torch.unique(x.double().cpu(), dim=0)
    if len(x) < 3:
        return None
    sq = (x * x).sum(1)
    dist = (sq[:, None] + sq[None, :] - 2 * x @ x.T).clamp_min_(0)
    dist.fill_diagonal_(math.inf)
    r = dist.topk(2, dim=1, largest=False).values.sqrt()
    ok = r[:, 0] > 0
    ratio = (r[ok, 1] / r[ok, 0]).sort().values
    n = len(ratio)
    keep = int(n * (1 - discard))
    if keep < 2:
        return None
    xs = ratio[:keep].log()
    ys = -torch.log1p(-torch.arange(1, keep + 1, dtype=torch.float64) / n)
    denom = float((xs * xs).sum())
    return float((xs * ys).sum()) / denom if denom > 0 else None
