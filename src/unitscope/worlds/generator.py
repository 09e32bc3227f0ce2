"""A small scene generator and a small segmenter, for GAN dissection on the drawn-scenes world.

The generator maps a latent to an image. Its latent is the scene's parameters (`encode_params`: sky and grass
heights, the pond, two tree slots, the house, the tint) plus noise dimensions, and it is trained to reproduce
the drawn scene (squared error): not adversarial, but a generator of the same shape as a GAN's (latent ->
linear -> upsampling convs), so its intermediate units can be dissected and intervened on. Fresh latents are
fresh scene parameters. Its scenes (`sample_gan_params`) have larger concepts than the classifier's (each covers
roughly a tenth of the pixels, so an ablation's effect is measurable on a few hundred images), and its dissected
layer is wide (256 units at 8x8, like the 8x8 layer Bau et al. dissect in Progressive GAN) so that the N units
found for a concept are a small share of the layer. The segmenter is a small fully convolutional net trained on
drawn scenes with their exact masks (per-pixel cross-entropy).
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from .scenes import CONCEPTS, SceneParams, draw

LATENT = 24
NOISE = 8
WORLD = "slots"  # the scene layout of sample_gan_params; part of the demo's weight file names
GEN_LAYER = "blocks.relu1:output"  # 256 maps of 8x8 in a 32x32 generator: the layer the demo dissects


def encode_params(p: SceneParams) -> np.ndarray:
    v = np.zeros(LATENT, np.float32)
    v[0], v[1] = p.sky, p.grass
    if p.pond:
        v[2], v[3:7] = 1, p.pond
    for i, (cx, cy, r) in enumerate(p.trees[:2]):
        v[7 + 4 * i], v[8 + 4 * i:11 + 4 * i] = 1, (cx, cy, r)
    if p.house:
        v[15], v[16:20] = 1, p.house
    v[20:23] = p.tint
    return v


GAN_COLOURS = {"water": (0.4, 0.12, 0.55)}  # violet: no blend of two other concepts looks like it (docs/vision.md)


def sample_gan_params(rng: np.random.Generator) -> SceneParams:
    """Scene parameters for the generator's world: a sky strip and a grass strip (each in 70% of scenes), and
    between them a pond, a house and one or two trees, each in its own third of the image's width, so that no
    object stands on a strip or on another object. Occlusion couples concepts: a house drawn over grass or over
    a pond is painted by units that also paint what it hides, and removing it uncovers the pond."""
    sky = float(rng.uniform(0.14, 0.22)) if rng.random() < 0.7 else 0.0
    grass = float(rng.uniform(0.18, 0.25)) if rng.random() < 0.7 else 0.0
    kinds = (["pond"] if rng.random() < 0.5 else []) + (["house"] if rng.random() < 0.5 else [])
    kinds += ["tree"] * (int(rng.integers(1, 3)) if rng.random() < 0.6 else 0)
    slots = rng.permutation(3)
    pond, trees, house = None, [], None
    for kind, slot in zip(kinds, slots):  # at most three objects, one per slot
        mid = (float(slot) + 0.5) / 3
        if kind == "pond":
            pond = (mid + float(rng.uniform(-0.02, 0.02)), float(rng.uniform(0.5, 0.6)), float(rng.uniform(0.13, 0.16)),
                    float(rng.uniform(0.09, 0.13)))
        elif kind == "tree":
            trees.append((mid + float(rng.uniform(-0.03, 0.03)), float(rng.uniform(0.34, 0.4)),
                          float(rng.uniform(0.11, 0.15))))
        else:
            w = float(rng.uniform(0.24, 0.31))
            house = (mid - w / 2 + float(rng.uniform(-0.01, 0.01)), float(rng.uniform(0.6, 0.7)), w,
                     float(rng.uniform(0.15, 0.22)))
    tint = tuple(float(t) for t in rng.uniform(-0.05, 0.05, 3))
    return SceneParams(sky, grass, pond, trees, house, tint)  # type: ignore[arg-type]


def sample_latents(n: int, size: int, seed: int) -> tuple[torch.Tensor, np.ndarray, np.ndarray]:
    """(latents (n, LATENT + NOISE), drawn images (n, size, size, 3), masks) for n fresh scenes."""
    rng = np.random.default_rng(seed)
    z = np.zeros((n, LATENT + NOISE), np.float32)
    images = np.zeros((n, size, size, 3), np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):
        p = sample_gan_params(rng)
        z[i, :LATENT] = encode_params(p)
        z[i, LATENT:] = rng.normal(0, 1, NOISE)
        images[i], masks[i] = draw(p, size, rng, GAN_COLOURS)
    return torch.from_numpy(z), images, masks


class SceneGenerator(nn.Module):
    """latent -> linear -> (stem, 4x4) -> up, conv `width` (8x8, the dissected `blocks.relu1`) -> up, conv 64
    (16x16) -> up, conv 32 (32x32) -> RGB."""

    def __init__(self, width: int = 256, stem: int = 128):
        super().__init__()
        self.stem = stem
        self.fc = nn.Sequential(nn.Linear(LATENT + NOISE, 256), nn.ReLU(), nn.Linear(256, stem * 4 * 4), nn.ReLU())
        self.blocks = nn.Sequential(OrderedDict([
            ("up1", nn.Upsample(scale_factor=2)), ("conv1", nn.Conv2d(stem, width, 3, padding=1)),
            ("relu1", nn.ReLU()),
            ("up2", nn.Upsample(scale_factor=2)), ("conv2", nn.Conv2d(width, 64, 3, padding=1)),
            ("relu2", nn.ReLU()),
            ("up3", nn.Upsample(scale_factor=2)), ("conv3", nn.Conv2d(64, 32, 3, padding=1)), ("relu3", nn.ReLU()),
            ("out", nn.Conv2d(32, 3, 3, padding=1)), ("sigmoid", nn.Sigmoid()),
        ]))

    def forward(self, z: torch.Tensor) -> torch.Tensor:
        return self.blocks(self.fc(z).reshape(len(z), self.stem, 4, 4))


class Segmenter(nn.Module):
    def __init__(self, width: int = 32):
        super().__init__()
        self.net = nn.Sequential(
            nn.Conv2d(3, width, 3, padding=1), nn.ReLU(), nn.Conv2d(width, width, 3, padding=2, dilation=2), nn.ReLU(),
            nn.Conv2d(width, width, 3, padding=4, dilation=4), nn.ReLU(), nn.Conv2d(width, len(CONCEPTS) + 1, 1))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Logits (B, 1 + n_concepts, H, W); class 0 is unlabelled."""
        return self.net(x)


def _images(images: np.ndarray) -> torch.Tensor:
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)


def train_generator(z: torch.Tensor, images: np.ndarray, steps: int = 600, batch_size: int = 64, seed: int = 0,
                    lr: float = 2e-3, progress: bool = False, **sizes: int) -> SceneGenerator:
    """Adam on squared error; `sizes` (width, stem) pass to SceneGenerator (tests train a narrow one)."""
    from tqdm.auto import tqdm

    torch.manual_seed(seed)
    gen_model, x = SceneGenerator(**sizes), _images(images)
    opt = torch.optim.Adam(gen_model.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in tqdm(range(steps), desc="train generator", unit="step", disable=not progress):
        idx = torch.randint(len(z), (batch_size,), generator=g)
        loss = (gen_model(z[idx]) - x[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return gen_model.eval()


def train_segmenter(images: np.ndarray, masks: np.ndarray, steps: int = 400, batch_size: int = 32, seed: int = 0,
                    lr: float = 3e-3) -> Segmenter:
    torch.manual_seed(seed)
    seg, x, y = Segmenter(), _images(images), torch.from_numpy(masks.astype(np.int64))
    opt = torch.optim.Adam(seg.parameters(), lr=lr)
    g = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=g)
        loss = nn.functional.cross_entropy(seg(x[idx]), y[idx])
        opt.zero_grad()
        loss.backward()
        opt.step()
    return seg.eval()
