"""Per-unit statistics and example windows, streamed from a store to Parquet in ONE pass.

One pass over the store encodes each batch of whole windows once and feeds it to accumulators whose size
does not grow with the number of tokens, so the [tokens, units] code matrix is never held (16k units over
millions of tokens fit in well under 2 GB). Only included positions count (`corpus.training_mask`: not
position 0, not special tokens). Shards are memory-mapped one at a time and unmapped after use, so the
resident memory does not grow with the store either. The definitions hold for every kind, signed or not:

- a unit *fires* on a token when its code is non-zero: code > 0 for kinds whose codes are non-negative
  (SAEs, transcoders, k-means, semi-NMF), either sign for signed kinds (PCA, diff-in-means, probes,
  neurons). `frequency` = firing tokens / included tokens.
- `max_activation` / `min_activation`: the largest / smallest code over included tokens (0 if none).
- `mean_activation`: the mean code over firing tokens (signed for signed kinds; 0 if it never fires).
- a window's *peak* is its largest code over included tokens (`bottom`: its smallest).

Why the bins are anchored to powers of two. Equal-width bins over [min, max] need the final extremes,
which a single pass learns only at its end; re-binning counts or samples as the extremes grow is exact only
when old bins nest inside new ones. So every unit keeps a *fine grid* over [-R, R) (histogram, `H_CELLS`
cells a side) or [0, R) (examples, `Q_CELLS` cells), with R = 2**e the smallest power of two at least the
largest magnitude seen so far. When R doubles, cell c becomes cell c >> 1 (floor division nests exactly:
floor(floor(v/D)/2) = floor(v/2D)), so counts add and samples merge without loss. The reported bins are
then unions of `j` consecutive fine cells, j the smallest that covers the unit's range: exact, and at most
a bin or two at the top stay empty. Cell indices are computed in float64 as floor(v * cells * 2**-e),
exact for float32 codes. (Alternatives: a first pass for the extremes doubles the encoding cost, which is
the whole cost; edges from a sample of the store miss rare units.)

- histogram: `N_BINS` bins of width W = j * R / H_CELLS with zero on an edge: bin k holds firing codes in
  [hist_min + k W, hist_min + (k + 1) W); `hist_min` is the largest multiple of W at or below min(0, min
  code), `hist_max` = hist_min + N_BINS W. q50/q90/q99: the centre of the first fine cell whose
  cumulative count reaches q x the firing count (within R / (2 H_CELLS) of the exact quantile).
- examples (`examples.parquet`, column `kind`):
  - `top`: the `top_n` windows with the largest peak above 0, ranked by peak (ties: earlier window first);
  - `bottom` (units with negative codes): the `top_n` windows with the most negative minimum;
  - `quantile`: windows with a peak above 0 fall into `N_QUANTILES` equal-width activation bins
    (`quantile_edges` in units.parquet: bin b = [b W, (b + 1) W), W = j * R / Q_CELLS, R = 2**e the power
    of two at or above the largest peak, j = floor(c_max / 10) + 1 for c_max the fine cell of the largest
    peak, so the top bin holds it or is the only empty one); from each bin the `quantile_n` windows with the
    smallest `sample_key(seed, unit, window)` are kept, in key order: a pseudo-random sample without
    replacement (bottom-k sampling), deterministic in the seed, and mergeable across batches (the k smallest of
    a union are the k smallest of the parts' k smallest), so it is exact in one pass;
  - `random`: the `random_n` windows (with at least one included token) where the unit never fires, with the
    smallest `sample_key`, in key order.
  `max_activation` holds the window's peak (its minimum for `bottom`, 0 for `random`), `acts` its per-token
  codes (0 at excluded positions), captured during the pass for the windows a sample accepts (a bounded
  buffer pruned to the windows still held), so no window is encoded twice.
- concept dictionaries (`concepts.parquet`, see `explain.concepts`) are built and scored in the same pass.

All tables are written into a temporary directory and swapped in together (`atomic.replace_dir`).
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ..atomic import replace_dir
from ..corpus import training_mask
from ..dictionaries import Dictionary
from ..errors import UnitscopeError
from ..store import Shard, Store
from .concepts import ConceptCounter

N_BINS = 20
QUANTILES = (0.5, 0.9, 0.99)
N_QUANTILES = 10
H_CELLS = 640  # fine histogram cells on each side of zero
Q_CELLS = 80  # fine cells of window peaks for the quantile samples
TABLES = ("units.parquet", "examples.parquet", "concepts.parquet")
# what later stages write beside the tables (`unitscope effects`, the report's dissection images): computed from
# these windows, so a new explanation replaces the folder without them rather than refusing it or keeping them stale
DERIVED = ("effects.parquet", "dissection")
KINDS = ("top", "bottom", "quantile", "random")
NO_EXP = -(10 ** 6)  # exponent of a unit that has seen no value yet
_INF = torch.iinfo(torch.int64).max
_M32 = 0xFFFFFFFF
ELEMENTS_PER_BATCH = 1 << 24  # codes per encoded batch (64 MB of float32)
EXAMPLES_SCHEMA = pa.schema([
    ("unit", pa.int32()), ("kind", pa.string()), ("rank", pa.int32()), ("quantile", pa.int32()),
    ("window", pa.int64()), ("max_activation", pa.float32()), ("token_ids", pa.list_(pa.int32())),
    ("tokens", pa.list_(pa.string())), ("acts", pa.list_(pa.float32()))])


def _fmix(x: torch.Tensor) -> torch.Tensor:
    """murmur3's 32-bit finaliser on int64 tensors holding 32-bit values (products wrap, then are masked)."""
    x = x ^ (x >> 16)
    x = (x * 0x85EBCA6B) & _M32
    x = x ^ (x >> 13)
    x = (x * 0xC2B2AE35) & _M32
    return x ^ (x >> 16)


def unit_salt(seed: int, units: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A 31-bit pseudo-random salt per unit (murmur3 finaliser of unit and seed)."""
    units = torch.as_tensor(units, dtype=torch.int64)
    s = _fmix(torch.tensor(seed & _M32, dtype=torch.int64) ^ 0x2545F491)
    return _fmix((units * 0x9E3779B1 + s) & _M32) & 0x7FFFFFFF


def window_hash(seed: int, windows: torch.Tensor | np.ndarray) -> torch.Tensor:
    """A 31-bit pseudo-random hash per window."""
    windows = torch.as_tensor(windows, dtype=torch.int64)
    s = _fmix(torch.tensor((seed + 0x6A09E667) & _M32, dtype=torch.int64))
    return _fmix(((windows * 0x85EBCA77) ^ s) & _M32) & 0x7FFFFFFF


def sample_key(seed: int, units: torch.Tensor | np.ndarray, windows: torch.Tensor | np.ndarray) -> torch.Tensor:
    """The sampling priority of (unit, window): window_hash XOR unit_salt in the high half, the window in the
    low half (so keys never tie). The smallest keys of a set are a pseudo-random sample of it without
    replacement, in a different order for each unit; XOR with a per-unit salt (rather than hashing every
    pair) lets a batch compare all its [windows, units] keys against the thresholds in three vector ops.
    """
    windows = torch.as_tensor(windows, dtype=torch.int64)
    return ((window_hash(seed, windows) ^ unit_salt(seed, units)) << 32) | (windows & _M32)


def pow2_exponent(x: torch.Tensor) -> torch.Tensor:
    """e with 2**(e-1) < x <= 2**e, for x > 0 (int64)."""
    m, e = torch.frexp(x.double())
    return e.long() - (m == 0.5).long()


def fine_cell(v: torch.Tensor, e: torch.Tensor, cells: int) -> torch.Tensor:
    """floor(v * cells / 2**e), exact in float64 for float32 values, clamped to [-cells, cells - 1]."""
    scaled = torch.ldexp(v.double() * cells, -e.double())
    return scaled.floor().clamp_(-cells, cells - 1).long()


def _offer(slots: torch.Tensor, cells: torch.Tensor, keys: torch.Tensor) -> torch.Tensor:
    """Merge candidate keys into `slots` [n_cells, n] (the n smallest keys of each cell, ascending; _INF empty).

    Returns the mask of candidates that passed the cell's current threshold (a superset of those kept).
    """
    keep = keys < slots[cells, -1]
    cells, keys = cells[keep], keys[keep]
    if not len(cells):
        return keep
    n = slots.shape[1]
    touched, inv = torch.unique(cells, return_inverse=True)
    old = slots[touched]
    pos = torch.cat([torch.arange(len(touched)).repeat_interleave(n), inv])
    allk = torch.cat([old.reshape(-1), keys])
    o1 = torch.argsort(allk, stable=True)
    order = o1[torch.argsort(pos[o1], stable=True)]
    sp, sk = pos[order], allk[order]
    rank = torch.arange(len(sp)) - torch.searchsorted(sp, sp)
    m = rank < n
    new = torch.full((len(touched), n), _INF, dtype=torch.int64)
    new[sp[m], rank[m]] = sk[m]
    slots[touched] = new
    return keep


def _merge_sorted(vals: torch.Tensor, wins: torch.Tensor, new_vals: torch.Tensor, new_wins: torch.Tensor,
                  n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Keep the n largest per column, earlier windows first among equals (stable sort; old rows come first)."""
    cand_v, cand_w = torch.cat([vals, new_vals]), torch.cat([wins, new_wins])
    order = torch.sort(cand_v, dim=0, descending=True, stable=True).indices[:n]
    return cand_v.gather(0, order), cand_w.gather(0, order)


class _Capture:
    """Per-token codes of the (unit, window) pairs a sample accepted, in a buffer pruned to the live pairs."""

    def __init__(self, cap: int = 1 << 23):
        self.keys: list[torch.Tensor] = []
        self.pos: list[torch.Tensor] = []
        self.vals: list[torch.Tensor] = []
        self.size, self.cap = 0, cap

    def add(self, codes: torch.Tensor, first: int, wi: torch.Tensor, ui: torch.Tensor) -> None:
        if not len(wi):
            return
        pair = torch.unique((ui << 32) | wi)
        ui, wi = pair >> 32, pair & _M32
        block = codes[wi, :, ui]  # [pairs, ctx]
        r, p = block.nonzero(as_tuple=True)
        self.keys.append((ui[r] << 32) | (wi[r] + first))
        self.pos.append(p.to(torch.int16))
        self.vals.append(block[r, p])
        self.size += len(r)

    def prune(self, live: torch.Tensor) -> None:
        """Drop entries of pairs no longer held (`live`: unit << 32 | window keys)."""
        if self.size <= self.cap:
            return
        keys, pos, vals = torch.cat(self.keys), torch.cat(self.pos), torch.cat(self.vals)
        keep = torch.isin(keys, live)
        self.keys, self.pos, self.vals = [keys[keep]], [pos[keep]], [vals[keep]]
        self.size = int(keep.sum())
        self.cap = max(self.cap, 2 * self.size)

    def table(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(keys, pos, vals) sorted by key."""
        if not self.keys:
            return torch.zeros(0, dtype=torch.int64), torch.zeros(0, dtype=torch.int16), torch.zeros(0)
        keys, pos, vals = torch.cat(self.keys), torch.cat(self.pos), torch.cat(self.vals)
        order = torch.argsort(keys, stable=True)
        return keys[order], pos[order], vals[order]


class StreamingPass:
    """The accumulators of the one pass: `update` per batch of whole windows, then `finish`."""

    def __init__(self, unit_ids: torch.Tensor, top_n: int, quantile_n: int, random_n: int, seed: int = 0):
        u = len(unit_ids)
        self.unit_ids = unit_ids.long()
        self.top_n, self.quantile_n, self.random_n, self.seed = top_n, quantile_n, random_n, seed
        self.total = torch.zeros(u, dtype=torch.float64)
        self.vmax = torch.full((u,), -torch.inf)
        self.vmin = torch.full((u,), torch.inf)
        self.h_exp = torch.full((u,), NO_EXP, dtype=torch.int64)
        self.h_counts = torch.zeros((u, 2 * H_CELLS), dtype=torch.int32)
        self.top_vals, self.top_win = torch.zeros((0, u)), torch.zeros((0, u), dtype=torch.int64)
        self.bot_vals, self.bot_win = torch.zeros((0, u)), torch.zeros((0, u), dtype=torch.int64)
        self.q_exp = torch.full((u,), NO_EXP, dtype=torch.int64)
        self.q_slots = torch.full((u * Q_CELLS, max(1, quantile_n)), _INF, dtype=torch.int64)
        self.r_slots = torch.full((u, max(1, random_n)), _INF, dtype=torch.int64)
        self.capture = _Capture()
        self.salt = unit_salt(seed, self.unit_ids)

    # ---- per batch ------------------------------------------------------------------------------------
    def update(self, first: int, codes: torch.Tensor, valid: torch.Tensor,
               nonzero: tuple[torch.Tensor, torch.Tensor]) -> None:
        """codes [w, ctx, u] (0 at excluded positions), valid [w, ctx], nonzero: (rows, cols) of the non-zero
        codes in codes.view(-1, u); windows first .. first + w - 1."""
        w, _ctx, u = codes.shape
        flat = codes.view(-1, u)
        excluded = (~valid).reshape(-1).nonzero()[:, 0]
        if len(excluded):  # extremes over included positions only: overwrite the excluded rows, then restore
            flat[excluded] = -torch.inf
            wmax = codes.amax(dim=1)
            flat[excluded] = torch.inf
            wmin = codes.amin(dim=1)
            flat[excluded] = 0
        else:
            wmax, wmin = codes.amax(dim=1), codes.amin(dim=1)
        self.vmax = torch.maximum(self.vmax, wmax.amax(0))
        self.vmin = torch.minimum(self.vmin, wmin.amin(0))
        self._histogram(flat, wmax, wmin, nonzero)
        ids = torch.arange(first, first + w)[:, None].expand(w, u)
        self.top_vals, self.top_win = _merge_sorted(self.top_vals, self.top_win, wmax, ids, self.top_n)
        new_top = (self.top_win >= first).nonzero(as_tuple=True)
        cap_w, cap_u = [self.top_win[new_top] - first], [new_top[1]]
        if bool((wmin < 0).any()) or len(self.bot_vals):  # only signed codes have bottom windows
            self.bot_vals, self.bot_win = _merge_sorted(self.bot_vals, self.bot_win, -wmin, ids, self.top_n)
            new_bot = (self.bot_win >= first).nonzero(as_tuple=True)
            cap_w.append(self.bot_win[new_bot] - first)
            cap_u.append(new_bot[1])
        win = torch.arange(first, first + w)
        hw = window_hash(self.seed, win)
        if self.quantile_n:
            qw, qu = self._quantiles(first, wmax, hw)
            cap_w.append(qw)
            cap_u.append(qu)
        if self.random_n:
            keys = ((hw[:, None] ^ self.salt[None, :]) << 32) | win[:, None]
            inactive = (wmax == 0) & (wmin == 0) & valid.any(1)[:, None] & (keys < self.r_slots[None, :, -1])
            wi, ui = inactive.nonzero(as_tuple=True)
            _offer(self.r_slots, ui, keys[wi, ui])
        self.capture.add(codes, first, torch.cat(cap_w), torch.cat(cap_u))
        if self.capture.size > self.capture.cap:
            self.capture.prune(self._live())

    def _histogram(self, flat: torch.Tensor, wmax: torch.Tensor, wmin: torch.Tensor,
                   nonzero: tuple[torch.Tensor, torch.Tensor]) -> None:
        absmax = torch.maximum(wmax.amax(0).clamp(min=0), (-wmin.amin(0)).clamp(min=0))
        seen = absmax > 0
        e = torch.maximum(self.h_exp, torch.where(seen, pow2_exponent(absmax.clamp(min=1e-38)), NO_EXP))
        grown = ((e > self.h_exp) & (self.h_exp != NO_EXP)).nonzero()[:, 0]
        if len(grown):  # R doubled (d times): fine cells nest, counts add
            d = (e[grown] - self.h_exp[grown]).clamp(max=62)
            rel = torch.arange(-H_CELLS, H_CELLS)
            target = (rel[None] >> d[:, None]) + H_CELLS
            merged = torch.zeros((len(grown), 2 * H_CELLS), dtype=torch.int32)
            merged.scatter_add_(1, target, self.h_counts[grown])
            self.h_counts[grown] = merged
        self.h_exp = e
        rows, cols = nonzero
        if len(rows):
            vals = flat[rows, cols].double()
            self.total.index_add_(0, cols, vals)  # only firing codes add to the sum: exact in float64
            cell = fine_cell(vals, e[cols], H_CELLS) + H_CELLS
            self.h_counts.view(-1).index_add_(0, cols * (2 * H_CELLS) + cell,
                                              torch.ones(len(cell), dtype=torch.int32))

    def _quantiles(self, first: int, wmax: torch.Tensor, hw: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        bmax = wmax.amax(0)
        seen = bmax > 0
        e = torch.maximum(self.q_exp, torch.where(seen, pow2_exponent(bmax.clamp(min=1e-38)), NO_EXP))
        grown = ((e > self.q_exp) & (self.q_exp != NO_EXP)).nonzero()[:, 0]
        if len(grown):  # R doubled: samples of cell c move to cell c >> d and are merged (bottom-k nests)
            d = (e[grown] - self.q_exp[grown]).clamp(max=62)
            rows = (grown[:, None] * Q_CELLS + torch.arange(Q_CELLS)[None]).reshape(-1)
            old = self.q_slots[rows].reshape(-1)
            cells = (grown[:, None] * Q_CELLS + (torch.arange(Q_CELLS)[None] >> d[:, None])).reshape(-1)
            cells = cells.repeat_interleave(self.q_slots.shape[1])
            held = old != _INF
            self.q_slots[rows] = _INF
            _offer(self.q_slots, cells[held], old[held])
        self.q_exp = e
        wi, ui = (wmax > 0).nonzero(as_tuple=True)
        cell = fine_cell(wmax[wi, ui], e[ui], Q_CELLS)
        keys = ((hw[wi] ^ self.salt[ui]) << 32) | (wi + first)
        passed = _offer(self.q_slots, ui * Q_CELLS + cell, keys)
        return wi[passed], ui[passed]

    def _live(self) -> torch.Tensor:
        """unit << 32 | window of every pair a sample still holds."""
        u = len(self.unit_ids)
        cols = torch.arange(u)[None]
        parts = [((cols.expand_as(self.top_win)) << 32 | self.top_win).reshape(-1),
                 ((cols.expand_as(self.bot_win)) << 32 | self.bot_win).reshape(-1)]
        q = self.q_slots.reshape(-1)
        held = q != _INF
        q_units = torch.arange(u).repeat_interleave(Q_CELLS * self.q_slots.shape[1])
        parts.append((q_units[held] << 32) | (q[held] & _M32))
        return torch.unique(torch.cat(parts))

    # ---- the end ------------------------------------------------------------------------------------------
    def finish(self) -> dict[str, Any]:
        vmax = torch.where(torch.isfinite(self.vmax), self.vmax, torch.zeros_like(self.vmax))
        vmin = torch.where(torch.isfinite(self.vmin), self.vmin, torch.zeros_like(self.vmin))
        counts = self.h_counts.long()
        count = counts.sum(1)
        hist, hist_min, hist_max = histogram_from_cells(counts, self.h_exp)
        qs = {q: quantile_from_cells(counts, self.h_exp, q) for q in QUANTILES}
        edges, rows = self._quantile_rows()
        return {"count": count, "sum": self.total, "max": vmax, "min": vmin, "hist": hist, "hist_min": hist_min,
                "hist_max": hist_max, "quantiles": qs, "quantile_edges": edges, "rows": rows}

    def _quantile_rows(self) -> tuple[list[list[float] | None], dict[str, np.ndarray]]:
        """Per unit: the quantile bin edges; and every example row: unit (column), kind, rank, quantile, window."""
        u, n = len(self.unit_ids), self.quantile_n
        out: dict[str, list[np.ndarray]] = {k: [] for k in ("col", "kind", "rank", "quantile", "window")}

        def add(col, kind, rank, quant, window):
            out["col"].append(np.asarray(col, np.int64))
            out["kind"].append(np.full(len(out["col"][-1]), KINDS.index(kind), np.int8))
            out["rank"].append(np.asarray(rank, np.int64))
            out["quantile"].append(np.asarray(quant, np.int64))
            out["window"].append(np.asarray(window, np.int64))

        for kind, vals, wins in (("top", self.top_vals, self.top_win), ("bottom", self.bot_vals, self.bot_win)):
            r, c = (vals > 0).nonzero(as_tuple=True)  # bottom holds negated minima
            add(c, kind, r, np.full(len(r), -1), wins[r, c])
        edges: list[list[float] | None] = [None] * u
        if n:
            keys = self.q_slots.reshape(u, Q_CELLS, -1)
            held = keys != _INF
            any_cell = held.any(2)
            c_max = torch.where(any_cell, torch.arange(Q_CELLS)[None], -1).amax(1)
            j = torch.div(c_max, 10, rounding_mode="floor") + 1
            for col in (c_max >= 0).nonzero()[:, 0].tolist():
                jc, scale = int(j[col]), 2.0 ** int(self.q_exp[col])
                edges[col] = [b * jc * scale / Q_CELLS for b in range(N_QUANTILES + 1)]  # each rounded once
            uu, cc, _ = held.nonzero(as_tuple=True)
            bins = torch.div(cc, j[uu], rounding_mode="floor").clamp(max=N_QUANTILES - 1)
            slots = torch.full((u * N_QUANTILES, n), _INF, dtype=torch.int64)
            _offer(slots, uu * N_QUANTILES + bins, keys[held])
            b, r = (slots != _INF).nonzero(as_tuple=True)
            add(b // N_QUANTILES, "quantile", r, b % N_QUANTILES, slots[b, r] & _M32)
        if self.random_n:
            c, r = (self.r_slots != _INF).nonzero(as_tuple=True)
            add(c, "random", r, np.full(len(r), -1), self.r_slots[c, r] & _M32)
        rows = {k: np.concatenate(v) if v else np.zeros(0, np.int64) for k, v in out.items()}
        order = np.lexsort((rows["rank"], rows["quantile"], rows["kind"], rows["col"]))
        return edges, {k: v[order] for k, v in rows.items()}


def histogram_from_cells(counts: torch.Tensor, exp: torch.Tensor) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """N_BINS bins of j fine cells each, zero on an edge, j the smallest that covers every firing code."""
    u = counts.shape[0]
    rel = torch.arange(-H_CELLS, H_CELLS)
    held = counts > 0
    lo = torch.where(held, rel[None], H_CELLS).amin(1)  # fine cells of the extremes
    hi = torch.where(held, rel[None], -H_CELLS - 1).amax(1)
    firing = held.any(1)
    j = torch.ones(u, dtype=torch.int64)
    for _ in range(2 * H_CELLS):  # the smallest j that fits (at most ~2 H_CELLS / N_BINS + 1 steps)
        k_lo = torch.div(lo.clamp(max=0), j, rounding_mode="floor")
        k_hi = torch.div(hi, j, rounding_mode="floor").clamp(min=-1)
        bad = firing & (k_hi - k_lo + 1 > N_BINS)
        if not bad.any():
            break
        j = j + bad.long()
    k_lo = torch.div(lo.clamp(max=0), j, rounding_mode="floor")
    bins = torch.div(rel[None], j[:, None], rounding_mode="floor") - k_lo[:, None]  # [u, 2H]
    hist = torch.zeros((u, N_BINS), dtype=torch.int64)
    inside = held & (bins >= 0) & (bins < N_BINS)
    hist.view(-1).index_add_(0, (torch.arange(u)[:, None] * N_BINS + bins)[inside], counts[inside])
    width = j.double() * torch.ldexp(torch.ones(u, dtype=torch.float64), exp.clamp(min=-1000).double()) / H_CELLS
    hmin = torch.where(firing, k_lo.double() * width, 0.0)
    hmax = torch.where(firing, hmin + N_BINS * width, 0.0)
    return hist.numpy(), hmin.numpy(), hmax.numpy()


def quantile_from_cells(counts: torch.Tensor, exp: torch.Tensor, q: float) -> np.ndarray:
    """Per unit: the centre of the first fine cell whose cumulative count reaches q x the count (0 if none)."""
    c = counts.cumsum(1)
    total = c[:, -1]
    cell = torch.minimum((c < q * total[:, None]).sum(1), torch.tensor(2 * H_CELLS - 1)) - H_CELLS
    delta = torch.ldexp(torch.ones(len(total), dtype=torch.float64), exp.clamp(min=-1000).double()) / H_CELLS
    return torch.where(total > 0, (cell.double() + 0.5) * delta, 0.0).numpy()


def _shard_acts(store: Store, site: str, s: int) -> torch.Tensor:
    """A shard's activations from a mapping of its own, released when the caller drops it (bounded RSS)."""
    entry = store.manifest["shards"][s]
    store.width(site)
    return Shard(store.root / entry["file"], entry.get("bytes")).get(f"acts.{site}")


@torch.inference_mode()
def encode_windows(dictionary: Dictionary, store: Store, site: str, mask: np.ndarray, windows_per_batch: int,
                   progress: bool, desc: str, columns: torch.Tensor | None = None) -> Iterator:
    """Yield (first_window, codes[w, ctx, units], valid[w, ctx]) over the store, window-aligned.

    Codes at excluded positions (and the padding of a truncated final window) are 0; `columns` keeps
    only those units.
    """
    ctx = int(store.manifest["ctx_len"])
    offsets = np.concatenate([[0], np.cumsum([s["tokens"] for s in store.manifest["shards"]])])
    bar = tqdm(total=store.n_tokens, unit="tok", desc=desc, disable=not progress)
    window = 0
    param = next(dictionary.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    for s in range(store.n_shards):
        acts = _shard_acts(store, site, s)
        n = acts.shape[0]
        for lo in range(0, n, windows_per_batch * ctx):
            hi = min(n, lo + windows_per_batch * ctx)
            w = -(-(hi - lo) // ctx)
            codes = dictionary.encode(acts[lo:hi].to(dtype)).float()
            if columns is not None:
                codes = codes.index_select(1, columns)
            valid = torch.from_numpy(mask[offsets[s] + lo:offsets[s] + hi])
            pad = w * ctx - (hi - lo)  # a truncated final window
            if pad:
                codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
                valid = torch.cat([valid, valid.new_zeros(pad)])
            codes = codes * valid[:, None]
            yield window, codes.view(w, ctx, -1), valid.view(w, ctx)
            window += w
            bar.update(hi - lo)
        del acts
    bar.close()


def check_units(dictionary: Dictionary, units: Sequence[int] | None) -> torch.Tensor:
    """The unit indices to explain (all by default); an index the dictionary lacks is refused in one sentence."""
    n = dictionary.n_units
    if units is None:
        return torch.arange(n)
    ids = [int(x) for x in units]
    bad = [x for x in ids if not 0 <= x < n]
    if bad:
        raise UnitscopeError(f"unit {bad[0]} does not exist: this {dictionary.architecture} dictionary has {n} "
                             f"units (0 to {n - 1})")
    if not ids:
        raise UnitscopeError("no units to explain: give at least one unit index")
    return torch.tensor(sorted(set(ids)), dtype=torch.int64)


def write_tables(out: str | Path, dictionary: Dictionary, store: Store, site: str, tokenizer: Any,
                 lens: dict[str, list] | None = None, top_n: int = 20, progress: bool = True,
                 quantile_n: int = 2, random_n: int = 5, units: Sequence[int] | None = None, seed: int = 0,
                 heldout_fraction: float = 0.2, windows_per_batch: int | None = None) -> dict[str, Path]:
    """Write units.parquet, examples.parquet and concepts.parquet for the units of `dictionary` (all, or
    `units`), from one pass over `store`, replacing all three at once. `lens` holds one entry per unit
    explained. `out` must be new, empty or a previous explanation directory: its contents are replaced whole.
    """
    for name, v, least in (("top examples", top_n, 1), ("quantile examples", quantile_n, 0),
                           ("random examples", random_n, 0)):
        if v < least:
            raise UnitscopeError(f"the number of {name} per unit must be at least {least}, not {v}")
    if not 0 < heldout_fraction < 1:
        raise UnitscopeError(f"the held-out fraction must lie between 0 and 1, not {heldout_fraction}")
    if site not in store.sites:
        raise UnitscopeError(f"the store has no site {site!r}; it holds {', '.join(store.sites)}")
    cols = check_units(dictionary, units)
    u = len(cols)
    tokens, pos = store.column("tokens"), store.column("pos")
    specials = np.asarray(store.manifest.get("specials", []), dtype=np.int32)
    mask = training_mask(tokens, pos, specials)
    ctx = int(store.manifest["ctx_len"])
    n_windows = -(-len(tokens) // ctx)
    wpb = windows_per_batch or max(1, min(64, ELEMENTS_PER_BATCH // (ctx * dictionary.n_units)))
    acc = StreamingPass(cols, top_n, quantile_n, random_n, seed)
    concepts = ConceptCounter(cols, tokens, mask, ctx, n_windows, heldout_fraction)
    with torch.inference_mode():
        for first, codes, valid in encode_windows(dictionary, store, site, mask, wpb, progress, "explain",
                                                  None if u == dictionary.n_units else cols):
            nonzero = codes.view(-1, u).nonzero(as_tuple=True)
            concepts.update(first, codes.shape[0], nonzero)
            acc.update(first, codes, valid, nonzero)
        st = acc.finish()
    concept_table = concepts.finish(tokenizer)

    count = st["count"].numpy()
    n_valid = int(mask.sum())
    mean = np.where(count > 0, st["sum"].numpy() / np.maximum(count, 1), 0.0)
    units_cols: dict[str, Any] = {
        "unit": cols.numpy().astype(np.int32), "frequency": count / max(1, n_valid),
        "max_activation": st["max"].numpy(), "min_activation": st["min"].numpy(), "mean_activation": mean,
        **{f"q{int(q * 100)}": st["quantiles"][q] for q in QUANTILES},
        "hist_counts": [h.tolist() for h in st["hist"]], "hist_min": st["hist_min"], "hist_max": st["hist_max"],
        "quantile_edges": pa.array(st["quantile_edges"], pa.list_(pa.float64())),
    }
    lens = lens or {}
    for key in ("promoted_tokens", "promoted_logits", "suppressed_tokens", "suppressed_logits"):
        units_cols[key] = lens.get(key, [None] * u)
    units_cols.update({"label": concept_table.column("label").to_pylist(),
                       "label_source": concept_table.column("source").to_pylist(),
                       "score_detection": [None] * u, "score_fuzzing": [None] * u})
    with replace_dir(out, {*TABLES, *DERIVED}) as tmp:
        pq.write_table(pa.table(units_cols), tmp / "units.parquet")
        _write_examples(tmp / "examples.parquet", st["rows"], acc.capture, cols, tokens, mask, ctx, tokenizer)
        pq.write_table(concept_table, tmp / "concepts.parquet")
    out = Path(out)
    return {"units": out / "units.parquet", "examples": out / "examples.parquet",
            "concepts": out / "concepts.parquet"}


def _write_examples(path: Path, rows: dict[str, np.ndarray], capture: _Capture, cols: torch.Tensor,
                    tokens: np.ndarray, mask: np.ndarray, ctx: int, tokenizer: Any, group: int = 8192) -> None:
    """Stream the example rows (sorted by unit, kind, quantile, rank) into Parquet, one row group at a time."""
    keys, cpos, cvals = capture.table()
    keys, cpos, cvals = keys.numpy(), cpos.numpy().astype(np.int64), cvals.numpy()
    vocab = np.unique(np.concatenate([tokens[w * ctx:(w + 1) * ctx] for w in np.unique(rows["window"])]
                                     or [np.zeros(0, np.int32)]))
    strings = pa.array([tokenizer.decode([int(i)]) for i in vocab], pa.string())
    n_tok = len(tokens)
    with pq.ParquetWriter(path, EXAMPLES_SCHEMA) as writer:
        for lo in range(0, max(1, len(rows["col"])), group):
            sl = slice(lo, lo + group)
            col, kind, rank = rows["col"][sl], rows["kind"][sl], rows["rank"][sl]
            quant, window = rows["quantile"][sl], rows["window"][sl]
            starts, ends = window * ctx, np.minimum((window + 1) * ctx, n_tok)
            lengths = ends - starts
            offsets = np.concatenate([[0], np.cumsum(lengths)]).astype(np.int32)
            flat_idx = np.repeat(starts - offsets[:-1], lengths) + np.arange(offsets[-1])
            ids = tokens[flat_idx].astype(np.int32)
            acts = np.zeros(len(flat_idx), np.float32)
            pair = (col << 32) | window
            a, b = np.searchsorted(keys, pair, "left"), np.searchsorted(keys, pair, "right")
            n_e = b - a
            if n_e.sum():
                e_idx = np.repeat(a - np.concatenate([[0], np.cumsum(n_e)[:-1]]), n_e) + np.arange(n_e.sum())
                row_of = np.repeat(np.arange(len(pair)), n_e)
                p = cpos[e_idx]
                inside = p < lengths[row_of]
                acts[offsets[:-1][row_of[inside]] + p[inside]] = cvals[e_idx[inside]]
            acts *= mask[flat_idx]
            kind_names = np.asarray(KINDS, dtype=object)[kind]
            peak = _row_peaks(acts, offsets, kind_names)
            acts = np.round(acts, 4).astype(np.float32)
            table = pa.table({
                "unit": pa.array(cols.numpy()[col].astype(np.int32)), "kind": pa.array(kind_names, pa.string()),
                "rank": pa.array(rank.astype(np.int32)),
                "quantile": pa.array(np.where(quant >= 0, quant, 0).astype(np.int32), mask=quant < 0),
                "window": pa.array(window.astype(np.int64)), "max_activation": pa.array(peak),
                "token_ids": pa.ListArray.from_arrays(pa.array(offsets), pa.array(ids)),
                "tokens": pa.ListArray.from_arrays(pa.array(offsets), strings.take(np.searchsorted(vocab, ids))),
                "acts": pa.ListArray.from_arrays(pa.array(offsets), pa.array(acts)),
            }, schema=EXAMPLES_SCHEMA)
            writer.write_table(table)


def _row_peaks(acts: np.ndarray, offsets: np.ndarray, kinds: np.ndarray) -> np.ndarray:
    """Each row's window peak from its per-token codes: the maximum, the minimum for `bottom`, 0 for `random`."""
    if not len(kinds):
        return np.zeros(0, np.float32)
    starts = offsets[:-1]
    nonempty = offsets[1:] > starts
    mx = np.zeros(len(kinds), np.float32)
    mn = np.zeros(len(kinds), np.float32)
    mx[nonempty] = np.maximum.reduceat(acts, starts[nonempty])
    mn[nonempty] = np.minimum.reduceat(acts, starts[nonempty])
    return np.where(kinds == "bottom", mn, np.where(kinds == "random", 0.0, mx)).astype(np.float32)
