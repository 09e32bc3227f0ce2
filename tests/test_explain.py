"""Explanation tables against a brute-force computation over the whole store (frequency, extremes, mean,
histogram, quantiles, top and bottom windows with per-token codes, logit lens through the model's own
modules), for non-negative (TopK) and signed (PCA, neurons) kinds; and the pair of tables is only ever
replaced whole, whatever moment a crash hits."""

import shutil
from contextlib import contextmanager
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch

from unitscope import Corpus, atomic, record
from unitscope.corpus import training_mask
from unitscope.dictionaries.fit import fit_from_store
from unitscope.dictionaries.linear import Neurons
from unitscope.dictionaries.sae import TopKSAE
from unitscope.errors import UnitscopeError
from unitscope.explain import logit_lens, write_tables
from unitscope.explain.examples import N_BINS, QUANTILES, TABLES

SITE = "blocks.1.resid_post"
CTX = 16
TOP = 5


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_subject):
    root = tmp_path_factory.mktemp("ex")
    return record(llama_subject, Corpus("default"), [SITE], 1000, root / "s", ctx_len=CTX, batch_size=4,
                  shard_tokens=160, progress=False)


def _topk(seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    return TopKSAE(32, 24, k=3, metadata={"hook_name": SITE})


def _dictionary(kind: str, store):
    if kind == "topk":
        return _topk()
    if kind == "pca":
        return fit_from_store(store, SITE, "pca", 8)
    return Neurons(32, metadata={"hook_name": SITE})  # raw residual coordinates: signed and uncentred


@pytest.fixture(scope="module", params=["topk", "pca", "neurons"])
def explained(request, tmp_path_factory, store, llama_subject):
    d = _dictionary(request.param, store)
    out = tmp_path_factory.mktemp(request.param) / "e"
    write_tables(out, d, store, SITE, llama_subject.tokenizer, lens=logit_lens(llama_subject, d), top_n=TOP,
                 progress=False)
    return out, d


def _brute_codes(d, st) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the store encoded densely (shard by shard), in float64, and the included positions."""
    with torch.no_grad():
        codes = torch.cat([d.encode(st.acts(SITE, i)).float() for i in range(st.n_shards)]).double().numpy()
    mask = training_mask(st.column("tokens"), st.column("pos"), np.asarray(st.manifest["specials"]))
    return codes, mask


def test_unit_statistics_match_brute_force(explained, store):
    out, d = explained
    units = pq.read_table(out / "units.parquet").to_pydict()
    codes, mask = _brute_codes(d, store)
    signed_units = 0
    for unit in range(d.n_units):
        vals = codes[mask, unit]
        firing = vals[vals != 0]
        assert units["frequency"][unit] == pytest.approx(len(firing) / mask.sum(), abs=1e-12)
        assert units["max_activation"][unit] == pytest.approx(vals.max(), rel=1e-5, abs=1e-6)
        assert units["min_activation"][unit] == pytest.approx(vals.min(), rel=1e-5, abs=1e-6)
        mean = firing.mean() if len(firing) else 0.0
        assert units["mean_activation"][unit] == pytest.approx(mean, rel=1e-5, abs=1e-6)
        lo, hi = min(0.0, vals.min()), max(0.0, vals.max())
        assert (units["hist_min"][unit], units["hist_max"][unit]) == pytest.approx((lo, hi), rel=1e-6, abs=1e-7)
        signed_units += vals.min() < 0
        if not len(firing):
            assert units["hist_counts"][unit] == [0] * N_BINS
            continue
        counts, edges = np.histogram(firing, bins=N_BINS, range=(lo, hi))
        assert units["hist_counts"][unit] == counts.tolist()
        for q in QUANTILES:
            # the exact quantile (smallest value whose empirical CDF reaches q) lies in the reported bin
            exact = np.quantile(firing, q, method="inverted_cdf")
            b = min(int(np.searchsorted(edges, exact, side="right")) - 1, N_BINS - 1)
            assert units[f"q{int(q * 100)}"][unit] == pytest.approx((edges[b] + edges[b + 1]) / 2, rel=1e-6)
            assert abs(units[f"q{int(q * 100)}"][unit] - exact) <= (hi - lo) / N_BINS / 2 * (1 + 1e-6)
    if d.architecture == "topk":
        assert signed_units == 0
    else:
        assert signed_units == d.n_units  # signed kinds really exercise the negative side


def test_examples_match_brute_force(explained, store, llama_subject):
    out, d = explained
    examples = pq.read_table(out / "examples.parquet").to_pylist()
    codes, mask = _brute_codes(d, store)
    tokens = store.column("tokens")
    n_windows = -(-len(tokens) // CTX)  # the last window may be truncated
    seen_bottom = 0
    for unit in range(d.n_units):
        c = np.where(mask, codes[:, unit], np.nan)
        wmax = np.array([np.nanmax(c[w * CTX:(w + 1) * CTX], initial=-np.inf) for w in range(n_windows)])
        wmin = np.array([np.nanmin(c[w * CTX:(w + 1) * CTX], initial=np.inf) for w in range(n_windows)])
        for kind, peaks, want in (("top", wmax, -np.sort(-wmax[wmax > 0])[:TOP]),
                                  ("bottom", wmin, np.sort(wmin[wmin < 0])[:TOP])):
            ex = sorted((e for e in examples if e["unit"] == unit and e["kind"] == kind), key=lambda e: e["rank"])
            assert [e["rank"] for e in ex] == list(range(len(want)))
            assert np.allclose([e["max_activation"] for e in ex], want, rtol=1e-5, atol=1e-6)
            seen_bottom += kind == "bottom" and len(ex)
            for e in ex:
                w = int(e["window"])
                assert peaks[w] == pytest.approx(e["max_activation"], rel=1e-5, abs=1e-6)  # the window named
                ids = tokens[w * CTX:(w + 1) * CTX]
                assert list(e["token_ids"]) == ids.tolist()
                assert e["tokens"] == [llama_subject.tokenizer.decode([int(i)]) for i in ids]
                want_acts = np.where(mask, codes[:, unit], 0.0)[w * CTX:(w + 1) * CTX]
                assert np.allclose(e["acts"], want_acts, atol=1e-3)
    assert bool(seen_bottom) == (d.architecture != "topk")


def test_logit_lens_matches_the_models_own_modules(explained, llama_subject):
    out, d = explained
    units = pq.read_table(out / "units.parquet").to_pydict()
    model, tok = llama_subject.model, llama_subject.tokenizer
    with torch.no_grad():  # the HF modules themselves: final RMSNorm, then the LM head
        logits = model.lm_head(model.model.norm(d.directions.detach().float()))
    for unit in range(d.n_units):
        for key, sign in (("promoted", 1.0), ("suppressed", -1.0)):
            vals, ids = (sign * logits[unit]).topk(10)
            assert units[f"{key}_tokens"][unit] == [tok.decode([int(i)]) for i in ids]
            assert np.allclose(units[f"{key}_logits"][unit], (sign * vals).numpy(), atol=1e-3)


def test_bad_arguments_are_one_sentence(store, llama_subject, tmp_path):
    d = _topk()
    with pytest.raises(UnitscopeError, match="no site"):
        write_tables(tmp_path / "a", d, store, "blocks.0.resid_post", llama_subject.tokenizer, progress=False)
    with pytest.raises(UnitscopeError, match="at least 1"):
        write_tables(tmp_path / "b", d, store, SITE, llama_subject.tokenizer, top_n=0, progress=False)
    (tmp_path / "c").mkdir()
    (tmp_path / "c" / "notes.txt").write_text("mine")
    with pytest.raises(UnitscopeError, match="other files"):  # the whole directory is replaced: refuse
        write_tables(tmp_path / "c", d, store, SITE, llama_subject.tokenizer, progress=False)
    assert (tmp_path / "c" / "notes.txt").read_text() == "mine"


class Crash(BaseException):
    """A simulated kill: not an Exception, so nothing on the way catches it as an error."""


@contextmanager
def crash_after(monkeypatch, n: int):
    """Raise Crash right after the n-th file-system step (a file written, a rename, a directory swap)."""
    calls = [0]

    def wrap(fn):
        def inner(*args, **kwargs):
            result = fn(*args, **kwargs)
            calls[0] += 1
            if calls[0] == n:
                raise Crash
            return result
        return inner

    with monkeypatch.context() as m:
        for owner, name in ((pq, "write_table"), (Path, "write_text"), (Path, "replace"), (Path, "rename"),
                            (atomic.os, "replace"), (atomic.os, "rename"), (atomic, "_exchange")):
            m.setattr(owner, name, wrap(getattr(owner, name)))
        yield calls


def _snapshot(path: Path) -> dict[str, bytes]:
    return {str(p.relative_to(path)): p.read_bytes() for p in sorted(path.rglob("*")) if p.is_file()}


def check_crashes(monkeypatch, tmp_path: Path, write_old, write_new, exchange: bool) -> int:
    """Crash `write_new` after each of its file-system steps in turn, over a complete old copy; after each
    crash the target holds exactly the old copy or exactly the new one, and a rerun completes. Returns
    the number of crash points tried."""
    ref_old, ref_new = tmp_path / "ref-old", tmp_path / "ref-new"
    write_old(ref_old)
    write_new(ref_new)
    old, new = _snapshot(ref_old), _snapshot(ref_new)
    assert old != new and old and new
    work = tmp_path / "work"
    for n in range(1, 500):
        shutil.rmtree(work, ignore_errors=True)
        work.mkdir()
        shutil.copytree(ref_old, work / "out")
        with monkeypatch.context() as m:
            if not exchange:
                m.setattr(atomic, "_exchange", lambda a, b: False)  # the two-rename fallback
            try:
                with crash_after(monkeypatch, n):
                    write_new(work / "out")
            except Crash:
                pass
            else:
                assert _snapshot(work / "out") == new
                return n - 1
        atomic.recover(work / "out")  # what every later reader and writer does first
        state = _snapshot(work / "out")
        whole = state == old or state == new
        assert whole, f"crash after step {n} left a mixed copy: {sorted(state)}"
        write_new(work / "out")
        assert _snapshot(work / "out") == new
        assert sorted(p.name for p in work.iterdir()) == ["out"]  # no temporary left behind
    raise AssertionError("the write never completed")


@pytest.mark.parametrize("exchange", [True, False], ids=["exchange", "two-renames"])
def test_tables_are_replaced_whole_at_any_crash(store, llama_subject, tmp_path, monkeypatch, exchange):
    tok = llama_subject.tokenizer
    old_d, new_d = _topk(0), _topk(1)  # both tables differ between the old and the new copy
    points = check_crashes(
        monkeypatch, tmp_path,
        lambda out: write_tables(out, old_d, store, SITE, tok, top_n=TOP, progress=False),
        lambda out: write_tables(out, new_d, store, SITE, tok, top_n=2, progress=False), exchange)
    assert points >= len(TABLES) + 1  # both files written, then the swap
