"""RecSAE on the synthetic catalogue: an SAE on the recommender's hidden states, each latent scored against the
item attributes, beside the raw neurons.

A row is a sequence position from the second item on (`skip` = 1); its concepts are the attributes of the item
just read (the world's exact item attributes), which is all the next item depends on. The held-out
users are split in two: on the first half ("fit") each unit gets its threshold and each attribute value its unit,
on the second half ("test") that unit's precision = P(concept | fires) and recall = P(fires | concept) are measured.
A unit fires when its value is beyond a threshold chosen on the fit rows to maximise F1: either sign for raw
neurons, above it for SAE latents (codes are >= 0); SAE latents are also scored as they come (fire when > 0).
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save_file

from ..vision.rows import train_on_rows
from .recommender import best_hit_rate, hidden_states, hit_rate, make_catalogue, make_sequences, train_recommender


def k_is_a_count(architecture: str) -> bool:
    """TopK kinds keep k latents per row (a whole number); the others take k as a target mean L0 (any number)."""
    from ..dictionaries import ARCHITECTURES
    from ..dictionaries.sae import TopKSAE

    return issubclass(ARCHITECTURES[architecture], TopKSAE)


def precision_recall(fires: np.ndarray, concept: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """fires (rows, units) bool, concept (rows,) bool -> per-unit precision and recall."""
    tp = (fires & concept[:, None]).sum(0).astype(np.float64)
    precision = tp / np.maximum(fires.sum(0), 1)
    recall = tp / max(int(concept.sum()), 1)
    return precision, recall


def _f1(p: np.ndarray, r: np.ndarray) -> np.ndarray:
    return np.where(p + r > 0, 2 * p * r / np.maximum(p + r, 1e-12), 0.0)


def best_units(fires: np.ndarray, concepts: dict[str, np.ndarray]) -> dict[str, dict[str, float]]:
    """Per concept, the unit with the best F1 on these rows, and its precision and recall on them."""
    out = {}
    for name, c in concepts.items():
        p, r = precision_recall(fires, c)
        u = int(_f1(p, r).argmax())
        out[name] = {"unit": u, "precision": round(float(p[u]), 4), "recall": round(float(r[u]), 4)}
    return out


def chosen_on_fit(fit_fires: np.ndarray, test_fires: np.ndarray, fit_concept: np.ndarray,
                  test_concept: np.ndarray) -> dict[str, float]:
    """The unit with the best F1 on the fit rows, scored on the test rows: choosing on the rows that are scored
    would let the best of many units look better than it is."""
    p, r = precision_recall(fit_fires, fit_concept)
    u = int(_f1(p, r).argmax())
    tp, tr = precision_recall(test_fires[:, [u]], test_concept)
    return {"unit": u, "precision": round(float(tp[0]), 4), "recall": round(float(tr[0]), 4)}


def tuned_fires(fit: np.ndarray, rows: np.ndarray, fit_concept: np.ndarray, both_signs: bool,
                quantiles: np.ndarray = np.linspace(0.02, 0.98, 49)) -> np.ndarray:
    """Each unit thresholded where its F1 for the concept on the fit rows is best -> fires on `rows` (rows, units);
    with `both_signs` the columns are unit i and then the negated unit i."""
    if both_signs:
        fit, rows = np.concatenate([fit, -fit], 1), np.concatenate([rows, -rows], 1)
    cuts = np.quantile(fit, quantiles, axis=0)  # (q, units)
    best, best_f1 = np.zeros(fit.shape[1]), np.full(fit.shape[1], -1.0)
    for cut in cuts:
        f = _f1(*precision_recall(fit > cut, fit_concept))
        better = f > best_f1
        best[better], best_f1[better] = cut[better], f[better]
    return rows > best


def score_units(fit: np.ndarray, test: np.ndarray, fit_concepts: dict[str, np.ndarray],
                test_concepts: dict[str, np.ndarray], both_signs: bool) -> dict[str, dict[str, Any]]:
    """Per attribute value: thresholds and unit chosen on the fit rows, precision/recall on the test rows."""
    out = {}
    n = fit.shape[1]
    for name, c in fit_concepts.items():
        best = chosen_on_fit(tuned_fires(fit, fit, c, both_signs), tuned_fires(fit, test, c, both_signs), c,
                             test_concepts[name])
        best["unit"], best["sign"] = best["unit"] % n, "+" if best["unit"] < n else "-"
        out[name] = best
    return out


def latent_mix(codes: np.ndarray, concepts: dict[str, np.ndarray]) -> list[dict[str, Any]]:
    """Per latent: how often it fires (> 0) and, among the rows where it does, the share on which each attribute
    value holds (rows' concepts: name -> (rows,) bool); a latent that is one value has that share near 1 and the
    others near their base rates."""
    out = []
    for u in range(codes.shape[1]):
        on = codes[:, u] > 0
        n = max(int(on.sum()), 1)
        out.append({"latent": u, "fires": round(float(on.mean()), 4),
                    "shares": {name: round(float(c[on].sum() / n), 3) for name, c in concepts.items()}})
    return out


def latent_concepts(fit_codes: np.ndarray, fit_items: np.ndarray, item_concepts: dict[str, np.ndarray],
                    top: int = 20, purity: float = 0.8) -> list[list[str]]:
    """RecSAE's concept per latent, with the world's attributes in place of its LLM summary: the `top` distinct
    items on which the latent is highest (fit rows, code > 0); each attribute value that holds for at least `purity`
    of them enters the concept, so a concept may be one value ("drama") or a conjunction ("premium drama"); an empty
    list: no concept. item_concepts: value name -> (n_items,) bool."""
    out = []
    for u in range(fit_codes.shape[1]):
        seen: list[int] = []
        for i in np.argsort(-fit_codes[:, u], kind="stable"):
            if fit_codes[i, u] <= 0 or len(seen) == top:
                break
            if fit_items[i] not in seen:
                seen.append(int(fit_items[i]))
        out.append([name for name, holds in item_concepts.items() if seen and holds[seen].mean() >= purity])
    return out


def concept_scores(codes: np.ndarray, items: np.ndarray, item_concepts: dict[str, np.ndarray],
                   concepts: list[list[str]]) -> list[dict[str, Any]]:
    """Each latent with a concept: precision/recall (fires when > 0) against its own concept on these rows."""
    out = []
    for u, concept in enumerate(concepts):
        if concept:
            holds = np.logical_and.reduce([item_concepts[name][items] for name in concept])
            p, r = precision_recall(codes[:, [u]] > 0, holds)
            out.append({"latent": u, "concept": concept, "precision": round(float(p[0]), 4),
                        "recall": round(float(r[0]), 4)})
    return out


def union_scores(codes: np.ndarray, concepts: list[list[str]],
                 test_concepts: dict[str, np.ndarray]) -> dict[str, dict[str, Any]]:
    """Per attribute value, the latents whose concept includes it taken together (any of them > 0): an SAE that
    splits a value across several latents still carries it, just not in one latent."""
    out = {}
    for name, truth in test_concepts.items():
        group = [u for u, c in enumerate(concepts) if name in c]
        p, r = precision_recall((codes[:, group] > 0).any(1, keepdims=True), truth)
        out[name] = {"latents": group, "precision": round(float(p[0]), 4), "recall": round(float(r[0]), 4)}
    return out


def passing(best: dict[str, dict[str, Any]], bar: float = 0.8) -> int:
    return sum(v["precision"] > bar and v["recall"] > bar for v in best.values())


def run_recommender_demo(out: str | Path, n_users: int = 3000, seed: int = 0, architecture: str = "jumprelu",
                         sae_units: int = 12, sae_k: float = 3.4, sae_steps: int = 1500, rec_steps: int = 1000,
                         skip: int = 1, fixed_decoder_bias: bool = True, rec_weight_decay: float = 1.0
                         ) -> dict[str, Any]:
    """Train the world's recommender (saved as OUT/recommender.safetensors) and an SAE on its hidden states
    (OUT/sae; any trainable kind, `sae_k` its k or target L0); score both on held-out users drawn with seed + 1."""
    out = Path(out)
    cat = make_catalogue(seed=seed)
    seqs = make_sequences(cat, n_users, seed=seed)
    model = train_recommender(seqs, cat.n_items, steps=rec_steps, seed=seed, weight_decay=rec_weight_decay)
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / ".recommender.safetensors.tmp"
    save_file(model.state_dict(), str(tmp))
    os.replace(tmp, out / "recommender.safetensors")
    held = make_sequences(cat, 1000, seed=seed + 1)

    def rows(s: np.ndarray) -> torch.Tensor:
        h = hidden_states(model, s)
        return h.reshape(len(s), s.shape[1], -1)[:, skip:].reshape(-1, h.shape[-1])

    k = int(sae_k) if k_is_a_count(architecture) else sae_k
    sae = train_on_rows(rows(seqs), str(out / "sae"), architecture=architecture, n_units=sae_units, k=k,
                        steps=sae_steps, batch_size=512, seed=seed, site="gru:output",
                        fixed_decoder_bias=fixed_decoder_bias)
    h = rows(held)
    items = held[:, skip:].reshape(-1)
    item_concepts = cat.attributes()
    attrs = {k: v[items] for k, v in item_concepts.items()}
    half = (len(held) // 2) * (held.shape[1] - skip)  # rows of the first half of the held-out users
    fit_c, test_c = {k: v[:half] for k, v in attrs.items()}, {k: v[half:] for k, v in attrs.items()}
    with torch.no_grad():
        codes = sae.encode(h).numpy()
        fvu = float(((sae.decode(sae.encode(h)) - h) ** 2).sum() / ((h - h.mean(0)) ** 2).sum())
    hn = h.numpy()
    sae_raw = {k: chosen_on_fit(codes[:half] > 0, codes[half:] > 0, fit_c[k], test_c[k]) for k in attrs}
    sae_tuned = score_units(codes[:half], codes[half:], fit_c, test_c, both_signs=False)
    neurons = score_units(hn[:half], hn[half:], fit_c, test_c, both_signs=True)
    concepts = latent_concepts(codes[:half], items[:half], item_concepts)
    own = concept_scores(codes[half:], items[half:], item_concepts, concepts)
    unions = union_scores(codes[half:], concepts, test_c)
    return {"hit_rate_at_10": round(hit_rate(model, held), 4),
            "best_hit_rate_at_10": round(best_hit_rate(cat, held), 4),
            "chance_hit_rate_at_10": round(10 / cat.n_items, 4),
            "sae": {"architecture": architecture, "units": sae_units, "k": k, "steps": sae_steps,
                    "fixed_decoder_bias": fixed_decoder_bias, "held_out_fvu": round(fvu, 4),
                    "l0": round(float((codes > 0).sum(1).mean()), 3),
                    "dead_latents": int(((codes > 0).sum(0) == 0).sum())},
            "recommender": {"steps": rec_steps, "weight_decay": rec_weight_decay}, "rows_from_position": skip,
            "base_rates": {k: round(float(v.mean()), 4) for k, v in test_c.items()},
            "sae_latents": sae_raw, "sae_latents_tuned": sae_tuned, "neurons": neurons,
            "latent_mix": latent_mix(codes, attrs),
            "latent_concepts": own, "latents_above_0.8_for_their_concept": passing({str(i): v for i, v in
                                                                                   enumerate(own)}),
            "sae_latent_unions": unions,
            "attributes": len(attrs), "attributes_with_a_latent_above_0.8": passing(sae_raw),
            "attributes_with_a_tuned_latent_above_0.8": passing(sae_tuned),
            "attributes_with_a_neuron_above_0.8": passing(neurons),
            "attributes_with_a_latent_union_above_0.8": passing(unions)}


def format_table(result: dict[str, Any]) -> str:
    """Per attribute value: precision / recall of the best SAE latent as it comes (> 0), with its threshold tuned,
    and of the best raw neuron (tuned), as `unitscope recommender` prints them."""
    cols = [("SAE latent (> 0)", "sae_latents"), ("SAE latent, tuned", "sae_latents_tuned"),
            ("neuron, tuned", "neurons")]
    lines = [f"{'attribute value':<22}" + "".join(f"{name:>22}" for name, _ in cols)]
    for value in result["base_rates"]:
        cells = []
        for _, key in cols:
            r = result[key][value]
            mark = "*" if r["precision"] > 0.8 and r["recall"] > 0.8 else " "
            unit = f"u{r['unit']}{'-' if r.get('sign') == '-' else ''}"
            cells.append(f"{r['precision']:.3f} / {r['recall']:.3f} {unit:<5}{mark}".rjust(22))
        lines.append(f"{value:<22}" + "".join(cells))
    lines.append(f"{'values above 0.8/0.8':<22}" + "".join(
        f"{n} of {result['attributes']}".rjust(22) for n in (result["attributes_with_a_latent_above_0.8"],
                                                             result["attributes_with_a_tuned_latent_above_0.8"],
                                                             result["attributes_with_a_neuron_above_0.8"])))
    return "\n".join(lines)
