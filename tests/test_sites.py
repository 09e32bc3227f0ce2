"""Every canonical site kind on tiny Llama, GPT-2 and GPT-NeoX models; raw module paths; bad names."""

import pytest
import torch

from unitscope import UnitscopeError
from unitscope.sites import BLOCK_SITES


def test_every_canonical_site_has_the_expected_shape(tiny_subject):
    names = tiny_subject.site_names()
    assert names[0] == "embed" and names[-1] == "final_norm"
    assert len(names) == 2 + 3 * len(BLOCK_SITES)
    shapes = tiny_subject.site_shapes(seq_len=5)
    cfg = tiny_subject.model.config
    d = cfg.hidden_size
    hidden = getattr(cfg, "intermediate_size", None) or 4 * d
    for name, shape in shapes.items():
        assert shape[:2] == (1, 5), name
        assert shape[-1] == (hidden if name.endswith("mlp_hidden") else d), name


def test_capture_equals_what_a_plain_hook_sees(tiny_subject):
    """resid_post of block i is the input of block i+1; mlp_hidden is the down projection's input."""
    model = tiny_subject.model
    ids = torch.randint(0, 300, (2, 7))
    seen = {}
    ref = tiny_subject.site("blocks.1.mlp_hidden")
    down = model.get_submodule(ref.module_path)
    block2 = model.get_submodule(tiny_subject.site("blocks.2.resid_pre").module_path)
    h1 = down.register_forward_pre_hook(lambda m, a: seen.__setitem__("hidden", a[0].clone()))
    h2 = block2.register_forward_pre_hook(
        lambda m, a, kw: seen.__setitem__("pre2", (a[0] if a else kw["hidden_states"]).clone()), with_kwargs=True)
    try:
        with tiny_subject.capture(["blocks.1.mlp_hidden", "blocks.1.resid_post", "blocks.2.resid_pre"]) as acts:
            tiny_subject.logits(ids)
    finally:
        h1.remove()
        h2.remove()
    assert torch.equal(acts["blocks.1.mlp_hidden"], seen["hidden"])
    assert torch.equal(acts["blocks.2.resid_pre"], seen["pre2"])
    assert torch.equal(acts["blocks.1.resid_post"], acts["blocks.2.resid_pre"])


def test_raw_module_path_sites(llama_subject):
    acts = llama_subject.collect(torch.zeros(1, 3, dtype=torch.long),
                                 ["model.layers.0.mlp.down_proj:input", "model.layers.0.mlp.down_proj:output"])
    assert acts["model.layers.0.mlp.down_proj:input"].shape == (1, 3, 64)
    assert acts["model.layers.0.mlp.down_proj:output"].shape == (1, 3, 32)


@pytest.mark.parametrize("bad", ["blocks.99.resid_post", "blocks.0.nothing", "resid", "no.such.module:output"])
def test_unknown_site_is_one_clear_sentence(llama_subject, bad):
    with pytest.raises(UnitscopeError) as e:
        llama_subject.site(bad)
    assert repr(bad) in str(e.value) and "\n" not in str(e.value)
    if not bad.endswith(":output"):
        assert "blocks.{0..2}" in str(e.value)  # lists the valid sites
