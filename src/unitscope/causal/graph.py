"""A feature graph of one prompt: the strongest unit and error nodes and the edges between them, as JSON.

The layout follows circuit-tracer's graph files (what its and Neuronpedia's front ends read): `metadata`
(prompt, prompt_tokens, the dictionaries as `transcoder_list`), `qParams`, `nodes` with `node_id`
"LAYER_FEATURE_POS", `feature`, `layer`, `ctx_idx`, `feature_type`, `activation`, `influence`, and `links`
with `source`, `target`, `weight`. Here `influence` is the node's attribution to the metric (code x gradient,
see `causal.attribution`), the metric is one node ("logit" type, layer = last + 1), error nodes have feature
-1, and link weights are total effects in the real model (not circuit-tracer's direct effects), each checked
against a real ablation in the tests.
"""

from __future__ import annotations

import re
from collections.abc import Sequence
from typing import Any

import torch

from .attribution import ERROR, Metric, attribute, edges

_BLOCK = re.compile(r"^blocks\.(\d+)\.")


def _layers(dictionaries: Sequence[Any]) -> list[int]:
    """Each dictionary's layer: its block number when every dictionary has a distinct one, else its order."""
    blocks = [_BLOCK.match(d.output_site or "") for d in dictionaries]
    nums = [int(m.group(1)) for m in blocks if m]
    if len(nums) == len(dictionaries) and len(set(nums)) == len(nums):
        return nums
    return list(range(len(dictionaries)))


def feature_graph(subject: Any, dictionaries: Sequence[Any], input_ids: torch.Tensor, metric: Metric,
                  names: Sequence[str] | None = None, max_nodes: int = 40, max_links: int = 200) -> dict[str, Any]:
    """The `max_nodes` unit and error nodes with the largest |attribution| to `metric`, their links to the metric,
    and the `max_links` strongest edges among them (plus every node-to-metric link)."""
    names = list(names) if names is not None else [f"d{i}" for i in range(len(dictionaries))]
    att = attribute(subject, dictionaries, input_ids, metric, names)
    layers = _layers(dictionaries)
    cands: list[tuple[float, int, int, int, float]] = []  # (attribution, dict, pos, unit, activation)
    for i, sa in enumerate(att.sites):
        a = sa.attribution
        for q, u in (sa.codes != 0).nonzero(as_tuple=False).tolist():
            cands.append((float(a[q, u]), i, q, u, float(sa.codes[q, u])))
        for q, e in enumerate(sa.error_attribution.tolist()):
            cands.append((e, i, q, ERROR, float(sa.error[q].norm())))
    cands.sort(key=lambda c: -abs(c[0]))
    chosen = cands[:max_nodes]
    tok = subject.tokenizer
    ids = input_ids[0].tolist()
    out_layer = str(max(layers) + 1)
    metric_id = f"{out_layer}_metric_{len(ids) - 1}"

    def node_id(i: int, q: int, u: int) -> str:
        return f"{layers[i]}_{u}_{q}"

    nodes = []
    for attr, i, q, u, act in chosen:
        d = dictionaries[i]
        nodes.append({"node_id": node_id(i, q, u), "jsNodeId": node_id(i, q, u), "feature": u, "layer": str(layers[i]),
                      "ctx_idx": q, "feature_type": "reconstruction error" if u == ERROR else d.architecture,
                      "activation": act, "influence": attr, "dictionary": names[i], "site": d.output_site,
                      "token": tok.decode([ids[q]]), "clerp": ""})
    nodes.append({"node_id": metric_id, "jsNodeId": metric_id, "feature": -1, "layer": out_layer,
                  "ctx_idx": len(ids) - 1, "feature_type": "logit", "is_target_logit": True,
                  "activation": att.value, "influence": None, "clerp": f"metric {metric.spec} = {att.value:.4g}"})
    links = [{"source": node_id(i, q, u), "target": metric_id, "weight": attr} for attr, i, q, u, _ in chosen]
    targets = [(i, q, u) for _, i, q, u, _ in chosen if u != ERROR and i > 0]
    keep = {(i, q, u) for _, i, q, u, _ in chosen}
    found = [e for e in edges(subject, dictionaries, input_ids, targets) if e.source in keep]
    found.sort(key=lambda e: -abs(e.weight))
    links += [{"source": node_id(*e.source), "target": node_id(*e.target), "weight": e.weight}
              for e in found[:max_links]]
    return {
        "metadata": {"slug": "unitscope", "scan": getattr(subject, "name", "model"), "transcoder_list": names,
                     "prompt_tokens": [tok.decode([t]) for t in ids], "prompt": tok.decode(ids),
                     "node_threshold": None, "schema_version": 1, "metric": metric.spec, "metric_value": att.value,
                     "generator": "unitscope.causal.graph"},
        "qParams": {"pinnedIds": [], "supernodes": [], "linkType": "both", "clickedId": "", "sg_pos": ""},
        "nodes": nodes,
        "links": links,
        "units": [{"dictionary": names[i], "site": sa.out_site,
                   "top": _top_units(sa.unit_totals())} for i, sa in enumerate(att.sites)],
    }


def _top_units(totals: torch.Tensor, n: int = 20) -> list[dict[str, float]]:
    """The units with the largest |attribution| summed over the prompt's positions."""
    order = totals.abs().argsort(descending=True)[:n]
    return [{"unit": int(u), "attribution": float(totals[u])} for u in order if float(totals[u]) != 0.0]
