"""Geometry of dictionaries against independent truth: planted angles, brute-force loops, known dimensions."""

import math

import numpy as np
import pytest
import torch

from unitscope import Corpus, UnitscopeError
from unitscope.dictionaries.linear import Neurons
from unitscope.dictionaries.sae import TopKSAE
from unitscope.evaluate import evaluate_fidelity
from unitscope.evaluate.geometry import active_coherence, geometry, pairwise, two_nn


def _orthonormal(n: int, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    return q.float()


def _sae(directions: torch.Tensor, k: int, seed: int = 0) -> TopKSAE:
    """A TopK SAE whose decoder rows are `directions` and whose encoder is a random (untrained) map."""
    torch.manual_seed(seed)
    n, d = directions.shape
    sae = TopKSAE(d, n, k=k, metadata={"hook_name": "blocks.0.resid_post"})
    with torch.no_grad():
        sae.W_dec.copy_(directions)
    return sae


def _brute_cos(dirs: np.ndarray, s: np.ndarray | None = None) -> np.ndarray:
    """|cos| of every pair of rows under the inner product uᵀSv (S = I when None), by plain loops."""
    n = len(dirs)
    s = np.eye(dirs.shape[1]) if s is None else s
    out = np.zeros((n, n))
    for i in range(n):
        for j in range(n):
            u, v = dirs[i], dirs[j]
            out[i, j] = abs(u @ s @ v) / math.sqrt((u @ s @ u) * (v @ s @ v))
    return out


def _brute_s(z: np.ndarray, ridge: float) -> np.ndarray:
    sigma = z.T @ z / len(z)
    return np.linalg.inv(sigma + ridge * np.trace(sigma) / len(sigma) * np.eye(len(sigma)))


def test_orthonormal_basis_has_zero_coherence_and_a_planted_pair_its_cosine():
    q = _orthonormal(16)
    assert pairwise(q)["coherence"] == pytest.approx(0.0, abs=1e-6)
    theta = math.radians(50.5)
    planted = q.clone()
    planted[1] = math.cos(theta) * q[0] + math.sin(theta) * q[1]
    r = pairwise(planted, bins=180)
    assert r["coherence"] == pytest.approx(math.cos(theta), abs=1e-6)
    counts = r["counts"]
    assert counts[50] == 1 and counts[89] + counts[90] == 16 * 15 // 2 - 1  # every other pair is orthogonal
    # the same directions, negated and rescaled, as a dictionary: coherence is of |cos| and of unit directions
    scaled = planted * torch.linspace(0.5, 3, 16)[:, None]
    scaled[3] *= -1
    x = torch.randn(200, 16)
    g = geometry(_sae(scaled, k=2), x)
    assert g["euclidean"]["mutual_coherence"] == pytest.approx(math.cos(theta), abs=1e-6)


def test_pairwise_streaming_matches_brute_force_in_small_chunks():
    g = torch.Generator().manual_seed(1)
    w = torch.nn.functional.normalize(torch.randn(37, 6, generator=g), dim=1)
    r = pairwise(w, bins=36, top_pairs=10, per_row=4, chunk=5)
    c = (w.double() @ w.double().T).numpy()
    iu = np.triu_indices(37, 1)
    assert r["coherence"] == pytest.approx(np.abs(c[iu]).max(), abs=1e-6)
    angles = np.degrees(np.arccos(np.clip(c[iu], -1, 1)))
    assert r["counts"] == np.histogram(angles, bins=36, range=(0, 180))[0].tolist()
    top = len(r["top_values"])  # an exact prefix of all pairs by |cos|, at most 10 long
    assert 1 <= top <= 10
    np.testing.assert_allclose(r["top_values"].numpy(), np.sort(np.abs(c[iu]))[::-1][:top], atol=1e-6)
    assert [abs(c[i, j]) for i, j in zip(r["top_i"].tolist(), r["top_j"].tolist())] == pytest.approx(
        r["top_values"].tolist(), abs=1e-6)


def test_whitened_coherence_equals_a_brute_force_computation():
    g = torch.Generator().manual_seed(2)
    mix = torch.randn(8, 8, generator=g) * torch.tensor([5, 3, 2, 1, 1, 0.5, 0.2, 0.1])
    x = torch.randn(400, 8, generator=g) @ mix + 0.3  # anisotropic, not centred
    dirs = torch.randn(20, 8, generator=g)
    r = geometry(_sae(dirs, k=3), x, ridge=1e-3)
    s = _brute_s(x.double().numpy(), 1e-3)
    brute = _brute_cos(dirs.double().numpy(), s)
    euclid = _brute_cos(dirs.double().numpy())
    iu = np.triu_indices(20, 1)
    assert r["whitened"]["mutual_coherence"] == pytest.approx(brute[iu].max(), abs=1e-5)
    assert r["euclidean"]["mutual_coherence"] == pytest.approx(euclid[iu].max(), abs=1e-5)
    assert abs(brute[iu].max() - euclid[iu].max()) > 1e-3  # whitening changed it: the test tells them apart


def test_uniqueness_fractions_match_a_per_row_loop():
    g = torch.Generator().manual_seed(3)
    x = torch.randn(300, 10, generator=g) * torch.linspace(0.2, 3, 10)
    dirs = torch.randn(24, 10, generator=g)
    dirs[5] = 0  # a zero direction takes no part
    sae = _sae(dirs, k=4)
    with torch.no_grad():
        sae.b_enc.fill_(-8 / 3)  # thresholds that leave L0 from 0 to 4 across rows
        sae.b_enc[::2] = -8
    r = geometry(sae, x)
    codes = sae.encode(x).detach().numpy()
    d = dirs.double().numpy()
    for name, s in (("euclidean", None), ("whitened", _brute_s(x.double().numpy(), 1e-3))):
        cos = _brute_cos(np.delete(d, 5, 0), s)
        unique = rip = 0
        ratios = []
        for row in np.delete(codes, 5, 1):
            act = np.flatnonzero(row)
            k = len(act)
            mu = max((cos[i, j] for i in act for j in act if i != j), default=0.0)
            unique += (2 * k - 1) * mu < 1
            rip += (k - 1) * mu < 1
            ratios.append(max(2 * k - 1, 0) * mu)
        lower_median = sorted(ratios)[(len(ratios) - 1) // 2]
        assert r[name]["median_uniqueness_ratio"] == pytest.approx(lower_median, rel=1e-5)
        assert r[name]["uniqueness_fraction"] == pytest.approx(unique / len(codes), abs=1e-12)
        assert r[name]["rip_fraction"] == pytest.approx(rip / len(codes), abs=1e-12)
    ks = (np.delete(codes, 5, 1) != 0).sum(1)
    assert 0 < r["zero_code_fraction"] < 1 and len(set(ks)) >= 3  # the data exercised several K
    assert 0 < r["euclidean"]["uniqueness_fraction"] < 1


def test_active_coherence_of_dense_and_sparse_rows_matches_brute_force():
    g = torch.Generator().manual_seed(4)
    w = torch.nn.functional.normalize(torch.randn(40, 12, generator=g), dim=1)
    active = torch.rand(64, 40, generator=g) < torch.linspace(0.02, 0.9, 64)[:, None]
    pairs = pairwise(w, top_pairs=7, per_row=3)
    assert 0 < len(pairs["top_values"]) <= 7
    mu, = active_coherence(active, [(w, pairs["top_values"], pairs["top_i"], pairs["top_j"])], sparse_k=5,
                           budget=500)
    dense = active.sum(1) > 5
    hits = (active[:, pairs["top_i"]] & active[:, pairs["top_j"]]).any(1)
    assert (dense & hits).any() and (dense & ~hits).any()  # both ways a dense row can go
    c = np.abs(w.double().numpy() @ w.double().numpy().T)
    for row, m in zip(active.numpy(), mu.tolist()):
        act = np.flatnonzero(row)
        assert m == pytest.approx(max((c[i, j] for i in act for j in act if i != j), default=0.0), abs=1e-6)


@pytest.mark.parametrize("k", [3, 6])
def test_two_nn_recovers_the_dimension_of_a_linear_subspace(k):
    g = torch.Generator().manual_seed(k)
    basis = _orthonormal(40, seed=k)[:k]
    x = torch.randn(2000, k, generator=g, dtype=torch.float64) @ basis.double() + 5.0
    assert two_nn(x, max_rows=2000) == pytest.approx(k, rel=0.15)


def test_two_nn_recovers_the_dimension_of_a_curved_manifold():
    """A swiss roll (2-D) and a circle (1-D) embedded by a random rotation into 30 dimensions."""
    g = torch.Generator().manual_seed(5)
    t = 1.5 * math.pi * (1 + 2 * torch.rand(2000, generator=g, dtype=torch.float64))
    h = 20 * torch.rand(2000, generator=g, dtype=torch.float64)
    roll = torch.stack([t * torch.cos(t), h, t * torch.sin(t)], 1)
    rot = _orthonormal(30, seed=6).double()[:3]
    assert two_nn(roll @ rot) == pytest.approx(2.0, rel=0.15)
    a = 2 * math.pi * torch.rand(2000, generator=g, dtype=torch.float64)
    circle = torch.stack([torch.cos(a), torch.sin(a), torch.zeros_like(a)], 1)
    assert two_nn(circle @ rot) == pytest.approx(1.0, rel=0.15)
    assert two_nn(torch.ones(10, 4)) is None  # all duplicates: no dimension


def test_neurons_are_far_less_unique_than_a_sparse_dictionary_in_the_eval_json(llama_subject):
    """The Atoms paper's ordering on a tiny model: MLP neurons (dense codes, down-projection directions) almost
    never satisfy the uniqueness condition; a TopK dictionary at the same site mostly does."""
    site = "blocks.1.mlp_hidden"
    neurons = Neurons.from_subject(llama_subject, site)
    torch.manual_seed(0)
    topk = TopKSAE(64, 128, k=2, metadata={"hook_name": site})
    res = {}
    for name, d in (("neurons", neurons), ("topk", topk)):
        r = evaluate_fidelity(llama_subject, d, Corpus("default"), 16, start_window=2, n_tokens=256, progress=False)
        res[name] = r["geometry"]
        assert r["geometry"]["rows"] == r["eval_result_metrics"]["misc"]["n_tokens"]
    assert res["neurons"]["whitening"]["source"].startswith("codes @ directions")
    assert res["neurons"]["directions_width"] == 32 and res["topk"]["directions_width"] == 64
    assert res["neurons"]["mean_l0"] > 60 and res["topk"]["mean_l0"] <= 2
    for variant in ("euclidean", "whitened"):
        assert res["neurons"][variant]["uniqueness_fraction"] < 0.05
        assert res["topk"][variant]["uniqueness_fraction"] > 0.5
        hist = res["topk"][variant]["angle_histogram"]
        assert sum(hist["counts"]) == 128 * 127 // 2 and len(hist["bin_edges_degrees"]) == len(hist["counts"]) + 1
        assert res["neurons"][variant]["median_uniqueness_ratio"] > res["topk"][variant]["median_uniqueness_ratio"]
    assert res["topk"]["intrinsic_dimension"]["value"] > 1


def test_bad_activations_are_refused():
    sae = _sae(torch.randn(8, 4), k=2)
    with pytest.raises(UnitscopeError, match=r"activations of shape \[rows, 4\]"):
        geometry(sae, torch.randn(10, 5))
    with pytest.raises(UnitscopeError, match="all zero"):
        geometry(sae, torch.zeros(10, 4))
