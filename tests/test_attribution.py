"""Attribution (causal.attribution, causal.graph, `unitscope attribute`): every path is checked against a real
intervention on the tiny Llama (ablate each unit / error / source for real and compare), plus completeness,
exactness of the splice, virtual weights and bad input."""

from __future__ import annotations

import json
from pydoc_data.topics import topics

import numpy as np
import pytest
import torch
from conftest import run_cli

from unitscope import hooks
from unitscope.causal.attribution import ERROR, Metric, attribute, edges, pre_activation, virtual_weights
from unitscope.causal.graph import feature_graph
from unitscope.causal.interventions import Positions, UnitEdit
from unitscope.dictionaries.linear import PCA
from unitscope.dictionaries.sae import TopKSAE, TopKTranscoder
from unitscope.errors import UnitscopeError

PROMPT = "The quick brown fox jumps over the lazy dog"


@pytest.fixture(scope="module")
def ids(tokenizer):
    return tokenizer(PROMPT, return_tensors="pt").input_ids


def _sae(site, seed, k=4, cls=TopKSAE, **meta):
    torch.manual_seed(seed)
    return cls(32, 48, k=k, metadata={"hook_name": site, **meta}).eval()


def _metric_after(subject, metric, ids, interventions):
    with torch.no_grad(), subject.intervene(interventions):
        return float(metric(subject.model(input_ids=ids, use_cache=False).logits, ids))


def _corr(a, b):
    return float(np.corrcoef(a, b)[0, 1])


def _clean(subject, ids):
    with torch.no_grad():
        return subject.model(input_ids=ids, use_cache=False).logits


@pytest.mark.parametrize("spec", ["loss", "logitdiff:#5,#9"])
def test_unit_attribution_matches_real_ablation_at_two_sites(llama_subject, tokenizer, ids, spec):
    """Summed over positions, code x gradient predicts metric(clean) - metric(unit ablated everywhere) for every
    active unit of two SAEs at successive sites (the upstream one's effect flows through the downstream splice)."""
    ds = [_sae("blocks.0.resid_post", 1), _sae("blocks.1.resid_post", 2)]
    metric = Metric.parse(spec, tokenizer)
    att = attribute(llama_subject, ds, ids, metric)
    assert att.value == pytest.approx(float(metric(_clean(llama_subject, ids), ids)), abs=1e-6)
    for i, sa in enumerate(att.sites):
        totals = sa.unit_totals()
        active = (sa.codes != 0).any(0).nonzero()[:, 0].tolist()
        assert len(active) >= 20
        real = [att.value - _metric_after(llama_subject, metric, ids, [UnitEdit(dictionary=ds[i], units=[u])])
                for u in active]
        assert _corr(totals[active].numpy(), real) >= 0.9
        # completeness: units + error + biases = r . g at every position
        total = sa.attribution.sum(-1) + sa.error_attribution + sa.rest
        torch.testing.assert_close(total, sa.output_dot_grad, atol=1e-6, rtol=1e-4)


def test_splice_is_exact(llama_subject, tokenizer, ids):
    """The spliced forward computes exactly the clean logits (bit for bit)."""
    from unitscope.causal.attribution import _forward, _splices

    ds = [_sae("blocks.0.resid_post", 1), _sae("blocks.1.resid_post", 2)]
    with torch.no_grad():
        spliced = _forward(llama_subject, _splices(llama_subject, ds, None), ids).detach()
    assert torch.equal(spliced, _clean(llama_subject, ids))


def test_per_position_and_error_nodes_match_real_ablation(llama_subject, tokenizer, ids):
    """A PCA at blocks.1 (small error): each (position, unit) node's attribution against ablating that unit at that
    position alone, and each position's error node against removing the error there (r -> reconstruct(x))."""
    site = "blocks.1.resid_post"
    texts = [topics[k][:400] for k in sorted(topics)[40:70]]
    acts = [llama_subject.collect(tokenizer(t, return_tensors="pt").input_ids[:, :64], [site])[site][0]
            for t in texts]
    pca = PCA.fit(acts, 32, 24, {"hook_name": site})
    metric = Metric.parse("logitdiff:#5,#9", tokenizer)
    sa = attribute(llama_subject, [pca], ids, metric).sites[0]
    base = float(metric(_clean(llama_subject, ids), ids))
    a = sa.attribution
    nodes = sorted(((q, u) for q in range(a.shape[0]) for u in range(24)), key=lambda n: -abs(float(a[n])))[:30]
    real = [base - _metric_after(llama_subject, metric, ids,
                                 [UnitEdit(dictionary=pca, units=[u], positions=Positions("indices", (q,)))])
            for q, u in nodes]
    assert _corr([float(a[n]) for n in nodes], real) >= 0.9
    real_err = []
    for q in range(ids.shape[1]):
        def no_error(r, step, q=q):
            out = r.clone()
            out[:, q] = pca.reconstruct(r[:, q])[1]
            return out
        real_err.append(base - _metric_after(llama_subject, metric, ids,
                                             [hooks.Intervention(llama_subject.site(site), no_error, positional=True)]))
    assert _corr(sa.error_attribution.numpy(), real_err) >= 0.9


def _transcoders():
    """Two random TopK transcoders whose outputs have the scale of the tiny model's MLP outputs (norm ~0.006;
    unit-norm decoder rows would write ~1000 times more than the MLP they stand for)."""
    out = [_sae("blocks.0.mlp_in", 3, k=6, cls=TopKTranscoder, hook_name_out="blocks.0.mlp_out"),
           _sae("blocks.1.mlp_in", 4, k=6, cls=TopKTranscoder, hook_name_out="blocks.1.mlp_out")]
    with torch.no_grad():
        for d in out:
            d.W_dec.mul_(1e-3)
    return out


def test_transcoder_attribution_and_edges_match_real_ablation(llama_subject, tokenizer, ids):
    """Transcoders at two layers: unit attributions against real ablations, and the input-dependent edges from
    layer-0 units (at each position) to layer-1 pre-activations against ablating the source unit at that
    position and reading the target's pre-activation on a real forward."""
    ds = _transcoders()
    metric = Metric.parse("logit:#7", tokenizer)
    att = attribute(llama_subject, ds, ids, metric)
    for i, sa in enumerate(att.sites):
        active = (sa.codes != 0).any(0).nonzero()[:, 0].tolist()
        real = [att.value - _metric_after(llama_subject, metric, ids, [UnitEdit(dictionary=ds[i], units=[u])])
                for u in active]
        assert _corr(sa.unit_totals()[active].numpy(), real) >= 0.9
    last = ids.shape[1] - 1
    targets = [(1, p, u) for p in (last, last // 2) for u in (att.sites[1].codes[p] != 0).nonzero()[:, 0].tolist()]
    found = [e for e in edges(llama_subject, ds, ids, targets) if e.source[2] != ERROR]
    assert all(e.source[1] <= e.target[1] for e in found)
    strongest = sorted(found, key=lambda e: -abs(e.weight))[:25]
    clean = pre_activation(llama_subject, ds[1], ids)
    real = []
    for e in strongest:
        i, q, u = e.source
        edited = pre_activation(llama_subject, ds[1], ids,
                                [UnitEdit(dictionary=ds[i], units=[u], positions=Positions("indices", (q,)))])
        real.append(float(clean[0, e.target[1], e.target[2]] - edited[0, e.target[1], e.target[2]]))
    assert _corr([e.weight for e in strongest], real) >= 0.9


def test_virtual_weights_equal_a_real_write_into_the_next_input(llama_subject, ids):
    """V[s, t] is what adding unit s's decoder direction at layer 1's MLP input adds to unit t's pre-activation."""
    a, b = _transcoders()
    v = virtual_weights(a, b)
    assert v.shape == (48, 48)
    clean = pre_activation(llama_subject, b, ids)
    for s in (0, 7, 31):
        direction = (a.decode(torch.eye(48)[s:s + 1]) - a.decode(torch.zeros(1, 48)))[0].detach()
        add = hooks.Intervention(llama_subject.site("blocks.1.mlp_in"), lambda x, d=direction: x + d)
        moved = pre_activation(llama_subject, b, ids, [add])
        torch.testing.assert_close(moved[0] - clean[0], v[s].expand_as(moved[0]), atol=1e-4, rtol=1e-4)


def test_feature_graph_layout_and_links(llama_subject, tokenizer, ids):
    ds = _transcoders()
    metric = Metric.parse("logit:#7", tokenizer)
    g = feature_graph(llama_subject, ds, ids, metric, names=["t0", "t1"], max_nodes=12, max_links=30)
    assert set(g) >= {"metadata", "qParams", "nodes", "links"}
    assert len(g["metadata"]["prompt_tokens"]) == ids.shape[1]
    nodes = {n["node_id"]: n for n in g["nodes"]}
    assert len(nodes) == 13 and sum(n["feature_type"] == "logit" for n in nodes.values()) == 1
    for link in g["links"]:
        assert link["source"] in nodes and link["target"] in nodes
    att = attribute(llama_subject, ds, ids, metric)
    for n in g["nodes"]:
        if n["feature_type"] not in ("logit", "reconstruction error"):
            layer = int(n["layer"])
            sa = att.sites[layer]
            assert n["influence"] == pytest.approx(float(sa.attribution[n["ctx_idx"], n["feature"]]), abs=1e-6)
            assert n["activation"] == pytest.approx(float(sa.codes[n["ctx_idx"], n["feature"]]), abs=1e-6)
    json.dumps(g)


def test_bad_input(llama_subject, tokenizer, ids):
    with pytest.raises(UnitscopeError, match="unknown metric"):
        Metric.parse("logits:x", tokenizer)
    with pytest.raises(UnitscopeError, match="is 2 tokens|tokens under this tokenizer"):
        Metric.parse("logit:quick brown fox", tokenizer)
    with pytest.raises(UnitscopeError, match="out of range"):
        Metric.parse("logit:#100000", tokenizer)
    d = _sae("blocks.9.resid_post", 1)
    with pytest.raises(UnitscopeError, match="site is not in the model"):
        attribute(llama_subject, [d], ids, Metric.parse("loss", tokenizer))
    with pytest.raises(UnitscopeError, match="one prompt"):
        attribute(llama_subject, [_sae("blocks.0.resid_post", 1)], ids.repeat(2, 1), Metric.parse("loss", tokenizer))
    with pytest.raises(UnitscopeError, match="out of range"):
        edges(llama_subject, _transcoders(), ids, [(1, 500, 0)])


def test_cli(tiny_model_dir, tmp_path, tokenizer):
    from unitscope import load_subject

    subject = load_subject(str(tiny_model_dir))
    meta = {"model_spec": str(tiny_model_dir), "model_fingerprint": subject.fingerprint()}
    paths = []
    for i, site in enumerate(("blocks.0.resid_post", "blocks.2.resid_post")):
        paths.append(_sae(site, i, **meta).save(tmp_path / f"d{i}"))
    out = tmp_path / "graph.json"
    r = run_cli("attribute", "--dictionary", paths[0], "--dictionary", paths[1], "--prompt", PROMPT,
                "--metric", "loss", "--out", out, "--nodes", "10")
    assert r.returncode == 0, r.stderr
    g = json.loads(out.read_text())
    assert len(g["nodes"]) == 11 and g["metadata"]["metric"] == "loss"
    ids = tokenizer(PROMPT, return_tensors="pt").input_ids
    assert g["metadata"]["metric_value"] == pytest.approx(float(Metric.parse("loss", tokenizer)(
        subject.logits(ids), ids)), abs=1e-5)
    bad = run_cli("attribute", "--dictionary", paths[0], "--prompt", PROMPT, "--metric", "logitdiff:a", "--out", out)
    assert bad.returncode == 2 and "unknown metric" in bad.stderr and "Traceback" not in bad.stderr
    assert json.loads(out.read_text()) == g  # the earlier output is untouched
