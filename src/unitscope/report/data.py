"""What the browser shows about one dictionary, read from the run's tables and made compact.

Per unit: statistics, histogram, logit-lens tokens, example snippets (token ids into a per-shard string
table, codes kept only where non-zero, 3 significant digits), labels from `concepts.parquet` and
`labels/ID/labels.parquet`, intervention effects from `effects.parquet` when present, nearest units by
decoder cosine (computed here in row blocks) and co-firing units. Co-firing is what the explanation stores
allows honestly: units whose stored example windows (top and quantile) overlap this unit's, counted per
shared window -- a lower bound on co-activation, not a correlation over the corpus.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq
import torch

from ..atomic import recover

SNIPPET = 16  # tokens kept either side of an example's peak
NEAREST = 8  # nearest units by decoder cosine, and co-firing units, per unit
SEARCH_TOKENS = 4  # peak tokens of the top examples kept in the unit list for search
KIND_CODE = {"top": 0, "bottom": 1, "quantile": 2, "random": 3}


def sig(x: Any, digits: int = 4) -> float | None:
    """A float rounded to `digits` significant digits (short JSON); None for missing or non-finite values."""
    if x is None:
        return None
    x = float(x)
    if not math.isfinite(x):
        return None
    return 0.0 if x == 0 else float(f"{x:.{digits}g}")


def _col(table: pa.Table, name: str, default: Any = None) -> list:
    return table.column(name).to_pylist() if name in table.column_names else [default] * table.num_rows


def read_labels(labels_path: Path | None) -> dict[int, dict[str, Any]]:
    """LLM labels of `unitscope label` (units labelled without error) keyed by unit."""
    if labels_path is None or not labels_path.is_file():
        return {}
    t = pq.read_table(labels_path)
    out = {}
    for r in t.to_pylist():
        if r.get("error") or not r.get("label"):
            continue
        out[int(r["unit"])] = {"label": r["label"], "source": r.get("source") or "llm",
                               "model": r.get("model"), "detection": sig(r.get("detection_balanced_accuracy")),
                               "fuzzing": sig(r.get("fuzzing_balanced_accuracy"))}
    return out


EFFECT_SCALARS = ("kl_ablate", "kl_clamp", "dlogp_next_ablate", "dlogp_next_clamp", "clamp_value", "n_windows",
                  "n_positions")


def read_effects(path: Path) -> tuple[dict[int, dict[str, Any]], str | None]:
    """effects.parquet (`unitscope effects`) keyed by unit: its KL and next-token figures, and the tokens the unit
    boosts and suppresses as [token, mean dlogp] pairs. Returns also the column the list sorts by as "effect"."""
    if not path.is_file():
        return {}, None
    t = pq.read_table(path)
    if "unit" not in t.column_names:
        return {}, None
    out: dict[int, dict[str, Any]] = {}
    for r in t.to_pylist():
        row: dict[str, Any] = {c: sig(r[c]) if isinstance(r[c], float) else r[c] for c in EFFECT_SCALARS if c in r}
        for key in ("boosted", "suppressed"):
            toks, vals = r.get(f"{key}_tokens") or [], r.get(f"{key}_dlogp") or []
            row[key] = [[tok, sig(v, 3)] for tok, v in zip(toks, vals)]
        out.setdefault(int(r["unit"]), row)  # one row per unit (the first, if several)
    return out, "kl_ablate" if "kl_ablate" in t.column_names else None


def nearest_by_cosine(directions: torch.Tensor, units: np.ndarray, k: int = NEAREST,
                      block: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """For each of `units` the k other units with the largest decoder cosine, in row blocks (never n x n)."""
    d = directions.detach().float()
    d = d / d.norm(dim=1, keepdim=True).clamp_min(1e-12)
    n = d.shape[0]
    k = min(k, n - 1)
    idx = np.zeros((len(units), max(k, 0)), dtype=np.int64)
    val = np.zeros((len(units), max(k, 0)), dtype=np.float32)
    if k <= 0:
        return idx, val
    rows = torch.as_tensor(units, dtype=torch.long)
    for s in range(0, len(rows), block):
        r = rows[s:s + block]
        sims = d[r] @ d.T
        sims[torch.arange(len(r)), r] = -float("inf")  # not itself
        v, i = sims.topk(k, dim=1)
        idx[s:s + block], val[s:s + block] = i.numpy(), v.numpy()
    return idx, val


def cofiring(examples: pa.Table, k: int = NEAREST) -> dict[int, list[list[int]]]:
    """Units sharing stored top/quantile example windows with each unit: [[unit, shared windows], ...]."""
    t = examples.select(["unit", "kind", "window"])
    t = t.filter(pc.is_in(t.column("kind"), pa.array(["top", "quantile"])))
    if t.num_rows == 0:
        return {}
    units = t.column("unit").to_numpy().astype(np.int64)
    windows = t.column("window").to_numpy().astype(np.int64)
    pairs = np.unique(np.stack([windows, units], 1), axis=0)  # each (window, unit) once
    order = np.argsort(pairs[:, 0], kind="stable")
    pairs = pairs[order]
    bounds = np.flatnonzero(np.diff(pairs[:, 0])) + 1
    counts: dict[int, dict[int, int]] = {}
    for group in np.split(pairs[:, 1], bounds):
        if len(group) < 2 or len(group) > 256:  # a window shared by hundreds of units says little about any pair
            continue
        for a in group:
            ca = counts.setdefault(int(a), {})
            for b in group:
                if a != b:
                    ca[int(b)] = ca.get(int(b), 0) + 1
    return {u: [[b, n] for b, n in sorted(c.items(), key=lambda x: (-x[1], x[0]))[:k]] for u, c in counts.items()}


def _snippet(ex: dict[str, Any]) -> tuple[int, int]:
    acts = ex["acts"] or [0.0]
    a = np.asarray(acts, dtype=np.float32)
    peak = int(a.argmin() if ex["kind"] == "bottom" else a.argmax())
    return max(0, peak - SNIPPET), min(len(acts), peak + SNIPPET + 1)


class ShardBuilder:
    """Collects a shard's units with token strings interned into one table."""

    def __init__(self) -> None:
        self.strings: list[str] = []
        self.index: dict[str, int] = {}
        self.units: list[dict[str, Any]] = []

    def intern(self, s: str) -> int:
        i = self.index.get(s)
        if i is None:
            i = self.index[s] = len(self.strings)
            self.strings.append(s)
        return i

    def example(self, ex: dict[str, Any]) -> list[Any]:
        """[kind, rank, quantile or -1, window, peak value, first position, [token refs], [pos, code, ...]]."""
        lo, hi = _snippet(ex)
        toks = [self.intern(t) for t in ex["tokens"][lo:hi]]
        nz: list[Any] = []
        for p, v in enumerate(ex["acts"][lo:hi]):
            if v:
                nz += [p, sig(v, 3)]
        q = ex.get("quantile")
        return [KIND_CODE.get(ex["kind"], 0), int(ex["rank"]), -1 if q is None else int(q), int(ex["window"]),
                sig(ex["max_activation"], 4), lo, toks, nz]

    def payload(self) -> dict[str, Any]:
        return {"strings": self.strings, "units": self.units}


def unit_record(u: dict[str, Any], exs: list[dict[str, Any]], shard: ShardBuilder, extra: dict[str, Any]) -> dict:
    """One unit's page data."""
    def pairs(key: str) -> list:
        return [[t, sig(v, 3)] for t, v in zip(u.get(f"{key}_tokens") or [], u.get(f"{key}_logits") or [])]

    rec = {"u": int(u["unit"]), "freq": sig(u["frequency"]), "max": sig(u["max_activation"]),
           "min": sig(u.get("min_activation")), "mean": sig(u.get("mean_activation")),
           "q": [sig(u.get(c)) for c in ("q50", "q90", "q99")],
           "hist": [int(c) for c in (u.get("hist_counts") or [])], "hmin": sig(u.get("hist_min")),
           "hmax": sig(u.get("hist_max")), "edges": [sig(e) for e in (u.get("quantile_edges") or [])],
           "promoted": pairs("promoted"), "suppressed": pairs("suppressed"),
           "ex": [shard.example(e) for e in exs]}
    rec.update({k: v for k, v in extra.items() if v})
    return rec


def read_units(explain_dir: Path) -> pa.Table:
    return pq.read_table(recover(explain_dir) / "units.parquet")


def read_concepts(explain_dir: Path) -> dict[int, dict[str, Any]]:
    """Concept labels with their held-out scores (precision, recall, F1), keyed by unit."""
    path = explain_dir / "concepts.parquet"
    if not path.is_file():
        return {}
    t = pq.read_table(path)
    out = {}
    for r in t.to_pylist():
        if r.get("label"):
            out[int(r["unit"])] = {"label": r["label"], "source": r.get("source") or "concepts",
                                   "precision": sig(r.get("precision")), "recall": sig(r.get("recall")),
                                   "f1": sig(r.get("f1"))}
    return out


def read_dissection(path: Path | None, top: int = 3) -> dict[int, list[dict[str, Any]]]:
    """Network-dissection concepts (`dissection.parquet` of `unitscope dissect`): each unit's best `top` by IoU."""
    if path is None or not path.is_file():
        return {}
    out: dict[int, list[dict[str, Any]]] = {}
    for r in pq.read_table(path, columns=["unit", "concept", "iou", "rank", "detector"]).to_pylist():
        if r["rank"] is not None and r["rank"] <= top:
            out.setdefault(int(r["unit"]), []).append({"label": r["concept"], "source": "dissection",
                                                       "iou": sig(r["iou"], 3), "rank": r["rank"],
                                                       "detector": bool(r["detector"])})
    for v in out.values():
        v.sort(key=lambda x: x["rank"])
    return out

