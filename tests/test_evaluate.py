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
        return float(F.cross_entropy(logits[:, :-1][pm], ids[:, 1:][pm]))

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
    """The evaluator sees exactly the stream windows after the store's, none of which is a recorded one."""
    from unitscope import record

    corpus = Corpus("default")
    store = record(llama_subject, corpus, [SITE], 1000, tmp_path / "s", ctx_len=16, shard_tokens=160, progress=False)
    seen = []
    handle = llama_subject.model.register_forward_pre_hook(
        lambda _m, _a, kw: seen.append(kw["input_ids"].clone()), with_kwargs=True)
    try:
        d = Neurons(32, metadata={"hook_name": SITE})
        r = evaluate_fidelity(llama_subject, d, corpus, 16, start_window=store.n_windows, n_tokens=160,
                              batch_size=4, progress=False)
    finally:
        handle.remove()
    evaluated = {tuple(row.tolist()) for ids in seen for row in ids if len(row) == 16}  # not the width probe
    stream = [w.tokens for _, w in zip(range(store.n_windows + 10), corpus.windows(llama_subject.tokenizer, 16))]
    recorded = np.concatenate(stream[:store.n_windows])[:store.n_tokens]
    assert np.array_equal(recorded, store.column("tokens"))  # the store is the stream's first windows
    assert evaluated == {tuple(w.tolist()) for w in stream[store.n_windows:]}  # eval: exactly the next ones
    assert not evaluated & {tuple(w.tolist()) for w in stream[:store.n_windows]}
    assert r["eval_config"]["start_window"] == store.n_windows == 63
