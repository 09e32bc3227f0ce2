"""`unitscope dissect --demo`: the drawn-scenes world end to end. Scenes are drawn (training and held-out sets),
the classifier trained (or reused when OUT/classifier.safetensors holds one made with the same settings), its
last conv layer dissected over the held-out set as neurons and as the units of a TopK SAE trained on the layer's
spatial rows with the project's Trainer; each unit of both drawn over the held-out images where it peaks
(`dissect.maps`: OUT/neurons/maps/, OUT/sae/maps/)."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from safetensors.torch import load_file, save_file

from ..atomic import write_json_atomic
from ..vision.images import open_dataset
from ..vision.rows import layer_output, spatial_rows, train_on_rows
from ..worlds.classifier import LAST_CONV, SceneClassifier, accuracy, to_tensor, train_classifier
from ..worlds.scenes import make_scenes, write_dataset
from .maps import write_unit_maps
from .network import dissect, write_dissection


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
    write_unit_maps(model, LAST_CONV, dataset, neurons, out / "neurons")
    rows = spatial_rows(layer_output(model, LAST_CONV, to_tensor(images)))
    sae = train_on_rows(rows, str(out / "sae" / "dictionary"), n_units=sae_units, k=sae_k, steps=400,
                        batch_size=512, seed=seed, site=LAST_CONV)
    sae_result = dissect(model, LAST_CONV, dataset, dictionary=sae)
    write_dissection(out / "sae", sae_result)
    write_unit_maps(model, LAST_CONV, dataset, sae_result, out / "sae", dictionary=sae)
    names = [dataset.concepts[c] for c in sorted(dataset.concepts)]
    summary = {"classifier_accuracy": {n: round(float(a), 4) for n, a in zip(names, acc)},
               "neurons": neurons.summary, "sae": sae_result.summary}
    write_json_atomic(out / "summary.json", summary)
    return summary

