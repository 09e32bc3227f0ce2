"""The RecSAE world: sequences follow the stated preferences, the scores equal brute force, the trained model and
its units carry the attributes."""

from __future__ import annotations

import numpy as np
import torch

from unitscope.worlds.recommender import GENRES, make_catalogue, make_sequences
from unitscope.worlds.recsae import precision_recall, run_recommender_demo


def test_sequences_keep_each_preference_at_the_stated_rate():
    cat = make_catalogue(seed=0)
    seqs = make_sequences(cat, 400, length=30, loyalty=0.7, seed=0)
    genre = cat.genre[seqs]
    modal = np.array([np.bincount(g, minlength=len(GENRES)).argmax() for g in genre])
    rate = (genre == modal[:, None]).mean()
    assert abs(rate - (0.7 + 0.3 / len(GENRES))) < 0.02
    price = cat.price[seqs]  # independent of genre: P(price = modal | genre = modal) is the marginal
    pmodal = np.array([np.bincount(p, minlength=3).argmax() for p in price])
    both = ((genre == modal[:, None]) & (price == pmodal[:, None])).mean()
    assert abs(both - rate * (price == pmodal[:, None]).mean()) < 0.02


def test_precision_recall_equal_brute_force():
    rng = np.random.default_rng(0)
    fires, concept = rng.random((200, 5)) < 0.3, rng.random(200) < 0.4
    p, r = precision_recall(fires, concept)
    for u in range(5):
        tp = sum(1 for i in range(200) if fires[i, u] and concept[i])
        assert p[u] == tp / fires[:, u].sum() and r[u] == tp / concept.sum()


def test_demo_small(tmp_path):
    torch.set_num_threads(1)
    r = run_recommender_demo(tmp_path, n_users=800, sae_units=12, sae_k=2, sae_steps=300, rec_steps=200)
    assert r["hit_rate_at_10"] > 5 * r["chance_hit_rate_at_10"]
    for name, base in r["base_rates"].items():  # every attribute value has a unit well above its base rate
        assert r["sae_latents"][name]["precision"] > 1.5 * base, (name, r["sae_latents"][name], base)
        assert r["neurons"][name]["precision"] > 1.5 * base, (name, r["neurons"][name], base)
    assert (tmp_path / "sae" / "cfg.json").is_file()
