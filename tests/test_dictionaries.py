"""Dictionary protocol: SAELens-layout files round-trip; bad widths and unknown architectures fail clearly."""

import json

import pytest
import torch
from conftest import calling_first

from unitscope import UnitscopeError, load_dictionary
from unitscope.dictionaries.linear import Neurons
from unitscope.dictionaries.sae import TopKSAE


def test_topk_round_trips_through_saelens_layout(tmp_path):
    sae = TopKSAE(16, 64, k=4, metadata={"hook_name": "blocks.0.resid_post", "model_name": "m"})
    with torch.no_grad():
        sae.b_enc.normal_()
        sae.b_dec.normal_()
    sae.save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    assert cfg["architecture"] == "topk" and cfg["d_in"] == 16 and cfg["d_sae"] == 64 and cfg["k"] == 4
    assert cfg["metadata"]["hook_name"] == "blocks.0.resid_post"
    loaded = load_dictionary(tmp_path / "d")
    x = torch.randn(3, 5, 16)  # leading dims of any shape
    codes = sae.encode(x)
    assert codes.shape == (3, 5, 64) and ((codes > 0).sum(-1) <= 4).all()
    assert torch.equal(loaded.encode(x), codes)
    assert torch.equal(loaded.decode(codes), sae.decode(codes))
    assert loaded.directions.shape == (64, 16)


def test_neurons_are_an_exact_identity(tmp_path):
    n = Neurons(8, metadata={"hook_name": "s"})
    x = torch.randn(2, 8)
    assert torch.equal(n(x), x)
    n.save(tmp_path / "n")
    assert torch.equal(load_dictionary(tmp_path / "n").directions, torch.eye(8))


def test_wrong_width_is_a_clear_error():
    with pytest.raises(UnitscopeError, match="width 10, but this topk dictionary expects width 16"):
        TopKSAE(16, 32, k=2).encode(torch.randn(4, 10))


def test_unknown_architecture_in_cfg(tmp_path):
    TopKSAE(4, 8, k=2).save(tmp_path / "d")
    cfg = json.loads((tmp_path / "d" / "cfg.json").read_text())
    (tmp_path / "d" / "cfg.json").write_text(json.dumps({**cfg, "architecture": "mystery"}))
    with pytest.raises(UnitscopeError, match="unknown dictionary architecture 'mystery'.*known architectures are"):
        load_dictionary(tmp_path / "d")


def test_k_larger_than_width_is_refused():
    with pytest.raises(UnitscopeError, match="k=40"):
        TopKSAE(4, 32, k=40)


def test_weights_file_missing_a_tensor(tmp_path):
    from safetensors.torch import load_file, save_file

    TopKSAE(4, 8, k=2).save(tmp_path / "d")
    w = load_file(str(tmp_path / "d" / "sae_weights.safetensors"))
    del w["b_enc"]
    save_file(w, str(tmp_path / "d" / "sae_weights.safetensors"))
    with pytest.raises(UnitscopeError, match="lack 'b_enc'"):
        load_dictionary(tmp_path / "d")


@pytest.mark.parametrize("exchange", [True, False])
def test_a_kill_at_any_step_of_a_save_leaves_the_old_or_the_new_dictionary(tmp_path, monkeypatch, exchange):
    """Copy the directory before every filesystem step of a replacing save (the state a kill there would leave);
    every copy loads as the complete old or new dictionary, and a later save over it works. Both swap paths:
    Linux's atomic exchange, and the two renames used where it is missing."""
    import os
    import shutil
    from pathlib import Path

    from unitscope import atomic
    from unitscope.dictionaries import base

    def sae(seed):
        torch.manual_seed(seed)
        d = TopKSAE(8, 16, k=3, metadata={"hook_name": "s"})
        with torch.no_grad():
            for p in d.parameters():
                p.normal_()
        return d

    work = tmp_path / "work"
    sae(1).save(work / "d")
    versions = {seed: sae(seed).weights() for seed in (1, 2, 3)}
    snaps = []

    def snapshot():
        dst = tmp_path / f"snap{len(snaps)}"
        shutil.copytree(work, dst)
        snaps.append(dst)

    def before(fn):
        return calling_first(snapshot, fn)

    monkeypatch.setattr(os, "replace", before(os.replace))
    monkeypatch.setattr(os, "rename", before(os.rename))
    monkeypatch.setattr(shutil, "rmtree", before(shutil.rmtree))
    monkeypatch.setattr(base, "save_file", before(base.save_file))
    monkeypatch.setattr(Path, "write_text", before(Path.write_text))
    monkeypatch.setattr(atomic, "_exchange", before(atomic._exchange if exchange else lambda a, b: False))
    sae(2).save(work / "d")
    monkeypatch.undo()
    snapshot()
    assert len(snaps) >= 5

    def which(path):
        w = load_dictionary(path).weights()
        return [s for s, v in versions.items() if all(torch.equal(w[k], v[k]) for k in v)]

    seen = [which(s / "d") for s in snaps]
    assert all(s in ([1], [2]) for s in seen), seen
    assert seen[0] == [1] and seen[-1] == [2]
    for s in snaps:  # a save over any interrupted state works and leaves only the new copy
        sae(3).save(s / "d")
        assert which(s / "d") == [3] and sorted(p.name for p in s.iterdir()) == ["d"]


@pytest.mark.parametrize("exchange", [True, False])
def test_a_save_that_fails_midway_puts_the_old_dictionary_back(tmp_path, monkeypatch, exchange):
    """Both swap paths: Linux's atomic exchange, and the two renames used where it is missing."""
    import os

    from unitscope import atomic

    old = TopKSAE(4, 8, k=2, metadata={"hook_name": "s"})
    old.save(tmp_path / "d")
    before = load_dictionary(tmp_path / "d").weights()
    real = os.replace

    def fails_to_move_the_new_copy_in(src, dst):
        if ".d.tmp-" in str(src):
            raise OSError("disk trouble")
        return real(src, dst)

    def exchange_fails(a, b):
        raise OSError("disk trouble")

    if exchange:
        monkeypatch.setattr(atomic, "_exchange", exchange_fails)
    else:
        monkeypatch.setattr(atomic, "_exchange", lambda a, b: False)
        monkeypatch.setattr(os, "replace", fails_to_move_the_new_copy_in)
    new = TopKSAE(4, 8, k=2, metadata={"hook_name": "s"})
    with pytest.raises(OSError, match="disk trouble"):
        new.save(tmp_path / "d")
    monkeypatch.undo()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["d"]  # no leftovers beside it
    after = load_dictionary(tmp_path / "d").weights()
    assert all(torch.equal(before[k], after[k]) for k in before)
    assert not all(torch.equal(new.weights()[k], after[k]) for k in before)
