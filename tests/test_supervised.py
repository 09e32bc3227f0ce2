"""Supervised IOI checks (causal.supervised, `unitscope supervised`): the metrics against truth on a planted model
whose site holds known attribute directions (a dictionary of those directions is sufficient and controls with 2
units; a random subspace is not and does not), the mechanics on the tiny Llama against hand computations, and the
command (table, files, refusals)."""

from __future__ import annotations

import json

import pyarrow.parquet as pq
import pytest
import torch
from torch import nn

from unitscope import load_subject
from unitscope.causal.supervised import SupervisedMeans, build_task, ioi_dataset, supervised_checks
from unitscope.cli import main
from unitscope.dictionaries.linear import PCA, Neurons
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


class Planted(nn.Module):
    """A model whose site `mid` holds, at every position, a_IO + 0.5 b_S + 0.2 (g_IO + g_S) + order * o
    (orthonormal directions; IO = the name seen once, S = the name seen twice, order 1 when S is named first) and
    whose logit for name v is 3 <x, a_v> + <x, g_v>: the clean logit difference is exactly 3, and moving the IO
    name to v' takes exactly two units of the planted basis (a_v' up and a_IO down; either alone leaves
    logit(IO) ahead by 0.2)."""

    def __init__(self, vocab: int, name_ids: torch.Tensor, width: int = 24):
        super().__init__()
        n = len(name_ids)
        q = torch.linalg.qr(torch.randn(width, width, generator=torch.Generator().manual_seed(1)))[0]
        self.register_buffer("basis", q[: 3 * n + 1].clone())  # a_0.., b_0.., g_0.., o
        self.register_buffer("name_ids", name_ids.clone())
        self.mid = nn.Identity()
        w = torch.zeros(vocab, width)
        w[name_ids] = 3 * q[:n] + q[2 * n: 3 * n]
        self.unembed = nn.Parameter(w, requires_grad=False)  # a parameter: a subject's device is its parameters'
        self.n = n

    def forward(self, ids):
        n, rows = self.n, torch.arange(len(ids))
        hits = ids[..., None] == self.name_ids  # [B, T, n]
        count = hits.sum(1).float()
        first = hits.any(-1).float().argmax(1)  # position of the first name
        order = (count[rows, hits[rows, first].float().argmax(-1)] == 2).float()
        a, b, g, o = self.basis[:n], self.basis[n: 2 * n], self.basis[2 * n: 3 * n], self.basis[3 * n]
        x = (count == 1).float() @ a + 0.5 * (count == 2).float() @ b + 0.2 * (count > 0).float() @ g
        x = self.mid((x + order[:, None] * o)[:, None].expand(-1, ids.shape[1], -1))
        return x @ self.unembed.T


def _subspace(directions, site="mid:output"):
    """A PCA-kind dictionary whose units are the given orthonormal directions (codes = projections)."""
    d = PCA(directions.shape[1], directions.shape[0], metadata={"hook_name": site})
    with torch.no_grad():
        d.W_dec.copy_(directions)
        d.W_enc.copy_(directions.T)
    return d


def test_metrics_against_a_planted_attribute(tokenizer):
    data = ioi_dataset(tokenizer, n=96, seed=5, names=NAMES)
    model = Planted(len(tokenizer), data.name_ids)
    subject = load_subject(model, tokenizer=tokenizer)
    truth = _subspace(model.basis)  # every planted direction: exact on this site
    q = torch.linalg.qr(torch.randn(24, 4, generator=torch.Generator().manual_seed(7)))[0]
    random4 = _subspace(q.T)  # a random 4-dimensional subspace
    rows = {r["method"]: r for r in supervised_checks(subject, "mid:output", data, {"truth": truth,
                                                                                     "random": random4})}
    assert rows["truth"]["clean_logit_diff"] == pytest.approx(3.0, abs=1e-5)
    assert rows["truth"]["sufficiency"] == pytest.approx(1.0, abs=1e-5)
    assert rows["truth"]["fvu"] == pytest.approx(0.0, abs=1e-6)
    # mean ablation of everything leaves x = the fit rows' mean: LD = 3 (P(IO = io) - P(IO = s)) + 0.2 (P(io named)
    # - P(s named)) over the fit rows
    fit, test = torch.arange(48), torch.arange(48, 96)
    p_io = torch.bincount(data.io[fit], minlength=len(NAMES)).float() / 48
    p_named = p_io + torch.bincount(data.s[fit], minlength=len(NAMES)).float() / 48
    io, s = data.io[test], data.s[test]
    want = float((3 * (p_io[io] - p_io[s]) + 0.2 * (p_named[io] - p_named[s])).mean()) / 3  # clean LD is 3
    assert rows["truth"]["necessity"] == pytest.approx(want, abs=1e-5)
    # the IO name moves by a_cf - a_io: two units, and one is never enough
    assert rows["truth"]["control"] == 1.0 and rows["truth"]["control_k"] == 2.0
    assert rows["counterfactual patch"]["control"] == 1.0
    assert rows["supervised"]["control"] == 1.0 and rows["supervised"]["sufficiency"] > 0.9
    # a random 4 of 24 dimensions keeps about a quarter of the IO direction: neither sufficient nor in control
    assert rows["random"]["sufficiency"] < 0.6 and rows["random"]["fvu"] > 0.4
    assert rows["random"]["control"] < 0.5


def test_refusals(tokenizer, llama_subject, data):
    with pytest.raises(UnitscopeError, match="unknown task 'sva'; valid tasks are ioi"):
        build_task("sva", tokenizer)
    other = Neurons(32, metadata={"hook_name": "blocks.0.resid_post"})
    with pytest.raises(UnitscopeError, match="trained on site 'blocks.0.resid_post', not 'blocks.1.resid_post'"):
        supervised_checks(llama_subject, SITE, data, {"n0": other})
    tc = Neurons(32, metadata={"hook_name": SITE, "hook_name_out": "blocks.2.resid_post"})
    with pytest.raises(UnitscopeError, match="transcoder"):
        supervised_checks(llama_subject, SITE, data, {"tc": tc})


def test_command(tiny_model_dir, tmp_path, capsys):
    """`unitscope supervised` in this process (a subprocess would pay torch's import each time)."""
    subject = load_subject(str(tiny_model_dir))
    Neurons.from_subject(subject, SITE).save(tmp_path / "neurons")
    q = torch.linalg.qr(torch.randn(32, 8, generator=torch.Generator().manual_seed(0)))[0]
    pca = _subspace(q.T, SITE)
    pca.metadata.update({k: v for k, v in Neurons.from_subject(subject, SITE).metadata.items() if k != "hook_name"})
    pca.save(tmp_path / "pca8")
    out = tmp_path / "sup"
    code = main(["supervised", "--dictionary", str(tmp_path / "neurons"), str(tmp_path / "pca8"), "--names", *NAMES,
                 "--n-prompts", "16", "--out", str(out)])
    printed = capsys.readouterr()
    assert code == 0, printed.err
    table = pq.read_table(out / "supervised.parquet").to_pylist()
    assert [row["method"] for row in table] == ["supervised", "counterfactual patch", "neurons", "pca8"]
    assert [row["kind"] for row in table] == ["supervised", "patch", "neurons", "pca"]
    saved = json.loads((out / "supervised.json").read_text())
    assert saved["rows"] == table and saved["settings"]["site"] == SITE and saved["settings"]["n_prompts"] == 16
    assert table[2]["sufficiency"] == pytest.approx(1.0, abs=1e-5)  # neurons are exact
    assert "pca8" in printed.out and "sufficiency" in printed.out
    # one sentence each, and the table written before is kept
    Neurons(32, metadata={**Neurons.from_subject(subject, SITE).metadata, "hook_name": "blocks.0.resid_post"}).save(
        tmp_path / "n0")
    assert main(["supervised", "--dictionary", str(tmp_path / "n0"), "--site", SITE, "--out", str(out)]) == 2
    err = capsys.readouterr().err
    assert "dictionary 'n0' was trained on site 'blocks.0.resid_post', not 'blocks.1.resid_post'" in err
    assert err.count("\n") == 1  # one sentence, no traceback
    assert pq.read_table(out / "supervised.parquet").to_pylist() == table
