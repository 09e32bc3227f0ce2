"""`unitscope dissect --demo`: the drawn-scenes world end to end. Scenes are drawn (training and held-out sets),
the classifier trained (or reused when OUT/classifier.safetensors holds one made with the same settings), its
last conv layer dissected over the held-out set as neurons and as the units of a TopK SAE trained on the layer's
spatial rows with the project's Trainer."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

from ..atomic import write_json_atomic
from ..vision.images import open_dataset
from ..vision.rows import layer_output, spatial_rows, train_on_rows
from ..worlds.classifier import LAST_CONV, SceneClassifier, accuracy, to_tensor, train_classifier
from ..worlds.scenes import make_scenes, write_dataset
from .gan_demo import _overlay
from .network import Dissection, dissect, write_dissection


def unit_maps(model: torch.nn.Module, layer: str, result: Dissection, x: torch.Tensor, out: Path) -> None:
    """OUT/unit_maps.png: for each concept its best detector (one row), the unit's map above its dissection
    threshold tinted red over the 6 images of x where the unit peaks highest; OUT/unit_maps.json says which unit
    each row is."""
    rows = [r for r in result.table.to_pylist() if r["rank"] == 1 and r["detector"]]
    best: dict[str, dict[str, Any]] = {}
    for r in rows:
        if r["concept"] not in best or r["iou"] > best[r["concept"]]["iou"]:
            best[r["concept"]] = r
    if not best:
        return
    chosen = sorted(best.values(), key=lambda r: r["concept_index"])
    with torch.no_grad():
        maps = layer_output(model, layer, x).float()
    thresholds = torch.full((maps.shape[1],), float("nan"))
    for r in result.table.to_pylist():
        thresholds[r["unit"]] = r["threshold"]
    _overlay(x, maps, thresholds, [r["unit"] for r in chosen], out / "unit_maps.png")
    write_json_atomic(out / "unit_maps.json", [{"unit": r["unit"], "concept": r["concept"], "iou": r["iou"],
                                                "threshold": r["threshold"]} for r in chosen])


def run_demo(out: str | Path, n_train: int = 600, n_test: int = 200, size: int = 64, steps: int = 300,
             seed: int = 0, sae_units: int = 64, sae_k: int = 4) -> dict[str, Any]:
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    settings = {"n_train": n_train, "size": size, "steps": steps, "seed": seed,
                "width": SceneClassifier().head.in_features}
    images, masks = make_scenes(n_train, size, seed)
    test_images, test_masks = make_scenes(n_test, size, seed + 1)
    write_dataset(out / "data", test_images, test_masks)
    model = SceneClassifier()
    weights, meta = out / "classifier.safetensors", out / "classifier.json"
    if weights.is_file() and meta.is_file() and json.loads(meta.read_text()) == settings:
        model.load_state_dict(load_file(str(weights)))
        model.eval()
    else:
        model = train_classifier(images, masks, steps=steps, seed=seed)
        tmp = weights.with_name(weights.name + ".tmp")
        save_file(model.state_dict(), str(tmp))
        tmp.replace(weights)
        write_json_atomic(meta, settings)
    acc = accuracy(model, test_images, test_masks)
    dataset = open_dataset(out / "data")
    neurons = dissect(model, LAST_CONV, dataset)
    write_dissection(out / "neurons", neurons)
    unit_maps(model, LAST_CONV, neurons, to_tensor(test_images), out / "neurons")
    rows = spatial_rows(layer_output(model, LAST_CONV, to_tensor(images)))
    sae = train_on_rows(rows, str(out / "sae" / "dictionary"), n_units=sae_units, k=sae_k, steps=400,
                        batch_size=512, seed=seed, site=LAST_CONV)
    sae_result = dissect(model, LAST_CONV, dataset, dictionary=sae)
    write_dissection(out / "sae", sae_result)
    names = [dataset.concepts[c] for c in sorted(dataset.concepts)]
    summary = {"classifier_accuracy": {n: round(float(a), 4) for n, a in zip(names, acc)},
               "neurons": neurons.summary, "sae": sae_result.summary}
    write_json_atomic(out / "summary.json", summary)
    return summary

