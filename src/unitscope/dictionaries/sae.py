"""Sparse autoencoders in the SAELens layout: W_enc[d_in, d_sae], b_enc, W_dec[d_sae, d_in], b_dec.

Each architecture is one class registered by its SAELens `architecture` name. Inference (`encode`)
returns dense codes; training (`training_forward`) uses the sparse kernels and returns the loss terms.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnitscopeError
from .base import Dictionary, register
from .kernels import select_encode, sparse_decode


@dataclass
class TrainOutput:
    """What one training forward returns to the trainer."""

    loss: torch.Tensor  # scalar to minimise
    fvu: torch.Tensor  # fraction of variance unexplained of this batch (detached)
    l0: float  # mean number of active latents per token
    fired: torch.Tensor  # indices of latents that fired in this batch (for dead-latent tracking)
    extra: dict[str, float] = field(default_factory=dict)


def fvu(x: torch.Tensor, recon: torch.Tensor) -> torch.Tensor:
    """FVU = sum ||x - x̂||² / sum ||x - mean(x)||²  (= 1 - explained variance; mean over the batch)."""
    return (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum().clamp_min(1e-12)


class SparseAutoencoder(Dictionary):
    """Shared weights and file handling of every SAE kind."""

    def __init__(self, d_in: int, n_units: int, metadata: dict[str, Any] | None = None,
                 apply_b_dec_to_input: bool = True, d_out: int | None = None):
        super().__init__(d_in, n_units, d_out, metadata)
        self.apply_b_dec_to_input = apply_b_dec_to_input
        self.W_enc = nn.Parameter(torch.empty(self.d_in, self.n_units))
        self.b_enc = nn.Parameter(torch.zeros(self.n_units))
        self.W_dec = nn.Parameter(torch.empty(self.n_units, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            w = torch.randn(self.n_units, self.d_out, generator=generator)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            if self.d_out == self.d_in:
                self.W_enc.copy_(self.W_dec.t())
            else:
                self.W_enc.copy_(torch.randn(self.d_in, self.n_units, generator=generator) / self.d_in ** 0.5)

    # ---- protocol ---------------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        self.check_width(x)
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input and self.d_out == self.d_in:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        return self.activate(self.pre_activations(x))

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_width(codes, self.n_units, "code")
        return codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    @property
    def directions(self) -> torch.Tensor:
        return self.W_dec

    # ---- files ------------------------------------------------------------------------------------
    def arch_config(self) -> dict[str, Any]:
        return {"apply_b_dec_to_input": self.apply_b_dec_to_input, "normalize_activations": "none"}

    @classmethod
    def _kwargs(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {}

    @classmethod
    def from_weights(cls, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> Dictionary:
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            if key not in weights:
                raise UnitscopeError(f"the weights of this {cfg['architecture']} dictionary lack {key!r}")
        d_in, d_sae = weights["W_enc"].shape
        if cfg.get("normalize_activations", "none") not in ("none", None):
            raise UnitscopeError(
                f"cfg.json asks for normalize_activations={cfg['normalize_activations']!r}, which this loader "
                "does not apply; fold the scaling into the weights and set it to 'none'"
            )
        sae = cls(d_in, d_sae, metadata=cfg.get("metadata", {}),
                  apply_b_dec_to_input=cfg.get("apply_b_dec_to_input", True),
                  d_out=weights["W_dec"].shape[1], **cls._kwargs(cfg))
        sae.load_state_dict({k: v for k, v in weights.items() if k in sae.state_dict()}, strict=False)
        return sae.to(weights["W_enc"].dtype)

    # ---- training ---------------------------------------------------------------------------------
    def fold_scaling(self, scale: float) -> None:
        """Trained on x*scale; make the saved weights act on raw x and reconstruct raw x."""
        with torch.no_grad():
            self.W_enc.mul_(scale)
            self.W_dec.div_(scale)
            self.b_dec.div_(scale)

    def training_forward(self, x: torch.Tensor, dead: torch.Tensor | None = None,
                         target: torch.Tensor | None = None) -> TrainOutput:
        raise NotImplementedError


@register("topk")
class TopKSAE(SparseAutoencoder):
    """TopK SAE (Gao et al. 2024): keep the k largest pre-activations (ReLU'd); AuxK revives dead latents."""

    def __init__(self, d_in: int, n_units: int, k: int = 32, aux_k: int | None = None,
                 aux_coef: float = 1 / 32, **kw: Any):
        if not 0 < k <= n_units:
            raise UnitscopeError(f"k={k} is not valid for a dictionary of {n_units} units; use 1 <= k <= {n_units}")
        super().__init__(d_in, n_units, **kw)
        self.k = int(k)
        self.aux_k = int(aux_k if aux_k is not None else max(1, d_in // 2))
        self.aux_coef = aux_coef

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        vals, idx = pre.topk(self.k, dim=-1)
        return torch.zeros_like(pre).scatter_(-1, idx, F.relu(vals))

    def arch_config(self) -> dict[str, Any]:
        return {**super().arch_config(), "k": self.k}

    @classmethod
    def _kwargs(cls, cfg: dict[str, Any]) -> dict[str, Any]:
        return {"k": int(cfg.get("k", 32))}

    def training_forward(self, x: torch.Tensor, dead: torch.Tensor | None = None,
                         target: torch.Tensor | None = None,
                         compute_dtype: torch.dtype | None = None) -> TrainOutput:
        target = x if target is None else target
        x_in = x - self.b_dec if self.apply_b_dec_to_input and self.d_out == self.d_in else x
        k = self.k
        n_dead = int(dead.sum()) if dead is not None else 0
        ka = min(self.aux_k, n_dead)

        def select(pre: torch.Tensor) -> torch.Tensor:
            top = pre.topk(k, dim=1, sorted=False).indices
            if not ka:
                return top
            aux = pre.masked_fill(~dead, float("-inf")).topk(ka, dim=1, sorted=False).indices
            return torch.cat([top, aux], dim=1)

        vals, idx = select_encode(x_in, self.W_enc.t(), self.b_enc, select, compute_dtype)
        acts = F.relu(vals[:, :k])
        recon = sparse_decode(acts, idx[:, :k], self.W_dec) + self.b_dec
        loss = fvu(target, recon)
        extra = {}
        if ka:
            err = (target - recon).detach()
            aux_recon = sparse_decode(F.relu(vals[:, k:]), idx[:, k:], self.W_dec)
            aux = fvu(err, aux_recon + err.mean(0))
            loss = loss + self.aux_coef * aux.nan_to_num(0.0)
            extra["auxk_fvu"] = float(aux)
        fired_mask = acts > 0
        return TrainOutput(loss, loss.detach() if not ka else fvu(target, recon).detach(),
                           float(fired_mask.sum()) / x.shape[0], idx[:, :k][fired_mask], extra)
