"""Hooks: identity interventions are bit-exact, contexts clean up exactly, forwards stop early."""

import pytest
import torch

from unitscope.hooks import StopForward


def _n_hooks(model):
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def test_identity_intervention_is_bit_exact(tiny_subject):
    ids = torch.randint(0, 300, (2, 9))
    clean = tiny_subject.logits(ids)
    sites = [s for s in tiny_subject.site_names()]
    with tiny_subject.intervene([tiny_subject.intervention(s, lambda x: x) for s in sites]):
        edited = tiny_subject.logits(ids)
    assert torch.equal(clean, edited)


def test_a_real_intervention_changes_the_output_and_is_removed(llama_subject):
    ids = torch.randint(0, 300, (1, 6))
    clean = llama_subject.logits(ids)
    with llama_subject.intervene([llama_subject.intervention("blocks.1.mlp_out", lambda x: torch.zeros_like(x))]):
        ablated = llama_subject.logits(ids)
    assert not torch.allclose(clean, ablated)
    assert torch.equal(llama_subject.logits(ids), clean)


def test_contexts_remove_exactly_their_hooks_when_nested_and_on_error(llama_subject):
    model = llama_subject.model
    before = _n_hooks(model)
    with pytest.raises(RuntimeError):
        with llama_subject.capture(["blocks.0.resid_post"]):
            with llama_subject.intervene([llama_subject.intervention("blocks.1.mlp_in", lambda x: x)]):
                assert _n_hooks(model) == before + 2
                raise RuntimeError("boom")
    assert _n_hooks(model) == before


def test_collect_stops_after_the_last_needed_site(llama_subject):
    calls = []
    last = llama_subject.model.get_submodule("model.layers.2")
    h = last.register_forward_hook(lambda *a: calls.append(1))
    try:
        acts = llama_subject.collect(torch.zeros(1, 4, dtype=torch.long), ["blocks.0.resid_post"])
    finally:
        h.remove()
    assert acts["blocks.0.resid_post"].shape == (1, 4, 32)
    assert calls == []  # block 2 never ran
    # the stopped forward gives the same activation as a full one
    with llama_subject.capture(["blocks.0.resid_post"]) as full:
        llama_subject.logits(torch.zeros(1, 4, dtype=torch.long))
    assert torch.equal(full["blocks.0.resid_post"], acts["blocks.0.resid_post"])


def _module_events(model):
    """Hooks on every module that log ("start", name) and ("end", name) in call order."""
    events, handles = [], []
    for name, mod in model.named_modules():
        handles.append(mod.register_forward_pre_hook(lambda _m, _a, n=name: events.append(("start", n))))
        handles.append(mod.register_forward_hook(lambda _m, _a, _o, n=name: events.append(("end", n))))
    return events, handles


@pytest.mark.parametrize("names", [["blocks.0.resid_post"], ["blocks.0.mlp_in", "blocks.1.mlp_out"],
                                   ["blocks.1.mlp_in"], ["blocks.2.resid_post", "blocks.0.resid_post"]])
def test_a_stopped_forward_runs_exactly_the_modules_before_the_last_site(tiny_subject, names):
    """Every module call of a full forward is logged; a collect() must make exactly the calls of the full forward
    up to the last needed site (its module's start for an input site, its end for an output one), then none."""
    ids = torch.randint(0, 300, (2, 5))
    model = tiny_subject.model
    events, handles = _module_events(model)
    try:
        tiny_subject.logits(ids)
        full = list(events)
        events.clear()
        acts = tiny_subject.collect(ids, names)
        stopped = list(events)
    finally:
        for h in handles:
            h.remove()
    refs = [tiny_subject.site(n) for n in names]
    last = max(full.index(("start" if r.io == "input" else "end", r.module_path)) for r in refs)
    assert stopped == full[:last + 1]
    assert ("end", "") in full and ("end", "") not in stopped  # the model's own forward never finished
    assert sorted(acts) == sorted(names)
    with pytest.raises(StopForward):  # StopForward escapes the forward: hooks raise it, collect() catches it
        with tiny_subject.capture(names, stop=True):
            model(input_ids=ids, use_cache=False)
