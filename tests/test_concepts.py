"""Concept dictionaries against planted units with known answers and a brute-force recount of the definition.

A hand-built store whose activations ARE token indicators: coordinate t is 1 exactly where the token is t,
one coordinate fires on a planted bigram, one on a token at even positions only (half its occurrences), one
never. Read through the `neurons` dictionary (codes = coordinates, exact), so every unit's firing positions
are known without any model."""

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from unitscope import Store
from unitscope.dictionaries.linear import Neurons
from unitscope.explain import write_tables

V, CTX, WINDOWS, HELDOUT = 10, 8, 60, 0.25
BIGRAM, HALF, NEVER = V, V + 1, V + 2  # the planted units beyond the token indicators
WIDTH = V + 3


class Tok:
    def decode(self, ids):
        return f"t{ids[0]}"


def _tokens() -> np.ndarray:
    rng = np.random.default_rng(3)
    t = rng.integers(0, V - 1, WINDOWS * CTX)  # token V - 1 never occurs
    after_one = np.flatnonzero(t[:-1] == 1) + 1
    t[after_one[rng.random(len(after_one)) < 0.7]] = 2  # 1 is often followed by 2
    return t


@pytest.fixture(scope="module")
def planted(tmp_path_factory):
    root = tmp_path_factory.mktemp("c")
    tokens = _tokens()
    pos = np.arange(len(tokens)) % CTX
    prev = np.concatenate([[-1], tokens[:-1]])
    acts = np.zeros((len(tokens), WIDTH), np.float32)
    acts[np.arange(len(tokens)), tokens] = 1.0
    acts[:, BIGRAM] = (prev == 1) & (tokens == 2) & (pos > 0)
    acts[:, HALF] = (tokens == 3) & (pos % 2 == 0)
    st = Store.create(root / "s", {"model": "m", "sites": {"s": {"width": WIDTH}}, "dtype": "float32",
                                   "ctx_len": CTX, "corpus": {"spec": "x", "field": "text", "seed": 0}})
    half = len(tokens) // 2  # two shards, so the pass crosses a shard boundary
    for lo, hi in ((0, half), (half, len(tokens))):
        st.append_shard(tokens[lo:hi], np.zeros(hi - lo), pos[lo:hi], {"s": torch.from_numpy(acts[lo:hi])},
                        windows=(hi - lo) // CTX)
    st = Store.open(root / "s")
    d = Neurons(WIDTH, metadata={"hook_name": "s"})
    out = root / "e"
    write_tables(out, d, st, "s", Tok(), heldout_fraction=HELDOUT, windows_per_batch=7, progress=False)
    return tokens, acts, pq.read_table(out / "concepts.parquet").to_pylist(), pq.read_table(
        out / "units.parquet").to_pylist()


def _brute(tokens: np.ndarray, acts: np.ndarray, unit: int) -> dict:
    """The documented rule, recounted position by position."""
    n_train = (WINDOWS - round(WINDOWS * HELDOUT)) * CTX
    included = np.arange(len(tokens)) % CTX > 0
    fires = (acts[:, unit] != 0) & included
    tok_n, tok_f, big_n, big_f = {}, {}, {}, {}
    for g in range(1, n_train):
        if not included[g]:
            continue
        t, b = int(tokens[g]), (int(tokens[g - 1]), int(tokens[g]))
        tok_n[t] = tok_n.get(t, 0) + 1
        big_n[b] = big_n.get(b, 0) + 1
        if fires[g]:
            tok_f[t] = tok_f.get(t, 0) + 1
            big_f[b] = big_f.get(b, 0) + 1
    toks = {t for t, f in tok_f.items() if f >= 2 and f >= 0.5 * tok_n[t]}
    ctxs = {b for b, f in big_f.items() if b[1] not in toks and f >= 2 and f >= 0.5 * big_n[b]}
    tp = pred = fired = 0
    for g in range(n_train, len(tokens)):
        if not included[g]:
            continue
        p = int(tokens[g]) in toks or (int(tokens[g - 1]), int(tokens[g])) in ctxs
        pred += p
        fired += bool(fires[g])
        tp += p and bool(fires[g])
    return {"toks": toks, "ctxs": ctxs, "tp": tp, "pred": pred, "fired": fired}


def test_planted_units_have_their_known_concepts(planted):
    tokens, _acts, concepts, units = planted
    rows = {r["unit"]: r for r in concepts}
    assert len(rows) == WIDTH and all(r["source"] == "concept-dictionary" for r in concepts)
    assert rows[0]["heldout_start_window"] == WINDOWS - round(WINDOWS * HELDOUT)
    for t in range(V - 1):  # a token indicator: exactly that token, perfect on held-out text
        assert rows[t]["label"] == f"tokens: 't{t}'"
        assert rows[t]["precision"] == 1.0 and rows[t]["recall"] == 1.0 and rows[t]["f1"] == 1.0
        held = tokens[rows[0]["heldout_start_window"] * CTX:]
        held_pos = np.arange(len(held)) % CTX > 0
        assert rows[t]["n_heldout_firings"] == int(((held == t) & held_pos).sum()) > 0
    assert rows[BIGRAM]["label"] == "contexts: 't1'+'t2'"  # 2 alone is not enough: its context is
    assert rows[BIGRAM]["precision"] == 1.0 and rows[BIGRAM]["recall"] == 1.0
    for unit in (V - 1, NEVER):  # never fires: no concept, nothing to score
        r = rows[unit]
        assert r["label"] is None and r["n_heldout_firings"] == 0 and r["n_heldout_predicted"] == 0
        assert r["precision"] is None and r["recall"] is None and r["f1"] is None
    # the concept is the units' default label
    for u in units:
        assert (u["label"], u["label_source"]) == (rows[u["unit"]]["label"], "concept-dictionary")


def test_scores_match_a_brute_force_recount(planted):
    tokens, acts, concepts, _units = planted
    for r in concepts:
        want = _brute(tokens, acts, r["unit"])
        assert r["n_heldout_firings"] == want["fired"] and r["n_heldout_predicted"] == want["pred"]
        assert r["precision"] == (pytest.approx(want["tp"] / want["pred"]) if want["pred"] else None)
        assert r["recall"] == (pytest.approx(want["tp"] / want["fired"]) if want["fired"] else None)
        den = want["pred"] + want["fired"]
        assert r["f1"] == (pytest.approx(2 * want["tp"] / den) if den else None)
        names = [f"'t{t}'" for t in want["toks"]] + [f"'t{a}'+'t{b}'" for a, b in want["ctxs"]]
        assert (r["label"] is None) == (not names)
        if len(names) <= 6:  # the label shows every entry
            assert all(name in r["label"] for name in names)
    half = next(r for r in concepts if r["unit"] == HALF)  # fires on half of its token's occurrences:
    assert half["recall"] < 1  # no token or context predicts it fully: an imperfect concept, scored as such


def test_counts_are_exact_within_budget_and_only_drop_rare_pairs_beyond_it():
    """The sparse counter against np.unique: exact while the distinct pairs fit; past the budget it drops
    only the rarest pairs, and never changes a kept count by more than the pairs it could have missed."""
    from unitscope.explain.concepts import _Counts

    rng = np.random.default_rng(0)
    chunks = [rng.zipf(1.5, 500) % 300 for _ in range(40)]
    k_all, c_all = np.unique(np.concatenate(chunks), return_counts=True)
    exact = _Counts(max_pairs=10_000)
    for ch in chunks:
        exact.add(ch)
    k, c = exact.result()
    assert k.tolist() == k_all.tolist() and c.tolist() == c_all.tolist() and not exact.pruned
    near = _Counts(max_pairs=len(k_all) + 50)  # more than half the budget in use, never over it: still exact
    near.add(np.concatenate(chunks))
    k1, c1 = near.result()
    assert k1.tolist() == k_all.tolist() and c1.tolist() == c_all.tolist() and not near.pruned
    lossy = _Counts(max_pairs=120)
    for ch in chunks:
        lossy.add(ch)
    k2, c2 = lossy.result()
    assert lossy.pruned and set(k2) <= set(k_all)
    truth = dict(zip(k_all.tolist(), c_all.tolist()))
    assert all(cnt <= truth[key] for key, cnt in zip(k2.tolist(), c2.tolist()))  # never invented
    top = k_all[np.argsort(-c_all)[:10]]
    assert set(top.tolist()) <= set(k2.tolist())  # the frequent pairs survive
