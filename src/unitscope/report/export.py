"""Export a run's explanations for other viewers.

`neuronpedia`: the folder SAEDashboard's NeuronpediaRunner writes for Neuronpedia's bulk upload, one per
dictionary: `D/batch-N.json` (a `NeuronpediaDashboardBatch`: model_id, layer, sae_set, features) and
`D/run_settings.json`; each feature is a `NeuronpediaDashboardFeature` dict (feature_index, pos_str/pos_values
and neg_str/neg_values from the logit lens, frac_nonzero, freq_hist_data_bar_values/heights, activations with
bin_min/bin_max/bin_contains/tokens/values, correlated_features_* from decoder cosine). Neuronpedia's
explanations upload is `D/explanations.json`. `saedashboard`: the same feature dicts one file per feature,
`D/features/U.json`, with `D/index.json`.

What unitscope does not compute is left empty rather than invented: logit histograms, neuron alignment,
Pearson correlations; `bin_contains` (the share of firings inside a quantile bin) is read from the unit's
histogram only where the bin's edges fall on histogram edges, else -1.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..atomic import recover, replace_dir
from ..errors import UnitscopeError
from . import data as D
from .site import _directions, read_state

FORMATS = ("neuronpedia", "saedashboard")
BATCH = 128  # features per Neuronpedia batch file


def _r3(values: Any) -> list[float]:
    return [round(float(v), 3) for v in values]


def _hist_bars(u: dict[str, Any]) -> tuple[list[float], list[float]]:
    counts = u.get("hist_counts") or []
    if not counts:
        return [], []
    lo, hi = float(u.get("hist_min") or 0), float(u.get("hist_max") or 0)
    width = (hi - lo) / len(counts)
    return _r3(lo + width * (i + 0.5) for i in range(len(counts))), [float(c) for c in counts]


def _bin_share(u: dict[str, Any], a: float, b: float) -> float:
    """Share of firing tokens with codes in [a, b), when a and b are edges of the unit's histogram; else -1."""
    counts = np.asarray(u.get("hist_counts") or [], dtype=np.float64)
    if not counts.size or counts.sum() == 0:
        return -1
    lo, hi = float(u.get("hist_min") or 0), float(u.get("hist_max") or 0)
    edges = np.linspace(lo, hi, len(counts) + 1)
    ia, ib = np.flatnonzero(np.isclose(edges, a, rtol=1e-6, atol=1e-9)), np.flatnonzero(
        np.isclose(edges, b, rtol=1e-6, atol=1e-9))
    if not ia.size or not ib.size:
        return -1
    return round(float(counts[ia[0]:ib[0]].sum() / counts.sum()), 6)


def feature_dict(u: dict[str, Any], exs: list[dict[str, Any]], near: list[list[Any]] | None,
                 info: dict[str, Any]) -> dict[str, Any]:
    """One unit as SAEDashboard's NeuronpediaDashboardFeature.to_dict()."""
    edges = u.get("quantile_edges") or []
    acts = []
    for e in exs:
        if e["kind"] == "top":
            lo, hi, share = -1, float(u["max_activation"]), -1
        elif e["kind"] == "quantile" and e.get("quantile") is not None and e["quantile"] + 1 < len(edges):
            lo, hi = float(edges[e["quantile"]]), float(edges[e["quantile"] + 1])
            share = _bin_share(u, lo, hi)
        else:
            continue  # bottom and random windows have no place in this layout
        acts.append({"bin_min": round(lo, 3), "bin_max": round(hi, 3), "bin_contains": share,
                     "tokens": list(e["tokens"]), "values": _r3(e["acts"])})
    values, heights = _hist_bars(u)
    return {
        "feature_index": int(u["unit"]),
        "neuron_alignment_indices": [], "neuron_alignment_values": [], "neuron_alignment_l1": [],
        "correlated_neurons_indices": [], "correlated_neurons_l1": [], "correlated_neurons_pearson": [],
        "correlated_features_indices": [int(a) for a, _ in near or []],
        "correlated_features_l1": [round(float(b), 3) for _, b in near or []],
        "correlated_features_pearson": [],
        "neg_str": list(u.get("suppressed_tokens") or []), "neg_values": _r3(u.get("suppressed_logits") or []),
        "pos_str": list(u.get("promoted_tokens") or []), "pos_values": _r3(u.get("promoted_logits") or []),
        "frac_nonzero": float(u["frequency"]),
        "freq_hist_data_bar_values": values, "freq_hist_data_bar_heights": heights,
        "logits_hist_data_bar_heights": [], "logits_hist_data_bar_values": [],
        "n_prompts_total": int(info.get("n_prompts_total") or 0),
        "n_tokens_in_prompt": int(info.get("n_tokens_in_prompt") or 0),
        "dataset": str(info.get("dataset") or ""), "decoder_weights_dist": [],
        "activations": acts,
    }


def _layer(site: str | None) -> int:
    m = re.search(r"(?:blocks|layers|h)\.(\d+)", site or "")
    return int(m.group(1)) if m else 0


def _features(explain_dir: Path, dictionary_dir: Path, info: dict[str, Any]):
    """(unit, feature dict) for every explained unit, streaming the examples row group by row group."""
    units = D.read_units(explain_dir)
    rows = {int(r["unit"]): r for r in units.to_pylist()}
    ids = np.asarray(sorted(rows), dtype=np.int64)
    near_of: dict[int, list] = {}
    directions = _directions(dictionary_dir)
    if directions is not None and directions.shape[0] > 1:
        idx, val = D.nearest_by_cosine(directions, ids)
        near_of = {int(u): list(zip(idx[i].tolist(), val[i].tolist())) for i, u in enumerate(ids)}
    pf = pq.ParquetFile(explain_dir / "examples.parquet")
    pending: dict[int, list] = {}
    seen = set()
    for rg in range(pf.num_row_groups):
        last = None
        for ex in pf.read_row_group(rg, columns=["unit", "kind", "quantile", "rank", "tokens", "acts"]).to_pylist():
            last = int(ex["unit"])
            pending.setdefault(last, []).append(ex)
        for u in [u for u in pending if u != last or rg + 1 == pf.num_row_groups]:
            seen.add(u)
            yield u, feature_dict(rows[u], pending.pop(u), near_of.get(u), info)
    for u in ids:
        if int(u) not in seen:
            yield int(u), feature_dict(rows[int(u)], [], near_of.get(int(u)), info)


def export_run(root: str | Path, fmt: str, out: str | Path) -> list[Path]:
    """Write every explained dictionary of the run in `fmt` under `out` (replaced whole); returns the folders."""
    if fmt not in FORMATS:
        raise UnitscopeError(f"unknown export format {fmt!r}; valid formats are {', '.join(FORMATS)}")
    root, out = Path(root), Path(out)
    cfg = read_state(root)["config"]
    explained = sorted(p.parent.name for p in (root / "explain").glob("*/units.parquet")
                       if not p.parent.name.startswith("."))
    if not explained:
        raise UnitscopeError(f"run {str(root)!r} has no explanation tables yet; run `unitscope explain` first")
    manifest = json.loads((root / "store" / "store.json").read_text()) if (root / "store" / "store.json").is_file() \
        else {}
    model = manifest.get("model") or cfg.get("model") or "model"
    site = cfg.get("site")
    site = site[0] if isinstance(site, list) and site else site
    ctx = int(manifest.get("ctx_len") or 0)
    info = {"n_prompts_total": (int(manifest.get("tokens") or 0) // ctx) if ctx else 0, "n_tokens_in_prompt": ctx,
            "dataset": cfg.get("corpus") or ""}
    with replace_dir(out, set(explained)) as tmp:
        for did in explained:
            folder = tmp / did
            folder.mkdir()
            labels = D.read_labels(root / "labels" / did / "labels.parquet")
            feats = _features(recover(root / "explain" / did), root / "dictionaries" / did, info)
            meta = {"model_id": str(model), "layer": _layer(site), "sae_set": did}
            if fmt == "neuronpedia":
                batch: list[dict] = []
                n = 0
                for _, f in feats:
                    batch.append(f)
                    if len(batch) == BATCH:
                        (folder / f"batch-{n}.json").write_text(json.dumps({**meta, "features": batch}))
                        batch, n = [], n + 1
                if batch:
                    (folder / f"batch-{n}.json").write_text(json.dumps({**meta, "features": batch}))
                settings = {**meta, "site": site, "n_prompts_total": info["n_prompts_total"],
                            "n_tokens_in_prompt": ctx, "huggingface_dataset_path": info["dataset"],
                            "n_features_per_batch": BATCH, "written_by": "unitscope export"}
                (folder / "run_settings.json").write_text(json.dumps(settings, indent=1))
                explanations = [{"modelId": str(model), "layer": f"{_layer(site)}-{did}", "index": str(u),
                                 "description": v["label"], "explanationModelName": v.get("model") or "",
                                 "typeName": "unitscope-label", "scores": {"detection": v.get("detection"),
                                                                           "fuzzing": v.get("fuzzing")}}
                                for u, v in sorted(labels.items())]
                (folder / "explanations.json").write_text(json.dumps(explanations))
            else:
                (folder / "features").mkdir()
                index = []
                for u, f in feats:
                    if u in labels:
                        f["explanations"] = [{"description": labels[u]["label"], "model": labels[u].get("model"),
                                              "detection": labels[u].get("detection"),
                                              "fuzzing": labels[u].get("fuzzing")}]
                    (folder / "features" / f"{u}.json").write_text(json.dumps(f))
                    index.append(u)
                (folder / "index.json").write_text(json.dumps({**meta, "site": site, "features": index}))
    return [out / d for d in explained]
