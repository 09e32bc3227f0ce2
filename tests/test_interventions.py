"""Interventions: each edit against its formula on the real activation, unit edits against a by-hand recomputation,
exact no-ops for every dictionary kind, positions with padding, generate() with and without the KV cache, JSON."""

import json

import pytest
import torch

from unitscope import UnitscopeError
from unitscope.causal import interventions as iv
from unitscope.dictionaries import ARCHITECTURES
from unitscope.dictionaries.sae import TopKSAE, TopKTranscoder

SITE = "blocks.1.resid_post"


def _batch():
    """Two rows, the first left-padded by two tokens."""
    ids = torch.tensor([[0, 0, 17, 40, 99, 123, 7], [5, 60, 71, 88, 140, 200, 31]])
    mask = torch.tensor([[0, 0, 1, 1, 1, 1, 1], [1, 1, 1, 1, 1, 1, 1]])
    return ids, mask


def _run(subject, edits, site=SITE):
    """(logits, the activation at `site` after the edits) for the padded batch."""
    ids, mask = _batch()
    with subject.intervene(edits):
        with subject.capture([site]) as acts:
            logits = subject.model(input_ids=ids, attention_mask=mask).logits
    return logits, acts[site]


def _random_dictionary(name, subject):
    cls = ARCHITECTURES[name]
    transcoder = "transcoder" in name
    meta = {"hook_name": "blocks.1.mlp_in", "hook_name_out": "blocks.1.mlp_out"} if transcoder else {"hook_name": SITE}
    torch.manual_seed(1)
    d = cls(32, 32 if name == "neurons" else 24, metadata=meta, k=4)
    with torch.no_grad():
        for p in d.parameters():
            p.copy_(torch.randn_like(p) * 0.5)
    return d.eval()


def test_activation_edits_match_their_formulas(llama_subject):
    clean_logits, r = _run(llama_subject, [])
    d = torch.randn(32)
    d2 = torch.randn(2, 32)
    mean = torch.randn(32)
    q, _ = torch.linalg.qr(d2.double().t())
    proj = ((r.double() @ q) @ q.t()).float()
    a, k = torch.rand(32), torch.randn(32)
    cases = [
        (iv.Zero(site=SITE), torch.zeros_like(r)),
        (iv.Zero(site=SITE, dims=[3, 5]), r.clone().index_fill_(-1, torch.tensor([3, 5]), 0.0)),
        (iv.MeanAblate(site=SITE, mean=mean), mean.expand_as(r)),
        (iv.Clamp(site=SITE, value=2.5, dims=[1]), r.clone().index_fill_(-1, torch.tensor([1]), 2.5)),
        (iv.Scale(site=SITE, factor=-2.0), -2.0 * r),
        (iv.AddDirection(site=SITE, direction=d, alpha=3.0), r + 3.0 * d),
        (iv.ProjectOut(site=SITE, directions=d2), r - proj),
        (iv.ProjectOutAdd(site=SITE, directions=d2, add=d), r - proj + d),
        (iv.Dissect(site=SITE, alpha=a, k=k), (1 - a) * r + a * k),
    ]
    real = _batch()[1].bool()
    for edit, want in cases:
        logits, got = _run(llama_subject, [edit])
        # padding is never edited; every real token gets the formula
        torch.testing.assert_close(got[real], want[real], rtol=1e-5, atol=1e-5, msg=edit.type)
        assert torch.equal(got[~real], r[~real]), edit.type
        assert not torch.allclose(logits[real], clean_logits[real]), edit.type
    _, after = _run(llama_subject, [])
    assert torch.equal(after, r)  # every hook was removed


def test_projecting_out_leaves_nothing_along_the_directions(llama_subject):
    d2 = torch.randn(3, 32)
    _, got = _run(llama_subject, [iv.ProjectOut(site=SITE, directions=d2)])
    real = _batch()[1].bool()
    assert float((got[real] @ d2.t()).abs().max()) < 1e-5
    assert float((got[~real] @ d2.t()).abs().max()) > 1e-3  # padding is left alone


def test_nested_contexts_stack_outer_first(llama_subject):
    _, r = _run(llama_subject, [])
    d = torch.randn(32)
    ids, mask = _batch()
    with llama_subject.intervene([iv.AddDirection(site=SITE, direction=d, alpha=1.0)]):
        with llama_subject.intervene([iv.Scale(site=SITE, factor=2.0)]):
            with llama_subject.capture([SITE]) as acts:
                llama_subject.model(input_ids=ids, attention_mask=mask)
    real = mask.bool()
    torch.testing.assert_close(acts[SITE][real], (2 * (r + d))[real])


def test_position_selectors_respect_padding(llama_subject):
    _, r = _run(llama_subject, [])
    mask = _batch()[1].bool()
    # indices count a row's real tokens: row 0 starts at column 2
    _, got = _run(llama_subject, [iv.Zero(site=SITE, positions=iv.Positions("indices", (0, 3)))])
    changed = (got != r).any(-1)
    assert changed.tolist() == [[False, False, True, False, False, True, False],
                                [True, False, False, True, False, False, False]]
    _, got = _run(llama_subject, [iv.Zero(site=SITE, positions="prompt")])
    assert torch.equal((got == 0).all(-1), mask)  # a plain forward is all prompt
    _, got = _run(llama_subject, [iv.Zero(site=SITE, positions="generated")])
    assert torch.equal(got, r)


def test_a_position_past_the_sequence_is_refused(llama_subject):
    with pytest.raises(UnitscopeError, match="position 9 is past the sequence: the longest row had 7 tokens"):
        _run(llama_subject, [iv.Zero(site=SITE, positions=[1, 9])])


@pytest.mark.parametrize("name", sorted(ARCHITECTURES))
def test_a_unit_edit_that_changes_nothing_is_an_exact_no_op(llama_subject, name):
    d = _random_dictionary(name, llama_subject)
    clean, _ = _run(llama_subject, [])
    for op, value in (("scale", 1.0), ("add", 0.0)):
        logits, _ = _run(llama_subject, [iv.UnitEdit(dictionary=d, units=[0, 3], op=op, value=value)])
        assert torch.equal(logits, clean), (name, op)
    # the same edit with a real value does change the output
    logits, _ = _run(llama_subject, [iv.UnitEdit(dictionary=d, units=[0, 3], op="set", value=4.0)])
    assert not torch.allclose(logits, clean), name


@pytest.mark.parametrize("kind", ["topk", "topk_transcoder"])
def test_unit_ablation_removes_exactly_its_decoder_row(llama_subject, kind):
    """Zeroing unit u subtracts c_u * W_dec[u] at the output site, from the codes of the clean input site."""
    meta = ({"hook_name": "blocks.1.mlp_in", "hook_name_out": "blocks.1.mlp_out"} if kind == "topk_transcoder"
            else {"hook_name": SITE})
    torch.manual_seed(2)
    d = (TopKTranscoder if kind == "topk_transcoder" else TopKSAE)(32, 24, k=6, metadata=meta)
    with torch.no_grad():
        d.b_enc.add_(0.3)
        d.b_dec.normal_()
    ids, mask = _batch()
    with llama_subject.capture([d.input_site, d.output_site]) as clean:
        llama_subject.model(input_ids=ids, attention_mask=mask)
    codes = d.encode(clean[d.input_site])
    u = int((codes != 0).sum((0, 1)).argmax())  # the unit that fires most
    assert int((codes[..., u] != 0).sum()) > 0
    want = clean[d.output_site] - codes[..., u:u + 1] * d.W_dec[u].detach()
    with llama_subject.intervene([iv.UnitEdit(dictionary=d, units=[u])]):
        with llama_subject.capture([d.output_site]) as edited:
            got_logits = llama_subject.model(input_ids=ids, attention_mask=mask).logits
    real = mask.bool()
    torch.testing.assert_close(edited[d.output_site][real], want[real], rtol=1e-5, atol=1e-5)
    # and the logits are those of splicing the by-hand activation in
    with llama_subject.intervene([llama_subject.intervention(d.output_site, lambda y: torch.where(
            real[..., None], want, y))]):
        by_hand = llama_subject.model(input_ids=ids, attention_mask=mask).logits
    torch.testing.assert_close(got_logits, by_hand, rtol=1e-5, atol=1e-5)


def test_neuron_ablation_equals_zeroing_the_coordinate(llama_subject):
    d = ARCHITECTURES["neurons"](64, metadata={"hook_name": "blocks.0.mlp_hidden"})
    ids, mask = _batch()
    with llama_subject.intervene([iv.UnitEdit(dictionary=d, units=[7, 11])]):
        a = llama_subject.model(input_ids=ids, attention_mask=mask).logits
    with llama_subject.intervene([iv.Zero(site="blocks.0.mlp_hidden", dims=[7, 11])]):
        b = llama_subject.model(input_ids=ids, attention_mask=mask).logits
    assert torch.equal(a, b)


def _generate(subject, edits, use_cache):
    ids, mask = _batch()
    with subject.intervene(edits):
        return subject.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=6, do_sample=False,
                                      use_cache=use_cache, pad_token_id=0)


def test_interventions_under_generate_give_the_same_tokens_with_and_without_the_kv_cache(llama_subject):
    d = TopKTranscoder(32, 24, k=4, metadata={"hook_name": "blocks.1.mlp_in", "hook_name_out": "blocks.1.mlp_out"})
    torch.manual_seed(3)
    steer = torch.randn(32) * 4
    plain = _generate(llama_subject, [], True)
    for edits in ([iv.AddDirection(site=SITE, direction=steer, alpha=1.0, positions="generated")],
                  [iv.AddDirection(site="blocks.0.resid_post", direction=steer, alpha=1.0, positions="prompt"),
                   iv.UnitEdit(dictionary=d, units=[1, 2], op="set", value=8.0, positions=[2, 6, 8])]):
        cached, uncached = _generate(llama_subject, edits, True), _generate(llama_subject, edits, False)
        assert torch.equal(cached, uncached), [e.type for e in edits]
        assert not torch.equal(cached, plain), [e.type for e in edits]


def test_generated_positions_are_only_the_new_tokens(llama_subject):
    """Under the cache, 'generated' edits the forwards after the prompt's: the prompt's activations are clean."""
    seen = []
    ids, mask = _batch()
    with llama_subject.intervene([iv.Zero(site=SITE, positions="generated")]):
        with llama_subject.capture([SITE]) as acts:
            h = llama_subject.model.get_submodule("model.layers.1").register_forward_hook(
                lambda *_: seen.append(acts[SITE].clone()))
            try:
                llama_subject.model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=3, do_sample=False,
                                             pad_token_id=0)
            finally:
                h.remove()
    assert seen[0].shape[1] == 7 and bool((seen[0] != 0).any(-1).all())
    assert all(s.shape[1] == 1 and bool((s == 0).all()) for s in seen[1:])


def test_every_intervention_round_trips_through_json(tmp_path):
    d = TopKSAE(32, 24, k=4, metadata={"hook_name": SITE})
    d.save(tmp_path / "sae")
    objs = [iv.Zero(site=SITE, dims=[1]), iv.MeanAblate(site=SITE, mean=[0.5] * 32, positions="prompt"),
            iv.Clamp(site=SITE, value=[1.0, 2.0], dims=[0, 1]), iv.Scale(site=SITE, factor=0.5),
            iv.AddDirection(site=SITE, direction=[0.25] * 32, alpha=-2.0, positions=[0, 4]),
            iv.ProjectOut(site=SITE, directions=[[1.0] * 32]),
            iv.ProjectOutAdd(site=SITE, directions=[[1.0] * 32], add=[0.5] * 32),
            iv.Dissect(site=SITE, alpha=0.5, k=[1.0] * 32),
            iv.UnitEdit(dictionary=str(tmp_path / "sae"), units=[3], op="set", value=2.0, positions="generated")]
    assert {o.type for o in objs} == set(iv.TYPES)
    for o in objs:
        text = json.dumps(o.to_json())
        back = iv.intervention_from_json(text)
        assert type(back) is type(o) and back.to_json() == o.to_json()


def test_an_applied_json_unit_edit_loads_its_dictionary(llama_subject, tmp_path):
    d = _random_dictionary("topk", llama_subject)
    d.save(tmp_path / "sae")
    spec = {"type": "units", "dictionary": str(tmp_path / "sae"), "units": [2], "op": "set", "value": 3.0}
    a, _ = _run(llama_subject, [iv.intervention_from_json(spec)])
    b, _ = _run(llama_subject, [iv.UnitEdit(dictionary=d, units=[2], op="set", value=3.0)])
    assert torch.equal(a, b)


@pytest.mark.parametrize("spec, message", [
    ({"type": "zap", "site": SITE}, "unknown intervention type 'zap'"),
    ({"type": "zero"}, "needs the field 'site'"),
    ({"type": "zero", "site": SITE, "colour": 1}, "unknown field 'colour'"),
    ({"type": "add", "site": SITE, "direction": [1.0, float("nan")]}, "holds NaN or infinite"),
    ({"type": "add", "site": SITE, "direction": [1.0], "alpha": float("inf")}, "alpha must be a finite number"),
    ({"type": "scale", "site": SITE, "factor": "big"}, "scale factor must be a finite number"),
    ({"type": "zero", "site": SITE, "positions": "middle"}, "unknown position selector 'middle'"),
    ({"type": "zero", "site": SITE, "positions": [-1]}, "position indices must be a non-empty list of integers"),
    ({"type": "units", "dictionary": "d", "units": [1], "op": "double"}, "unknown unit operation 'double'"),
    ("[1, 2", "is not"),
])
def test_bad_json_is_refused_in_one_sentence(spec, message):
    with pytest.raises(UnitscopeError, match=message):
        iv.intervention_from_json(json.dumps(spec) if isinstance(spec, dict) else spec)


def test_bad_units_sites_and_widths_are_refused(llama_subject):
    d = TopKSAE(32, 24, k=4, metadata={"hook_name": SITE})
    with pytest.raises(UnitscopeError, match="unit 24 is out of range: this topk dictionary has 24 units"):
        _run(llama_subject, [iv.UnitEdit(dictionary=d, units=[24])])
    with pytest.raises(UnitscopeError, match="site 'blocks.0.resid_post' is not where this topk dictionary was "
                                             "trained; it reads 'blocks.1.resid_post'"):
        _run(llama_subject, [iv.UnitEdit(dictionary=d, units=[1], site="blocks.0.resid_post")])
    with pytest.raises(UnitscopeError, match="direction of this add intervention has length 3, but site"):
        _run(llama_subject, [iv.AddDirection(site=SITE, direction=[1.0, 2.0, 3.0])])
    with pytest.raises(UnitscopeError, match="dimension 40 is out of range"):
        _run(llama_subject, [iv.Zero(site=SITE, dims=[40])])


def test_a_model_that_is_not_a_sequence_model_takes_all_positions(tokenizer):
    from unitscope import load_subject

    torch.manual_seed(4)
    net = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.ReLU(), torch.nn.Linear(16, 3))
    subject = load_subject(net, tokenizer=tokenizer)
    x = torch.randn(5, 8)
    want = net[2](torch.relu(net[0](x) * 3.0))
    with subject.intervene([iv.Scale(site="0:output", factor=3.0)]):
        torch.testing.assert_close(net(x), want)
    with pytest.raises(UnitscopeError, match="position selector 'prompt' needs \\[batch, sequence, width\\]"):
        with subject.intervene([iv.Scale(site="0:output", factor=3.0, positions="prompt")]):
            net(x)
