"""Per-unit statistics and top-activating windows, streamed from a store to Parquet.

Two passes over the store, never holding the [tokens, units] code matrix: the first finds each unit's
frequency, extremes and mean and its top and bottom windows; the second fills a histogram per unit
from which quantiles are read. Only included positions count (`corpus.training_mask`: not position 0,
not special tokens). The definitions hold for every kind, signed or not:

- a unit *fires* on a token when its code is non-zero: code > 0 for kinds whose codes are non-negative
  (SAEs, transcoders, k-means, semi-NMF), either sign for signed kinds (PCA, diff-in-means, probes,
  neurons). `frequency` = firing tokens / included tokens.
- `max_activation` / `min_activation`: the largest / smallest code over included tokens (0 if none).
- `mean_activation`: the mean code over firing tokens (signed for signed kinds; 0 if it never fires).
  For non-negative kinds this is the usual "mean when active".
- histogram: `N_BINS` equal bins over the firing tokens' codes from `hist_min` = min(0, min_activation)
  to `hist_max` = max(0, max_activation), with the edges and bin rule of `numpy.histogram`; quantiles
  q50/q90/q99 are the centre of the first bin whose cumulative count reaches q × the firing count.
- examples: kind `top`, the `top_n` windows with the largest window maximum above 0, ranked by it; kind
  `bottom` (only units with negative codes), the `top_n` windows with the most negative window minimum.
  Their `max_activation` column holds that peak (the window's maximum for `top`, minimum for `bottom`).

Both tables are written into a temporary directory and swapped in together (`atomic.replace_dir`).
"""

from __future__ import annotations

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
from ..store import Store

N_BINS = 20
QUANTILES = (0.5, 0.9, 0.99)
TABLES = ("units.parquet", "examples.parquet")


@torch.inference_mode()
def _encode_windows(dictionary: Dictionary, store: Store, site: str, mask: np.ndarray, windows_per_batch: int,
                    progress: bool, desc: str):
    """Yield (first_window, codes[w, ctx, units], valid[w, ctx]) over the store, window-aligned.

    Codes at excluded positions (and the padding of a truncated final window) are 0.
    """
    ctx = int(store.manifest["ctx_len"])
    offsets = np.concatenate([[0], np.cumsum([s["tokens"] for s in store.manifest["shards"]])])
    bar = tqdm(total=store.n_tokens, unit="tok", desc=desc, disable=not progress)
    window = 0
    param = next(dictionary.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    for s in range(store.n_shards):
        acts = store.acts(site, s)
        n = acts.shape[0]
        for lo in range(0, n, windows_per_batch * ctx):
            hi = min(n, lo + windows_per_batch * ctx)
            w = -(-(hi - lo) // ctx)
            codes = dictionary.encode(acts[lo:hi].to(dtype)).float()
            valid = torch.from_numpy(mask[offsets[s] + lo:offsets[s] + hi])
            pad = w * ctx - (hi - lo)  # a truncated final window
            if pad:
                codes = torch.cat([codes, codes.new_zeros(pad, codes.shape[1])])
                valid = torch.cat([valid, valid.new_zeros(pad)])
            codes = codes * valid[:, None]
            yield window, codes.view(w, ctx, -1), valid.view(w, ctx)
            window += w
            bar.update(hi - lo)
    bar.close()


def _keep_best(vals: torch.Tensor, wins: torch.Tensor, new_vals: torch.Tensor, new_wins: torch.Tensor,
               top_n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge per-window scores [w, u] into the running top-n per unit (largest first)."""
    cand_v = torch.cat([vals, new_vals])
    cand_w = torch.cat([wins, new_wins])
    k = min(top_n, cand_v.shape[0])
    vals, order = cand_v.topk(k, dim=0)
    return vals, cand_w.gather(0, order)


def hist_edges(lo: np.ndarray, hi: np.ndarray) -> np.ndarray:
    """Per-unit bin edges [u, N_BINS + 1], computed exactly as numpy.histogram does for range=(lo, hi)."""
    return np.linspace(np.asarray(lo, np.float64), np.asarray(hi, np.float64), N_BINS + 1, axis=-1)


def _bin_index(v: torch.Tensor, cols: torch.Tensor, lo: torch.Tensor, hi: torch.Tensor,
               edges: torch.Tensor) -> torch.Tensor:
    """numpy.histogram's rule for values in [lo, hi]: scaled index, then corrected against the edges.

    `edges` is [u, N_BINS + 1]; flat `take`s instead of 2-D indexing keep this as fast as plain scaling.
    """
    flat_edges = edges.reshape(-1)
    base = cols * (N_BINS + 1)
    low = lo.take(cols)
    idx = ((v - low) / (hi.take(cols) - low) * N_BINS).long().clamp_(0, N_BINS - 1)
    idx -= (v < flat_edges.take(base + idx)).long()
    idx += ((v >= flat_edges.take(base + idx + 1)) & (idx != N_BINS - 1)).long()
    return idx.clamp_(0, N_BINS - 1)


@torch.inference_mode()
def unit_statistics(dictionary: Dictionary, store: Store, site: str, top_n: int = 20,
                    windows_per_batch: int = 32, progress: bool = True) -> dict[str, Any]:
    """Streamed per-unit statistics and top/bottom windows (definitions in the module docstring)."""
    tokens, pos = store.column("tokens"), store.column("pos")
    specials = np.asarray(store.manifest.get("specials", []), dtype=np.int32)
    mask = training_mask(tokens, pos, specials)
    u = dictionary.n_units
    total = torch.zeros(u, dtype=torch.float64)
    vmax = torch.full((u,), -torch.inf)
    vmin = torch.full((u,), torch.inf)
    top_vals, top_win = torch.zeros((0, u)), torch.zeros((0, u), dtype=torch.long)
    bot_vals, bot_win = torch.zeros((0, u)), torch.zeros((0, u), dtype=torch.long)
    n_valid = int(mask.sum())
    for first, codes, valid in _encode_windows(dictionary, store, site, mask, windows_per_batch, progress,
                                               "explain 1/2"):
        flat = codes.reshape(-1, u)
        total += flat.sum(0).double()
        # extremes over included positions only: overwrite the few excluded rows in place (no full copy)
        excluded = (~valid).reshape(-1).nonzero()[:, 0]
        flat[excluded] = -torch.inf
        wmax = codes.amax(dim=1)  # [w, u]; -inf for a window with no included token
        flat[excluded] = torch.inf
        wmin = codes.amin(dim=1)
        vmax = torch.maximum(vmax, wmax.amax(0))
        vmin = torch.minimum(vmin, wmin.amin(0))
        ids = torch.arange(first, first + codes.shape[0])[:, None].expand_as(wmax)
        top_vals, top_win = _keep_best(top_vals, top_win, wmax, ids, top_n)
        if bool((wmin < 0).any()):  # only signed codes can have bottom windows
            bot_vals, bot_win = _keep_best(bot_vals, bot_win, -wmin, ids, top_n)
    vmax = torch.where(torch.isfinite(vmax), vmax, torch.zeros_like(vmax))
    vmin = torch.where(torch.isfinite(vmin), vmin, torch.zeros_like(vmin))
    lo = torch.minimum(vmin, torch.zeros_like(vmin)).double()
    hi = torch.maximum(vmax, torch.zeros_like(vmax)).double()
    edges = torch.from_numpy(hist_edges(lo.numpy(), hi.numpy()))
    hist = torch.zeros(u, N_BINS, dtype=torch.long)
    for _first, codes, _valid in _encode_windows(dictionary, store, site, mask, windows_per_batch, progress,
                                                 "explain 2/2"):
        flat = codes.reshape(-1, u)
        rows, cols = (flat != 0).nonzero(as_tuple=True)
        b = _bin_index(flat[rows, cols].double(), cols, lo, hi, edges)
        hist.view(-1).index_add_(0, cols * N_BINS + b, torch.ones_like(b))
    count = hist.sum(1)  # every firing code lands in exactly one bin
    return {"count": count, "n_valid": n_valid, "sum": total, "max": vmax, "min": vmin, "hist": hist,
            "hist_min": lo.float(), "hist_max": hi.float(), "top_vals": top_vals, "top_win": top_win,
            "bottom_vals": -bot_vals, "bottom_win": bot_win, "mask": mask, "tokens": tokens}


def quantiles_from_hist(hist: np.ndarray, edges: np.ndarray, q: float) -> np.ndarray:
    """Per unit: the centre of the first bin whose cumulative count reaches q × the unit's count (0 if none)."""
    c = hist.cumsum(axis=1)
    total = c[:, -1]
    b = np.minimum((c < q * total[:, None]).sum(axis=1), N_BINS - 1)
    rows = np.arange(len(hist))
    centre = (edges[rows, b] + edges[rows, b + 1]) / 2
    return np.where(total > 0, centre, 0.0)


def write_tables(out: str | Path, dictionary: Dictionary, store: Store, site: str, tokenizer: Any,
                 lens: dict[str, list] | None = None, top_n: int = 20, progress: bool = True) -> dict[str, Path]:
    """Write units.parquet and examples.parquet for every unit of `dictionary`, replacing both at once.

    `out` must be new, empty or a previous explanation directory: its contents are replaced whole.
    """
    if top_n < 1:
        raise UnitscopeError(f"the number of top examples per unit must be at least 1, not {top_n}")
    if site not in store.sites:
        raise UnitscopeError(f"the store has no site {site!r}; it holds {', '.join(store.sites)}")
    st = unit_statistics(dictionary, store, site, top_n=top_n, progress=progress)
    u = dictionary.n_units
    hist = st["hist"].numpy()
    count = st["count"].numpy()
    lo, hi = st["hist_min"].numpy(), st["hist_max"].numpy()
    edges = hist_edges(lo.astype(np.float64), hi.astype(np.float64))
    freq = count / max(1, st["n_valid"])
    mean = np.where(count > 0, st["sum"].numpy() / np.maximum(count, 1), 0.0)
    units = {
        "unit": np.arange(u, dtype=np.int32), "frequency": freq, "max_activation": st["max"].numpy(),
        "min_activation": st["min"].numpy(), "mean_activation": mean,
        **{f"q{int(q * 100)}": quantiles_from_hist(hist, edges, q) for q in QUANTILES},
        "hist_counts": [h.tolist() for h in hist],
        "hist_min": lo, "hist_max": hi,
    }
    lens = lens or {}
    for key in ("promoted_tokens", "promoted_logits", "suppressed_tokens", "suppressed_logits"):
        units[key] = lens.get(key, [None] * u)
    units.update({"label": [None] * u, "label_source": [None] * u, "score_detection": [None] * u,
                  "score_fuzzing": [None] * u})

    # examples: re-encode only the windows that are some unit's top or bottom window
    ctx = int(store.manifest["ctx_len"])
    tokens = st["tokens"]
    kinds = (("top", st["top_vals"].numpy(), st["top_win"].numpy(), 1.0),
             ("bottom", st["bottom_vals"].numpy(), st["bottom_win"].numpy(), -1.0))
    needed = np.unique(np.concatenate([win[sign * vals > 0] for _k, vals, win, sign in kinds]))
    rows: dict[str, list] = {k: [] for k in ("unit", "kind", "rank", "window", "max_activation",
                                               "token_ids", "tokens", "acts")}
    acts_by_window = _window_codes(dictionary, store, site, st["mask"], needed, ctx)
    id_to_str = _token_strings(tokenizer, tokens, needed, ctx)
    for unit in range(u):
        for kind, vals, win, sign in kinds:
            for rank in range(vals.shape[0]):
                if not sign * vals[rank, unit] > 0:
                    break
                w = int(win[rank, unit])
                ids = tokens[w * ctx:(w + 1) * ctx]
                rows["unit"].append(unit)
                rows["kind"].append(kind)
                rows["rank"].append(rank)
                rows["window"].append(w)
                rows["max_activation"].append(float(vals[rank, unit]))
                rows["token_ids"].append(ids.tolist())
                rows["tokens"].append([id_to_str[int(t)] for t in ids])
                rows["acts"].append(np.round(acts_by_window[w][:, unit], 4).tolist())
    schema = pa.schema([("unit", pa.int32()), ("kind", pa.string()), ("rank", pa.int32()), ("window", pa.int64()),
                        ("max_activation", pa.float32()), ("token_ids", pa.list_(pa.int32())),
                        ("tokens", pa.list_(pa.string())), ("acts", pa.list_(pa.float32()))])
    with replace_dir(out, set(TABLES)) as tmp:
        pq.write_table(pa.table(units), tmp / "units.parquet")
        pq.write_table(pa.table(rows, schema=schema), tmp / "examples.parquet")
    out = Path(out)
    return {"units": out / "units.parquet", "examples": out / "examples.parquet"}


@torch.inference_mode()
def _window_codes(dictionary: Dictionary, store: Store, site: str, mask: np.ndarray, windows: np.ndarray,
                  ctx: int) -> dict[int, np.ndarray]:
    offsets = np.concatenate([[0], np.cumsum([s["tokens"] for s in store.manifest["shards"]])])
    param = next(dictionary.parameters(), None)
    dtype = param.dtype if param is not None else torch.float32
    out = {}
    for w in windows.tolist():
        lo, hi = w * ctx, min((w + 1) * ctx, int(offsets[-1]))
        s = int(np.searchsorted(offsets, lo, side="right") - 1)
        acts = store.acts(site, s)[lo - offsets[s]:hi - offsets[s]]
        codes = dictionary.encode(acts.to(dtype)).float() * torch.from_numpy(mask[lo:hi])[:, None]
        out[w] = codes.numpy()
    return out


def _token_strings(tokenizer: Any, tokens: np.ndarray, windows: np.ndarray, ctx: int) -> dict[int, str]:
    ids = np.unique(np.concatenate([tokens[w * ctx:(w + 1) * ctx] for w in windows.tolist()] or [np.zeros(0, int)]))
    return {int(i): tokenizer.decode([int(i)]) for i in ids}
