"""The sparse training kernels agree with the dense computation, values and gradients."""

import torch
import torch.nn.functional as F

from unitscope.dictionaries.kernels import select_encode, sparse_decode


def test_select_encode_and_sparse_decode_match_dense_autograd():
    torch.manual_seed(0)
    B, d, n, k = 64, 24, 96, 5
    x = torch.randn(B, d)
    w_enc = torch.randn(d, n, requires_grad=True)
    b_enc = torch.randn(n, requires_grad=True)
    w_dec = torch.randn(n, d, requires_grad=True)
    b_dec = torch.randn(d, requires_grad=True)
    target = torch.randn(B, d)

    def loss_sparse():
        vals, idx = select_encode(x - b_dec, w_enc.t(), b_enc, lambda pre: pre.topk(k, dim=1).indices)
        recon = sparse_decode(F.relu(vals), idx, w_dec) + b_dec
        return (recon - target).pow(2).sum(), idx

    def loss_dense():
        pre = (x - b_dec) @ w_enc + b_enc
        vals, idx = pre.topk(k, dim=1)
        codes = torch.zeros_like(pre).scatter(1, idx, F.relu(vals))
        return ((codes @ w_dec + b_dec) - target).pow(2).sum(), idx

    ls, idx_s = loss_sparse()
    grads_s = torch.autograd.grad(ls, [w_enc, b_enc, w_dec, b_dec])
    ld, idx_d = loss_dense()
    grads_d = torch.autograd.grad(ld, [w_enc, b_enc, w_dec, b_dec])
    assert torch.equal(idx_s.sort(1).values, idx_d.sort(1).values)
    assert torch.allclose(ls, ld, rtol=1e-5)
    for gs, gd in zip(grads_s, grads_d):
        assert torch.allclose(gs, gd, rtol=1e-4, atol=1e-4)


def test_bfloat16_selection_stays_close_to_float32():
    torch.manual_seed(0)
    x = torch.randn(256, 64)
    w_enc = torch.randn(64, 512) / 8
    b_enc = torch.randn(512) / 10

    def pick(pre):
        return pre.topk(16, dim=1).indices

    v32, i32 = select_encode(x, w_enc.t(), b_enc, pick)
    v16, i16 = select_encode(x, w_enc.t(), b_enc, pick, compute_dtype=torch.bfloat16)
    assert v16.dtype == torch.float32
    same = (i32.sort(1).values == i16.sort(1).values).float().mean()
    assert same > 0.9  # near-ties may swap
    exact = torch.addmm(b_enc, x, w_enc).gather(1, i16)
    assert torch.allclose(v16, exact, rtol=2e-2, atol=2e-2)
