"""Unit kinds fitted in closed form or by their own iterations (no SGD loop): neurons, PCA, k-means,
semi-NMF from a store; difference-in-means and probe directions from labelled text run through the model."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import numpy as np
import torch

from ..corpus import special_ids, training_mask
from ..errors import UnitscopeError
from ..store import Store
from .base import Dictionary
from .kmeans import KMeans
from .linear import PCA, DiffMean, Neurons, Probe
from .snmf import SNMF, default_code_units, default_wta, fit_snmf

FROM_STORE = ("neurons", "pca", "kmeans", "snmf")
FROM_LABELS = ("diffmean", "probe")
FIT_ROWS = 262_144  # rows k-means and semi-NMF fit on by default (the whole of a 200k-row store)
MAX_FIT_BYTES = 1 << 30  # and at most 1 GiB of them in memory (float32)


def _mask(store: Store) -> np.ndarray:
    specials = np.asarray(store.manifest.get("specials", []), dtype=np.int32)
    return training_mask(store.column("tokens"), store.column("pos"), specials)


def _sample(store: Store, site: str, max_rows: int, seed: int) -> torch.Tensor:
    """Up to `max_rows` shuffled training rows (and at most MAX_FIT_BYTES of them), float32."""
    mask = _mask(store)
    max_rows = max(1, min(max_rows, MAX_FIT_BYTES // (4 * store.width(site))))
    rows, have = [], 0
    for batch in store.batches(site, min(4096, int(mask.sum())), mask=mask, seed=seed, epochs=1, drop_last=False):
        rows.append(batch.float())
        have += len(batch)
        if have >= max_rows:
            break
    return torch.cat(rows)[:max_rows]


def fit_options(args: Any, architecture: str) -> dict[str, Any]:
    """The command line's options of the fitted kinds, refused for a kind they do not apply to."""
    given = {flag: getattr(args, name, None) for flag, name in (("--snmf-wta", "snmf_wta"),
                                                                 ("--snmf-code-units", "snmf_code_units"))}
    if architecture != "snmf" and any(v is not None for v in given.values()):
        flags = ", ".join(f for f, v in given.items() if v is not None)
        raise UnitscopeError(f"{flags} applies to snmf, not to {architecture}")
    options: dict[str, Any] = {}
    if given["--snmf-wta"] is not None:
        options["wta"] = given["--snmf-wta"] or None  # 0 turns it off
    if given["--snmf-code-units"] is not None:
        options["code_units"] = given["--snmf-code-units"]
    return options


def _metadata(store: Store, site: str) -> dict[str, Any]:
    return {**store.provenance(), "hook_name": site}


def fit_from_store(store: Store, site: str, architecture: str, n_units: int, subject: Any = None,
                   max_rows: int = FIT_ROWS, seed: int = 0, options: dict[str, Any] | None = None) -> Dictionary:
    """Fit a kind that needs no SGD loop. `options` go to the fit (semi-NMF: wta, code_units, iters, ...);
    semi-NMF's winner-take-all defaults to the paper's 1% at an `mlp_hidden` site and off elsewhere."""
    options = dict(options or {})
    width = store.width(site)
    meta = _metadata(store, site)
    if architecture == "neurons":
        if subject is None:
            return Neurons(width, metadata=meta)
        neurons = Neurons.from_subject(subject, site)
        neurons.metadata = {**meta, **neurons.metadata}
        return neurons
    if architecture == "pca":
        if not 0 < n_units <= width:
            raise UnitscopeError(f"PCA gives at most {width} units at a site of width {width}, not {n_units}")
        mask = _mask(store)
        return PCA.fit(store.batches(site, min(4096, int(mask.sum())), mask=mask, epochs=1, drop_last=False),
                       width, n_units, meta)
    if architecture == "kmeans":
        return KMeans.fit(_sample(store, site, max_rows, seed), n_units, meta, seed=seed)
    if architecture == "snmf":
        acts = _sample(store, site, max_rows, seed)
        options.setdefault("wta", default_wta(site))
        F, _ = fit_snmf(acts, n_units, seed=seed, **options)
        dirs = F.t()
        if subject is not None:
            from ..sites import down_projection

            down = down_projection(subject.model, site)
            if down is not None:
                w = down.weight.detach().float()
                w_out = w if isinstance(down, torch.nn.Linear) else w.t()  # [d_model, d_mlp]
                dirs = (w_out @ F).t()
        d = SNMF(width, n_units, meta, directions=dirs,
                 code_units=options.get("code_units") or default_code_units(width, n_units))
        d.W_dec.data.copy_(F.t())
        return d
    raise UnitscopeError(f"{architecture!r} is not fitted from a store; those are {', '.join(FROM_STORE)}")


def read_labels(path: str | Path) -> tuple[list[str], list[str]]:
    """A JSONL file of {"text": ..., "label": ...} rows."""
    path = Path(path)
    if not path.is_file():
        raise UnitscopeError(f"labelled data {str(path)!r} does not exist; give a .jsonl file of "
                             '{"text": ..., "label": ...} rows')
    texts, labels = [], []
    for i, line in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
            texts.append(str(row["text"]))
            labels.append(str(row["label"]))
        except (json.JSONDecodeError, KeyError, TypeError):
            raise UnitscopeError(f"line {i} of {str(path)!r} is not a JSON object with 'text' and 'label'") from None
    return texts, labels


@torch.inference_mode()
def text_features(subject: Any, site: str, texts: list[str]) -> torch.Tensor:
    """Mean activation over each text's tokens (special tokens and the first position excluded)."""
    specials = special_ids(subject.tokenizer)
    feats = []
    for t in texts:
        ids = torch.tensor([subject.tokenizer(t, add_special_tokens=False)["input_ids"]])
        if ids.shape[1] < 2:
            raise UnitscopeError(f"labelled text {t!r} is too short; give at least two tokens")
        acts = subject.collect(ids, [site])[site][0].float()
        keep = torch.from_numpy(training_mask(ids[0].numpy(), np.arange(ids.shape[1]), specials))
        feats.append(acts[keep].mean(0))
    return torch.stack(feats)


def fit_from_labels(subject: Any, site: str, architecture: str, labels_path: str | Path) -> Dictionary:
    texts, labels = read_labels(labels_path)
    feats = text_features(subject, site, texts)
    meta = {"model_name": subject.name, "model_spec": subject.spec, "model_fingerprint": subject.fingerprint(),
            "hook_name": site, "labels_path": str(labels_path)}
    cls = {"diffmean": DiffMean, "probe": Probe}[architecture]
    return cls.fit(feats, labels, meta)
