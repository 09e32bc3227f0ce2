"""The sparse training kernels agree with the dense computation, values and gradients."""

import pytest
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


def _fvu(x, recon):
    return (x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum()


def _random(sae, seed=0):
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
        sae.W_dec.div_(sae.W_dec.norm(dim=1, keepdim=True))
    return sae


def _dense_params(sae):
    return {k: v.detach().clone().requires_grad_(True) for k, v in sae.named_parameters()}


def _grads(sae, names):
    return [dict(sae.named_parameters())[n].grad for n in names]


@pytest.mark.parametrize("dominant", [1, 40])
def test_batchtopk_sparse_training_matches_a_dense_batch_topk(dominant):
    """BatchTopK keeps the k*B largest ReLU'd pre-activations of the whole batch: the sparse path's loss, every
    gradient, L0, the latents that fired and the running threshold equal a dense recomputation (also when one
    row takes far more than its share, beyond the first candidates per row)."""
    from unitscope.dictionaries.sae import BatchTopKSAE

    torch.manual_seed(0)
    B, d, n, k = 48, 16, 80, 3
    sae = _random(BatchTopKSAE(d, n, k=k))
    x = torch.randn(B, d) * 2
    x[0] *= dominant
    out = sae.training_forward(x)
    out.loss.backward()
    p = _dense_params(sae)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    flat = F.relu(pre).flatten()
    vals, idx = flat.topk(k * B)
    codes = torch.zeros_like(flat).scatter(0, idx, vals).view(B, n)
    loss = _fvu(x, codes @ p["W_dec"] + p["b_dec"])
    loss.backward()
    assert torch.allclose(out.loss, loss, rtol=1e-5)
    for name, g in zip(p, _grads(sae, p)):
        assert torch.allclose(g, p[name].grad, rtol=1e-4, atol=1e-5), name
    assert out.l0 == float((codes > 0).sum()) / B
    rows_fired = sorted(set((codes > 0).any(0).nonzero().flatten().tolist()))
    assert sorted(set(out.fired.tolist())) == rows_fired
    assert (codes > 0).sum(1).max() > (4 * k if dominant > 1 else k) and (codes > 0).sum(1).min() < k
    assert float(sae.topk_threshold) == float(vals[vals > 0].min().detach())


def test_batchtopk_keeps_every_value_tied_at_the_cut():
    """Identical rows tie at the (k*B)-th value: all of them are kept (exactly the values >= that value, found by
    brute force), whatever order topk would break the tie in; a data-parallel step takes the same rule."""
    from unitscope.dictionaries.sae import BatchTopKSAE

    sae = BatchTopKSAE(4, 6, k=1)
    g = torch.Generator().manual_seed(0)
    rows = torch.rand(4, 6, generator=g)
    rows[0, :3] = torch.tensor([9.0, 8.0, 7.0])
    pre = torch.cat([rows, rows[:1], rows[:1], rows[:1]])  # row 0 four times: its 8s tie at the 7th place
    idx, mask = sae.select_top(pre)
    picked = torch.zeros_like(pre, dtype=torch.bool)
    picked.scatter_(1, idx, mask)
    cut = pre.flatten().sort(descending=True).values[len(pre) - 1]
    assert cut == 8.0
    assert torch.equal(picked, (pre >= cut) & (pre > 0))
    assert int(picked.sum()) == 8 > len(pre)  # the four 9s and all four 8s: one more than k*B = 7


def test_auxk_loss_matches_a_dense_recomputation():
    """With dead latents, TopK's loss is FVU + aux_coef * FVU of the residual predicted by the top aux_k dead
    latents (residual mean added back); loss and gradients equal a dense recomputation."""
    from unitscope.dictionaries.sae import TopKSAE

    torch.manual_seed(1)
    B, d, n, k = 40, 12, 60, 4
    sae = _random(TopKSAE(d, n, k=k, aux_k=5), seed=1)
    x = torch.randn(B, d)
    dead = torch.zeros(n, dtype=torch.bool)
    dead[torch.randperm(n)[:20]] = True
    out = sae.training_forward(x, dead=dead)
    out.loss.backward()
    p = _dense_params(sae)
    pre = (x - p["b_dec"]) @ p["W_enc"] + p["b_enc"]
    top = pre.topk(k, dim=1)
    codes = torch.zeros_like(pre).scatter(1, top.indices, F.relu(top.values))
    recon = codes @ p["W_dec"] + p["b_dec"]
    main = _fvu(x, recon)
    err = (x - recon).detach()
    aux_top = pre.masked_fill(~dead, float("-inf")).topk(5, dim=1)
    aux_codes = torch.zeros_like(pre).scatter(1, aux_top.indices, F.relu(aux_top.values))
    aux = (err - aux_codes @ p["W_dec"] - err.mean(0)).pow(2).sum() / (err - err.mean(0)).pow(2).sum()
    loss = main + sae.aux_coef * aux
    loss.backward()
    assert aux_codes.count_nonzero() > 0 and (aux_codes[:, ~dead] == 0).all()
    assert torch.allclose(out.loss, loss, rtol=1e-5)
    assert abs(out.extra["auxk_fvu"] - float(aux.detach())) < 1e-5 and abs(float(out.fvu) - float(main.detach())) < 1e-6
    for name, g in zip(p, _grads(sae, p)):
        assert torch.allclose(g, p[name].grad, rtol=1e-4, atol=1e-6), name


def test_matryoshka_prefixes_match_dense_decodes_of_masked_codes():
    """Each prefix reconstruction equals the dense decode of the codes with later latents zeroed; the loss is the
    mean FVU over prefixes, while the FVU reported for logging is the whole dictionary's."""
    from unitscope.dictionaries.kernels import select_encode
    from unitscope.dictionaries.sae import MatryoshkaTopKSAE

    torch.manual_seed(2)
    B, d, n, k = 32, 12, 64, 8
    sae = _random(MatryoshkaTopKSAE(d, n, k=k, prefixes=[4, 16]), seed=2)
    x = torch.randn(B, d)
    codes = sae.encode(x).detach()
    dense = []
    for p in sae.prefixes:
        masked = codes.clone()
        masked[:, p:] = 0
        dense.append(masked @ sae.W_dec.detach() + sae.b_dec.detach())
    assert all(codes[:, :p].count_nonzero() for p in sae.prefixes)
    vals, idx = select_encode(x - sae.b_dec, sae.W_enc.t(), sae.b_enc, lambda pre: pre.topk(k, dim=1).indices)
    parts = sae.prefix_reconstructions(F.relu(vals), idx)
    for part, ref in zip(parts, dense[:-1]):
        assert torch.allclose(part, ref, atol=1e-5)
    out = sae.training_forward(x)
    fvus = [float(_fvu(x, r)) for r in dense]
    assert abs(float(out.loss.detach()) - sum(fvus) / len(fvus)) < 1e-5
    assert abs(float(out.fvu) - fvus[-1]) < 1e-5 and abs(fvus[0] - fvus[-1]) > 0.05  # the mean is not the whole


def test_bfloat16_backward_stays_close_to_a_dense_float32_reference():
    """The bf16 encoder product only rounds the forward values; loss and gradients stay within bf16 rounding of
    a dense float32 autograd computation on the same selected latents."""
    torch.manual_seed(3)
    B, d, n, k = 128, 32, 256, 8
    x = torch.randn(B, d)
    w_enc = (torch.randn(d, n) / d ** 0.5).requires_grad_(True)
    b_enc = (torch.randn(n) / 10).requires_grad_(True)
    w_dec = torch.randn(n, d).div(d ** 0.5).requires_grad_(True)
    b_dec = (torch.randn(d) / 10).requires_grad_(True)
    params = [w_enc, b_enc, w_dec, b_dec]
    vals, idx = select_encode(x - b_dec, w_enc.t(), b_enc, lambda pre: pre.topk(k, dim=1).indices,
                              compute_dtype=torch.bfloat16)
    loss16 = _fvu(x, sparse_decode(F.relu(vals), idx, w_dec) + b_dec)
    g16 = torch.autograd.grad(loss16, params)
    pre = (x - b_dec) @ w_enc + b_enc
    codes = torch.zeros_like(pre).scatter(1, idx, F.relu(pre.gather(1, idx)))
    loss32 = _fvu(x, codes @ w_dec + b_dec)
    g32 = torch.autograd.grad(loss32, params)
    assert abs(float(loss16.detach()) - float(loss32.detach())) < 1e-2 * float(loss32.detach())
    for name, a, b in zip(("W_enc", "b_enc", "W_dec", "b_dec"), g16, g32):
        assert b.norm() > 0
        assert (a - b).norm() < 2e-2 * b.norm(), name
        assert ((a != 0) == (b != 0)).all() or name.startswith("b_dec"), name  # same sparsity pattern


def test_a_forward_under_inference_mode_does_not_break_later_training_steps():
    from unitscope.dictionaries.train import TrainConfig, build_dictionary

    x = torch.randn(32, 16, generator=torch.Generator().manual_seed(0))
    grads = []
    for peek in (False, True):
        sae = build_dictionary(TrainConfig(architecture="topk", n_units=64, k=4), 16, {"hook_name": "x"})
        if peek:  # e.g. a held-out loss computed under inference mode between steps
            with torch.inference_mode():
                sae.training_forward(x)
        sae.training_forward(x).loss.backward()
        grads.append(sae.W_enc.grad.clone())
        assert sae.W_enc.grad.stride() == sae.W_enc.stride()  # fused Adam needs the parameter's layout
    assert torch.equal(grads[0], grads[1])
