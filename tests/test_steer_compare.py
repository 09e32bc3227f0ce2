"""The steering comparison's mechanics on a tiny model: detector, best unit, presence and perplexity against
by-hand recomputations, matched KL, the table and the plot."""

import math

import pyarrow.parquet as pq
import pytest
import torch

from unitscope import UnitscopeError
from unitscope.causal.steer import generate
from unitscope.causal.steer_compare import (
    _score,
    best_unit,
    concept_detector,
    steer_compare,
    summary,
    write_steer_compare,
)
from unitscope.dictionaries.linear import Neurons
from unitscope.dictionaries.sae import TopKSAE

SITE = "blocks.1.resid_post"
CONCEPTS = {"code": ["def f(x): return x", "import os\nprint(1)"],
            "sea": ["the ocean waves and the sea", "ships sail on the sea"]}


def _per_text_means(subject, texts, site):
    """Per-text mean activation without the first token."""
    return torch.stack([subject.collect(subject.tokenizer(t, return_tensors="pt").input_ids, [site])[site][0, 1:]
                        .mean(0) for t in texts])


def test_detector_best_unit_and_scores_match_by_hand(sharp_subject):
    pos, neg = _per_text_means(sharp_subject, CONCEPTS["code"], SITE), _per_text_means(sharp_subject,
                                                                                        CONCEPTS["sea"], SITE)
    det = concept_detector(sharp_subject, SITE, CONCEPTS["code"], CONCEPTS["sea"])
    torch.testing.assert_close(det["direction"], pos.mean(0) - neg.mean(0))
    # neurons at the site: the best unit is the coordinate with the largest mean difference
    neurons = Neurons(32, metadata={"hook_name": SITE})
    unit, diff = best_unit(sharp_subject, neurons, CONCEPTS["code"], CONCEPTS["sea"])
    want = pos.mean(0) - neg.mean(0)
    assert unit == int(want.abs().argmax()) and diff == pytest.approx(float(want[unit]), rel=1e-5)
    # presence and perplexity of a continuation, recomputed with HF's own loss
    prompt, text = "I think that", " the sea is wide"
    presence, ppl = _score(sharp_subject, prompt, [text], SITE, det)
    tok = sharp_subject.tokenizer
    p_ids = tok(prompt, return_tensors="pt").input_ids
    c_ids = tok(text, return_tensors="pt", add_special_tokens=False).input_ids
    ids = torch.cat([p_ids, c_ids], 1)
    labels = ids.clone()
    labels[:, :p_ids.shape[1]] = -100
    with torch.no_grad():
        loss = sharp_subject.model(input_ids=ids, labels=labels).loss
    assert ppl[0] == pytest.approx(math.exp(float(loss)), rel=1e-4)
    x = sharp_subject.collect(ids, [SITE])[SITE][0, p_ids.shape[1]:]
    proj = float((x @ det["unit"]).mean())
    assert presence[0] == pytest.approx((proj - det["zero"]) / (det["one"] - det["zero"]), rel=1e-4)


def test_steer_compare_rows_table_and_plot(sharp_subject, tmp_path):
    sae = TopKSAE(32, 24, k=4, metadata={"hook_name": SITE})
    rows = steer_compare(sharp_subject, CONCEPTS, {"topk": sae}, SITE, kl_targets=(0.05, 0.5), n=2, max_new_tokens=5)
    assert {(r["kind"], r["concept"], r["target_kl"]) for r in rows} == {
        (k, c, t) for k in ("diffmean", "topk") for c in CONCEPTS for t in (0.05, 0.5)}
    for r in rows:
        assert r["error"] is None and abs(r["kl"] - r["target_kl"]) <= 0.02 * r["target_kl"]
        assert math.isfinite(r["presence"]) and r["perplexity"] > 1
        assert r["sign"] == (1 if r["unit_score"] >= 0 else -1)
    # the baseline is the unsteered model sampled with the same seed
    base = generate(sharp_subject, "I think that", [], 2, 5, 0)
    det = concept_detector(sharp_subject, SITE, CONCEPTS["sea"], CONCEPTS["code"])
    pres, ppl = _score(sharp_subject, "I think that", base, SITE, det)
    sea = [r for r in rows if r["concept"] == "sea"][0]
    assert sea["baseline_presence"] == pytest.approx(sum(pres) / 2) and sea["baseline_perplexity"] == pytest.approx(
        sum(ppl) / 2)
    paths = write_steer_compare(tmp_path / "sc", rows)
    back = pq.read_table(paths["table"]).to_pylist()
    assert len(back) == len(rows) and back[0]["kind"] == rows[0]["kind"]
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"
    assert {(s["kind"], s["target_kl"]) for s in summary(rows)} == {(k, t) for k in ("diffmean", "topk")
                                                                     for t in (0.05, 0.5)}


def test_steer_compare_refuses_a_lone_concept(sharp_subject):
    with pytest.raises(UnitscopeError, match="at least two concepts, or one concept and negatives"):
        steer_compare(sharp_subject, {"code": CONCEPTS["code"]}, {}, SITE)


def test_the_steer_compare_command(tiny_model_dir, tmp_path, capsys):
    import json

    from unitscope.cli import main

    d = TopKSAE(32, 24, k=4, metadata={"hook_name": SITE, "model_spec": str(tiny_model_dir)})
    d.save(tmp_path / "topk")
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps(CONCEPTS))
    # conftest's tiny Llama has near-flat logits: KL 0.005 is reachable, 0.5 is not (rows that say so)
    code = main(["steer-compare", "--concepts", str(concepts), "--dictionary", str(tmp_path / "topk"), "--site", SITE,
                 "--kl", "0.005", "0.5", "--n", "1", "--max-new-tokens", "3", "--out", str(tmp_path / "sc")])
    out = capsys.readouterr().out
    assert code == 0
    rows = pq.read_table(tmp_path / "sc" / "steer_compare.parquet").to_pylist()
    assert len(rows) == 2 * 2 * 2
    assert all((r["error"] is None) == (r["target_kl"] == 0.005) for r in rows)
    assert all("no alpha reaches next-token KL 0.5" in r["error"] for r in rows if r["target_kl"] == 0.5)
    assert "diffmean" in out and "topk" in out and "2/2" in out and "0/2" in out
    concepts.write_text(json.dumps({"code": []}))
    code = main(["steer-compare", "--concepts", str(concepts), "--site", SITE, "--out", str(tmp_path / "sc2")])
    err = capsys.readouterr().err
    assert code == 2 and "must hold an object mapping each concept name to a non-empty list" in err
