"""The steering comparison's mechanics on a tiny model: detector, best unit, presence and perplexity against
by-hand recomputations, the unsteered baseline, lifts, standard errors and paired differences recomputed from the
per-generation values, matched KL, the table, the plot, and the LLM judge (a Starlette stub with a known rule, and
the real llama-cpp-python server of test_label_server)."""

import json
import math
import statistics

import pyarrow.parquet as pq
import pytest
import torch
from conftest import serving
from test_label_server import server  # noqa: F401 -- the real llama.cpp server fixture

from unitscope import UnitscopeError
from unitscope.causal.steer import generate
from unitscope.causal.steer_compare import (
    _score,
    best_unit,
    concept_detector,
    paired_differences,
    steer_compare,
    summary,
    write_steer_compare,
)
from unitscope.causal.steer_judge import PROMPT_TEMPLATE, ConceptJudge, parse_rating
from unitscope.dictionaries.linear import Neurons
from unitscope.dictionaries.sae import TopKSAE
from unitscope.label import OpenAIEndpoint

SITE = "blocks.1.resid_post"
CONCEPTS = {"code": ["def f(x): return x", "import os\nprint(1)"],
            "sea": ["the ocean waves and the sea", "ships sail on the sea"]}
PROMPTS = ("I think that", "Today, I")


def _finite(values):
    return [v for v in values if not math.isnan(v)]


def _per_text_means(subject, texts, site):
    """Per-text mean activation without the first token."""
    return torch.stack([subject.collect(subject.tokenizer(t, return_tensors="pt").input_ids, [site])[site][0, 1:]
                        .mean(0) for t in texts])


def test_detector_best_unit_and_scores_match_by_hand(sharp_subject):
    pos, neg = _per_text_means(sharp_subject, CONCEPTS["code"], SITE), _per_text_means(sharp_subject,
                                                                                        CONCEPTS["sea"], SITE)
    det = concept_detector(sharp_subject, SITE, CONCEPTS["code"], CONCEPTS["sea"])
    torch.testing.assert_close(det["direction"], pos.mean(0) - neg.mean(0))
    # neurons at the site: the best unit is the coordinate most above the contrast
    neurons = Neurons(32, metadata={"hook_name": SITE})
    unit, diff = best_unit(sharp_subject, neurons, CONCEPTS["sea"], CONCEPTS["code"])
    want = neg.mean(0) - pos.mean(0)
    assert unit == int(want.argmax()) and diff == pytest.approx(float(want.max()), rel=1e-5)
    assert int(want.argmax()) != int(want.abs().argmax())  # this case tells "most above" from "largest |diff|"
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


def test_baseline_lifts_errors_table_and_plot(sharp_subject, tmp_path):
    sae = TopKSAE(32, 24, k=4, metadata={"hook_name": SITE})
    rows = steer_compare(sharp_subject, CONCEPTS, {"topk": sae}, SITE, kl_targets=(0.05, 0.5), prompts=PROMPTS,
                         n=2, max_new_tokens=5)
    assert {(r["kind"], r["concept"], r["target_kl"]) for r in rows} == {
        (k, c, t) for k in ("diffmean", "topk") for c in CONCEPTS for t in (0.05, 0.5)} | {
        ("unsteered", c, 0.0) for c in CONCEPTS}
    # the baseline: the unsteered model sampled from every prompt with the same seed, scored by the detector
    det = concept_detector(sharp_subject, SITE, CONCEPTS["sea"], CONCEPTS["code"])
    base = [r for r in rows if r["kind"] == "unsteered" and r["concept"] == "sea"][0]
    gens = [g for p in PROMPTS for g in generate(sharp_subject, p, [], 2, 5, 0)]
    pres = [v for p in PROMPTS for v in _score(sharp_subject, p, generate(sharp_subject, p, [], 2, 5, 0), SITE,
                                               det)[0]]
    assert base["generations"] == gens and base["presence_each"] == pytest.approx(pres, nan_ok=True)
    assert base["presence"] == pytest.approx(statistics.mean(_finite(pres)))
    for r in rows:
        assert r["error"] is None and math.isfinite(r["presence"]) and r["perplexity"] > 1 and r["n"] == 4
        if r["kind"] == "unsteered":
            continue
        assert abs(r["kl"] - r["target_kl"]) <= 0.02 * r["target_kl"] and r["sign"] == 1
        own_base = [b for b in rows if b["kind"] == "unsteered" and b["concept"] == r["concept"]][0]
        assert r["lift_each"] == pytest.approx([s - b for s, b in zip(r["presence_each"], own_base["presence_each"])],
                                               nan_ok=True)
        assert r["generations"] != own_base["generations"]  # steering at KL >= 0.05 changes what is written
    # summary: mean and standard error over concepts x generations, recomputed with `statistics`
    for s in summary(rows):
        group = [r for r in rows if (r["kind"], r["target_kl"]) == (s["kind"], s["target_kl"])]
        for key in ("presence", "lift", "perplexity"):
            pooled = _finite([v for r in group for v in r[f"{key}_each"]])
            assert s[key] == pytest.approx(statistics.mean(pooled))
            if key != "lift" or s["kind"] != "unsteered":
                assert s[f"{key}_se"] == pytest.approx(statistics.stdev(pooled) / math.sqrt(len(pooled)))
        assert s["lift_se_concepts"] == pytest.approx(statistics.stdev([r["lift"] for r in group]) / math.sqrt(2))
        assert math.isnan(s["judge"])
    # paired differences: the better kind at each KL against the other, over the same concept/prompt/seed draws
    for d in paired_differences(rows):
        at = {k: [v for r in rows if (r["kind"], r["target_kl"]) == (k, d["target_kl"]) for v in r["presence_each"]]
              for k in ("diffmean", "topk")}
        diffs = _finite([a - b for a, b in zip(at[d["best"]], at[d["other"]])])  # an empty generation has no score
        assert statistics.mean(_finite(at[d["best"]])) >= statistics.mean(_finite(at[d["other"]]))
        assert d["pairs"] == len(diffs) >= 2 and d["diff"] == pytest.approx(statistics.mean(diffs))
        assert d["se"] == pytest.approx(statistics.stdev(diffs) / math.sqrt(len(diffs)))
        by_concept = {}
        for r_best in (r for r in rows if (r["kind"], r["target_kl"]) == (d["best"], d["target_kl"])):
            r_other = next(r for r in rows if (r["kind"], r["target_kl"], r["concept"]) ==
                           (d["other"], d["target_kl"], r_best["concept"]))
            by_concept[r_best["concept"]] = statistics.mean(
                _finite([a - b for a, b in zip(r_best["presence_each"], r_other["presence_each"])]))
        assert d["concepts"] == len(by_concept) == 2
        assert d["se_concepts"] == pytest.approx(statistics.stdev(by_concept.values()) / math.sqrt(2))
    # rows of a second run (another seed) pool: draws pair within a run, so the pairs double
    other = [{**r, "seed": 1, "presence_each": [v + (0.5 if r["kind"] == "topk" else 0.0) for v in r["presence_each"]]}
             for r in rows]
    for d in paired_differences(rows + other):
        assert d["pairs"] == 2 * [e for e in paired_differences(rows) if e["target_kl"] == d["target_kl"]][0]["pairs"]
        assert d["best"] == "topk"  # topk is ahead by 0.5 on the second run's draws
    paths = write_steer_compare(tmp_path / "sc", rows)
    back = pq.read_table(paths["table"]).to_pylist()
    assert len(back) == len(rows) and back[1]["presence_each"] == pytest.approx(rows[1]["presence_each"], nan_ok=True)
    assert paths["plot"].read_bytes()[:4] == b"\x89PNG"


def test_steer_compare_refuses_a_lone_concept(sharp_subject):
    with pytest.raises(UnitscopeError, match="at least two concepts, or one concept and negatives"):
        steer_compare(sharp_subject, {"code": CONCEPTS["code"]}, {}, SITE)


@pytest.fixture(scope="module")
def stub_judge():
    """A Starlette stand-in for a chat endpoint with a known rule: the rating is the fragment's length mod 3,
    except that a fragment whose length is 3 mod 4 gets an answer with no rating; `/bad` refuses everything.
    It records the prompts it was sent."""
    from starlette.applications import Starlette
    from starlette.responses import JSONResponse
    from starlette.routing import Route

    seen = []

    def fragment(prompt: str) -> str:
        return prompt.split("Text fragment:\n", 1)[1][:-1]

    async def chat(request):
        body = await request.json()
        prompt = body["messages"][0]["content"]
        seen.append(prompt)
        frag = fragment(prompt)
        text = "I am not sure." if len(frag) % 4 == 3 else f"Rating: [[{len(frag) % 3}]]"
        return JSONResponse({"choices": [{"message": {"role": "assistant", "content": text}}]})

    async def models(request):
        return JSONResponse({"data": [{"id": "stub"}]})

    async def bad(request):
        return JSONResponse({"error": "no"}, status_code=400)

    app = Starlette(routes=[Route("/v1/chat/completions", chat, methods=["POST"]), Route("/v1/models", models),
                            Route("/bad/v1/chat/completions", bad, methods=["POST"]), Route("/bad/v1/models", models)])
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}", seen, fragment


def test_the_judge_rates_every_generation_and_records_what_it_said(sharp_subject, stub_judge):
    url, seen, fragment = stub_judge
    judge = ConceptJudge(OpenAIEndpoint(url + "/v1"))
    rows = steer_compare(sharp_subject, CONCEPTS, {}, SITE, kl_targets=(0.05,), prompts=PROMPTS, n=2,
                         max_new_tokens=6, judge=judge)
    asked = {fragment(p) for p in seen}
    for r in rows:
        assert r["judge_prompt"] == PROMPT_TEMPLATE and r["judge_model"] == "stub"
        assert len(r["judge_each"]) == len(r["generations"]) == 4
        for text, rating, answer in zip(r["generations"], r["judge_each"], r["judge_answers"]):
            frag = text.strip()
            assert frag in asked and judge.prompt(r["concept"], text) in seen
            if len(frag) % 4 == 3:
                assert math.isnan(rating) and answer == "I am not sure."
            else:
                assert rating == len(frag) % 3 and answer == f"Rating: [[{rating:.0f}]]"
    ratings = [v for r in rows for v in r["judge_each"]]
    assert any(math.isnan(v) for v in ratings) and any(v == 2 for v in ratings)  # both branches were met
    for s in summary(rows):
        pooled = [v for r in rows if (r["kind"], r["target_kl"]) == (s["kind"], s["target_kl"])
                  for v in r["judge_each"] if not math.isnan(v)]
        assert s["judge"] == pytest.approx(statistics.mean(pooled))
    # an endpoint that refuses: NaN and the error, recorded
    rating, answer = ConceptJudge(OpenAIEndpoint(url + "/bad/v1")).rate("sea", "waves")
    assert math.isnan(rating) and answer.startswith("error: ") and "HTTP 400" in answer
    assert [parse_rating(a) for a in ("Rating: [[2]]", "rating: 1", "Rating: [[3]]", "2")][:2] == [2.0, 1.0]
    assert math.isnan(parse_rating("Rating: [[3]]")) and math.isnan(parse_rating("2"))
    assert math.isnan(parse_rating("Rating: 12")) and math.isnan(parse_rating("Rating: 1.5"))


def test_the_judge_through_the_real_llama_cpp_server(server):  # noqa: F811
    """Ratings are parsed from the real server's answers, and the recorded answer is what the server says to the
    same prompt asked directly. llama.cpp reuses the evaluated prefix of the previous prompt, which moves its floats
    (and so greedy near-ties), so both askings follow the same prompt: a direct warm-up, the judge, the direct one."""
    import httpx

    judge = ConceptJudge(OpenAIEndpoint(server))
    concept, text = "the ocean", "Waves crashed on the rocks as the tide came in from the sea."
    body = {"model": judge.model, "messages": [{"role": "user", "content": judge.prompt(concept, text)}],
            "max_tokens": judge.max_tokens, "temperature": 0.0, "seed": 0}
    with httpx.Client(timeout=120) as c:
        c.post(server + "/chat/completions", json=body).raise_for_status()
        rating, answer = judge.rate(concept, text)
        direct = c.post(server + "/chat/completions", json=body).json()["choices"][0]["message"]["content"]
    assert answer == direct and answer.strip()
    assert rating == parse_rating(answer) or (math.isnan(rating) and math.isnan(parse_rating(answer)))
    print(f"\njudge via llama.cpp (SmolLM2-135M) on {concept!r}: {answer!r} -> {rating}")


def test_the_steer_compare_command(tiny_model_dir, tmp_path, capsys, stub_judge):
    from unitscope.cli import main

    d = TopKSAE(32, 24, k=4, metadata={"hook_name": SITE, "model_spec": str(tiny_model_dir)})
    d.save(tmp_path / "topk")
    concepts = tmp_path / "concepts.json"
    concepts.write_text(json.dumps(CONCEPTS))
    # conftest's tiny Llama has near-flat logits: KL 0.005 is reachable, 0.5 is not (rows that say so)
    code = main(["steer-compare", "--concepts", str(concepts), "--dictionary", str(tmp_path / "topk"), "--site", SITE,
                 "--kl", "0.005", "0.5", "--n", "2", "--max-new-tokens", "3", "--judge-endpoint", stub_judge[0],
                 "--out", str(tmp_path / "sc")])
    out = capsys.readouterr().out
    assert code == 0
    rows = pq.read_table(tmp_path / "sc" / "steer_compare.parquet").to_pylist()
    assert len(rows) == 2 * (1 + 2 * 2)
    steered = [r for r in rows if r["kind"] != "unsteered"]
    assert all((r["error"] is None) == (r["target_kl"] == 0.005) for r in steered)
    assert all("no alpha reaches next-token KL 0.5" in r["error"] for r in steered if r["target_kl"] == 0.5)
    assert all(len(r["judge_answers"]) == 2 for r in rows if r["error"] is None)
    assert "unsteered" in out and "judge 0-2" in out and "±" in out and "2/2" in out and "0/2" in out
    assert "KL 0.005: " in out and "(4 pairs)" in out
    concepts.write_text(json.dumps({"code": []}))
    code = main(["steer-compare", "--concepts", str(concepts), "--site", SITE, "--out", str(tmp_path / "sc2")])
    err = capsys.readouterr().err
    assert code == 2 and "must hold an object mapping each concept name to a non-empty list" in err
    concepts.write_text(json.dumps(CONCEPTS))
    code = main(["steer-compare", "--concepts", str(concepts), "--site", SITE, "--judge-endpoint", "ftp://x",
                 "--out", str(tmp_path / "sc3")])
    err = capsys.readouterr().err
    assert code == 2 and "'ftp://x' is not an http:// or https:// URL" in err and not (tmp_path / "sc3").exists()
