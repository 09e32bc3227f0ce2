"""Supervised IOI checks (causal.supervised): the mechanics on the tiny Llama against hand computations (the tiny
random model does not solve IOI; the default model's figures are for a later run)."""

from __future__ import annotations

import pytest
import torch

from unitscope.causal.supervised import SupervisedMeans, ioi_dataset, supervised_checks
from unitscope.dictionaries.linear import Neurons
from unitscope.errors import UnitscopeError

NAMES = (" value", " with", " that", " not", " for", " def")  # single tokens of the tiny tokenizer
SITE = "blocks.1.resid_post"


@pytest.fixture(scope="module")
def data(tokenizer):
    return ioi_dataset(tokenizer, n=24, seed=3, names=NAMES)


def test_dataset(data, tokenizer):
    assert data.input_ids.shape == data.cf_ids.shape
    for i in range(24):
        diff = (data.input_ids[i] != data.cf_ids[i]).nonzero()[:, 0].tolist()
        assert len(diff) == 1  # only the IO name changes
        assert int(data.input_ids[i, diff[0]]) == int(data.name_ids[data.io[i]])
        assert int(data.cf_ids[i, diff[0]]) == int(data.name_ids[data.cf[i]])
        assert len({int(data.io[i]), int(data.s[i]), int(data.cf[i])}) == 3
        text = tokenizer.decode(data.input_ids[i])
        assert text.count(NAMES[data.s[i]]) == 2 and text.count(NAMES[data.io[i]]) == 1
    with pytest.raises(UnitscopeError, match="one token"):
        ioi_dataset(tokenizer, names=(" value", " with", " Bartholomew"))


def test_supervised_means_are_class_means(data):
    x = torch.randn(24, 5, generator=torch.Generator().manual_seed(0))
    fit = torch.arange(12)
    sup = SupervisedMeans(x, data, fit, len(NAMES))
    for v in range(len(NAMES)):
        rows = [i for i in range(12) if data.io[i] == v]
        if rows:
            torch.testing.assert_close(sup.parts["io"][v], x[rows].mean(0) - x[:12].mean(0))


def test_checks_with_an_exact_dictionary(llama_subject, data):
    """Neurons are exact: sufficiency is 1, necessity is mean ablation by hand, and setting every differing unit
    to its counterfactual code is the counterfactual patch, so control reaches at least the patch's rate."""
    d = Neurons(32, metadata={"hook_name": SITE})
    rows = {r["method"]: r for r in supervised_checks(llama_subject, SITE, data, {"neurons": d})}
    assert rows["neurons"]["sufficiency"] == pytest.approx(1.0, abs=1e-5)
    x = llama_subject.collect(data.input_ids, [SITE])[SITE][:, -1]
    mean = x[:12].mean(0)

    def edit(out):
        r = out[0] if isinstance(out, tuple) else out
        r = r.clone()
        r[:, -1] = mean
        return (r, *out[1:]) if isinstance(out, tuple) else r

    h = llama_subject.model.model.layers[1].register_forward_hook(lambda _m, _a, out: edit(out))
    try:
        logits = llama_subject.logits(data.input_ids[12:])[:, -1]
    finally:
        h.remove()
    clean = llama_subject.logits(data.input_ids[12:])[:, -1]
    rows_ = torch.arange(12)
    io, s = data.name_ids[data.io[12:]], data.name_ids[data.s[12:]]
    ld = (logits[rows_, io] - logits[rows_, s]).mean() / (clean[rows_, io] - clean[rows_, s]).mean()
    assert rows["neurons"]["necessity"] == pytest.approx(float(ld), rel=1e-4)
    # the last k tried sets every differing unit (= the patch), so every row the patch flips is controlled;
    # a smaller k can flip a row the full patch does not, hence >=
    assert rows["neurons"]["control"] >= rows["counterfactual patch"]["control"] - 1e-9
    assert rows["supervised"]["clean_logit_diff"] == pytest.approx(float((clean[rows_, io] - clean[rows_, s]).mean()),
                                                                   rel=1e-5)
