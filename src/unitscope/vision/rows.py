"""Spatial positions as rows: a conv layer's (B, C, H, W) map becomes B*H*W rows of C, as a store holds token
positions, so the existing dictionaries (SAEs, PCA, k-means...) train and encode on images unchanged."""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import torch
from torch import nn

from .. import hooks, sites
from ..errors import UnitscopeError


def spatial_rows(acts: torch.Tensor) -> torch.Tensor:
    """(B, C, H, W) -> (B*H*W, C)."""
    return acts.permute(0, 2, 3, 1).reshape(-1, acts.shape[1])


def from_rows(rows: torch.Tensor, batch: int, height: int, width: int) -> torch.Tensor:
    """The inverse of spatial_rows for any number of columns (e.g. dictionary codes)."""
    return rows.reshape(batch, height, width, -1).permute(0, 3, 1, 2)


@torch.no_grad()
def layer_output(model: nn.Module, site: str, x: torch.Tensor, spatial: bool = True) -> torch.Tensor:
    """The activation at `site` ('module.path:input|output') for input x; the forward stops there."""
    ref = sites.resolve_site(model, site)
    with hooks.capture(model, [ref], stop=True) as acts:
        try:
            model(x)
        except hooks.StopForward:
            pass
    if site not in acts:
        raise UnitscopeError(f"layer {site!r} was never reached by the model's forward; pick a module the forward uses")
    a = acts[site]
    if spatial and a.dim() != 4:
        raise UnitscopeError(f"layer {site!r} gives activations of shape {tuple(a.shape)}, with no spatial dimensions; "
                             "dissection needs a convolutional layer whose output is (batch, channels, height, width)")
    return a.float()


class RowSource:
    """A training source (see dictionaries/sources.py) over rows held in memory: shuffled batches, the same ones
    for the same seed, so the ordinary Trainer trains any dictionary kind on spatial (or sequence) rows."""

    def __init__(self, rows: torch.Tensor, batch_size: int, seed: int = 0, metadata: dict[str, Any] | None = None):
        if rows.dim() != 2 or len(rows) < batch_size:
            raise UnitscopeError(f"need at least one batch ({batch_size}) of 2-D rows to train on, not a tensor of "
                                 f"shape {tuple(rows.shape)}")
        self.rows, self.batch_size, self.seed = rows.float(), batch_size, seed
        self._metadata = metadata or {}

    def widths(self) -> tuple[int, None]:
        return self.rows.shape[1], None

    def metadata(self) -> dict[str, Any]:
        return dict(self._metadata)

    def batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        per_epoch = len(self.rows) // self.batch_size
        b = start
        while True:
            epoch, i = divmod(b, per_epoch)
            perm = torch.randperm(len(self.rows), generator=torch.Generator().manual_seed(self.seed * 100003 + epoch))
            x = self.rows[perm[i * self.batch_size:(i + 1) * self.batch_size]]
            yield x, x
            b += 1


def train_on_rows(rows: torch.Tensor, out: str, architecture: str = "topk", n_units: int = 64, k: int = 4,
                  steps: int = 500, batch_size: int = 256, seed: int = 0, site: str = "rows",
                  metadata: dict[str, Any] | None = None, fixed_decoder_bias: bool = False, **extra: Any):
    """Train a dictionary of any trainable kind on in-memory rows with the project's Trainer; returns it.

    `fixed_decoder_bias` holds b_dec at its start (the rows' geometric median): when every row has exactly one
    value of a categorical attribute, a trained b_dec moves onto one value and that value gets no unit of its own
    (measured in docs/vision.md, RecSAE)."""
    from ..dictionaries.train import TrainConfig, Trainer

    cfg = TrainConfig(architecture=architecture, n_units=n_units, k=k, batch_size=batch_size,
                      train_tokens=steps * batch_size, seed=seed, checkpoint_every=10**9, compute_dtype="float32",
                      extra=extra)
    trainer = Trainer(RowSource(rows, batch_size, seed, metadata), site, cfg, out, progress=False)
    if fixed_decoder_bias:  # a zero gradient: Adam's moments stay 0 and so does every update
        trainer.sae.b_dec.register_hook(torch.zeros_like)
    return trainer.run()

