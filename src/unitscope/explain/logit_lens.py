"""Logit lens of unit directions: unembed(final_norm(direction)), top promoted and suppressed tokens.

Every kind whose directions live in the residual stream gets it: SAE and transcoder decoder rows, neuron
down-projection rows, PCA / k-means / semi-NMF / diff-in-means / probe directions; others (directions of
another width) get empty entries.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch

from ..dictionaries import Dictionary
from ..sites import unembed_modules
from ..subject import Subject
from .examples import check_units


@torch.inference_mode()
def logit_lens(subject: Subject, dictionary: Dictionary, top: int = 10, chunk: int = 512,
               units: Sequence[int] | None = None) -> dict[str, list[Any]]:
    """Per unit (all, or `units`, sorted as `write_tables` orders them): the `top` tokens its direction
    promotes and suppresses most, with their logits.

    Returns None entries when the directions do not live in the residual stream (their width differs
    from the unembedding's input).
    """
    norm, unembed = unembed_modules(subject.model)
    dirs = dictionary.directions.detach()
    if units is not None:
        dirs = dirs[check_units(dictionary, units)]
    n = dirs.shape[0]
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
