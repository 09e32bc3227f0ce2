"""Procedurally drawn outdoor scenes with exact per-pixel concept masks.

Each scene is drawn from a handful of parameters (horizon, pond, trees, house); the mask records which concept
painted each pixel last, so it is exact by construction. `write_dataset` lays a set out as network dissection
reads it: `images/NAME.png`, `masks/NAME.png` (concept index per pixel, 0 = unlabelled) and `concepts.json`.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..atomic import replace_dir, write_json_atomic

CONCEPTS = {1: "sky", 2: "grass", 3: "water", 4: "tree", 5: "house"}
COLOURS = {"sky": (0.45, 0.7, 0.95), "grass": (0.5, 0.8, 0.2), "water": (0.1, 0.3, 0.55), "trunk": (0.4, 0.25, 0.1),
           "canopy": (0.05, 0.3, 0.08), "walls": (0.8, 0.35, 0.25), "roof": (0.35, 0.15, 0.15)}


@dataclass
class SceneParams:
    """What a scene is drawn from (fractions of the image size, so one scene can be drawn at any size)."""

    sky: float  # height of the sky strip at the top (0: none)
    grass: float  # height of the grass strip at the bottom (0: none)
    pond: tuple[float, float, float, float] | None  # centre x, centre y, radius x, radius y
    trees: list[tuple[float, float, float]]  # centre x, canopy centre y, canopy radius
    house: tuple[float, float, float, float] | None  # left, ground y, width, height
    tint: tuple[float, float, float]  # a small colour shift per scene


def sample_params(rng: np.random.Generator) -> SceneParams:
    """Objects on an unlabelled rocky backdrop. Each concept covers a few percent of all pixels (as objects do in
    Broden): with the 0.005 top quantile a unit's mask covers ~0.5% of pixels, so a concept covering a fraction f
    of the dataset can reach IoU at most ~0.005/f, and f must stay well under 0.005/0.04 = 12.5%."""
    sky = float(rng.uniform(0.06, 0.15)) if rng.random() < 0.3 else 0.0
    grass = float(rng.uniform(0.06, 0.15)) if rng.random() < 0.3 else 0.0
    pond = None
    if rng.random() < 0.35:
        pond = (float(rng.uniform(0.2, 0.8)), float(rng.uniform(0.35, 0.75)), float(rng.uniform(0.12, 0.22)),
                float(rng.uniform(0.05, 0.09)))
    trees = [(float(rng.uniform(0.1, 0.9)), float(rng.uniform(0.25, 0.6)), float(rng.uniform(0.07, 0.12)))
             for _ in range(int(rng.integers(1, 3)) if rng.random() < 0.4 else 0)]
    house = None
    if rng.random() < 0.4:
        w = float(rng.uniform(0.18, 0.28))
        house = (float(rng.uniform(0.02, 0.98 - w)), float(rng.uniform(0.55, 0.9)), w, float(rng.uniform(0.12, 0.2)))
    tint = tuple(float(t) for t in rng.uniform(-0.05, 0.05, 3))
    return SceneParams(sky, grass, pond, trees, house, tint)  # type: ignore[arg-type]


def draw(params: SceneParams, size: int, rng: np.random.Generator,
         colours: dict[str, tuple[float, float, float]] | None = None) -> tuple[np.ndarray, np.ndarray]:
    """(image HxWx3 uint8, mask HxW uint8) for one scene; `rng` only adds texture (the backdrop, pixel noise).
    `colours` overrides entries of COLOURS (a world may need its concepts further apart in colour)."""
    s = size
    col = COLOURS if colours is None else {**COLOURS, **colours}
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    coarse = rng.uniform(0, 1, (8, 8)).astype(np.float32)  # a blotchy grey-brown backdrop, label 0
    blotch = np.kron(coarse, np.ones((s // 8 + 1, s // 8 + 1), np.float32))[:s, :s]
    img = (np.asarray((0.5, 0.45, 0.38), np.float32) + 0.15 * (blotch[..., None] - 0.5)
           + rng.normal(0, 0.04, (s, s, 1)).astype(np.float32)).repeat(1, 2) * np.ones((1, 1, 3), np.float32)
    mask = np.zeros((s, s), np.uint8)

    def paint(where: np.ndarray, colour, concept: int, jitter: float = 0.04):
        noise = rng.normal(0, jitter, (s, s, 1)).astype(np.float32)
        img[where] = (np.asarray(colour, np.float32) + noise)[where]
        mask[where] = concept

    if params.sky:
        sky = yy < params.sky
        paint(sky, col["sky"], 1, 0.02)
        img[sky] += (yy[..., None] * 0.4)[sky]  # lighter towards the horizon
    if params.grass:
        grass = yy > 1 - params.grass + 0.02 * np.sin(xx * 25)
        paint(grass, col["grass"], 2, 0.06)
    if params.pond:
        cx, cy, rx, ry = params.pond
        pond = ((xx - cx) / rx) ** 2 + ((yy - cy) / ry) ** 2 < 1
        paint(pond, col["water"], 3, 0.03)
        img[pond] += (0.05 * np.sin(yy * 90))[..., None][pond]  # ripples
    for cx, cy, r in params.trees:
        trunk = (np.abs(xx - cx) < r * 0.22) & (yy > cy) & (yy < cy + r * 2.2)
        paint(trunk, col["trunk"], 4, 0.03)
        canopy = (xx - cx) ** 2 + (yy - cy) ** 2 < r ** 2
        paint(canopy, col["canopy"], 4, 0.08)
    if params.house:
        left, base, w, h = params.house
        walls = (xx >= left) & (xx < left + w) & (yy < base) & (yy >= base - h)
        paint(walls, col["walls"], 5, 0.03)
        top = base - h
        roof = (yy < top) & (yy >= top - w * 0.5) & (np.abs(xx - (left + w / 2)) < (yy - (top - w * 0.5)))
        paint(roof, col["roof"], 5, 0.03)
    img += np.asarray(params.tint, np.float32)
    return (np.clip(img, 0, 1) * 255).round().astype(np.uint8), mask


def make_scenes(n: int, size: int = 64, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """n scenes: images (n, size, size, 3) uint8 and masks (n, size, size) uint8, the same for the same seed."""
    rng = np.random.default_rng(seed)
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        images[i], masks[i] = draw(sample_params(rng), size, rng)
    return images, masks


def write_dataset(out: str | Path, images: np.ndarray, masks: np.ndarray,
                  concepts: dict[int, str] | None = None) -> Path:
    """Write a dissection dataset folder (replaced whole, so a kill leaves the old one or the new one)."""
    from PIL import Image

    concepts = CONCEPTS if concepts is None else concepts
    with replace_dir(out, allowed={"images", "masks", "concepts.json"}) as tmp:
        (tmp / "images").mkdir()
        (tmp / "masks").mkdir()
        for i, (img, m) in enumerate(zip(images, masks)):
            Image.fromarray(img).save(tmp / "images" / f"{i:05d}.png")
            Image.fromarray(m).save(tmp / "masks" / f"{i:05d}.png")
        write_json_atomic(tmp / "concepts.json", {str(k): v for k, v in concepts.items()})
    return Path(out)


def presence(masks: np.ndarray, concepts: dict[int, str] | None = None) -> np.ndarray:
    """(n, n_concepts) float: 1 where the concept has any pixel in the scene (the classifier's targets)."""
    concepts = CONCEPTS if concepts is None else concepts
    return np.stack([(masks == c).reshape(len(masks), -1).any(1) for c in sorted(concepts)], 1).astype(np.float32)
