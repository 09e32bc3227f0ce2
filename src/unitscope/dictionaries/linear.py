"""Linear unit kinds that need no training loop: the identity basis over a site (neurons)."""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from ..errors import UnitscopeError
from .base import Dictionary, register, require_weights


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
        return cls(width, directions=dirs, metadata={"model_name": subject.name, "model_spec": subject.spec,
                                                     "model_fingerprint": subject.fingerprint(), "hook_name": site})

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
        require_weights(cfg, weights, "W_dec")
        return cls(int(cfg["d_in"]), directions=weights["W_dec"], metadata=cfg.get("metadata", {}))


class AffineDictionary(Dictionary):
    """Units that encode by a linear map: codes = (x - b_dec) @ W_enc + b_enc, x̂ = codes @ W_dec + b_dec."""

    def __init__(self, d_in: int, n_units: int, metadata: dict[str, Any] | None = None, **_: Any):
        super().__init__(d_in, n_units, d_in, metadata)
        self.W_enc = nn.Parameter(torch.zeros(d_in, n_units), requires_grad=False)
        self.b_enc = nn.Parameter(torch.zeros(n_units), requires_grad=False)
        self.W_dec = nn.Parameter(torch.zeros(n_units, d_in), requires_grad=False)
        self.b_dec = nn.Parameter(torch.zeros(d_in), requires_grad=False)

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        self.check_width(x)
        return (x.to(self.W_enc.dtype) - self.b_dec) @ self.W_enc + self.b_enc

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_width(codes, self.n_units, "code")
        return codes.to(self.W_dec.dtype) @ self.W_dec + self.b_dec

    @property
    def directions(self) -> torch.Tensor:
        return self.W_dec

    def arch_config(self) -> dict[str, Any]:
        return {"apply_b_dec_to_input": True}

    @classmethod
    def from_weights(cls, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> Dictionary:
        require_weights(cfg, weights, "W_enc", "b_enc", "W_dec", "b_dec")
        d = cls(int(cfg["d_in"]), int(cfg["d_sae"]), metadata=cfg.get("metadata", {}))
        d.load_state_dict({k: v for k, v in weights.items() if k in d.state_dict()}, strict=False)
        return d


@register("pca")
class PCA(AffineDictionary):
    """Principal directions of the activations (exact covariance, accumulated in float64 over the store).

    Codes are the (signed) coordinates along each direction; decode is the rank-n reconstruction.
    """

    def __init__(self, d_in: int, n_units: int, metadata: dict[str, Any] | None = None, **kw: Any):
        super().__init__(d_in, n_units, metadata, **kw)
        self.explained_variance = nn.Parameter(torch.zeros(n_units), requires_grad=False)

    @classmethod
    def fit(cls, batches, d_in: int, n_units: int, metadata: dict[str, Any]) -> PCA:
        n, total, outer = 0, torch.zeros(d_in, dtype=torch.float64), torch.zeros(d_in, d_in, dtype=torch.float64)
        for x in batches:
            x = x.double()
            n += x.shape[0]
            total += x.sum(0)
            outer += x.t() @ x
        if n < 2:
            raise UnitscopeError("PCA needs at least two activation rows")
        mean = total / n
        cov = (outer - n * torch.outer(mean, mean)) / (n - 1)
        evals, evecs = torch.linalg.eigh(cov)
        order = evals.argsort(descending=True)[:n_units]
        comps = evecs[:, order].t()
        # a deterministic sign: the largest-magnitude coordinate of each component is positive
        signs = comps.gather(1, comps.abs().argmax(1, keepdim=True)).sign()
        comps = comps * signs
        d = cls(d_in, n_units, metadata)
        with torch.no_grad():
            d.W_dec.copy_(comps.float())
            d.W_enc.copy_(comps.t().float())
            d.b_dec.copy_(mean.float())
            d.explained_variance.copy_(evals[order].float())
        return d


@register("diffmean")
class DiffMean(AffineDictionary):
    """Supervised directions: for each labelled concept, mean activation of positives minus negatives.

    Codes are projections onto the unit-normalised directions; `directions` keep the raw difference
    (its norm is the separation in activation units), which is what steering adds.
    """

    def arch_config(self) -> dict[str, Any]:
        return {"apply_b_dec_to_input": False, "concepts": self.metadata.get("concepts", [])}

    @classmethod
    def fit(cls, features: torch.Tensor, labels: list[str], metadata: dict[str, Any]) -> DiffMean:
        concepts = sorted(set(labels))
        if len(concepts) < 2:
            raise UnitscopeError(f"diffmean needs at least two labels in the labelled data, found {concepts}")
        lab = torch.tensor([concepts.index(label) for label in labels])
        dirs = torch.stack([features[lab == i].mean(0) - features[lab != i].mean(0) for i in range(len(concepts))])
        d = cls(features.shape[1], len(concepts), {**metadata, "concepts": concepts})
        with torch.no_grad():
            d.W_dec.copy_(dirs)
            d.W_enc.copy_((dirs / dirs.norm(dim=1, keepdim=True).clamp_min(1e-12)).t())
        return d

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_width(codes, self.n_units, "code")
        unit = self.W_enc.t()
        return codes.to(unit.dtype) @ unit


@register("probe")
class Probe(AffineDictionary):
    """Logistic-regression directions, one-vs-rest per labelled concept (L2-regularised, L-BFGS).

    Codes are the probe logits (x @ w + b); directions are the unit-normalised weight vectors.
    """

    def arch_config(self) -> dict[str, Any]:
        return {"apply_b_dec_to_input": False, "concepts": self.metadata.get("concepts", [])}

    @classmethod
    def fit(cls, features: torch.Tensor, labels: list[str], metadata: dict[str, Any], l2: float = 1e-3) -> Probe:
        concepts = sorted(set(labels))
        if len(concepts) < 2:
            raise UnitscopeError(f"a probe needs at least two labels in the labelled data, found {concepts}")
        lab = torch.tensor([concepts.index(label) for label in labels])
        mu, sd = features.mean(0), features.std(0).clamp_min(1e-6)
        z = (features - mu) / sd
        W = torch.zeros(features.shape[1], len(concepts), requires_grad=True)
        b = torch.zeros(len(concepts), requires_grad=True)
        target = torch.nn.functional.one_hot(lab, len(concepts)).float()
        opt = torch.optim.LBFGS([W, b], max_iter=200, line_search_fn="strong_wolfe")

        def closure():
            opt.zero_grad()
            loss = torch.nn.functional.binary_cross_entropy_with_logits(z @ W + b, target) + l2 * W.pow(2).sum()
            loss.backward()
            return loss

        opt.step(closure)
        w_raw = (W.detach() / sd[:, None])  # back to raw activation units
        b_raw = b.detach() - mu @ w_raw
        d = cls(features.shape[1], len(concepts), {**metadata, "concepts": concepts})
        with torch.no_grad():
            d.W_enc.copy_(w_raw)
            d.b_enc.copy_(b_raw)
            d.W_dec.copy_((w_raw / w_raw.norm(dim=0, keepdim=True).clamp_min(1e-12)).t())
        return d

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        self.check_width(codes, self.n_units, "code")
        return codes.to(self.W_dec.dtype) @ self.W_dec
