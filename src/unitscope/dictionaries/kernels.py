"""Sparse training kernels: one dense encoder product, everything after it sparse.

`select_encode` computes the dense pre-activations once, lets the caller pick latents from them, and
returns only the picked values; its backward touches only the picked latents (a sparse [B, n] gradient
against the input), so the encoder weight gradient costs B*m*d instead of B*n*d.
`sparse_decode` decodes (values, indices) through `embedding_bag`, whose backward is sparse as well.
Both are checked against the dense computation in tests/test_kernels.py.

The [B, n] pre-activations are written into a scratch buffer reused across steps (one per thread and shape):
a fresh 150 MB tensor per step (B 4096, n 9216) is mmapped and page-faulted anew, which costs about as much as
the topk. They are never
saved for backward, so the next step may overwrite them. The encoder arrives as rows [n, d] (SAEs keep W_enc
[d, n] as a transposed view of row-major storage), so neither the weight gradient nor the input gradient
makes a transposed copy of the weight (a bf16 compute dtype still casts it once per step).
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch
import torch.nn.functional as F

_local = threading.local()  # each thread its own buffers: two trainings in threads never share one


def scratch(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    """A reusable buffer of this shape, dtype and device for this thread; its contents are garbage. One per shape,
    so a sweep of widths stepping in turn keeps one each; `release_scratch` frees them when training ends."""
    buffers = _local.__dict__.setdefault("buffers", {})
    key = (tuple(shape), dtype, str(device))
    buf = buffers.get(key)
    if buf is None:
        with torch.inference_mode(False):  # a normal tensor even if first made under inference mode
            buf = buffers[key] = torch.empty(shape, dtype=dtype, device=device)
    return buf


def release_scratch() -> None:
    """Free this thread's buffers (called when a training ends)."""
    _local.__dict__.pop("buffers", None)


class _SelectEncode(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, w_enc_t, b_enc, select, compute_dtype):
        # w_enc_t: [n, d] (encoder rows); x: [B, d]
        # in low precision, the dense product, the selection and the picked values; only [B, m] goes back to
        # float32 (bf16 products run ~2x faster on CPUs with AVX512-BF16/AMX)
        dtype = compute_dtype if compute_dtype is not None else x.dtype
        pre = scratch((x.shape[0], w_enc_t.shape[0]), dtype, x.device)
        torch.addmm(b_enc.to(dtype), x.to(dtype), w_enc_t.t().to(dtype), out=pre)
        idx = select(pre)
        vals = pre.gather(1, idx).to(x.dtype)
        ctx.save_for_backward(x, w_enc_t, idx)
        ctx.mark_non_differentiable(idx)
        return vals, idx

    @staticmethod
    def backward(ctx, g_vals, _g_idx):
        x, w_enc_t, idx = ctx.saved_tensors
        n, d = w_enc_t.shape
        g = g_vals.contiguous()
        flat_idx = idx.reshape(-1)
        grad_x = grad_w = grad_b = None
        if ctx.needs_input_grad[2]:
            grad_b = torch.zeros(n, dtype=g.dtype, device=g.device).index_add_(0, flat_idx, g.reshape(-1))
        if ctx.needs_input_grad[1]:
            rows = torch.arange(idx.shape[0], device=idx.device).repeat_interleave(idx.shape[1])
            sparse = torch.sparse_coo_tensor(torch.stack([flat_idx, rows]), g.reshape(-1), (n, idx.shape[0]),
                                             dtype=g.dtype, check_invariants=False)
            grad_w = torch.sparse.mm(sparse, x.to(g.dtype))
        if ctx.needs_input_grad[0]:
            # embedding_bag gathers rows; on a strided (transposed) weight it is ~50x slower than a copy
            grad_x = F.embedding_bag(idx, w_enc_t.contiguous(), per_sample_weights=g, mode="sum")
        return grad_x, grad_w, grad_b, None, None


def select_encode(x: torch.Tensor, w_enc_t: torch.Tensor, b_enc: torch.Tensor,
                  select: Callable[[torch.Tensor], torch.Tensor],
                  compute_dtype: torch.dtype | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Pre-activations at the latents that `select(pre) -> idx[B, m]` picks: (values[B, m], idx)."""
    return _SelectEncode.apply(x, w_enc_t, b_enc, select, compute_dtype)


def sparse_decode(vals: torch.Tensor, idx: torch.Tensor, w_dec: torch.Tensor) -> torch.Tensor:
    """sum_j vals[b, j] * w_dec[idx[b, j]] without forming the dense [B, n] code matrix."""
    return F.embedding_bag(idx, w_dec, per_sample_weights=vals.to(w_dec.dtype), mode="sum")
