"""A network-dissection dataset folder: `images/NAME.png`, `masks/NAME.png`, `concepts.json`.

Masks hold a concept index per pixel (0 = unlabelled) and name the same files as the images. Image-level labels
may be given instead of masks as `labels.json` ({NAME: [concept index, ...]}); dissection then scores a unit
against the whole image. Everything is checked before any activation is computed.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from ..errors import UnitscopeError

IMAGE_SUFFIXES = (".png", ".jpg", ".jpeg")


@dataclass
class ImageDataset:
    root: Path
    names: list[str]
    concepts: dict[int, str]
    image_size: tuple[int, int]
    mask_size: tuple[int, int] | None
    labels: dict[str, list[int]] | None = None  # image-level labels when there are no masks

    def image(self, name: str) -> np.ndarray:
        from PIL import Image

        path = next(p for p in (self.root / "images" / (name + s) for s in IMAGE_SUFFIXES) if p.is_file())
        with Image.open(path) as im:
            return np.asarray(im.convert("RGB"))

    def mask(self, name: str) -> np.ndarray:
        from PIL import Image

        with Image.open(self.root / "masks" / f"{name}.png") as im:
            return np.asarray(im)

    def batches(self, batch_size: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """(images float (B, 3, H, W) in [0, 1], masks long (B, h, w)) in name order. With image-level labels the
        mask is (B, n_concepts) of 0/1 instead."""
        order = sorted(self.concepts)
        for i in range(0, len(self.names), batch_size):
            chunk = self.names[i:i + batch_size]
            x = torch.from_numpy(np.stack([self.image(n) for n in chunk])).permute(0, 3, 1, 2).float().div(255)
            if self.labels is None:
                m = torch.from_numpy(np.stack([self.mask(n) for n in chunk]).astype(np.int64))
            else:
                m = torch.tensor([[int(c in self.labels[n]) for c in order] for n in chunk])
            yield x, m


def _size(path: Path) -> tuple[int, int]:
    from PIL import Image

    try:
        with Image.open(path) as im:
            return im.size[1], im.size[0]
    except OSError as e:
        raise UnitscopeError(f"{str(path)!r} is not a readable image ({e})") from None


def open_dataset(root: str | Path, check_pixels: bool = True) -> ImageDataset:
    """Open and validate a dataset folder; each problem is refused in one sentence naming the file."""
    root = Path(root)
    if not (root / "images").is_dir():
        raise UnitscopeError(f"dataset {str(root)!r} has no images/ folder; a dissection dataset holds "
                             "images/NAME.png, masks/NAME.png and concepts.json")
    concepts = _read_concepts(root / "concepts.json")
    images = sorted(p for p in (root / "images").iterdir() if p.suffix.lower() in IMAGE_SUFFIXES)
    if not images:
        raise UnitscopeError(f"{str(root / 'images')!r} holds no .png or .jpg images")
    names = [p.stem for p in images]
    sizes = {_size(p) for p in images}
    if len(sizes) > 1:
        raise UnitscopeError(f"the images in {str(root / 'images')!r} have different sizes ({sorted(sizes)[:3]}); "
                             "resize them to one size first")
    image_size = sizes.pop()
    labels = None
    mask_size = None
    if (root / "masks").is_dir():
        for img, name in zip(images, names):
            m = root / "masks" / f"{name}.png"
            if not m.is_file():
                raise UnitscopeError(f"image {img.name!r} has no mask {str(m)!r}; every image needs masks/NAME.png")
            size = _size(m)
            if size != image_size:
                raise UnitscopeError(f"mask {str(m)!r} is {size[1]}x{size[0]} but its image is "
                                     f"{image_size[1]}x{image_size[0]}; images and masks must have the same size")
        mask_size = image_size
    elif (root / "labels.json").is_file():
        labels = _read_labels(root / "labels.json", names, concepts)
    else:
        raise UnitscopeError(f"dataset {str(root)!r} has neither masks/ nor labels.json; give per-pixel masks or "
                             "image-level labels")
    ds = ImageDataset(root, names, concepts, image_size, mask_size, labels)
    if check_pixels:
        _check_concepts_present(ds)
    return ds


def _read_concepts(path: Path) -> dict[int, str]:
    if not path.is_file():
        raise UnitscopeError(f"{str(path)!r} is missing; it maps each concept index (1, 2, ...) to its name")
    try:
        raw = json.loads(path.read_text())
        concepts = {int(k): str(v) for k, v in raw.items()}
    except (ValueError, AttributeError, UnicodeDecodeError):
        raise UnitscopeError(f"{str(path)!r} is not a JSON object of concept index -> name, e.g. "
                             '{"1": "sky", "2": "grass"}') from None
    bad = [k for k in concepts if not 1 <= k <= 255]
    if bad or not concepts:
        raise UnitscopeError(f"{str(path)!r} has concept index {bad[0] if bad else 'none'}; indices run from 1 to 255 "
                             "(0 is unlabelled)")
    return concepts


def _read_labels(path: Path, names: list[str], concepts: dict[int, str]) -> dict[str, list[int]]:
    try:
        raw = json.loads(path.read_text())
        labels = {str(k): [int(c) for c in v] for k, v in raw.items()}
    except (ValueError, AttributeError, TypeError):
        raise UnitscopeError(f"{str(path)!r} is not a JSON object of image name -> list of concept indices") from None
    for n in names:
        for c in labels.get(n, []):
            if c not in concepts:
                raise UnitscopeError(f"{str(path)!r} labels image {n!r} with concept {c}, which concepts.json does "
                                     f"not name (it has {sorted(concepts)})")
    return {n: labels.get(n, []) for n in names}


def _check_concepts_present(ds: ImageDataset) -> None:
    """A concept named in concepts.json but never present cannot be scored (IoU 0/0): refuse it by name."""
    seen: set[int] = set()
    if ds.labels is not None:
        seen = {c for v in ds.labels.values() for c in v}
    else:
        for n in ds.names:
            seen.update(np.unique(ds.mask(n)).tolist())
        unknown = sorted(seen - set(ds.concepts) - {0})
        if unknown:
            raise UnitscopeError(f"the masks use concept index {unknown[0]}, which concepts.json does not name; "
                                 f"name it there or relabel it 0 (unlabelled)")
    missing = [c for c in sorted(ds.concepts) if c not in seen]
    if missing:
        c = missing[0]
        raise UnitscopeError(f"concept {c} ({ds.concepts[c]!r}) has no pixels in any mask of {str(ds.root)!r}; its IoU "
                             "would be 0/0, so remove it from concepts.json or add images that show it")
