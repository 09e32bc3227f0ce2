"""Sparse autoencoders in the SAELens layout: W_enc[d_in, d_sae], b_enc, W_dec[d_sae, d_in], b_dec.

Each architecture is one class registered by its SAELens `architecture` name. Inference (`encode`)
returns dense codes; training (`training_forward`) uses the sparse kernels and returns the loss terms.
"""

from __future__ import annotations

import json
import math
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn

from .. import distributed
from ..distributed import batch_mean, batch_sum, row_mean
from ..errors import UnitscopeError
from .base import FORMATS, Dictionary, register, require_weights
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
    """FVU = sum ||x - x̂||² / sum ||x - mean(x)||²  (= 1 - explained variance; mean over the batch). In a
    data-parallel step the mean and the denominator are the global batch's, so the ranks' FVUs sum to the global one."""
    return (x - recon).pow(2).sum() / batch_sum((x - batch_mean(x)).pow(2).sum()).clamp_min(1e-12)


class SparseAutoencoder(Dictionary):
    """Shared weights and file handling of every SAE kind."""

    skip: bool = False  # skip transcoders add W_skip @ x to the reconstruction
    sparse_kernels: bool = False  # trains through kernels.select_encode, the only place compute_dtype applies
    tied_init: bool = True  # start with W_enc = W_decᵀ (input and output in one space); not for transcoders

    def __init__(self, d_in: int, n_units: int, metadata: dict[str, Any] | None = None,
                 apply_b_dec_to_input: bool = True, d_out: int | None = None):
        super().__init__(d_in, n_units, d_out, metadata)
        self.apply_b_dec_to_input = apply_b_dec_to_input and self.d_out == self.d_in
        # the sparse kernels read and write the encoder by rows: keep [d, n] (SAELens) as a view of [n, d] storage
        enc = torch.empty(self.n_units, self.d_in).t() if self.sparse_kernels else torch.empty(self.d_in, self.n_units)
        self.W_enc = nn.Parameter(enc)
        self.b_enc = nn.Parameter(torch.zeros(self.n_units))
        self.W_dec = nn.Parameter(torch.empty(self.n_units, self.d_out))
        self.b_dec = nn.Parameter(torch.zeros(self.d_out))
        if self.skip:
            self.W_skip = nn.Parameter(torch.zeros(self.d_out, self.d_in))
        self.reset_parameters()

    def reset_parameters(self, generator: torch.Generator | None = None) -> None:
        with torch.no_grad():
            w = torch.randn(self.n_units, self.d_out, generator=generator)
            self.W_dec.copy_(w / w.norm(dim=1, keepdim=True))
            if self.tied_init and self.d_out == self.d_in:
                self.W_enc.copy_(self.W_dec.t())  # tied initialisation: input and output share a space
            else:
                self.W_enc.copy_(torch.randn(self.d_in, self.n_units, generator=generator) / self.d_in ** 0.5)

    def initialise(self, x: torch.Tensor) -> None:
        """Data-dependent initialisation from the first (scaled) training rows, after b_dec; most kinds need none."""

    def weights(self) -> dict[str, torch.Tensor]:
        """Training-only state (`train_*` buffers, e.g. an adaptive penalty coefficient) stays in checkpoints."""
        return {k: v for k, v in super().weights().items() if not k.startswith("train_")}

    # ---- protocol ---------------------------------------------------------------------------------
    def pre_activations(self, x: torch.Tensor) -> torch.Tensor:
        self.check_width(x)
        x = x.to(self.W_enc.dtype)
        if self.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        codes, recon = super().reconstruct(x)
        if self.skip:
            recon = recon + x.to(self.W_skip.dtype) @ self.W_skip.t()
        return codes, recon

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
        require_weights(cfg, weights, "W_enc", "b_enc", "W_dec", "b_dec", *(["W_skip"] if cls.skip else []))
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
        if cfg.get("rescale_acts_by_decoder_norm"):
            _fold_decoder_norm(sae)
        return sae.to(weights["W_enc"].dtype)

    # ---- training ---------------------------------------------------------------------------------
    def fold_scaling(self, scale: float, out_scale: float | None = None) -> None:
        """Trained on x*scale (targets y*out_scale); make the saved weights act on and give raw values."""
        out_scale = scale if out_scale is None else out_scale
        with torch.no_grad():
            self.W_enc.mul_(scale)
            self.W_dec.div_(out_scale)
            self.b_dec.div_(out_scale)
            if self.skip:
                self.W_skip.mul_(scale / out_scale)
        if self.apply_b_dec_to_input and scale != out_scale:
            raise UnitscopeError("an SAE that subtracts b_dec from its input needs one scale for input and output")

    # Dense training path (ReLU-like kinds, always float32); TopK kinds override with the sparse kernels.
    def activate_train(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, sparsity penalty) for one batch of pre-activations."""
        raise NotImplementedError

    def _init_sparsity_target(self, k: float | None, coefficient: float | None, initial: float,
                              rate: float = 0.05) -> None:
        """A penalised kind's sparsity: a fixed `coefficient`, or (None) one adapted every step so that the mean L0
        settles at `k`, the way TopK kinds are told their sparsity. A fixed coefficient gives an L0 that depends on
        the data, the width and the training length (0.001 gave L0 45 on a 4-sparse synthetic set); a target does
        not. The coefficient follows log c += rate * log(L0 / k), clipped to ±1 per unit of rate."""
        if coefficient is not None and not (coefficient >= 0 and math.isfinite(coefficient)):
            raise UnitscopeError(f"the sparsity coefficient must be zero or positive, not {coefficient}")
        self.target_l0 = None if coefficient is not None else float(k or 1)
        self.sparsity_rate = rate
        start = coefficient if coefficient is not None else initial
        self.register_buffer("train_log_coefficient", torch.tensor(math.log(start) if start > 0 else -math.inf))

    @property
    def sparsity_coefficient(self) -> float:
        return float(self.train_log_coefficient.exp())

    @torch.no_grad()
    def adapt_sparsity(self, l0: float) -> None:
        """After an optimiser step (the trainer calls it), move an adaptive penalty coefficient towards its target
        L0; a no-op for kinds without one. Kept out of `training_forward`, which leaves the loss a pure function."""
        if getattr(self, "target_l0", None) is not None:
            step = math.log(max(l0, 1e-3) / self.target_l0)
            self.train_log_coefficient.add_(self.sparsity_rate * max(-1.0, min(1.0, step)))

    def training_forward(self, x: torch.Tensor, dead: torch.Tensor | None = None,
                         target: torch.Tensor | None = None,
                         compute_dtype: torch.dtype | None = None) -> TrainOutput:
        target = x if target is None else target
        x_in = x - self.b_dec if self.apply_b_dec_to_input else x
        pre = torch.addmm(self.b_enc, x_in, self.W_enc)
        codes, penalty = self.activate_train(pre)
        recon = codes @ self.W_dec + self.b_dec
        if self.skip:
            recon = recon + x @ self.W_skip.t()
        err = fvu(target, recon)
        loss = err + penalty
        extra = {"penalty": float(penalty.detach()), "sparsity_coefficient": self.sparsity_coefficient}
        n_dead = int(dead.sum()) if dead is not None else 0
        aux_k, aux_coef = getattr(self, "aux_k", 0), getattr(self, "aux_coef", 0.0)
        if n_dead and aux_k and aux_coef:
            # AuxK, as the TopK kinds have it: the dead latents' largest (ReLU'd) pre-activations reconstruct the
            # residual, so their encoder and decoder rows move towards what the live ones miss and they fire again
            residual = (target - recon).detach()
            vals, idx = pre.masked_fill(~dead, float("-inf")).topk(min(aux_k, n_dead), dim=1, sorted=False)
            aux = fvu(residual, sparse_decode(F.relu(vals), idx, self.W_dec) + batch_mean(residual))
            loss = loss + aux_coef * aux.nan_to_num(0.0)
            extra["auxk_fvu"] = float(aux.detach())
        fired = codes > 0
        return TrainOutput(loss, err.detach(), float(fired.sum()) / x.shape[0], fired.any(0).nonzero().flatten(), extra)


@register("topk")
class TopKSAE(SparseAutoencoder):
    """TopK SAE (Gao et al. 2024): keep the k largest pre-activations (ReLU'd); AuxK revives dead latents."""

    sparse_kernels = True

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

    def reconstruction_loss(self, target, acts, idx, recon, full: torch.Tensor) -> torch.Tensor:
        """The loss to minimise; `full` is the FVU of the whole dictionary, which is also what gets logged."""
        return full

    def select_top(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Latents kept per row: (idx[B, m], mask[B, m] of the picks that count, or None when all do)."""
        return pre.topk(self.k, dim=1, sorted=False).indices, None

    def training_forward(self, x: torch.Tensor, dead: torch.Tensor | None = None,
                         target: torch.Tensor | None = None,
                         compute_dtype: torch.dtype | None = None) -> TrainOutput:
        target = x if target is None else target
        x_in = x - self.b_dec if self.apply_b_dec_to_input else x
        n_dead = int(dead.sum()) if dead is not None else 0
        ka = min(self.aux_k, n_dead)
        picked: dict[str, Any] = {}

        def select(pre: torch.Tensor) -> torch.Tensor:
            top, keep = self.select_top(pre)
            picked["m"], picked["keep"] = top.shape[1], keep
            if not ka:
                return top
            dead_units = dead.nonzero().flatten()  # n_dead >= ka: the dead columns' topk, not a masked [B, n] copy
            aux = dead_units[pre.index_select(1, dead_units).topk(ka, dim=1, sorted=False).indices]
            return torch.cat([top, aux], dim=1)

        vals, idx = select_encode(x_in, self.W_enc.t(), self.b_enc, select, compute_dtype)
        m, keep = picked["m"], picked["keep"]
        acts = F.relu(vals[:, :m])
        if keep is not None:
            acts = acts * keep
        top = idx[:, :m]
        recon = sparse_decode(acts, top, self.W_dec) + self.b_dec
        if self.skip:
            recon = recon + x @ self.W_skip.t()
        full = fvu(target, recon)
        loss = self.reconstruction_loss(target, acts, top, recon, full)
        extra = {}
        if ka:
            err = (target - recon).detach()
            aux_recon = sparse_decode(F.relu(vals[:, m:]), idx[:, m:], self.W_dec)
            aux = fvu(err, aux_recon + batch_mean(err))
            loss = loss + self.aux_coef * aux.nan_to_num(0.0)
            extra["auxk_fvu"] = float(aux.detach())
        if loss is not full:
            extra["loss"] = float(loss.detach())
        fired_mask = acts > 0
        self.after_step(acts[fired_mask].detach())
        return TrainOutput(loss, full.detach(), float(fired_mask.sum()) / x.shape[0], top[fired_mask], extra)

    def after_step(self, fired_values: torch.Tensor) -> None:
        """Hook for kinds that learn from the batch's activations (BatchTopK's threshold)."""


def _fold_decoder_norm(sae: SparseAutoencoder) -> None:
    """SAELens' rescale_acts_by_decoder_norm, folded into the weights (same codes times the row norms)."""
    with torch.no_grad():
        norms = sae.W_dec.norm(dim=1)
        sae.W_enc.mul_(norms)
        sae.b_enc.mul_(norms)
        sae.W_dec.div_(norms[:, None])


@register("standard")
class StandardSAE(SparseAutoencoder):
    """ReLU SAE with an L1 penalty weighted by decoder norm (Bricken et al. 2023; decoder rows unit-norm). The L1
    coefficient adapts so that the mean L0 settles at 2k unless `l1_coefficient` fixes it: an L1 penalty shrinks
    every code, and the SAE makes up for it with small extra activations. Held at L0 = k it shrinks too hard to
    afford rare features (512 planted features in 128 dimensions, k = 4, 1024 units: held at L0 4, FVU 0.43 and
    77.7% of the features recovered; at L0 8, FVU 0.03 and 99.4%)."""

    def __init__(self, d_in: int, n_units: int, k: float = 32, l1_coefficient: float | None = None,
                 aux_k: int | None = None, aux_coef: float = 1 / 32, **kw: Any):
        super().__init__(d_in, n_units, **kw)
        self._init_sparsity_target(2 * k, l1_coefficient, initial=5e-3)
        self.aux_k, self.aux_coef = int(aux_k if aux_k is not None else max(1, d_in // 2)), aux_coef

    @torch.no_grad()
    def initialise(self, x: torch.Tensor) -> None:
        """With an L0 target, each encoder bias starts so that its latent fires on a fraction k/n of the first rows:
        training starts as sparse as it should end instead of every latent firing on half the rows."""
        if self.target_l0 is None:
            return
        pre = self.pre_activations(x.to(self.W_enc.dtype)).float()
        rank = min(len(pre), max(1, round((1 - self.target_l0 / self.n_units) * len(pre))))
        self.b_enc.sub_(pre.kthvalue(rank, dim=0).values.clamp_min(0).to(self.b_enc.dtype))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre)

    def activate_train(self, pre):
        codes = F.relu(pre)
        l1 = row_mean((codes * self.W_dec.norm(dim=1)).sum(1)) / self.d_in ** 0.5
        return codes, self.train_log_coefficient.exp() * l1


class _StepSTE(torch.autograd.Function):
    """Heaviside(pre - θ) with the rectangle-kernel pseudo-derivative in θ (Rajamanoharan et al. 2024)."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        near = ((pre - threshold).abs() < bw / 2).to(pre.dtype)
        return None, (-g * near / bw).sum(0), None


class _JumpSTE(torch.autograd.Function):
    """pre * 1[pre > θ]: exact gradient in pre above θ, kernel pseudo-derivative in θ."""

    @staticmethod
    def forward(ctx, pre, threshold, bandwidth):
        ctx.save_for_backward(pre, threshold)
        ctx.bandwidth = bandwidth
        return pre * (pre > threshold).to(pre.dtype)

    @staticmethod
    def backward(ctx, g):
        pre, threshold = ctx.saved_tensors
        bw = ctx.bandwidth
        on = (pre > threshold).to(pre.dtype)
        near = ((pre - threshold).abs() < bw / 2).to(pre.dtype)
        return g * on, (-g * threshold * near / bw).sum(0), None


@register("jumprelu")
class JumpReLUSAE(SparseAutoencoder):
    """Threshold-activated SAE: pre * 1[pre > θ] per latent, trained with an L0 penalty through a
    straight-through estimator (Rajamanoharan et al. 2024). The L0 coefficient adapts so that the mean L0 settles
    at `k` unless `l0_coefficient` fixes it; with a target, each threshold starts at its latent's (1 - k/n)
    quantile on the first rows, so training starts as sparse as it should end (from a threshold of 0.1 every latent
    fired on half the rows, and on a synthetic set of 512 planted features none was recovered). BatchTopK SAEs are
    saved in this form too, as SAELens does."""

    def __init__(self, d_in: int, n_units: int, k: float = 32, l0_coefficient: float | None = None,
                 bandwidth: float = 0.05, initial_threshold: float = 0.1, aux_k: int | None = None,
                 aux_coef: float = 1 / 32, **kw: Any):
        super().__init__(d_in, n_units, **kw)
        self.aux_k, self.aux_coef = int(aux_k if aux_k is not None else max(1, d_in // 2)), aux_coef
        if not (bandwidth > 0 and math.isfinite(bandwidth)) or not (initial_threshold > 0 and
                                                                    math.isfinite(initial_threshold)):
            raise UnitscopeError(f"a JumpReLU SAE needs a positive bandwidth and initial threshold, not {bandwidth} "
                                 f"and {initial_threshold}")
        self._init_sparsity_target(k, l0_coefficient, initial=1e-3)
        self.bandwidth = bandwidth
        self.log_threshold = nn.Parameter(torch.full((self.n_units,), math.log(initial_threshold)))

    @torch.no_grad()
    def initialise(self, x: torch.Tensor) -> None:
        if self.target_l0 is None:
            return
        pre = self.pre_activations(x.to(self.W_enc.dtype))
        rank = min(len(pre), max(1, round((1 - self.target_l0 / self.n_units) * len(pre))))
        self.log_threshold.copy_(pre.float().kthvalue(rank, dim=0).values.clamp_min(self.bandwidth).log())

    @property
    def threshold(self) -> torch.Tensor:
        return self.log_threshold.exp()

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre) * (pre > self.threshold.to(pre.dtype)).to(pre.dtype)

    def activate_train(self, pre):
        th = self.threshold
        codes = _JumpSTE.apply(pre, th, self.bandwidth)
        l0 = row_mean(_StepSTE.apply(pre, th, self.bandwidth).sum(1))
        return codes, self.train_log_coefficient.exp() * l0

    def weights(self) -> dict[str, torch.Tensor]:
        w = {k: v for k, v in super().weights().items() if k != "log_threshold"}
        w["threshold"] = self.threshold.detach()
        return w

    @classmethod
    def from_weights(cls, cfg, weights):
        require_weights(cfg, weights, "threshold")
        th = weights["threshold"].float()
        sae = super().from_weights(cfg, {k: v for k, v in weights.items() if k != "threshold"})
        with torch.no_grad():
            # thresholds <= 0 behave like 0 under ReLU(pre)*1[pre > θ]; keep them representable
            sae.log_threshold.copy_(th.clamp_min(1e-30).log())
        return sae


@register("batchtopk")
class BatchTopKSAE(TopKSAE):
    """BatchTopK (Bussmann et al. 2024): the k*B largest activations over the whole batch, trained with the sparse
    kernels and AuxK like TopK. At inference a single learned threshold replaces the batch, so it is saved as a
    `jumprelu` SAE, as SAELens does."""

    def __init__(self, d_in: int, n_units: int, k: int = 32, threshold_lr: float = 0.01, **kw: Any):
        super().__init__(d_in, n_units, k=k, **kw)
        self.threshold_lr = threshold_lr
        self.register_buffer("topk_threshold", torch.zeros(()))

    def activate(self, pre: torch.Tensor) -> torch.Tensor:
        return F.relu(pre) * (pre > self.topk_threshold).to(pre.dtype)

    def select_top(self, pre: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The k*B largest positive pre-activations of the batch, as (idx[B, m], mask): each row's picks padded
        to the row with most; every value tied with the (k*B)-th is kept too, so the picks do not depend on how
        topk breaks ties (identical rows are common: repeated contexts) and one process and a data-parallel step
        (B the global batch, `distributed.kth_largest`: only each rank's top values travel) pick alike. They are
        found among each row's top M candidates (M doubles, on every rank, while some row has all its candidates
        picked, which proves no pick lies beyond them), cheaper than a topk over all B*n."""
        n = pre.shape[1]
        n_keep = self.k * distributed.global_rows(pre)
        width = min(n, 4 * self.k)
        while True:
            cand = pre.topk(width, dim=1, sorted=False)
            chosen = cand.values >= distributed.kth_largest(cand.values.flatten(), n_keep)
            if width == n or not distributed.any_rank(bool(chosen.all(1).any()), pre):
                return self._padded(cand, chosen)
            width = min(n, 2 * width)

    @staticmethod
    def _padded(cand, chosen: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        chosen = chosen & (cand.values > 0)
        m = max(1, int(chosen.sum(1).max()))
        order = chosen.float().topk(m, dim=1, sorted=False).indices
        return cand.indices.gather(1, order), chosen.gather(1, order)

    @torch.no_grad()
    def after_step(self, fired_values: torch.Tensor) -> None:
        """Running estimate of the smallest kept activation: the threshold that replaces the batch at inference."""
        low = fired_values.min() if len(fired_values) else fired_values.new_tensor(float("inf"))
        if distributed.in_data_parallel():  # the global batch's smallest kept activation
            low = distributed.all_reduce_(low.detach().clone().reshape(1), "min").reshape(())
        if not torch.isfinite(low):
            return
        if self.topk_threshold == 0:
            self.topk_threshold.fill_(low)  # start the running estimate at the first batch's value
        else:
            self.topk_threshold.mul_(1 - self.threshold_lr).add_(self.threshold_lr * low)

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> Path:
        """Saved as the equivalent JumpReLU SAE (one threshold for every latent)."""
        j = JumpReLUSAE(self.d_in, self.n_units, metadata={**self.metadata, "trained_as": "batchtopk", "k": self.k},
                        apply_b_dec_to_input=self.apply_b_dec_to_input)
        j.load_state_dict({k: v for k, v in self.state_dict().items() if k in j.state_dict()}, strict=False)
        with torch.no_grad():
            j.log_threshold.fill_(float(self.topk_threshold.clamp_min(1e-30).log()))
        return j.save(path, extra)


@register("matryoshka_topk")
class MatryoshkaTopKSAE(TopKSAE):
    """Matryoshka SAE (Bussmann et al. 2025; Nabeshima 2024) with TopK latents: every prefix of the dictionary
    (sizes in `prefixes`) is trained to reconstruct on its own, so early latents learn general features."""

    def __init__(self, d_in: int, n_units: int, k: int = 32, prefixes: list[int] | None = None, **kw: Any):
        super().__init__(d_in, n_units, k=k, **kw)
        default = [n_units // 16, n_units // 4, n_units]
        self.prefixes = sorted({int(p) for p in (prefixes or default) if 0 < int(p) <= n_units} | {n_units})

    def arch_config(self) -> dict[str, Any]:
        return {**super().arch_config(), "matryoshka_widths": self.prefixes}

    @classmethod
    def _kwargs(cls, cfg):
        return {**super()._kwargs(cfg), "prefixes": cfg.get("matryoshka_widths")}

    def prefix_reconstructions(self, acts: torch.Tensor, idx: torch.Tensor) -> list[torch.Tensor]:
        """Reconstructions from the latents below each prefix size but the last (the whole dictionary)."""
        return [sparse_decode(acts * (idx < p), idx, self.W_dec) + self.b_dec for p in self.prefixes[:-1]]

    def reconstruction_loss(self, target, acts, idx, recon, full) -> torch.Tensor:
        """The mean FVU over the prefixes (the whole dictionary included); the logged FVU stays the whole's."""
        parts = [fvu(target, part) for part in self.prefix_reconstructions(acts, idx)]
        return torch.stack([full, *parts]).mean()


@register("transcoder")
class Transcoder(StandardSAE):
    """ReLU transcoder (SAELens layout, with d_out): reads one site, reconstructs another."""

    tied_init = False

    def __init__(self, d_in: int, n_units: int, **kw: Any):
        kw["apply_b_dec_to_input"] = False
        super().__init__(d_in, n_units, **kw)


@register("skip_transcoder")
class SkipTranscoder(Transcoder):
    """Transcoder plus a linear skip connection W_skip [d_out, d_in] (Paulo et al. 2025)."""

    skip = True


@register("topk_transcoder")
class TopKTranscoder(TopKSAE):
    """TopK transcoder: reads `blocks.{i}.mlp_in`, reconstructs `blocks.{i}.mlp_out`."""

    tied_init = False

    def __init__(self, d_in: int, n_units: int, **kw: Any):
        kw["apply_b_dec_to_input"] = False
        super().__init__(d_in, n_units, **kw)


@register("topk_skip_transcoder")
class TopKSkipTranscoder(TopKTranscoder):
    skip = True


def _is_sparsify(path: Path) -> bool:
    return (path / "sae.safetensors").is_file() and (path / "cfg.json").is_file()


def load_sparsify(path: Path) -> Dictionary:
    """EleutherAI sparsify's layout: cfg.json (d_in, num_latents | expansion_factor, k, transcode,
    skip_connection) and sae.safetensors (encoder.weight [n, d_in], encoder.bias, W_dec [n, d_out], b_dec,
    W_skip). Its encoder is ReLU then top-k on (x - b_dec) (x itself for transcoders): a TopK SAE here."""
    cfg = json.loads((path / "cfg.json").read_text())
    if cfg.get("activation", "topk") != "topk":
        raise UnitscopeError(f"sparsify activation {cfg['activation']!r} in {str(path)!r} is not supported; only topk")
    w = load_file(str(path / "sae.safetensors"))
    transcode = bool(cfg.get("transcode"))
    skip = "W_skip" in w
    if skip and not transcode:
        raise UnitscopeError(f"{str(path)!r} is a sparsify SAE with a skip connection, which is not supported")
    cls = (TopKSkipTranscoder if skip else TopKTranscoder) if transcode else TopKSAE
    n, d_in = w["encoder.weight"].shape
    meta = {"hook_name": None, "sparsify_hookpoint": path.name, "source": "sparsify"}
    sae = cls(d_in, n, k=int(cfg["k"]), metadata=meta, d_out=w["b_dec"].shape[0])
    state = {"W_enc": w["encoder.weight"].t(), "b_enc": w["encoder.bias"], "W_dec": w["W_dec"], "b_dec": w["b_dec"]}
    if skip:
        state["W_skip"] = w["W_skip"]
    sae.load_state_dict(state)
    return sae.to(w["encoder.weight"].dtype)


FORMATS.append((_is_sparsify, load_sparsify))
