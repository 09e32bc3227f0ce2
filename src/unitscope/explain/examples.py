"""Per-unit statistics and top-activating windows, streamed from a store to Parquet.

Two passes over the store, never holding the [tokens, units] code matrix: the first finds each unit's
frequency, maximum and mean and its top windows (by the window's maximum activation); the second fills a
histogram per unit (20 bins from 0 to the unit's max) from which quantiles are read.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ..corpus import training_mask
from ..dictionaries import Dictionary
from ..store import Store

N_BINS = 20
QUANTILES = (0.5, 0.9, 0.99)


@torch.inference_mode()
def _encode_windows(dictionary: Dictionary, store: Store, site: str, mask: np.ndarray, windows_per_batch: int,
                    progress: bool, desc: str):
    """Yield (first_window, codes[w, ctx, units], valid[w, ctx]) over the store, window-aligned."""
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


def unit_statistics(dictionary: Dictionary, store: Store, site: str, top_n: int = 20,
                    windows_per_batch: int = 32, progress: bool = True) -> dict[str, Any]:
    tokens, pos = store.column("tokens"), store.column("pos")
    specials = np.asarray(store.manifest.get("specials", []), dtype=np.int32)
    mask = training_mask(tokens, pos, specials)
    u = dictionary.n_units
    count = torch.zeros(u, dtype=torch.long)
    total = torch.zeros(u, dtype=torch.float64)
    vmax = torch.zeros(u)
    top_vals = torch.full((0, u), -1.0)
    top_win = torch.zeros((0, u), dtype=torch.long)
    n_valid = int(mask.sum())
    for first, codes, _valid in _encode_windows(dictionary, store, site, mask, windows_per_batch, progress,
                                                "explain 1/2"):
        flat = codes.reshape(-1, u)
        active = flat > 0
        count += active.sum(0)
        total += flat.sum(0).double()
        wmax = codes.amax(dim=1)  # [w, u]
        vmax = torch.maximum(vmax, wmax.amax(0))
        ids = torch.arange(first, first + codes.shape[0])[:, None].expand_as(wmax)
        cand_v = torch.cat([top_vals, wmax])
        cand_w = torch.cat([top_win, ids])
        k = min(top_n, cand_v.shape[0])
        top_vals, order = cand_v.topk(k, dim=0)
        top_win = cand_w.gather(0, order)
    hist = torch.zeros(u, N_BINS, dtype=torch.long)
    scale = torch.where(vmax > 0, N_BINS / vmax, torch.zeros_like(vmax))
    for _first, codes, _valid in _encode_windows(dictionary, store, site, mask, windows_per_batch, progress,
                                                 "explain 2/2"):
        flat = codes.reshape(-1, u)
        rows, cols = (flat > 0).nonzero(as_tuple=True)
        b = (flat[rows, cols] * scale[cols]).long().clamp_(max=N_BINS - 1)
        hist.view(-1).index_add_(0, cols * N_BINS + b, torch.ones_like(b))
    return {"count": count, "n_valid": n_valid, "sum": total, "max": vmax, "hist": hist,
            "top_vals": top_vals, "top_win": top_win, "mask": mask, "tokens": tokens}


def _quantile_from_hist(hist: np.ndarray, vmax: float, q: float) -> float:
    c = hist.cumsum()
    if c[-1] == 0:
        return 0.0
    b = int(np.searchsorted(c, q * c[-1]))
    return float((b + 0.5) * vmax / N_BINS)


def write_tables(out: str | Path, dictionary: Dictionary, store: Store, site: str, tokenizer: Any,
                 lens: dict[str, list] | None = None, top_n: int = 20, progress: bool = True) -> dict[str, Path]:
    """Write units.parquet and examples.parquet (DESIGN.md) for every unit of `dictionary`."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    st = unit_statistics(dictionary, store, site, top_n=top_n, progress=progress)
    u = dictionary.n_units
    hist = st["hist"].numpy()
    vmax = st["max"].numpy()
    count = st["count"].numpy()
    freq = count / max(1, st["n_valid"])
    mean = np.where(count > 0, st["sum"].numpy() / np.maximum(count, 1), 0.0)
    units = {
        "unit": np.arange(u, dtype=np.int32), "frequency": freq, "max_activation": vmax,
        "mean_activation": mean,
        **{f"q{int(q * 100)}": [_quantile_from_hist(hist[i], vmax[i], q) for i in range(u)] for q in QUANTILES},
        "hist_counts": [h.tolist() for h in hist],
        "hist_max": vmax,
    }
    lens = lens or {}
    for key in ("promoted_tokens", "promoted_logits", "suppressed_tokens", "suppressed_logits"):
        units[key] = lens.get(key, [None] * u)
    units.update({"label": [None] * u, "label_source": [None] * u, "score_detection": [None] * u,
                  "score_fuzzing": [None] * u})
    pq.write_table(pa.table(units), out / ".units.parquet.tmp")

    # examples: re-encode only the windows that are someone's top window
    ctx = int(store.manifest["ctx_len"])
    tokens = st["tokens"]
    top_vals, top_win = st["top_vals"].numpy(), st["top_win"].numpy()
    needed = np.unique(top_win[top_vals > 0])
    rows: dict[str, list] = {k: [] for k in ("unit", "kind", "rank", "window", "max_activation",
                                               "token_ids", "tokens", "acts")}
    acts_by_window = _window_codes(dictionary, store, site, st["mask"], needed, ctx)
    id_to_str = _token_strings(tokenizer, tokens, needed, ctx)
    for unit in range(u):
        for rank in range(top_vals.shape[0]):
            if top_vals[rank, unit] <= 0:
                break
            w = int(top_win[rank, unit])
            ids = tokens[w * ctx:(w + 1) * ctx]
            rows["unit"].append(unit)
            rows["kind"].append("top")
            rows["rank"].append(rank)
            rows["window"].append(w)
            rows["max_activation"].append(float(top_vals[rank, unit]))
            rows["token_ids"].append(ids.tolist())
            rows["tokens"].append([id_to_str[int(t)] for t in ids])
            rows["acts"].append(np.round(acts_by_window[w][:, unit], 4).tolist())
    schema = pa.schema([("unit", pa.int32()), ("kind", pa.string()), ("rank", pa.int32()), ("window", pa.int64()),
                        ("max_activation", pa.float32()), ("token_ids", pa.list_(pa.int32())),
                        ("tokens", pa.list_(pa.string())), ("acts", pa.list_(pa.float32()))])
    pq.write_table(pa.table(rows, schema=schema), out / ".examples.parquet.tmp")
    (out / ".units.parquet.tmp").replace(out / "units.parquet")
    (out / ".examples.parquet.tmp").replace(out / "examples.parquet")
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
