"""GAN dissection (Bau et al. 2019) for any generator and segmenter: which units of a layer make a concept, and
proof by intervention.

- Thresholds: per unit, the threshold t maximising the information quality ratio I(M;S)/H(M,S) between the
  unit's upsampled map thresholded at t (M) and the segmented concept (S), over candidate quantiles of the unit's
  values; thresholds where the unit is on for more than half of the pixels are skipped.
- Intervention at the layer over a region p (H×W, 0/1) and units α (per channel, 0..1):
  r' = (1 − α⊙p)⊙r + α⊙p⊙k, with k = 0 (ablation) or k = the unit's mean activation where the concept is
  segmented (insertion).
- Average causal effect: the change of the concept's segmented pixel fraction (in the region) under the edit.
- Unit search: a soft α = sigmoid(θ) optimised so that ablation removes the concept (the segmenter's mean
  probability of it where the unedited image shows it, plus a penalty λ·Σα), then the top N units by α are kept.
"""

from __future__ import annotations

import math
from collections.abc import Iterator
from contextlib import contextmanager

import torch
import torch.nn.functional as F
from torch import nn

from .. import hooks, sites
from ..errors import UnitscopeError


def layer_maps(generator: nn.Module, layer: str, z: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(maps (B, C, h, w) at `layer`, images) for latents z."""
    ref = sites.resolve_site(generator, layer)
    with torch.no_grad(), hooks.capture(generator, [ref]) as acts:
        images = generator(z)
    a = acts[layer]
    if a.dim() != 4:
        raise UnitscopeError(f"layer {layer!r} gives activations of shape {tuple(a.shape)}, with no spatial "
                             "dimensions; GAN dissection needs (batch, channels, height, width) maps")
    return a.float(), images


def segment(segmenter: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """Concept index per pixel (B, H, W)."""
    with torch.no_grad():
        return segmenter(images).argmax(1)


def _iqr(on: torch.Tensor, s: torch.Tensor) -> torch.Tensor:
    """I(M;S)/H(M,S) for a batch of binary maps `on` (T, P) against one binary segmentation s (P,)."""
    n = s.numel()
    p11 = (on & s).sum(1) / n
    p10 = (on & ~s).sum(1) / n
    p01 = (~on & s).sum(1) / n
    p00 = 1 - p11 - p10 - p01
    pm, ps = p11 + p10, (p11 + p01).expand_as(p11)
    joint = torch.stack([p11, p10, p01, p00], 1).double()
    marg = torch.stack([pm * ps, pm * (1 - ps), (1 - pm) * ps, (1 - pm) * (1 - ps)], 1).double()
    plogp = torch.where(joint > 0, joint * torch.log(joint.clamp_min(1e-300)), torch.zeros_like(joint))
    mi = (plogp - torch.where(joint > 0, joint * torch.log(marg.clamp_min(1e-300)), torch.zeros_like(joint))).sum(1)
    h = -plogp.sum(1)
    return torch.where(h > 0, mi / h.clamp_min(1e-300), torch.zeros_like(h))


def iqr_thresholds(maps: torch.Tensor, concept_mask: torch.Tensor,
                   quantiles: torch.Tensor | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per unit (threshold, IQR) maximising I(M;S)/H(M,S); maps (B, U, h, w), concept_mask (B, H, W) bool.

    A unit whose every candidate threshold leaves it on for more than half the pixels has no usable threshold:
    its threshold and IQR are NaN (not a detector of anything), never a made-up index or score."""
    if not concept_mask.any():
        raise UnitscopeError("the concept is segmented in none of the generated images; sample more latents or "
                             "pick a concept the generator draws")
    up = F.interpolate(maps, size=tuple(concept_mask.shape[1:]), mode="bilinear", align_corners=False)
    q = torch.linspace(0.5, 0.995, 34) if quantiles is None else quantiles
    s = concept_mask.reshape(-1)
    ths, scores = [], []
    for u in range(up.shape[1]):
        v = up[:, u].reshape(-1)
        cands = torch.quantile(v[torch.randperm(len(v), generator=torch.Generator().manual_seed(u))[:200_000]], q)
        on = v[None, :] > cands[:, None]
        ok = on.float().mean(1) <= 0.5  # a unit on for more than half the pixels is not a detector
        if not ok.any():
            ths.append(math.nan)
            scores.append(math.nan)
            continue
        r = torch.where(ok, _iqr(on, s), torch.full((len(q),), -math.inf, dtype=torch.float64))
        best = int(r.argmax())
        ths.append(float(cands[best]))
        scores.append(float(r[best]))
    return torch.tensor(ths), torch.tensor(scores)


@contextmanager
def edit_units(generator: nn.Module, layer: str, alpha: torch.Tensor, k: torch.Tensor | float = 0.0,
               region: torch.Tensor | None = None) -> Iterator[None]:
    """r' = (1 − α⊙p)⊙r + α⊙p⊙k at `layer` for every forward inside the context; α (C,), k scalar or (C,),
    region p (h, w) of 0/1 at the layer's resolution (None: everywhere)."""
    ref = sites.resolve_site(generator, layer)

    def fn(r: torch.Tensor) -> torch.Tensor:
        if alpha.numel() != r.shape[1]:
            raise UnitscopeError(f"alpha has {alpha.numel()} entries but layer {layer!r} has {r.shape[1]} channels")
        p = torch.ones(r.shape[2:], dtype=r.dtype, device=r.device) if region is None else region.to(r)
        ap = alpha.to(r)[None, :, None, None] * p[None, None]
        kk = torch.as_tensor(k).to(r)
        kk = kk[None, :, None, None] if kk.dim() else kk
        return (1 - ap) * r + ap * kk

    handle = hooks.add_hook(generator, ref, fn)
    try:
        yield
    finally:
        handle.remove()


def concept_fractions(segmenter: nn.Module, images: torch.Tensor, n_classes: int,
                      region: torch.Tensor | None = None) -> torch.Tensor:
    """Fraction of (region) pixels segmented as each class, (n_classes,)."""
    seg = segment(segmenter, images)
    if region is not None:
        seg = seg[:, region.bool()]
    return torch.stack([(seg == c).float().mean() for c in range(n_classes)])


def search_units(generator: nn.Module, segmenter: nn.Module, layer: str, concept: int, z: torch.Tensor,
                 steps: int = 100, lam: float = 0.01, lr: float = 0.1, batch_size: int = 32, seed: int = 0,
                 keep: float = 0.0) -> torch.Tensor:
    """A soft ablation α = sigmoid(θ) that removes `concept` at small Σα; returns α (C,).

    The loss is the segmenter's mean probability of the concept over the pixels where the unedited image shows
    it (the fraction of the concept that survives, ~1 before any ablation), plus λ·Σα. Averaging over all pixels
    instead makes a concept covering 3% of them worth ~0.03, below the penalty of a single unit, and α collapses
    to 0 for every unit. `keep` > 0 adds keep × the probability lost by the other labelled concepts (class > 0)
    where the unedited image shows them, averaged per concept so that small ones count as much as large ones:
    units shared with other concepts then cost more (an addition to
    Bau et al.'s objective, off by default). The caller's models keep their modes and requires_grad flags."""
    params = list(generator.parameters()) + list(segmenter.parameters())
    flags = [q.requires_grad for q in params]
    modes = [(m, m.training) for m in (*generator.modules(), *segmenter.modules())]
    ref = sites.resolve_site(generator, layer)
    try:
        generator.eval()
        segmenter.eval()
        for q in params:
            q.requires_grad_(False)
        maps, _ = layer_maps(generator, layer, z[:2])
        theta = torch.full((maps.shape[1],), -3.0, device=maps.device, requires_grad=True)
        opt = torch.optim.Adam([theta], lr=lr)
        g = torch.Generator().manual_seed(seed)
        for _ in range(steps):
            zb = z[torch.randint(len(z), (batch_size,), generator=g)].to(maps.device)
            with torch.no_grad():
                clean = segmenter(generator(zb)).argmax(1)
            present = clean == concept
            if not present.any():
                continue
            alpha = torch.sigmoid(theta)
            handle = hooks.add_hook(generator, ref, lambda r, a=alpha: (1 - a.to(r)[None, :, None, None]) * r)
            try:
                probs = segmenter(generator(zb)).softmax(1)
            finally:
                handle.remove()
            loss = probs[:, concept][present].mean() + lam * alpha.sum()
            lost = [(1 - probs[:, o][clean == o]).mean() for o in clean.unique().tolist() if o not in (0, concept)]
            if keep and lost:
                loss = loss + keep * torch.stack(lost).mean()
            opt.zero_grad()
            loss.backward()
            opt.step()
        return torch.sigmoid(theta).detach()
    finally:
        for q, f in zip(params, flags):
            q.requires_grad_(f)
        for m, t in modes:
            m.train(t)


def mean_where_concept(maps: torch.Tensor, concept_mask: torch.Tensor) -> torch.Tensor:
    """Each unit's mean activation over the positions (at the layer's resolution) where the concept is segmented."""
    small = F.interpolate(concept_mask[:, None].float(), size=tuple(maps.shape[2:]), mode="area")[:, 0] > 0.5
    if not small.any():
        raise UnitscopeError("the concept covers no position at the layer's resolution; it cannot give k")
    return maps.permute(1, 0, 2, 3)[:, small].mean(1)
