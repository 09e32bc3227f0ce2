"""Linear unit kinds that need no training loop: the identity basis over a site (neurons)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnitscopeError
from .base import Dictionary, register


@register("neurons")
class Neurons(Dictionary):
    """The identity basis: each coordinate of the site is a unit; encode and decode are exact no-ops.

    `directions` default to the standard basis; for `blocks.{i}.mlp_hidden` they are the rows that the
    down projection writes into the residual stream, so steering and the logit lens work on neurons too.
    """

    def __init__(self, d_in: int, n_units: int | None = None, directions: torch.Tensor | None = None,
                 metadata: dict[str, Any] | None = None, **_: Any):
        if n_units is not None and n_units != d_in:
            raise UnitscopeError(f"a neuron basis has exactly d_in={d_in} units, not {n_units}")
        dirs = torch.eye(d_in) if directions is None else directions.detach().clone()
        super().__init__(d_in, d_in, d_in, metadata)
        self.W_dec = nn.Parameter(dirs, requires_grad=False)

    @classmethod
    def from_subject(cls, subject: Any, site: str) -> Neurons:
        from ..sites import down_projection

        down = down_projection(subject.model, site)
        width = subject.width(site)
        dirs = None
        if down is not None:
            w = down.weight.detach().float()
            dirs = w.t() if isinstance(down, nn.Linear) else w  # Conv1D (GPT-2) stores [in, out]
        return cls(width, directions=dirs, metadata={"model_name": subject.name, "hook_name": site})

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.check_width(x)
        return x

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_width(codes, self.n_units, "code")
        return codes

    @property
    def directions(self) -> torch.Tensor:
        return self.W_dec

    @classmethod
    def from_weights(cls, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> Dictionary:
        if "W_dec" not in weights:
            raise UnitscopeError("the weights of a neurons dictionary lack 'W_dec'")
        return cls(int(cfg["d_in"]), directions=weights["W_dec"], metadata=cfg.get("metadata", {}))
