"""Network dissection (Bau et al. 2017): which units of a conv layer detect which labelled concepts.

Two passes over the dataset. Pass 1: each unit's top-quantile threshold T_u, the value exceeded by a fraction
`quantile` (0.005) of its activations over every image and spatial position. It is exact and streaming: the
number of values n is known from the first batch's map size, so a running buffer of each unit's m = ceil(q·n)
largest values (merged by topk per batch) holds the m-th largest at the end; memory is units × m. Pass 2: each
unit's map is upsampled (bilinear, half-pixel centres) to the mask size and thresholded, A_u = map > T_u; per
concept c with pixels M_c the dataset-wide IoU_uc = Σ|A_u ∧ M_c| / Σ|A_u ∨ M_c|. A unit is a detector when its
best IoU exceeds 0.04. Units are channels (neurons), or a dictionary's units encoded from the spatial rows.
With image-level labels a unit is "on" in an image when any position exceeds T_u, and IoU is over images.
Pass 2 also keeps, per unit, the `map_images` images where its map peaks highest (a running top list; ties go to the
earlier image), which `dissect.maps` draws with the thresholded map over them.
"""

from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import fsync, write_json_atomic
from ..errors import UnitscopeError
from ..vision.images import ImageDataset
from ..vision.rows import from_rows, layer_output, spatial_rows

DETECTOR_IOU = 0.04
QUANTILE = 0.005


@dataclass
class Dissection:
    table: pa.Table  # unit, concept, concept_index, iou, threshold, rank (1 = best within the unit), detector
    summary: dict[str, Any]
    peak_images: torch.Tensor | None = None  # (units, n) dataset indices where each unit's map peaks, highest first
    peak_values: torch.Tensor | None = None  # (units, n) those peaks (the map's maximum over positions)


def top_images(best: tuple[torch.Tensor, torch.Tensor] | None, peaks: torch.Tensor, first: int,
               n: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Merge a batch's (B, U) peaks (images first, first + 1, ...) into the running (values, indices) of each unit's
    n highest, (U, n) each; a stable sort keeps the earlier image on ties."""
    idx = torch.arange(first, first + peaks.shape[0]).expand(peaks.shape[1], -1)
    vals = peaks.T
    if best is not None:
        vals, idx = torch.cat([best[0], vals], 1), torch.cat([best[1], idx], 1)
    order = vals.sort(dim=1, descending=True, stable=True).indices[:, :n]
    return vals.gather(1, order), idx.gather(1, order)


def unit_maps(model: nn.Module, layer: str, x: torch.Tensor, dictionary: Any = None) -> torch.Tensor:
    """(B, units, h, w): the layer's channels, or a dictionary's codes of each spatial position."""
    a = layer_output(model, layer, x)
    if dictionary is None:
        return a
    if a.shape[1] != dictionary.d_in:
        raise UnitscopeError(f"the dictionary reads {dictionary.d_in} channels but layer {layer!r} has {a.shape[1]}; "
                             "use a dictionary trained on this layer's spatial rows")
    with torch.no_grad():
        codes = dictionary.encode(spatial_rows(a))
    return from_rows(codes.float(), a.shape[0], a.shape[2], a.shape[3])


def top_quantile_thresholds(batches, quantile: float = QUANTILE, total: int | None = None) -> torch.Tensor:
    """Exact per-unit value exceeded by `quantile` of the values, from (B, U, ...) batches in one pass.

    `total` (the number of values per unit) fixes m = ceil(quantile * total); the m largest are kept per unit."""
    buf = None
    m = None
    for maps in batches:
        vals = maps.transpose(0, 1).reshape(maps.shape[1], -1)
        if m is None:
            if total is None:
                raise UnitscopeError("top_quantile_thresholds needs the number of values per unit (total)")
            m = max(1, math.ceil(quantile * total))
            buf = torch.full((maps.shape[1], 0), -math.inf)
        both = torch.cat([buf, vals], 1)
        buf = both.topk(min(m, both.shape[1]), dim=1).values
    if buf is None or buf.shape[1] < m:
        raise UnitscopeError("the dataset gave fewer activations than its size promised; is it being modified?")
    return buf[:, m - 1].clone()


def dissect(model: nn.Module, layer: str, dataset: ImageDataset, dictionary: Any = None,
            quantile: float = QUANTILE, batch_size: int = 16, map_images: int = 6) -> Dissection:
    """Dissect `layer` of `model` over `dataset` (see the module docstring); the table is ranked within units.
    `map_images`: how many peak images to keep per unit for drawing its maps (0: none)."""
    if not 0 < quantile < 1:
        raise UnitscopeError(f"the quantile must be between 0 and 1 (exclusive), not {quantile}")
    model.eval()
    first = next(dataset.batches(1))[0]
    probe = unit_maps(model, layer, first, dictionary)
    n_units, h, w = probe.shape[1], probe.shape[2], probe.shape[3]
    total = len(dataset.names) * h * w
    thresholds = top_quantile_thresholds(
        (unit_maps(model, layer, x, dictionary) for x, _ in dataset.batches(batch_size)), quantile, total)

    order = sorted(dataset.concepts)
    inter = torch.zeros(n_units, len(order), dtype=torch.float64)
    on_area = torch.zeros(n_units, dtype=torch.float64)
    concept_area = torch.zeros(len(order), dtype=torch.float64)
    index = torch.tensor(order)
    peaks = None
    seen = 0
    for x, m in dataset.batches(batch_size):
        maps = unit_maps(model, layer, x, dictionary)
        if map_images > 0:
            peaks = top_images(peaks, maps.flatten(2).amax(2), seen, map_images)
        seen += len(x)
        if dataset.labels is None:
            up = F.interpolate(maps, size=tuple(m.shape[1:]), mode="bilinear", align_corners=False)
            on = (up > thresholds[None, :, None, None]).flatten(2).double()  # (B, U, P)
            onehot = (m.flatten(1)[..., None] == index).double()  # (B, P, C)
        else:
            on = (maps.flatten(2).amax(2) > thresholds).double()[..., None]  # (B, U, 1): on anywhere
            onehot = m.double()[:, None, :]  # (B, 1, C)
        inter += torch.einsum("bup,bpc->uc", on, onehot)
        on_area += on.sum((0, 2))
        concept_area += onehot.sum((0, 1))
    iou = inter / (on_area[:, None] + concept_area[None, :] - inter).clamp_min(1e-12)
    return Dissection(_table(iou, thresholds, order, dataset.concepts),
                      _summary(iou, order, dataset, layer, quantile, n_units, dictionary, (h, w)),
                      *((peaks[1], peaks[0]) if peaks is not None else (None, None)))


def ranked_units(table: pa.Table) -> list[dict[str, Any]]:
    """Each unit's best row (rank 1), detectors first, then by IoU (highest first), then by unit: the order the
    page lists units in and `dissect.maps` draws them in."""
    best = [r for r in table.to_pylist() if r["rank"] == 1]
    return sorted(best, key=lambda r: (not r["detector"], -r["iou"], r["unit"]))


def _table(iou: torch.Tensor, thresholds: torch.Tensor, order: list[int], names: dict[int, str]) -> pa.Table:
    n_units, n_c = iou.shape
    ranked = iou.argsort(dim=1, descending=True, stable=True)
    units, concepts, idx, ious, ths, ranks, det = [], [], [], [], [], [], []
    for u in range(n_units):
        for r, c in enumerate(ranked[u].tolist()):
            units.append(u)
            idx.append(order[c])
            concepts.append(names[order[c]])
            ious.append(float(iou[u, c]))
            ths.append(float(thresholds[u]))
            ranks.append(r + 1)
            det.append(r == 0 and float(iou[u, c]) > DETECTOR_IOU)
    return pa.table({"unit": pa.array(units, pa.int32()), "concept": concepts,
                     "concept_index": pa.array(idx, pa.int32()), "iou": ious, "threshold": ths,
                     "rank": pa.array(ranks, pa.int32()), "detector": det})


def _summary(iou, order, dataset, layer, quantile, n_units, dictionary, map_size) -> dict[str, Any]:
    best, arg = iou.max(dim=1)
    detectors = best > DETECTOR_IOU
    per_concept: dict[str, int] = {}
    for u in detectors.nonzero().flatten().tolist():
        name = dataset.concepts[order[int(arg[u])]]
        per_concept[name] = per_concept.get(name, 0) + 1
    return {
        "layer": layer, "units": n_units, "unit_kind": "neurons" if dictionary is None else
        str(getattr(dictionary, "architecture", type(dictionary).__name__)),
        "images": len(dataset.names), "map_size": list(map_size), "mask_size": list(dataset.mask_size or []),
        "labels": "pixels" if dataset.labels is None else "images", "quantile": quantile,
        "quantile_method": "exact: running top-m buffer per unit, m = ceil(quantile * images * h * w)",
        "detector_iou": DETECTOR_IOU, "detectors": int(detectors.sum()), "unique_concepts": len(per_concept),
        "detectors_by_concept": dict(sorted(per_concept.items())),
    }


def write_dissection(out: str | Path, result: Dissection) -> Path:
    """OUT/dissection.parquet and OUT/dissection.json, each written beside its target and renamed over it."""
    import pyarrow.parquet as pq

    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UnitscopeError(f"--out {str(out)!r} is an existing file; give a directory")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / f".dissection.parquet.tmp-{os.getpid()}"
    pq.write_table(result.table, tmp)
    fsync(tmp)
    os.replace(tmp, out / "dissection.parquet")
    write_json_atomic(out / "dissection.json", result.summary)
    return out / "dissection.parquet"
