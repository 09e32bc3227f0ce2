"""The RecSAE world: sequences follow the stated preferences, the scores equal brute force, units and thresholds are
chosen on other rows than those scored, and the demo's figures are what its saved SAE gives on the world's exact
item attributes."""

from __future__ import annotations

import numpy as np
import torch
from safetensors.torch import load_file

from unitscope.dictionaries import load_dictionary
from unitscope.worlds.recommender import (
    GENRES,
    SequentialRecommender,
    hidden_states,
    make_catalogue,
    make_sequences,
    transitions,
)
from unitscope.worlds.recsae import (
    chosen_on_fit,
    concept_scores,
    latent_concepts,
    precision_recall,
    run_recommender_demo,
    tuned_fires,
    union_scores,
)


def test_transitions_equal_the_stated_product_and_sequences_follow_them():
    cat = make_catalogue(n_items=60, seed=0)
    p = transitions(cat, keep_genre=0.8, keep_price=0.7)
    assert np.allclose(p.sum(1), 1) and (np.diag(p) == 0).all()

    def w(a: int, b: int) -> float:  # the unnormalised weight by hand, one factor per attribute
        genres = np.prod([0.8 if cat.genres[a, g] == cat.genres[b, g] else 0.2 for g in range(len(GENRES))])
        return genres * (0.7 if cat.price[a] == cat.price[b] else 0.15)

    for i, j in [(0, 1), (5, 17), (42, 3)]:
        assert abs(p[i, j] / p[i, 40] - w(i, j) / w(i, 40)) < 1e-9
    assert cat.genres.any(1).all()  # every item has a genre
    seqs = make_sequences(cat, 4000, length=6, seed=1, keep_genre=0.8, keep_price=0.7)
    prev, nxt = seqs[:, :-1].reshape(-1), seqs[:, 1:].reshape(-1)
    kept = (cat.genres[prev] == cat.genres[nxt]).mean(0)  # per genre: how often the next item agrees on it
    expected = np.array([(p[prev] * (cat.genres[prev][:, None, g] == cat.genres[None, :, g])).sum(1).mean()
                         for g in range(len(GENRES))])
    assert np.abs(kept - expected).max() < 0.01
    assert abs((cat.price[prev] == cat.price[nxt]).mean() - (p[prev] * (cat.price[prev][:, None] == cat.price)).sum(1)
               .mean()) < 0.01


def test_precision_recall_equal_brute_force():
    rng = np.random.default_rng(0)
    fires, concept = rng.random((200, 5)) < 0.3, rng.random(200) < 0.4
    p, r = precision_recall(fires, concept)
    for u in range(5):
        tp = sum(1 for i in range(200) if fires[i, u] and concept[i])
        assert p[u] == tp / fires[:, u].sum() and r[u] == tp / concept.sum()


def test_tuned_threshold_is_the_best_f1_cut_on_the_fit_rows():
    rng = np.random.default_rng(1)
    concept = rng.random(300) < 0.3
    fit = rng.normal(size=(300, 3)) + np.outer(concept, [2.0, -2.0, 0.0])
    rows = rng.normal(size=(50, 3))
    fires = tuned_fires(fit, rows, concept, both_signs=True)
    assert fires.shape == (50, 6)
    both_fit, both_rows = np.concatenate([fit, -fit], 1), np.concatenate([rows, -rows], 1)
    for u in range(6):  # brute force: every cut tried in turn, the first best F1 kept
        best_cut, best_f1 = None, -1.0
        for q in np.linspace(0.02, 0.98, 49):
            cut = np.quantile(both_fit[:, u], q)
            on = both_fit[:, u] > cut
            tp = int((on & concept).sum())
            f1 = 2 * tp / (on.sum() + concept.sum()) if tp else 0.0
            if f1 > best_f1:
                best_cut, best_f1 = cut, f1
        assert (fires[:, u] == (both_rows[:, u] > best_cut)).all()
    # unit 0 rises with the concept, unit 1 falls: their useful side is + and - respectively
    assert fires[:, 0].mean() < 0.9 and fires[:, 4].mean() < 0.9


def test_unit_is_chosen_on_the_fit_rows_and_scored_on_the_test_rows():
    rng = np.random.default_rng(2)
    fit_c, test_c = rng.random(400) < 0.3, rng.random(400) < 0.3
    noise = rng.random(400) < 0.3
    fit_fires = np.stack([fit_c, noise], 1)  # unit 0 is the concept on the fit rows, unit 1 noise
    test_fires = np.stack([rng.random(400) < 0.5, test_c], 1)  # ... and the other way round on the test rows
    best = chosen_on_fit(fit_fires, test_fires, fit_c, test_c)
    p, r = precision_recall(test_fires[:, [0]], test_c)
    assert best == {"unit": 0, "precision": round(float(p[0]), 4), "recall": round(float(r[0]), 4)}


def test_recsae_concepts_of_planted_latents():
    """Latent 0 is 'drama', latent 1 'premium drama' (a conjunction), latent 2 'premium' but only half of it,
    latent 3 fires at random: the concepts built from their top items and their scores follow the plant."""
    cat = make_catalogue(seed=0)
    values = cat.attributes()
    items = np.random.default_rng(3).integers(0, cat.n_items, 6000)
    drama, premium = values["genre=drama"][items], values["price=premium"][items]
    half_premium = premium & (items % 2 == 0)
    noise = np.random.default_rng(4).random(6000)
    codes = np.stack([drama * 1.0, (drama & premium) * 2.0, half_premium * 1.0, noise], 1)
    concepts = latent_concepts(codes[:3000], items[:3000], values)
    assert concepts[:3] == [["genre=drama"], ["genre=drama", "price=premium"], ["price=premium"]]
    own = concept_scores(codes[3000:], items[3000:], values, concepts)
    assert [(o["latent"], o["precision"], o["recall"]) for o in own[:2]] == [(0, 1.0, 1.0), (1, 1.0, 1.0)]
    half_share = half_premium[3000:].sum() / premium[3000:].sum()
    assert own[2]["precision"] == 1.0 and abs(own[2]["recall"] - half_share) < 1e-4
    unions = union_scores(codes[3000:], concepts, {"genre=drama": drama[3000:], "price=premium": premium[3000:]})
    assert unions["genre=drama"] == {"latents": [0, 1], "precision": 1.0, "recall": 1.0}
    p, r = precision_recall(((drama & premium) | half_premium)[3000:, None], premium[3000:])
    assert unions["price=premium"]["latents"] == [1, 2]
    assert (unions["price=premium"]["precision"], unions["price=premium"]["recall"]) == (round(float(p[0]), 4),
                                                                                         round(float(r[0]), 4))


def test_demo_finds_a_latent_per_attribute_value(tmp_path):
    """The issue's bar on the default demo: every attribute value has an SAE latent with precision and recall above
    0.8 on held-out users (its threshold tuned on the other half; as they come, > 0, 7-11 of 11 pass over seeds 0-3,
    docs/vision.md); and the figures are what the saved recommender and SAE give against the world's exact item
    attributes."""
    torch.set_num_threads(1)
    r = run_recommender_demo(tmp_path)
    assert r["hit_rate_at_10"] > 0.9 * r["best_hit_rate_at_10"] > 10 * r["chance_hit_rate_at_10"]
    low = {k: v for k, v in r["sae_latents_tuned"].items() if not (v["precision"] > 0.8 and v["recall"] > 0.8)}
    assert not low, low
    units = [v["unit"] for v in r["sae_latents_tuned"].values()]
    assert len(set(units)) == len(units)  # one latent per value, not one latent for several
    cat = make_catalogue(seed=0)
    held = make_sequences(cat, 1000, seed=1)
    model = SequentialRecommender(cat.n_items)
    model.load_state_dict(load_file(tmp_path / "recommender.safetensors"))
    h = hidden_states(model, held).reshape(1000, 20, -1)[:, 1:].reshape(-1, 64)
    sae = load_dictionary(str(tmp_path / "sae"))
    with torch.no_grad():
        codes = sae.encode(h).numpy()
    items = held[:, 1:].reshape(-1)
    half = 500 * 19
    for name, truth in cat.attributes().items():
        c = truth[items]
        unit = r["sae_latents"][name]["unit"]
        p, rec = precision_recall(codes[half:, [unit]] > 0, c[half:])
        assert (round(float(p[0]), 4), round(float(rec[0]), 4)) == (r["sae_latents"][name]["precision"],
                                                                    r["sae_latents"][name]["recall"])
        fit_p, fit_r = precision_recall(codes[:half] > 0, c[:half])  # and that unit is the fit rows' best F1
        f1 = 2 * fit_p * fit_r / np.maximum(fit_p + fit_r, 1e-12)
        assert f1[unit] == f1.max()
    values = cat.attributes()
    concepts = latent_concepts(codes[:half], items[:half], values)
    assert r["latent_concepts"] == concept_scores(codes[half:], items[half:], values, concepts)
    mix = r["latent_mix"]
    assert len(mix) == 12 and [m["fires"] for m in mix] == [round(float(v), 4) for v in (codes > 0).mean(0)]
    on = codes[:, units[0]] > 0
    assert mix[units[0]]["shares"]["genre=action"] == round(float(values["genre=action"][items][on].mean()), 3)


def test_a_held_decoder_bias_stays_at_its_start(tmp_path):
    """`fixed_decoder_bias`: b_dec ends where the Trainer starts it, the geometric median of the first four batches
    (recomputed here from the same batches); trained, it moves away."""
    from unitscope.dictionaries.train import geometric_median
    from unitscope.vision.rows import RowSource, train_on_rows

    rows = torch.randn(2048, 8) + torch.linspace(-2, 3, 8)
    held = train_on_rows(rows, str(tmp_path / "held"), n_units=16, k=2, steps=40, fixed_decoder_bias=True)
    free = train_on_rows(rows, str(tmp_path / "free"), n_units=16, k=2, steps=40)
    it = RowSource(rows, 256, seed=0).batches(0)
    x = torch.cat([next(it)[0] for _ in range(4)])
    scale = float((x.shape[1] / x.pow(2).sum(1).mean()) ** 0.5)
    start = geometric_median(x * scale) / scale
    assert torch.allclose(held.b_dec.detach(), start, atol=1e-5)
    assert (free.b_dec.detach() - start).norm() > 0.05


def test_cli_refuses_bad_input_in_one_sentence(tmp_path, capsys):
    from unitscope.cli import main

    afile = tmp_path / "afile"
    afile.write_text("keep me")
    out = str(tmp_path / "o")
    cases = [(["--demo", "--out", str(afile)], "is a file"),
             (["--demo", "--k", "13", "--out", out], "--k 13 is larger than --units 12"),
             (["--demo", "--architecture", "pca", "--out", out], "--architecture 'pca' is not an SAE kind"),
             (["--demo", "--architecture", "topk", "--k", "2.5", "--out", out], "--k 2.5 is not a whole number"),
             (["--out", out], "pass --demo")]
    for argv, words in cases:
        assert main(["recommender", *argv]) == 2
        err = capsys.readouterr().err
        assert words in err and "Traceback" not in err
    assert afile.read_text() == "keep me" and not (tmp_path / "o").exists()
