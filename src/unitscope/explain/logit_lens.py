"""Logit lens of unit directions: unembed(final_norm(direction)), top promoted and suppressed tokens.

Every kind whose directions live in the residual stream gets it: SAE and transcoder decoder rows, neuron
down-projection rows, PCA / k-means / semi-NMF / diff-in-means / probe directions; others (directions of
another width) get empty entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from ..dictionaries import Dictionary
from ..sites import down_projection, unembed_modules
from ..subject import Subject
from .examples import check_units


@torch.inference_mode()
def logit_lens(subject: Subject, dictionary: Dictionary, top: int = 10, chunk: int = 512,
               units: Sequence[int] | None = None) -> dict[str, list[Any]]:
    """Per unit (all, or `units`, sorted as `write_tables` orders them): the `top` tokens its direction
    promotes and suppresses most, with their logits.

    Directions at `blocks.{i}.mlp_hidden` (of any kind) are first written into the residual stream by that
    block's down projection (its weight alone: the linear map a direction goes through). Returns None
    entries when the directions have no residual-stream image.
    """
    norm, unembed = unembed_modules(subject.model)
    dirs = dictionary.directions.detach()
    if units is not None:
        dirs = dirs[check_units(dictionary, units)]
    n = dirs.shape[0]
    dirs = _to_residual(subject, dictionary, dirs, unembed.weight.shape[-1])
    if dirs.shape[-1] != unembed.weight.shape[-1]:
        return {k: [None] * n for k in ("promoted_tokens", "promoted_logits", "suppressed_tokens", "suppressed_logits")}
    top = min(top, unembed.weight.shape[0])  # a vocabulary smaller than `top` gives all its tokens
    vocab = {}
    out: dict[str, list[Any]] = {"promoted_tokens": [], "promoted_logits": [], "suppressed_tokens": [],
                                 "suppressed_logits": []}
    for lo in range(0, n, chunk):
        d = dirs[lo:lo + chunk].to(device=subject.device, dtype=subject.dtype)
        logits = unembed(norm(d[:, None, :]))[:, 0].float()
        for key, sign in (("promoted", 1.0), ("suppressed", -1.0)):
            vals, ids = (sign * logits).topk(top, dim=-1)
            for row_v, row_i in zip(vals.tolist(), ids.tolist()):
                for i in row_i:
                    if i not in vocab:
                        vocab[i] = subject.tokenizer.decode([i])
                out[f"{key}_tokens"].append([vocab[i] for i in row_i])
                out[f"{key}_logits"].append([round(sign * v, 4) for v in row_v])
    return out


def _to_residual(subject: Subject, dictionary: Dictionary, dirs: torch.Tensor, width: int) -> torch.Tensor:
    """Directions in the MLP's hidden space mapped through the down projection's weight; others unchanged."""
    site = dictionary.output_site or dictionary.input_site
    if dirs.shape[-1] == width or not site:
        return dirs
    try:
        down = down_projection(subject.model, site)
    except Exception:  # a site name the model's family does not know
        return dirs
    if down is None:
        return dirs
    w = down.weight.detach().float()
    w = w.t() if isinstance(down, nn.Linear) else w  # Conv1D (GPT-2) stores [in, out]
    if w.shape != (dirs.shape[-1], width):
        return dirs
    return dirs.float().to(w.device) @ w
