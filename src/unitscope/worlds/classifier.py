"""A small CNN that tells which concepts a scene contains and how much of it each covers, trained in well under a
minute on one core.

Two heads read the last conv layer: one max-pools each channel over space to predict presence (multi-label), the
other mean-pools it to predict each concept's pixel fraction. A channel helps only where it fires, over the whole
extent of the concept: the pressure that makes spatial concept detectors (network dissection's subject) emerge.
"""

from __future__ import annotations

from collections import OrderedDict

import numpy as np
import torch
from torch import nn

from .scenes import CONCEPTS, presence

LAST_CONV = "features.relu3:output"  # the site network dissection reads in the demo


class SceneClassifier(nn.Module):
    def __init__(self, n_concepts: int = 5, width: int = 64):
        super().__init__()
        self.features = nn.Sequential(OrderedDict([
            ("conv1", nn.Conv2d(3, 16, 3, padding=1)), ("relu1", nn.ReLU()), ("pool1", nn.MaxPool2d(2)),
            ("conv2", nn.Conv2d(16, width, 3, padding=1)), ("relu2", nn.ReLU()), ("pool2", nn.MaxPool2d(2)),
            ("conv3", nn.Conv2d(width, width, 3, padding=1)), ("relu3", nn.ReLU()),
        ]))
        self.head = nn.Linear(width, n_concepts)
        self.extent = nn.Linear(width, n_concepts)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Presence logits (B, n_concepts)."""
        return self.head(self.features(x).amax(dim=(2, 3)))

    def forward_both(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(presence logits, predicted pixel fractions)."""
        f = self.features(x)
        return self.head(f.amax(dim=(2, 3))), self.extent(f.mean(dim=(2, 3)))


def to_tensor(images: np.ndarray) -> torch.Tensor:
    """uint8 (n, H, W, 3) -> float (n, 3, H, W) in [0, 1], the input every scene network takes."""
    return torch.from_numpy(images).permute(0, 3, 1, 2).float().div(255)


def train_classifier(images: np.ndarray, masks: np.ndarray, steps: int = 300, batch_size: int = 32,
                     seed: int = 0, width: int = 64, lr: float = 3e-3) -> SceneClassifier:
    """Adam on binary cross-entropy of concept presence plus the squared error of the (x10) pixel fractions;
    deterministic for a seed on one thread."""
    torch.manual_seed(seed)
    model = SceneClassifier(len(CONCEPTS), width)
    x, y = to_tensor(images), torch.from_numpy(presence(masks))
    frac = torch.from_numpy(np.stack([(masks == c).mean((1, 2)) for c in sorted(CONCEPTS)], 1)).float() * 10
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        idx = torch.randint(len(x), (batch_size,), generator=gen)
        logits, extent = model.forward_both(x[idx])
        loss = nn.functional.binary_cross_entropy_with_logits(logits, y[idx]) + (extent - frac[idx]).pow(2).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def accuracy(model: nn.Module, images: np.ndarray, masks: np.ndarray) -> np.ndarray:
    """Per-concept accuracy of the presence predictions."""
    pred = model(to_tensor(images)) > 0
    return (pred.numpy() == presence(masks).astype(bool)).mean(0)
