"""RecSAE on the synthetic catalogue: an SAE on the recommender's hidden states, each latent scored against the
item attributes, beside the raw neurons.

A row is a sequence position from the fifth item on (`skip` = 4: before that a user's preferences are barely
visible); its concepts are the attributes of the item just read. A unit fires on a row when
its code is > 0 (SAE latents, no tuning) or, for raw neurons and again for SAE latents ("tuned"), when it is
beyond a threshold (either sign) chosen on the first half of the users to maximise F1; every figure is measured
on the other half. Precision =
P(concept | fires), recall = P(fires | concept); per attribute value the unit with the best F1 is reported.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..vision.rows import train_on_rows
from .recommender import hidden_states, hit_rate, make_catalogue, make_sequences, train_recommender


def precision_recall(fires: np.ndarray, concept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fires (rows, units) bool, concept (rows,) bool -> per-unit precision and recall."""
    tp = (fires & concept[:, None]).sum(0).astype(np.float64)
    precision = tp / np.maximum(fires.sum(0), 1)
    recall = tp / max(int(concept.sum()), 1)
    return precision, recall


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)


def best_units(fires: np.ndarray, concepts: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    out = {}
    for name, c in concepts.items():
        p, r = precision_recall(fires, c)
        u = int(_f1(p, r).argmax())
        out[name] = {"unit": u, "precision": round(float(p[u]), 4), "recall": round(float(r[u]), 4)}
    return out


def neuron_fires(fit: np.ndarray, test: np.ndarray, fit_concepts: dict[str, np.ndarray],
                 quantiles: np.ndarray = np.linspace(0.02, 0.98, 49)) -> dict[str, np.ndarray]:
    """Per concept, every neuron (both signs) thresholded where F1 on the fit rows is best -> test fires
    (rows, 2 * neurons); the columns are neuron i and then the negated neuron i."""
    both_fit, both_test = np.concatenate([fit, -fit], 1), np.concatenate([test, -test], 1)
    cuts = np.quantile(both_fit, quantiles, axis=0)  # (q, 2n)
    out = {}
    for name, c in fit_concepts.items():
        best = np.zeros(both_fit.shape[1])
        best_f1 = np.full(both_fit.shape[1], -1.0)
        for cut in cuts:
            p, r = precision_recall(both_fit > cut, c)
            f = _f1(p, r)
            better = f > best_f1
            best[better], best_f1[better] = cut[better], f[better]
        out[name] = both_test > best
    return out




def run_recommender_demo(out: str | Path, n_users: int = 3000, seed: int = 0, sae_units: int = 12, sae_k: int = 2,
                         sae_steps: int = 1500, rec_steps: int = 400, skip: int = 4) -> dict[str, Any]:
    """Train the world's recommender and a TopK SAE on its hidden states (SAE saved under OUT/sae); score both."""
    out = Path(out)
    cat = make_catalogue(seed=seed)
    seqs = make_sequences(cat, n_users, seed=seed)
    model = train_recommender(seqs, cat.n_items, steps=rec_steps, seed=seed)
    held = make_sequences(cat, 1000, seed=seed + 1)

    def rows(s: np.ndarray) -> torch.Tensor:
        h = hidden_states(model, s)
        return h.reshape(len(s), s.shape[1], -1)[:, skip:].reshape(-1, h.shape[-1])

    sae = train_on_rows(rows(seqs), str(out / "sae"), n_units=sae_units, k=sae_k, steps=sae_steps, batch_size=512,
                        seed=seed, site="gru:output")
    h = rows(held)
    items = held[:, skip:].reshape(-1)
    attrs = {k: v[items] for k, v in cat.attributes().items()}
    half = (len(held) // 2) * (held.shape[1] - skip)  # the first half of the users fit neuron thresholds
    with torch.no_grad():
        codes = sae.encode(h[half:]).numpy()
    test_concepts = {k: v[half:] for k, v in attrs.items()}
    sae_best = best_units(codes > 0, test_concepts)
    with torch.no_grad():
        fit_codes = sae.encode(h[:half]).numpy()
    tuned = neuron_fires(fit_codes, codes, {k: v[:half] for k, v in attrs.items()})
    sae_tuned = {k: best_units(tuned[k], {k: test_concepts[k]})[k] for k in test_concepts}
    fires = neuron_fires(h[:half].numpy(), h[half:].numpy(), {k: v[:half] for k, v in attrs.items()})
    neuron_best = {k: best_units(fires[k], {k: test_concepts[k]})[k] for k in test_concepts}
    for best, n in ((neuron_best, h.shape[1]), (sae_tuned, sae_units)):
        for v in best.values():  # name the unit and its sign
            v["unit"], v["sign"] = v["unit"] % n, "+" if v["unit"] < n else "-"

    def passing(best: dict[str, dict[str, float]]) -> int:
        return sum(v["precision"] > 0.8 and v["recall"] > 0.8 for v in best.values())

    return {"hit_rate_at_10": round(hit_rate(model, held), 4), "chance_hit_rate_at_10": round(10 / cat.n_items, 4),
            "sae": {"units": sae_units, "k": sae_k, "steps": sae_steps}, "rows_from_position": skip,
            "base_rates": {k: round(float(v.mean()), 4) for k, v in test_concepts.items()},
            "sae_latents": sae_best, "sae_latents_tuned": sae_tuned, "neurons": neuron_best,
            "attributes": len(sae_best), "attributes_with_a_latent_above_0.8": passing(sae_best),
            "attributes_with_a_tuned_latent_above_0.8": passing(sae_tuned),
            "attributes_with_a_neuron_above_0.8": passing(neuron_best)}
