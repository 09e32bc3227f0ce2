"""Explanation tables against a brute-force computation over the whole store (frequency, extremes, mean,
histogram, quantiles, top / bottom / quantile / random windows with per-token codes, logit lens through the
model's own modules), for non-negative (TopK) and signed (PCA, neurons) kinds; the one streaming pass is
cut into many small batches so that every merge (ranges doubling, samples re-binned, the capture buffer
pruned) happens; and the tables are only ever replaced whole, whatever moment a crash hits."""

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
from unitscope.explain import examples, logit_lens, write_tables
from unitscope.explain.examples import N_BINS, QUANTILES, TABLES, sample_key

SITE = "blocks.1.resid_post"
CTX = 16
TOP = 5
QN = 2  # quantile examples per bin
RN = 3  # random examples
SEED = 7
H, Q = 640, 80  # fine cells of the histogram (a side) and of the quantile bins, as documented


@pytest.fixture(scope="module")
def store(tmp_path_factory, llama_subject):
    root = tmp_path_factory.mktemp("ex")
    return record(llama_subject, Corpus("default"), [SITE], 1000, root / "s", ctx_len=CTX, batch_size=4,
                  shard_tokens=160, progress=False)


def _topk(seed: int = 0) -> TopKSAE:
    torch.manual_seed(seed)
    return TopKSAE(32, 24, k=3, metadata={"hook_name": SITE})


def _onehot() -> TopKSAE:
    """A TopK SAE whose encoder picks single residual coordinates (scaled by powers of two), so its codes are
    exact whatever the batch shape: the brute force then must match window for window, bit for bit."""
    d = TopKSAE(32, 24, k=3, metadata={"hook_name": SITE})
    with torch.no_grad():
        for p in d.parameters():
            p.zero_()
        for unit in range(24):
            d.W_enc[unit % 32 if unit < 16 else (unit * 7) % 32, unit] = 2.0 ** (unit % 3) * (-1) ** (unit // 16)
    return d


def _dictionary(kind: str, store):
    if kind == "topk":
        return _topk()
    if kind == "onehot":
        return _onehot()
    if kind == "pca":
        return fit_from_store(store, SITE, "pca", 8)
    return Neurons(32, metadata={"hook_name": SITE})  # raw residual coordinates: signed, uncentred, exact


EXACT = ("onehot", "neurons")  # encoders whose codes do not depend on the batch shape


@pytest.fixture(scope="module", params=["topk", "onehot", "pca", "neurons"])
def explained(request, tmp_path_factory, store, llama_subject):
    d = _dictionary(request.param, store)
    out = tmp_path_factory.mktemp(request.param) / "e"
    with pytest.MonkeyPatch.context() as m:  # a tiny capture buffer: it is pruned many times during the pass
        m.setattr(examples._Capture.__init__, "__defaults__", (64,))
        write_tables(out, d, store, SITE, llama_subject.tokenizer, lens=logit_lens(llama_subject, d), top_n=TOP,
                     quantile_n=QN, random_n=RN, seed=SEED, windows_per_batch=3, progress=False)
    return out, d, request.param


def _brute_codes(d, st) -> tuple[np.ndarray, np.ndarray]:
    """Every row of the store encoded densely (shard by shard), in float64, and the included positions."""
    with torch.no_grad():
        codes = torch.cat([d.encode(st.acts(SITE, i)).float() for i in range(st.n_shards)]).double().numpy()
    mask = training_mask(st.column("tokens"), st.column("pos"), np.asarray(st.manifest["specials"]))
    return codes, mask


def _exp2(x: float) -> int:
    """e with 2**(e-1) < x <= 2**e."""
    m, e = np.frexp(x)
    return int(e) - (m == 0.5)


def _brute_histogram(firing: np.ndarray) -> tuple[list[int], float, float]:
    """The documented histogram, from the firing codes alone: fine cells of R / 640 a side, R = 2**e the power
    of two at or above the largest magnitude; bins of the fewest cells that fit 20 of them, zero on an edge."""
    e = _exp2(np.abs(firing).max())
    r = np.clip(np.floor(firing * H / 2.0 ** e), -H, H - 1).astype(int)
    j = 1
    while max(-1, r.max() // j) - min(0, r.min() // j) + 1 > N_BINS:
        j += 1
    k_lo = min(0, r.min() // j)
    counts = np.bincount(r // j - k_lo, minlength=N_BINS)
    width = j * 2.0 ** e / H
    return counts.tolist(), k_lo * width, (k_lo + N_BINS) * width


def test_unit_statistics_match_brute_force(explained, store):
    out, d, _kind = explained
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
        signed_units += vals.min() < 0
        if not len(firing):
            assert units["hist_counts"][unit] == [0] * N_BINS
            continue
        counts, lo, hi = _brute_histogram(firing)
        assert units["hist_counts"][unit] == counts
        assert (units["hist_min"][unit], units["hist_max"][unit]) == pytest.approx((lo, hi), rel=1e-12)
        assert lo <= firing.min() and firing.max() < hi and lo <= 0  # the histogram covers every firing code
        assert sum(c > 0 for c in counts[-3:]) or firing.max() < 0  # at most two empty bins at the top
        delta = 2.0 ** _exp2(np.abs(firing).max()) / H
        for q in QUANTILES:
            # the exact quantile (smallest value whose empirical CDF reaches q), and the centre of its fine cell
            exact = np.quantile(firing, q, method="inverted_cdf")
            centre = (min(np.floor(exact / delta), H - 1) + 0.5) * delta
            assert units[f"q{int(q * 100)}"][unit] == pytest.approx(centre, rel=1e-9)
            assert abs(units[f"q{int(q * 100)}"][unit] - exact) <= delta / 2 * (1 + 1e-9)
    if d.architecture == "topk":
        assert signed_units == 0
    else:
        assert signed_units == d.n_units  # signed kinds really exercise the negative side


def _brute_examples(codes: np.ndarray, mask: np.ndarray, unit: int, n_windows: int) -> dict:
    """Every example row of one unit by the definitions in explain.examples, from the dense codes."""
    c = np.where(mask, codes[:, unit], np.nan)
    per = [c[w * CTX:(w + 1) * CTX] for w in range(n_windows)]
    wmax = np.array([np.nanmax(x, initial=-np.inf) for x in per])
    wmin = np.array([np.nanmin(x, initial=np.inf) for x in per])
    has = np.array([bool(np.isfinite(x).any()) for x in per])
    wins = np.arange(n_windows)
    out = {"top": [int(w) for w in sorted(wins[wmax > 0], key=lambda w: (-wmax[w], w))[:TOP]],
           "bottom": [int(w) for w in sorted(wins[wmin < 0], key=lambda w: (wmin[w], w))[:TOP]]}
    keys = sample_key(SEED, np.full(n_windows, unit), wins).numpy()
    quiet = wins[has & (wmax == 0) & (wmin == 0)]
    out["random"] = [int(w) for w in sorted(quiet, key=lambda w: keys[w])[:RN]]
    active = wins[wmax > 0]
    out["quantile"], out["edges"] = [], None
    if len(active):
        e = _exp2(wmax[active].max())
        cell = np.minimum(np.floor(wmax[active] * Q / 2.0 ** e), Q - 1).astype(int)
        j = cell.max() // 10 + 1
        out["edges"] = [b * j * 2.0 ** e / Q for b in range(11)]
        bins = np.minimum(cell // j, 9)
        for b in range(10):
            chosen = sorted(active[bins == b], key=lambda w: keys[w])[:QN]
            out["quantile"] += [(b, rank, int(w)) for rank, w in enumerate(chosen)]
    out["peaks"] = (wmax, wmin)
    return out


def test_examples_match_brute_force(explained, store, llama_subject):
    """Top, bottom, quantile and random windows of every unit, each row's per-token codes and tokens. Exact
    window for window where the encoder is exact; where a matrix product may round differently with the batch
    shape, the peaks are compared within float tolerance and the windows through them."""
    out, d, kind = explained
    rows = pq.read_table(out / "examples.parquet").to_pylist()
    units = pq.read_table(out / "units.parquet").to_pydict()
    codes, mask = _brute_codes(d, store)
    tokens = store.column("tokens")
    n_windows = -(-len(tokens) // CTX)  # the last window may be truncated
    seen = {k: 0 for k in ("top", "bottom", "quantile", "random")}
    order = [(r["unit"], ("top", "bottom", "quantile", "random").index(r["kind"]), r["quantile"] or 0, r["rank"])
             for r in rows]
    assert order == sorted(order)  # sorted by unit, kind, quantile bin, rank
    for unit in range(d.n_units):
        want = _brute_examples(codes, mask, unit, n_windows)
        wmax, wmin = want["peaks"]
        got = {k: [r for r in rows if r["unit"] == unit and r["kind"] == k] for k in seen}
        for k in seen:
            seen[k] += len(got[k])
        for k, peaks in (("top", wmax), ("bottom", wmin)):
            assert [r["rank"] for r in got[k]] == list(range(len(want[k])))
            assert np.allclose([r["max_activation"] for r in got[k]], peaks[want[k]], rtol=1e-5, atol=1e-6)
            if kind in EXACT:
                assert [r["window"] for r in got[k]] == want[k]
        quant = [(r["quantile"], r["rank"], r["window"]) for r in got["quantile"]]
        if kind in EXACT:
            assert quant == want["quantile"]
            assert [r["window"] for r in got["random"]] == want["random"]
            assert units["quantile_edges"][unit] == want["edges"]
        else:
            assert len(quant) == len(want["quantile"]) and len(got["random"]) == len(want["random"])
        for r in got["quantile"]:
            assert r["max_activation"] == pytest.approx(wmax[r["window"]], rel=1e-5)
            edges = units["quantile_edges"][unit]
            assert edges[r["quantile"]] * (1 - 1e-6) <= r["max_activation"] <= edges[r["quantile"] + 1] * (1 + 1e-6)
        for r in got["random"]:
            assert r["max_activation"] == 0 and wmax[r["window"]] == 0 == wmin[r["window"]]
        for r in got["top"] + got["bottom"] + got["quantile"] + got["random"]:
            w = int(r["window"])
            ids = tokens[w * CTX:(w + 1) * CTX]
            assert list(r["token_ids"]) == ids.tolist()
            assert r["tokens"] == [llama_subject.tokenizer.decode([int(i)]) for i in ids]
            want_acts = np.where(mask, codes[:, unit], 0.0)[w * CTX:(w + 1) * CTX]
            assert np.allclose(r["acts"], want_acts, atol=1e-3)
    assert seen["top"] and seen["quantile"]
    assert bool(seen["bottom"]) == (d.architecture != "topk")
    assert bool(seen["random"]) == (d.architecture == "topk")  # signed dense codes are never all zero


def test_logit_lens_matches_the_models_own_modules(explained, llama_subject):
    out, d, _kind = explained
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


def test_a_new_explanation_drops_the_effects_computed_from_the_old_windows(store, llama_subject, tmp_path):
    """`unitscope effects` writes effects.parquet beside the tables; explaining again replaces the folder (the
    effects were measured on the old top windows, so keeping them would show stale figures) instead of refusing."""
    d = _topk()
    out = tmp_path / "e"
    write_tables(out, d, store, SITE, llama_subject.tokenizer, progress=False)
    (out / "effects.parquet").write_bytes(b"stale")
    write_tables(out, d, store, SITE, llama_subject.tokenizer, progress=False)
    assert not (out / "effects.parquet").exists() and (out / "units.parquet").is_file()


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
        for owner, name in ((pq, "write_table"), (pq.ParquetWriter, "close"), (Path, "write_text"),
                            (Path, "replace"), (Path, "rename"),
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
    assert points >= len(TABLES) + 1  # every table written, then the swap


def test_a_subset_of_units_gives_the_same_rows_as_the_whole(explained, store, llama_subject, tmp_path):
    """`units` explains only those: the same statistics, examples, concepts and lens as the full run."""
    out, d, _kind = explained
    pick = [d.n_units - 1, 2, 5]
    sub = tmp_path / "sub"
    write_tables(sub, d, store, SITE, llama_subject.tokenizer, lens=logit_lens(llama_subject, d, units=pick),
                 top_n=TOP, quantile_n=QN, random_n=RN, seed=SEED, units=pick, windows_per_batch=2, progress=False)
    for table in TABLES:
        whole = [r for r in pq.read_table(out / table).to_pylist() if r["unit"] in pick]
        part = pq.read_table(sub / table).to_pylist()
        assert sorted({r["unit"] for r in part}) == sorted(pick) and len(part) == len(whole)
        if _kind in EXACT:  # exact codes: the very same rows
            assert part == whole, table


def test_unknown_unit_is_one_sentence_and_nothing_is_written(store, llama_subject, tmp_path, capsys):
    from unitscope.cli import main

    d = _topk()
    with pytest.raises(UnitscopeError, match=r"unit 24 does not exist: this topk dictionary has 24 units \(0 to 23\)"):
        write_tables(tmp_path / "a", d, store, SITE, llama_subject.tokenizer, units=[3, 24], progress=False)
    with pytest.raises(UnitscopeError, match="unit 99 does not exist"):
        logit_lens(llama_subject, d, units=[99])
    assert not (tmp_path / "a").exists()
    d.save(tmp_path / "dict")
    (tmp_path / "e").mkdir()
    (tmp_path / "e" / "units.parquet").write_bytes(b"old")
    argv = ["explain", "--dictionary", str(tmp_path / "dict"), "--store", str(store.root), "--out",
            str(tmp_path / "e"), "--units", "1", "40", "--quiet"]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.count("\n") == 0 and "unit 40 does not exist" in err
    assert (tmp_path / "e" / "units.parquet").read_bytes() == b"old"  # nothing lost


@pytest.mark.parametrize("kind", ["topk", "kmeans"])
def test_logit_lens_of_mlp_hidden_directions_goes_through_the_down_projection(llama_subject, kind):
    """Any kind at blocks.1.mlp_hidden: its directions reach the residual stream through the block's down
    projection, and the lens is that image read by the model's own final norm and LM head."""
    from unitscope.dictionaries.kmeans import KMeans

    site = "blocks.1.mlp_hidden"
    torch.manual_seed(0)
    d = TopKSAE(64, 12, k=2, metadata={"hook_name": site}) if kind == "topk" else KMeans(
        64, 12, metadata={"hook_name": site})
    if kind == "kmeans":
        with torch.no_grad():
            d.W_dec.copy_(torch.randn_like(d.W_dec))  # centroids in the MLP's hidden space
    lens = logit_lens(llama_subject, d)
    model, tok = llama_subject.model, llama_subject.tokenizer
    with torch.no_grad():
        resid = d.directions.detach().float() @ model.model.layers[1].mlp.down_proj.weight.t()
        logits = model.lm_head(model.model.norm(resid))
    for unit in range(d.n_units):
        vals, ids = logits[unit].topk(10)
        assert lens["promoted_tokens"][unit] == [tok.decode([int(i)]) for i in ids]
        assert np.allclose(lens["promoted_logits"][unit], vals.numpy(), atol=1e-3)
