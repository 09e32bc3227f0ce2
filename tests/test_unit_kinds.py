"""Every unit kind trains or fits on a real store from the default model and round-trips through its files."""

import json

import numpy as np
import pytest
import torch

from unitscope import load_dictionary, record
from unitscope.corpus import Corpus
from unitscope.dictionaries import fit
from unitscope.dictionaries.snmf import fit_snmf
from unitscope.dictionaries.train import TrainConfig, train

B = 3
SITES = [f"blocks.{B}.resid_post", f"blocks.{B}.mlp_in", f"blocks.{B}.mlp_out", f"blocks.{B}.mlp_hidden"]


@pytest.fixture(scope="module")
def store(tmp_path_factory, default_subject):
    return record(default_subject, Corpus("default"), SITES, 8192, tmp_path_factory.mktemp("kinds") / "store",
                  ctx_len=64, batch_size=16, shard_tokens=2048, progress=False)


@pytest.fixture(scope="module")
def rows(store):
    mask = fit._mask(store)
    return {s: torch.cat([store.acts(s, i) for i in range(store.n_shards)])[torch.from_numpy(mask)] for s in SITES}


def _fvu(x, recon):
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def _round_trip(d, path, x):
    d.save(path)
    loaded = load_dictionary(path)
    assert json.loads((path / "cfg.json").read_text())["architecture"] == loaded.architecture
    with torch.no_grad():
        codes = d.encode(x)
        assert torch.equal(loaded.encode(x), codes)
        assert torch.equal(loaded.decode(codes), d.decode(codes))
    return loaded


@pytest.mark.parametrize("arch", ["standard", "topk", "batchtopk", "jumprelu", "matryoshka_topk"])
def test_sae_kinds_learn_and_round_trip(arch, store, rows, tmp_path):
    cfg = TrainConfig(architecture=arch, n_units=1024, k=16, batch_size=512, train_tokens=512 * 60, seed=0)
    d = train(store, SITES[0], cfg, tmp_path / arch, progress=False)
    x = rows[SITES[0]][:2000]
    loaded = load_dictionary(tmp_path / arch)
    with torch.no_grad():
        codes, recon = loaded.reconstruct(x)
        assert _fvu(x, recon) < 0.5, arch
        l0 = float((codes > 0).sum(-1).float().mean())
        # brute force from the saved weights: pre-activations, then each kind's own rule
        pre = (x - loaded.b_dec) @ loaded.W_enc + loaded.b_enc
    logged = [r["l0"] for r in json.loads((tmp_path / arch / "train.json").read_text())["log"][-3:]]
    if arch in ("topk", "matryoshka_topk"):
        top = pre.topk(16, dim=1)
        assert torch.allclose(codes, torch.zeros_like(pre).scatter(1, top.indices, top.values.relu()), atol=1e-5)
        assert l0 > 0.9 * 16  # the top 16 are nearly always positive (ReLU rarely cuts one), not by construction
    elif arch == "batchtopk":
        assert loaded.architecture == "jumprelu" and loaded.metadata["trained_as"] == "batchtopk"
        # in training k*B latents fire per batch, plus any value tied with the (k*B)-th (all are kept; identical
        # rows, e.g. repeated contexts, tie): 16.02 per row here
        assert 16 <= logged[-1] < 16.5
        assert 0.6 * 16 < l0 < 1.6 * 16  # at inference the learned threshold keeps about k per token
    else:
        on = pre > (loaded.threshold if arch == "jumprelu" else 0)
        assert torch.equal(codes > 0, on)
        # the sparsity that inference gives is the one training reached (L0 logged over the last batches)
        assert 0.7 * min(logged) < l0 < 1.4 * max(logged), (l0, logged)
    if arch != "batchtopk":
        assert loaded.architecture == arch
        with torch.no_grad():
            assert torch.equal(loaded.encode(x), d.encode(x))


@pytest.mark.parametrize("arch", ["topk_transcoder", "topk_skip_transcoder", "transcoder", "skip_transcoder"])
def test_transcoders_reconstruct_mlp_out_from_mlp_in(arch, store, rows, tmp_path):
    cfg = TrainConfig(architecture=arch, n_units=1024, k=16, batch_size=512, train_tokens=512 * 160, seed=0)
    train(store, None, cfg, tmp_path / arch, progress=False)
    d = load_dictionary(tmp_path / arch)
    assert (d.input_site, d.output_site) == (SITES[1], SITES[2])
    with torch.no_grad():
        fvu = _fvu(rows[SITES[2]][:2000], d(rows[SITES[1]][:2000]))
    assert fvu < 0.65, (arch, fvu)  # predicting the mean scores 1.0


def test_pca_matches_numpy_svd(store, rows, tmp_path):
    d = fit.fit_from_store(store, SITES[0], "pca", 16)
    x = rows[SITES[0]].double().numpy()
    xc = x - x.mean(0)
    _, s, vt = np.linalg.svd(xc, full_matrices=False)
    comps = d.W_dec.double().numpy()
    for i in range(16):
        assert abs(abs(comps[i] @ vt[i]) - 1) < 1e-4, i
    assert np.allclose(d.explained_variance.numpy(), s[:16] ** 2 / (len(x) - 1), rtol=1e-4)
    _round_trip(d, tmp_path / "pca", rows[SITES[0]][:100])


def test_kmeans_units_are_centroids(store, rows, tmp_path):
    d = fit.fit_from_store(store, SITES[0], "kmeans", 32, max_rows=4000)
    x = rows[SITES[0]][:500]
    codes = d.encode(x)
    assert torch.equal(codes.sum(-1), torch.ones(500)) and set(codes.unique().tolist()) == {0.0, 1.0}
    nearest = torch.cdist(x, d.W_dec).argmin(1)
    assert torch.equal(d.decode(codes), d.W_dec[nearest])
    _round_trip(d, tmp_path / "km", x)


def test_snmf_follows_the_semi_nmf_update_rules(rows):
    acts = rows[SITES[3]][:3000]
    losses = []
    F, G = fit_snmf(acts, 24, iters=40, wta=None, init="random", patience=100,
                    callback=lambda it, loss: losses.append(loss))
    assert len(losses) == 40
    # never increases (up to float32 rounding: the fit keeps rows in float32)
    assert all(b <= a * (1 + 1e-6) for a, b in zip(losses, losses[1:])), losses
    assert (G.to_dense() >= 0).all() and losses[-1] < losses[0]


def test_snmf_fits_with_sparse_features_and_residual_directions(store, rows, default_subject, tmp_path):
    d = fit.fit_from_store(store, SITES[3], "snmf", 16, subject=default_subject, max_rows=3000)
    F = d.W_dec.t()
    assert ((F != 0).sum(0) <= int(round(0.01 * 1536)) + 1).all()  # winner-take-all keeps ~1% per feature
    down = default_subject.model.model.layers[B].mlp.down_proj.weight.detach()
    assert torch.allclose(d.directions, (down @ F).t(), atol=1e-4)
    x = rows[SITES[3]][:200]
    codes = d.encode(x)
    assert (codes >= 0).all()
    # the codes are non-negative least squares against the features: scipy's active-set NNLS agrees
    from scipy.optimize import nnls

    feats = d.W_dec.t().double().numpy()
    for row in range(0, 200, 25):
        target = x[row].double().numpy()
        ref, ref_res = nnls(feats, target)
        ours = codes[row].double().numpy()
        # the same minimum (the features are nearly collinear, so coefficients agree less tightly than residuals)
        assert np.linalg.norm(feats @ ours - target) <= ref_res * (1 + 1e-4) + 1e-6, row
        assert np.linalg.norm(ours - ref) <= 0.05 * np.linalg.norm(ref), row
        assert (ours[ref > 0.05 * ref.max()] > 0).all(), row
    assert _fvu(x, d.decode(codes)) < 1.0
    _round_trip(d, tmp_path / "snmf", x)


def test_neurons_at_mlp_hidden_write_through_the_down_projection(store, default_subject, tmp_path):
    d = fit.fit_from_store(store, SITES[3], "neurons", 1536, subject=default_subject)
    down = default_subject.model.model.layers[B].mlp.down_proj.weight.detach()
    assert torch.equal(d.directions, down.t())
    x = store.acts(SITES[3], 0)[:10]
    assert torch.equal(d(x), x)
    _round_trip(d, tmp_path / "neurons", x)


def test_diffmean_and_probe_separate_labelled_text(default_subject, tmp_path):
    code = ["def parse(path): return open(path).read()", "for i in range(10): print(i)",
            "import os, sys; sys.exit(main())", "class Node: pass", "x = [f(y) for y in items if y]",
            "with open(name) as f: data = json.load(f)"]
    food = ["Whisk the eggs with sugar until pale.", "Simmer the tomato sauce for an hour.",
            "Bake the bread at a high temperature.", "Season the soup with salt and pepper.",
            "Chop the onions and fry them in butter.", "Serve the cake with fresh cream."]
    path = tmp_path / "labels.jsonl"
    path.write_text("\n".join(json.dumps({"text": t, "label": lab}) for lab, ts in (("code", code), ("food", food))
                              for t in ts))
    site = "blocks.10.resid_post"
    feats = fit.text_features(default_subject, site, code + food)
    for arch in ("diffmean", "probe"):
        d = fit.fit_from_labels(default_subject, site, arch, path)
        assert d.metadata["concepts"] == ["code", "food"]
        with torch.no_grad():
            score = d.encode(feats)[:, 0]  # the "code" unit
        assert score[:6].min() > score[6:].max(), arch
        _round_trip(d, tmp_path / arch, feats)
