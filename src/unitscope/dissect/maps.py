"""Each dissected unit drawn over the images where it peaks: its map (a channel, or a dictionary unit's codes over
spatial positions) upsampled as dissection upsamples it (bilinear, half-pixel centres, to the image size), the part
above the unit's dissection threshold tinted red over the image.

`write_unit_maps` writes OUT/maps/U.png (the unit's peak images side by side, highest peak first) and
OUT/maps/maps.json (per unit its images, peaks and threshold); the folder is written beside and swapped in whole.
Only the images a unit peaks on are run again (the dissection kept their indices), not the dataset.
"""

from __future__ import annotations

import json
import re
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ..atomic import replace_dir
from ..vision.images import ImageDataset
from .network import Dissection, ranked_units, unit_maps

MAX_UNITS = 200  # the page lists at most this many units per layer; maps are drawn for the same ones
TINT = 0.6  # weight of red where the map is above the threshold


def overlay(images: torch.Tensor, maps: torch.Tensor, threshold: float) -> np.ndarray:
    """(n, 3, H, W) images in [0, 1] and (n, h, w) maps -> (H, n*W, 3) uint8: the map above `threshold` in red."""
    up = F.interpolate(maps[:, None].float(), size=tuple(images.shape[2:]), mode="bilinear", align_corners=False)
    on = up[:, 0] > threshold
    img = images.clamp(0, 1).permute(0, 2, 3, 1).clone()
    img[on] = (1 - TINT) * img[on] + TINT * torch.tensor([1.0, 0.0, 0.0])
    return np.concatenate(list((img.numpy() * 255).astype(np.uint8)), 1)


def write_unit_maps(model: nn.Module, layer: str, dataset: ImageDataset, result: Dissection, out: str | Path,
                    dictionary: Any = None, max_units: int = MAX_UNITS, batch_size: int = 16) -> Path | None:
    """OUT/maps/ for the first `max_units` units in the page's order (`ranked_units`); None (and an earlier
    OUT/maps/ of this function's removed) when the dissection kept no peak images (`map_images=0`)."""
    from PIL import Image

    out = Path(out) / "maps"
    ours = {p.name for p in out.iterdir() if re.fullmatch(r"\d+\.png|maps\.json", p.name)} if out.is_dir() else set()
    if result.peak_images is None:  # no maps: an earlier dissection's must not pass for this one's
        if out.is_dir() and ours == {p.name for p in out.iterdir()}:
            shutil.rmtree(out)
        return None
    best = ranked_units(result.table)[:max_units]
    wanted: dict[int, list[int]] = {}  # image index -> the units that peak on it
    for r in best:
        for i in result.peak_images[r["unit"]].tolist():
            wanted.setdefault(i, []).append(r["unit"])
    images: dict[int, torch.Tensor] = {}
    maps: dict[tuple[int, int], torch.Tensor] = {}
    order = sorted(wanted)
    for start in range(0, len(order), batch_size):
        chunk = order[start:start + batch_size]
        x = torch.from_numpy(np.stack([dataset.image(dataset.names[i]) for i in chunk])).permute(0, 3, 1, 2)
        a = unit_maps(model, layer, x.float().div(255), dictionary)
        for j, i in enumerate(chunk):
            images[i] = x[j]
            for u in wanted[i]:
                maps[i, u] = a[j, u].clone()
    index = {}
    with replace_dir(out, allowed=ours) as tmp:
        for r in best:
            u = r["unit"]
            picks = result.peak_images[u].tolist()
            x = torch.stack([images[i] for i in picks]).float().div(255)
            Image.fromarray(overlay(x, torch.stack([maps[i, u] for i in picks]), r["threshold"])).save(tmp / f"{u}.png")
            index[str(u)] = {"images": [dataset.names[i] for i in picks], "threshold": r["threshold"],
                             "peaks": [float(v) for v in result.peak_values[u]]}
        (tmp / "maps.json").write_text(json.dumps({"layer": result.summary.get("layer"), "units": index}))
    return out
