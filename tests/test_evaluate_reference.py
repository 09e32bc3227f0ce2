"""evaluate_fidelity's figures against a brute-force recomputation written here, window by window, with hooks
attached by hand: a random TopK SAE on the residual stream and a transcoder from mlp_in to mlp_out."""

import math

import numpy as np
import pytest
import torch

from unitscope.corpus import Corpus
from unitscope.dictionaries.sae import TopKSAE, TopKTranscoder
from unitscope.evaluate import evaluate_fidelity

CTX, START, N_TOKENS = 16, 3, 16 * 7
# the tiny Llama's modules, named here rather than through unitscope's site table
MODULES = {"blocks.1.resid_post": ("model.layers.1", "output"), "blocks.1.mlp_in": ("model.layers.1.mlp", "input"),
           "blocks.1.mlp_out": ("model.layers.1.mlp", "output")}


@pytest.fixture(scope="module")
def subject(tokenizer):
    """The tiny random Llama with a sharper unembedding and a louder block-1 MLP, so that splicing and ablating
    move the loss by far more than float rounding (the untouched model predicts a near-uniform distribution)."""
    from conftest import tiny_model

    from unitscope import load_subject

    model = tiny_model("llama", len(tokenizer))
    with torch.no_grad():
        model.lm_head.weight.mul_(40)
        model.model.layers[1].mlp.down_proj.weight.mul_(20)
    return load_subject(model, tokenizer=tokenizer)


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
    from pydoc_data.topics import topics

    path = tmp_path_factory.mktemp("evalref") / "text.txt"
    path.write_text("\n\n".join(topics[k] for k in sorted(topics)[40:52]))
    return Corpus(str(path))


def _first(value):
    return value[0] if isinstance(value, (tuple, list)) else value


def _forward(model, ids, read=(), write=None):
    """Logits of one window; `read` sites are recorded, `write` = (site, fn(activation) -> new) replaces one."""
    seen, handles = {}, []
    for site in read:
        path, io = MODULES[site]
        mod = model.get_submodule(path)
        if io == "input":
            handles.append(mod.register_forward_pre_hook(lambda _m, args, s=site: seen.__setitem__(s, args[0])))
        else:
            handles.append(mod.register_forward_hook(lambda _m, _a, out, s=site: seen.__setitem__(s, _first(out))))
    if write is not None:
        path, io = MODULES[write[0]]
        assert io == "output"

        def replace(_m, _a, out, fn=write[1]):
            new = fn(_first(out))
            return (new, *out[1:]) if isinstance(out, tuple) else new
        handles.append(model.get_submodule(path).register_forward_hook(replace))
    try:
        with torch.no_grad():
            logits = model(input_ids=ids[None], use_cache=False).logits[0]
    finally:
        for h in handles:
            h.remove()
    return logits, {k: v[0] for k, v in seen.items()}


def _codes_and_recon(d, x):
    """By hand from the weights: TopK of the pre-activations (ReLU'd), then the linear decoder."""
    pre = (x - d.b_dec if d.apply_b_dec_to_input else x) @ d.W_enc + d.b_enc
    top = pre.topk(d.k, dim=-1)
    codes = torch.zeros_like(pre).scatter(-1, top.indices, top.values.clamp_min(0))
    return codes, codes @ d.W_dec + d.b_dec


@torch.no_grad()
def brute_force(subject, d, corpus):
    model, tok = subject.model, subject.tokenizer
    specials = set(tok.all_special_ids)
    windows = [w for _, w in zip(range(N_TOKENS // CTX), corpus.windows(tok, CTX, start=START))]
    ys, recons, codes_all = [], [], []
    ce = {"clean": [], "spliced": [], "zero_all": []}
    kl = {"spliced": [], "zero_all": []}
    for w in windows:
        ids = torch.as_tensor(w.tokens, dtype=torch.long)
        keep = torch.tensor([int(p) > 0 and int(t) not in specials for p, t in zip(w.pos, w.tokens)])
        clean, acts = _forward(model, ids, read=[d.input_site, d.output_site])
        codes, recon = _codes_and_recon(d, acts[d.input_site])
        ys.append(acts[d.output_site][keep])
        recons.append(recon[keep])
        codes_all.append(codes[keep])
        spliced, _ = _forward(model, ids, write=(d.output_site, lambda y, r=recon, k=keep: torch.where(
            k[:, None], r, y)))
        zero_all, _ = _forward(model, ids, write=(d.output_site, torch.zeros_like))
        for t in range(CTX - 1):
            if not keep[t]:
                continue
            p_clean = clean[t].log_softmax(-1)
            for name, logits in (("clean", clean), ("spliced", spliced), ("zero_all", zero_all)):
                lp = logits[t].log_softmax(-1)
                ce[name].append(-float(lp[ids[t + 1]]))
                if name != "clean":
                    kl[name].append(float((p_clean.exp() * (p_clean - lp)).sum()))
    y, r, c = torch.cat(ys).double(), torch.cat(recons).double(), torch.cat(codes_all)
    mean = {k: sum(v) / len(v) for k, v in ce.items()}
    return {
        "fvu": float((y - r).pow(2).sum() / (y - y.mean(0)).pow(2).sum()),
        "l0": float((c != 0).sum(1).double().mean()),
        "frac_dead": float(((c != 0).sum(0) == 0).double().mean()),
        "ce_clean": mean["clean"], "ce_spliced": mean["spliced"], "ce_zero_all": mean["zero_all"],
        "ce_score": (mean["zero_all"] - mean["spliced"]) / (mean["zero_all"] - mean["clean"]),
        "kl_spliced": sum(kl["spliced"]) / len(kl["spliced"]), "kl_zero_all": sum(kl["zero_all"]) / len(kl["zero_all"]),
        "n": len(y),
    }


def _dictionary(kind, scale):
    """Random weights; decoder rows of the size of the activations at the output site (`scale`)."""
    g = torch.Generator().manual_seed(7)
    if kind == "sae":
        d = TopKSAE(32, 48, k=5, metadata={"hook_name": "blocks.1.resid_post"})
    else:
        d = TopKTranscoder(32, 48, k=5, metadata={"hook_name": "blocks.1.mlp_in", "hook_name_out": "blocks.1.mlp_out"})
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn(p.shape, generator=g))
        d.W_dec.mul_(scale / d.W_dec.norm(dim=1, keepdim=True) / 3)
        d.b_dec.mul_(scale / 32 ** 0.5 / 3)
        d.b_enc[:6] = -1e4  # six units can never fire: frac_dead has something to count
    return d.eval()


@pytest.mark.parametrize("kind", ["sae", "transcoder"])
def test_fidelity_metrics_match_a_brute_force_recomputation(subject, corpus, kind):
    site = "blocks.1.resid_post" if kind == "sae" else "blocks.1.mlp_out"
    ids = torch.as_tensor(next(corpus.windows(subject.tokenizer, CTX)).tokens, dtype=torch.long)
    d = _dictionary(kind, float(_forward(subject.model, ids, read=[site])[1][site].norm(dim=-1).mean()))
    assert (d.input_site != d.output_site) == (kind == "transcoder")
    res = evaluate_fidelity(subject, d, corpus, CTX, START, n_tokens=N_TOKENS, batch_size=3, progress=False)
    ref = brute_force(subject, d, corpus)
    m = res["eval_result_metrics"]
    got = {
        "fvu": m["reconstruction_quality"]["fvu"], "l0": m["sparsity"]["l0"], "frac_dead": m["misc"]["frac_dead_units"],
        "ce_clean": m["model_performance_preservation"]["ce_loss_without_sae"],
        "ce_spliced": m["model_performance_preservation"]["ce_loss_with_sae"],
        "ce_zero_all": m["model_performance_preservation"]["ce_loss_with_ablation"],
        "ce_score": m["model_performance_preservation"]["ce_loss_score"],
        "kl_spliced": m["model_behavior_preservation"]["kl_div_with_sae"],
        "kl_zero_all": m["model_behavior_preservation"]["kl_div_with_ablation"],
        "n": m["misc"]["n_tokens"],
    }
    # the brute force is not degenerate: splicing and ablating move the loss, dead units exist, not all are dead
    assert ref["n"] > 50 and ref["kl_spliced"] > 0.01 and abs(ref["ce_zero_all"] - ref["ce_clean"]) > 0.1, ref
    assert 6 / 48 <= ref["frac_dead"] < 1 and 0 < ref["l0"] <= 5
    for key, want in ref.items():
        assert math.isclose(got[key], want, rel_tol=1e-4, abs_tol=1e-6), (key, got[key], want)
    freq = np.array([u["frequency"] for u in res["eval_result_details"]])
    assert math.isclose(float((freq == 0).mean()), ref["frac_dead"])
    assert res["eval_config"]["input_site"] == d.input_site and res["eval_config"]["output_site"] == d.output_site

