"""How well gradient x activation attribution predicts real ablations on a real model.

For each prompt and metric, every unit active on the prompt is ablated for real (`UnitEdit`, all positions) and
metric(clean) - metric(ablated) is compared with its attribution summed over positions (Pearson and Spearman
correlations); the 40 strongest (position, unit) nodes are ablated one position at a time likewise.

    python benchmarks/attribution_vs_ablation.py DICTIONARY_DIR [--model default]
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch

from unitscope import load_subject
from unitscope.causal.attribution import Metric, attribute
from unitscope.causal.interventions import Positions, UnitEdit
from unitscope.dictionaries import load_dictionary

PROMPTS = [("The capital of France is", "logit: Paris"), ("def add(a, b):\n    return a", "loss"),
           ("Alice and Bob went to the store. Bob gave the milk to", "logitdiff: Alice, Bob")]


def _rank(x) -> np.ndarray:
    return np.argsort(np.argsort(np.asarray(x)))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("dictionary")
    ap.add_argument("--model", default="default")
    args = ap.parse_args()
    s = load_subject(args.model)
    d = load_dictionary(args.dictionary)
    for prompt, spec in PROMPTS:
        ids = s.tokenizer(prompt, return_tensors="pt").input_ids
        m = Metric.parse(spec, s.tokenizer)
        t0 = time.time()
        att = attribute(s, [d], ids, m)
        sa = att.sites[0]

        def effect(edit, ids=ids, m=m, base=att.value):
            with torch.no_grad(), s.intervene([edit]):
                return base - float(m(s.model(input_ids=ids, use_cache=False).logits, ids))

        active = (sa.codes != 0).any(0).nonzero()[:, 0].tolist()
        est = sa.unit_totals()[active].numpy()
        real = [effect(UnitEdit(dictionary=d, units=[u])) for u in active]
        a = sa.attribution
        nodes = sorted((a != 0).nonzero().tolist(), key=lambda n: -abs(float(a[n[0], n[1]])))[:40]
        node_real = [effect(UnitEdit(dictionary=d, units=[u], positions=Positions("indices", (q,)))) for q, u in nodes]
        node_est = [float(a[q, u]) for q, u in nodes]
        print(f"{prompt!r} {spec}: value {att.value:.3f}, {len(active)} active units, Pearson (units summed) "
              f"{np.corrcoef(est, real)[0, 1]:.3f}, Spearman {np.corrcoef(_rank(est), _rank(real))[0, 1]:.3f}, "
              f"Pearson (top-40 nodes) {np.corrcoef(node_est, node_real)[0, 1]:.3f}, error node "
              f"{float(sa.error_attribution.sum()):.3f} ({time.time() - t0:.0f} s)", flush=True)


if __name__ == "__main__":
    main()
