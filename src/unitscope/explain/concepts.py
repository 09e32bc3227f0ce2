"""Concept dictionaries: which tokens (and token contexts) a unit fires on, scored on held-out windows.

RecSAE's interpretation confidence, for every unit kind: a unit's concept dictionary is built from the
store's *training* windows (the first 1 - heldout_fraction of them) and scored on the *held-out* windows
that follow, in the same streaming pass as the other explanations (`examples.write_tables`).

- A unit fires at an included position when its code is non-zero (the definition of `examples`).
- Entries: a token t when the unit fired on it at least `min_count` times in the training windows and on at
  least `min_precision` of its occurrences there; a context (previous token p, token t) when t is not itself
  an entry and the same holds for the bigram (p, t). The previous token is the one before in the window
  (every included position has one: position 0 is excluded).
- Prediction: the unit fires at a held-out position whose token, or (previous token, token), is an entry.
  precision = correct predictions / predictions, recall = correct predictions / firings, f1 = 2 correct /
  (predictions + firings); null where the denominator is 0.
- `concepts.parquet`: unit, label (e.g. "tokens: ' the', ' a'; contexts: ' of'+' the'", entries by training
  firings, most first), source = "concept-dictionary", precision, recall, f1, n_heldout_firings,
  n_heldout_predicted, heldout_start_window. It is the units' default label (units.parquet `label`,
  `label_source`) when no LLM has labelled them.

Memory: firing counts are kept sparse, per (unit, token) and (unit, previous token, token) seen firing,
merged as they stream; if the distinct pairs outgrow `max_pairs`, those seen least are dropped (lossy
counting: such an entry could then be missed, never invented; `pruned` in the result says it happened).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import pyarrow as pa
import torch

SOURCE = "concept-dictionary"
LABEL_ENTRIES = 6
SCHEMA = pa.schema([("unit", pa.int32()), ("label", pa.string()), ("source", pa.string()),
                    ("precision", pa.float64()), ("recall", pa.float64()), ("f1", pa.float64()),
                    ("n_heldout_firings", pa.int64()), ("n_heldout_predicted", pa.int64()),
                    ("heldout_start_window", pa.int64())])


class _Counts:
    """Sparse int64 key -> count, merged from per-batch chunks; lossy beyond `max_pairs` distinct keys."""

    def __init__(self, max_pairs: int):
        self.chunks: list[tuple[np.ndarray, np.ndarray]] = []
        self.size, self.max_pairs, self.pruned = 0, max_pairs, False

    def add(self, keys: np.ndarray) -> None:
        if len(keys):
            k, c = np.unique(keys, return_counts=True)
            self.chunks.append((k, c.astype(np.int32)))
            self.size += len(k)
            if self.size > self.max_pairs:
                self._merge()

    def _merge(self, prune: bool = True) -> None:
        if len(self.chunks) > 1:
            keys = np.concatenate([k for k, _ in self.chunks])
            counts = np.concatenate([c for _, c in self.chunks])
            k, inv = np.unique(keys, return_inverse=True)
            self.chunks = [(k, np.bincount(inv, weights=counts).astype(np.int32))]
            del keys, counts, inv
        k, c = self.chunks[0] if self.chunks else (np.zeros(0, np.int64), np.zeros(0, np.int32))
        floor = 1
        while prune and len(k) > self.max_pairs // 2:  # drop the rarest until half the budget is free
            keep = c > floor
            k, c, floor = k[keep], c[keep], floor + 1
            self.pruned = True
        self.chunks, self.size = [(k, c)], len(k)

    def result(self) -> tuple[np.ndarray, np.ndarray]:
        self._merge(prune=False)
        return self.chunks[0] if self.chunks else (np.zeros(0, np.int64), np.zeros(0, np.int64))


def _ranges(sorted_keys: np.ndarray, lo: np.ndarray, hi: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """For each query i, the indices of sorted_keys in [lo_i, hi_i): (query index, key index), flattened."""
    a, b = np.searchsorted(sorted_keys, lo, "left"), np.searchsorted(sorted_keys, hi, "left")
    n = b - a
    total = int(n.sum())
    query = np.repeat(np.arange(len(lo)), n)
    idx = np.repeat(a - np.concatenate([[0], np.cumsum(n)[:-1]]), n) + np.arange(total)
    return query, idx


class ConceptCounter:
    """Streams batches of codes: counts firings on training windows, then scores the dictionary on the rest."""

    def __init__(self, unit_ids: torch.Tensor, tokens: np.ndarray, mask: np.ndarray, ctx: int, n_windows: int,
                 heldout_fraction: float = 0.2, min_count: int = 2, min_precision: float = 0.5,
                 max_pairs: int = 1 << 22):
        self.unit_ids = unit_ids.numpy().astype(np.int64)
        self.u = len(self.unit_ids)
        self.tokens, self.mask, self.ctx = tokens.astype(np.int64), mask, ctx
        self.v = int(tokens.max()) + 1 if len(tokens) else 1
        self.heldout = max(1, round(n_windows * heldout_fraction)) if n_windows >= 2 else 0
        self.train_windows = n_windows - self.heldout
        self.min_count, self.min_precision = min_count, min_precision
        self.fire_tok, self.fire_ctx = _Counts(max_pairs), _Counts(max_pairs)
        train = np.flatnonzero(mask[:self.train_windows * ctx])
        self.n_tok = np.bincount(self.tokens[train], minlength=self.v)
        self.bigram_keys, self.bigram_counts = np.unique(self._bigram(train), return_counts=True)
        self.entries: dict[str, np.ndarray] | None = None
        self.tp = np.zeros(self.u, np.int64)
        self.n_pred = np.zeros(self.u, np.int64)
        self.n_fired = np.zeros(self.u, np.int64)

    def _bigram(self, g: np.ndarray) -> np.ndarray:
        return self.tokens[g - 1] * self.v + self.tokens[g]

    def update(self, first: int, w: int, nonzero: tuple[torch.Tensor, torch.Tensor]) -> None:
        """The firings of windows first .. first + w - 1: nonzero = (rows, cols) of their non-zero codes in the
        [w * ctx, units] code matrix (0 at excluded positions)."""
        rows, cols = nonzero
        g = rows.numpy().astype(np.int64) + first * self.ctx
        cols = cols.numpy().astype(np.int64)
        split = max(0, min(w, self.train_windows - first)) * self.ctx + first * self.ctx
        train = g < split
        if train.any():
            gt, ct = g[train], cols[train]
            self.fire_tok.add(ct * self.v + self.tokens[gt])
            self.fire_ctx.add(ct * self.v * self.v + self._bigram(gt))
        if first + w > self.train_windows:
            if self.entries is None:
                self._build()
            self._score(g[~train], cols[~train], split, (first + w) * self.ctx)

    def _build(self) -> None:
        """Choose each unit's entries from the training counts."""
        k, c = self.fire_tok.result()
        col, tok = k // self.v, k % self.v
        is_tok = (c >= self.min_count) & (c >= self.min_precision * self.n_tok[tok])
        tok_keys = tok[is_tok] * self.u + col[is_tok]
        k2, c2 = self.fire_ctx.result()
        col2, big = k2 // (self.v * self.v), k2 % (self.v * self.v)
        bi = np.searchsorted(self.bigram_keys, big).clip(max=max(0, len(self.bigram_keys) - 1))
        n_big = np.where(self.bigram_keys[bi] == big, self.bigram_counts[bi], 0) if len(self.bigram_keys) else 0
        tok_of = big % self.v
        covered = np.isin(tok_of * self.u + col2, tok_keys)
        is_ctx = (c2 >= self.min_count) & (c2 >= self.min_precision * n_big) & ~covered
        order_t, order_c = np.argsort(tok_keys), np.argsort(big[is_ctx] * self.u + col2[is_ctx])
        self.entries = {
            "tok_keys": tok_keys[order_t], "ctx_keys": (big[is_ctx] * self.u + col2[is_ctx])[order_c],
            # for labels: every entry with its unit and training firings
            "tok_col": col[is_tok], "tok_id": tok[is_tok], "tok_n": c[is_tok],
            "ctx_col": col2[is_ctx], "ctx_big": big[is_ctx], "ctx_n": c2[is_ctx]}

    def _score(self, g_fired: np.ndarray, c_fired: np.ndarray, lo: int, hi: int) -> None:
        hi = min(hi, len(self.tokens))
        g = lo + np.flatnonzero(self.mask[lo:hi])
        e = self.entries
        q1, i1 = _ranges(e["tok_keys"], self.tokens[g] * self.u, (self.tokens[g] + 1) * self.u)
        big = self._bigram(g)
        q2, i2 = _ranges(e["ctx_keys"], big * self.u, (big + 1) * self.u)
        pred_g = np.concatenate([g[q1], g[q2]])
        pred_c = np.concatenate([e["tok_keys"][i1] % self.u, e["ctx_keys"][i2] % self.u])
        fired = np.sort(g_fired * self.u + c_fired)
        hit = np.isin(pred_g * self.u + pred_c, fired, assume_unique=False)
        self.n_pred += np.bincount(pred_c, minlength=self.u)
        self.tp += np.bincount(pred_c[hit], minlength=self.u)
        self.n_fired += np.bincount(c_fired, minlength=self.u)

    def finish(self, tokenizer: Any) -> pa.Table:
        """The concepts table, one row per unit (in the order of `unit_ids`)."""
        if self.entries is None:
            self._build()
        e = self.entries
        labels = self._labels(tokenizer, e)
        scored = self.heldout > 0

        def ratio(num: np.ndarray, den: np.ndarray) -> list[float | None]:
            return [float(a) / float(b) if b > 0 and scored else None for a, b in zip(num, den)]

        return pa.table({
            "unit": self.unit_ids.astype(np.int32), "label": labels, "source": [SOURCE] * self.u,
            "precision": ratio(self.tp, self.n_pred), "recall": ratio(self.tp, self.n_fired),
            "f1": ratio(2 * self.tp, self.n_pred + self.n_fired),
            "n_heldout_firings": self.n_fired, "n_heldout_predicted": self.n_pred,
            "heldout_start_window": np.full(self.u, self.train_windows, np.int64)}, schema=SCHEMA)

    def _labels(self, tokenizer: Any, e: dict[str, np.ndarray]) -> list[str | None]:
        strings: dict[int, str] = {}

        def s(t: int) -> str:
            if t not in strings:
                strings[t] = repr(tokenizer.decode([int(t)]))
            return strings[t]

        per_unit: dict[int, list[tuple[int, int, str]]] = {}
        for col, t, n in zip(e["tok_col"].tolist(), e["tok_id"].tolist(), e["tok_n"].tolist()):
            per_unit.setdefault(col, []).append((-n, 0, s(t)))
        for col, b, n in zip(e["ctx_col"].tolist(), e["ctx_big"].tolist(), e["ctx_n"].tolist()):
            per_unit.setdefault(col, []).append((-n, 1, s(b // self.v) + "+" + s(b % self.v)))
        labels: list[str | None] = []
        for col in range(self.u):
            items = sorted(per_unit.get(col, []))
            if not items:
                labels.append(None)
                continue
            shown = items[:LABEL_ENTRIES]
            parts = [f"{name}: " + ", ".join(x[2] for x in shown if x[1] == i)
                     for i, name in ((0, "tokens"), (1, "contexts")) if any(x[1] == i for x in shown)]
            more = f" (+{len(items) - len(shown)} more)" if len(items) > len(shown) else ""
            labels.append("; ".join(parts) + more)
        return labels
