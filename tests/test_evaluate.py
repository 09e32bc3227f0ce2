"""Fidelity eval: a perfect dictionary scores exactly 1 / 0; CE figures match a hand-made intervention."""

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from unitscope import Corpus, UnitscopeError
from unitscope.corpus import special_ids, training_mask
from unitscope.dictionaries.linear import Neurons
from unitscope.dictionaries.sae import TopKSAE
from unitscope.evaluate import evaluate_fidelity

SITE = "blocks.1.resid_post"


def test_identity_dictionary_recovers_everything(llama_subject):
    d = Neurons(32, metadata={"hook_name": SITE})
    r = evaluate_fidelity(llama_subject, d, Corpus("default"), 16, start_window=5, n_tokens=64, progress=False)
    m = r["eval_result_metrics"]
    assert m["reconstruction_quality"]["fvu"] == 0.0
    assert m["model_performance_preservation"]["ce_loss_score"] == pytest.approx(1.0, abs=1e-12)
    assert m["model_behavior_preservation"]["kl_div_with_sae"] == pytest.approx(0.0, abs=1e-9)
    assert m["sparsity"]["l0"] > 30  # neurons are dense
    assert r["eval_type_id"] == "core" and set(m) >= {"reconstruction_quality", "sparsity", "misc"}


def test_ce_figures_match_a_direct_computation(llama_subject):
    torch.manual_seed(0)
    d = TopKSAE(32, 64, k=4, metadata={"hook_name": SITE})
    corpus = Corpus("default")
    r = evaluate_fidelity(llama_subject, d, corpus, 16, start_window=3, n_tokens=32, batch_size=2, progress=False)
    m = r["eval_result_metrics"]["model_performance_preservation"]
    ws = [w for _, w in zip(range(2), corpus.windows(llama_subject.tokenizer, 16, start=3))]
    ids = torch.from_numpy(np.stack([w.tokens for w in ws])).long()
    mask = torch.from_numpy(training_mask(ids.numpy(), np.stack([w.pos for w in ws]),
                                          special_ids(llama_subject.tokenizer)))

    def ce(edit=None):
        ivs = [llama_subject.intervention(SITE, edit)] if edit else []
        with llama_subject.intervene(ivs):
            logits = llama_subject.logits(ids)
        pm = mask[:, :-1]
        return float(F.cross_entropy(logits[:, :-1][pm].double(), ids[:, 1:][pm]))  # float64: the truth

    zero_eval = ce(lambda y: torch.where(mask[..., None], torch.zeros_like(y), y))
    zero_all = ce(lambda y: y * 0)  # SAELens / SAEBench: every position zeroed, the excluded ones too
    spliced = ce(lambda y: torch.where(mask[..., None], d(y), y))
    clean = ce()
    assert mask[:, 0].eq(False).all() and zero_all != pytest.approx(zero_eval, rel=1e-3)  # the two differ here
    assert m["ce_loss_without_sae"] == pytest.approx(clean, rel=1e-5)
    assert m["ce_loss_with_ablation"] == pytest.approx(zero_all, rel=1e-5)
    assert m["ce_loss_with_ablation_evaluated_positions"] == pytest.approx(zero_eval, rel=1e-5)
    assert m["ce_loss_with_sae"] == pytest.approx(spliced, rel=1e-5)
    assert m["ce_loss_score"] == pytest.approx((zero_all - spliced) / (zero_all - clean), rel=1e-4)
    assert m["ce_loss_score_zero_evaluated_positions"] == pytest.approx(
        (zero_eval - spliced) / (zero_eval - clean), rel=1e-4)


def test_width_mismatch_between_dictionary_and_site(llama_subject):
    d = TopKSAE(16, 32, k=2, metadata={"hook_name": SITE})
    with pytest.raises(UnitscopeError, match="expects width 16 but site 'blocks.1.resid_post'"):
        evaluate_fidelity(llama_subject, d, Corpus("default"), 16, start_window=0, n_tokens=16, progress=False)


def test_bad_evaluation_sizes_and_non_finite_dictionaries(llama_subject):
    d = TopKSAE(32, 64, k=4, metadata={"hook_name": SITE})
    with pytest.raises(UnitscopeError, match="--eval-tokens must be a positive number, not -5"):
        evaluate_fidelity(llama_subject, d, Corpus("default"), 16, start_window=0, n_tokens=-5, progress=False)
    with torch.no_grad():
        d.b_dec[0] = float("nan")
    with pytest.raises(UnitscopeError, match="not finite"):
        evaluate_fidelity(llama_subject, d, Corpus("default"), 16, start_window=0, n_tokens=64, progress=False)


def test_held_out_windows_are_disjoint_from_the_recorded_ones(tmp_path, llama_subject):
    """Against the token stream packed by hand (documents in corpus order, each after one separator token): the
    store holds its first tokens and the evaluator sees exactly the windows that follow, none overlapping."""
    from unitscope import record

    text = tmp_path / "notes.txt"
    text.write_text("\n\n".join(f"Entry {i}: the {['red', 'blue', 'green'][i % 3]} kite flew {i * 3 % 17} metres."
                                 for i in range(600)))
    corpus, ctx = Corpus(str(text)), 16
    store = record(llama_subject, corpus, [SITE], 1000, tmp_path / "s", ctx_len=ctx, shard_tokens=160, progress=False)
    tok = llama_subject.tokenizer
    stream = []
    for doc in corpus.documents():
        stream += [tok.bos_token_id] + tok(doc, add_special_tokens=False)["input_ids"]
    seen = []
    handle = llama_subject.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    try:
        d = Neurons(32, metadata={"hook_name": SITE})
        r = evaluate_fidelity(llama_subject, d, corpus, ctx, start_window=store.n_windows, n_tokens=160,
                              batch_size=4, progress=False)
    finally:
        handle.remove()
    assert store.column("tokens").tolist() == stream[:store.n_tokens]
    evaluated = [row.tolist() for ids in seen for row in ids if len(row) == ctx]  # not the width probe
    offsets = [next(o for o in range(0, len(stream) - ctx + 1, ctx) if stream[o:o + ctx] == w) for w in evaluated]
    assert sorted(set(offsets)) == [store.n_windows * ctx + i * ctx for i in range(10)]  # 4 forwards each
    assert min(offsets) >= store.n_windows * ctx >= store.n_tokens  # past every recorded token
    assert r["eval_config"]["start_window"] == store.n_windows == 63


@pytest.mark.parametrize("site", ["blocks.1.resid_post", "blocks.2.mlp_hidden"])
def test_forwards_share_the_blocks_below_the_site_and_give_the_full_forward_figures(tiny_subject, site):
    """The spliced and ablated forwards replay the clean forward's lower blocks: the figures equal those of four
    whole forwards, and a block below the site runs once per batch while the site's block runs four times."""
    from unitscope.sites import family_of

    torch.manual_seed(0)
    d = TopKSAE(tiny_subject.width(site), 64, k=4, metadata={"hook_name": site})
    fam = family_of(tiny_subject.model)
    block = int(site.split(".")[1])
    calls = {"below": 0, "site": 0}

    def counter(key):
        def hook(*_):
            calls[key] += 1
        return hook

    handles = [tiny_subject.model.get_submodule(f"{fam.blocks}.{block - 1}.{fam.mlp}").register_forward_hook(
                   counter("below")),
               tiny_subject.model.get_submodule(f"{fam.blocks}.{block}.{fam.mlp}").register_forward_hook(
                   counter("site"))]
    try:
        runs = {}
        for shared in (True, False):
            calls.update(below=0, site=0)
            runs[shared] = evaluate_fidelity(tiny_subject, d, Corpus("default"), 16, start_window=3, n_tokens=64,
                                             batch_size=2, progress=False, share_lower=shared, geometry_rows=0)
            runs[shared]["calls"] = dict(calls)
    finally:
        for h in handles:
            h.remove()
    # 2 batches (the width check's dry run to the site adds one call below it): 3 forwards a batch no longer run it
    assert runs[True]["calls"]["below"] == 1 + 2 and runs[False]["calls"]["below"] == 1 + 8
    assert runs[True]["calls"]["site"] == runs[False]["calls"]["site"] >= 8
    for group in ("model_performance_preservation", "model_behavior_preservation", "reconstruction_quality"):
        new, old = runs[True]["eval_result_metrics"][group], runs[False]["eval_result_metrics"][group]
        assert new == pytest.approx(old, rel=1e-6, abs=1e-9), group
    behaviour = runs[True]["eval_result_metrics"]["model_behavior_preservation"]
    assert behaviour["kl_div_with_sae"] > 1e-6 and behaviour["kl_div_with_ablation"] > 1e-6  # the edits took effect
    for name, module in tiny_subject.model.named_modules():  # every block's own forward is back
        assert "forward" not in vars(module), name


def test_next_token_sums_equal_log_softmax_and_kl_div():
    """The log-partition form of CE and KL equals the textbook one (log_softmax, nll_loss, kl_div) on the masked
    positions, for edits near and far from the clean logits."""
    import torch.nn.functional as F

    from unitscope.evaluate.fidelity import next_token_sums

    g = torch.Generator().manual_seed(0)
    clean = torch.randn(3, 7, 50, generator=g) * 4
    edited = {"near": clean + 0.01 * torch.randn(3, 7, 50, generator=g), "far": torch.randn(3, 7, 50, generator=g),
              "same": clean.clone()}
    targets = torch.randint(0, 50, (3, 6), generator=g)
    rows = torch.rand(3, 6, generator=g) > 0.3
    got = next_token_sums(clean, edited, targets, rows)
    lp_c = F.log_softmax(clean[:, :-1][rows].double(), -1)
    for name, logits in {"clean": clean, **edited}.items():
        lp = F.log_softmax(logits[:, :-1][rows].double(), -1)
        assert got[name] == pytest.approx(float(F.nll_loss(lp, targets[rows], reduction="sum")), rel=1e-5)
        if name != "clean":
            want = float(F.kl_div(lp, lp_c, log_target=True, reduction="sum"))
            assert got["kl:" + name] == pytest.approx(want, rel=1e-4, abs=1e-6)
    assert got["kl:same"] == 0.0
