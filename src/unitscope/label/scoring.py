"""Held-out windows for the scorers, and the metrics computed from the model's answers.

Per unit, the rows of `examples.parquet` (kinds `top`, `quantile`, `random`; `bottom` rows of signed units are
not used) split into: windows the explainer sees (every other `top` and every other `quantile` row, so both
halves span the same activation range), held-out firing windows (the rest) and held-out non-firing windows
(rows with no token above 0, i.e. `random`). A window appears on one side only. Truth always comes from the
recorded activations of the excerpt actually shown (a token fires when its activation is above 0), never
from the row's kind.

- detection: a held-out excerpt, firing or not; the model says whether it shows the label.
- fuzzing: a held-out firing excerpt, marked either at its real firing tokens (truth yes) or at as many
  randomly chosen non-firing tokens (truth no).

Metrics: balanced accuracy (mean of the true-positive and true-negative rates) and F1 of the yes class, an
answer that is neither yes nor no counting as wrong (a judge gets no credit for garbage); ROC AUC of P(yes)
(from the answer token's top log-probabilities) over the windows that have it, ties counting half. Each is NaN when a
class is missing.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


@dataclass
class Excerpt:
    window: int
    kind: str
    tokens: list[str]
    acts: np.ndarray  # per-token activation of this unit

    @property
    def fires(self) -> np.ndarray:
        return self.acts > 0


@dataclass
class Split:
    explain: list[Excerpt]
    positives: list[Excerpt]
    negatives: list[Excerpt]


def crop(ex: Excerpt, length: int, rng: np.random.Generator) -> Excerpt:
    """At most `length` tokens: around the peak (three quarters before it) for a firing window, else a random
    span; the whole window when it is short enough."""
    n = len(ex.tokens)
    if n <= length:
        return ex
    if ex.fires.any():
        start = int(np.clip(int(np.argmax(ex.acts)) - (3 * length) // 4, 0, n - length))
    else:
        start = int(rng.integers(0, n - length + 1))
    return Excerpt(ex.window, ex.kind, ex.tokens[start:start + length], ex.acts[start:start + length])


def split(rows: Sequence[Excerpt], n_explain: int, n_score: int, seed: int) -> Split:
    """Explainer / held-out sides for one unit's rows (see the module docstring); deterministic in `seed`."""
    rng = np.random.default_rng(seed)
    firing = [r for r in rows if r.kind != "bottom" and r.fires.any()]
    quiet = [r for r in rows if r.kind != "bottom" and not r.fires.any()]
    top = [r for r in firing if r.kind == "top"]
    other = [r for r in firing if r.kind != "top"]  # quantile rows (and any other firing kind)
    explain_pool = [top[0::2], other[0::2]]
    held = top[1::2] + other[1::2]
    explain: list[Excerpt] = []
    seen: set[int] = set()
    i = 0
    while len(explain) < n_explain and any(explain_pool):  # alternate top / quantile
        pool = explain_pool[i % 2] or explain_pool[(i + 1) % 2]
        r = pool.pop(0)
        if r.window not in seen:
            explain.append(r)
            seen.add(r.window)
        i += 1
    held = [r for r in held + explain_pool[0] + explain_pool[1] if r.window not in seen]
    positives = _distinct([held[i] for i in rng.permutation(len(held))], n_score)
    negatives = _distinct([quiet[i] for i in rng.permutation(len(quiet))], n_score, seen)
    return Split(explain, positives, negatives)


def _distinct(rows: list[Excerpt], n: int, exclude: set[int] | None = None) -> list[Excerpt]:
    out, seen = [], set(exclude or ())
    for r in rows:
        if r.window not in seen and len(out) < n:
            out.append(r)
            seen.add(r.window)
    return out


def fuzz_marks(ex: Excerpt, rng: np.random.Generator) -> np.ndarray | None:
    """As many randomly chosen non-firing tokens as the excerpt has firing ones (None if too few)."""
    k = int(ex.fires.sum())
    quiet = np.flatnonzero(~ex.fires)
    if k == 0 or len(quiet) < k:
        return None
    marks = np.zeros(len(ex.tokens), dtype=bool)
    marks[rng.choice(quiet, size=k, replace=False)] = True
    return marks


def _counted(truth: Sequence[bool], pred: Sequence[bool | None]) -> list[tuple[bool, bool]]:
    """(truth, prediction) pairs, an unreadable answer (None) counting as the wrong one."""
    return [(bool(t), (not t) if p is None else bool(p)) for t, p in zip(truth, pred)]


def balanced_accuracy(truth: Sequence[bool], pred: Sequence[bool | None]) -> float:
    pairs = _counted(truth, pred)
    pos = [p for t, p in pairs if t]
    neg = [p for t, p in pairs if not t]
    if not pos or not neg:
        return math.nan
    return 0.5 * (sum(pos) / len(pos) + sum(not p for p in neg) / len(neg))


def f1(truth: Sequence[bool], pred: Sequence[bool | None]) -> float:
    pairs = _counted(truth, pred)
    tp = sum(t and p for t, p in pairs)
    fp = sum((not t) and p for t, p in pairs)
    fn = sum(t and not p for t, p in pairs)
    if not any(t for t, _ in pairs):
        return math.nan
    return 2 * tp / (2 * tp + fp + fn)


def auc(truth: Sequence[bool], score: Sequence[float | None]) -> float:
    """ROC AUC by the rank-sum (Mann-Whitney) formula with average ranks for ties."""
    pairs = [(t, s) for t, s in zip(truth, score) if s is not None and not math.isnan(s)]
    n_pos = sum(t for t, _ in pairs)
    n_neg = len(pairs) - n_pos
    if not n_pos or not n_neg:
        return math.nan
    s = np.array([x for _, x in pairs], dtype=np.float64)
    order = np.argsort(s, kind="mergesort")
    ranks = np.empty(len(s))
    sorted_s = s[order]
    i = 0
    while i < len(s):  # average rank over each run of ties
        j = i
        while j + 1 < len(s) and sorted_s[j + 1] == sorted_s[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2 + 1
        i = j + 1
    pos_ranks = sum(r for r, (t, _) in zip(ranks, pairs) if t)
    return float((pos_ranks - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))
