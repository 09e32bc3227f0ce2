"""Training: FVU falls, the decoder stays unit-norm, and a killed run resumes to identical weights."""

import json

import pytest
import torch
from conftest import calling_first

from unitscope import Corpus, UnitscopeError, load_dictionary, record
from unitscope.dictionaries.train import TrainConfig, Trainer


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, llama_subject):
    return record(llama_subject, Corpus("default"), ["blocks.1.resid_post"], 6000,
                  tmp_path_factory.mktemp("st") / "s", ctx_len=32, batch_size=8, shard_tokens=1024, progress=False)


def _cfg(**kw):
    base = dict(n_units=128, k=8, batch_size=256, train_tokens=256 * 60, checkpoint_every=10, seed=1)
    return TrainConfig(**{**base, **kw})


def test_training_reduces_fvu_and_saves_a_loadable_dictionary(small_store, tmp_path):
    d = Trainer(small_store, "blocks.1.resid_post", _cfg(), tmp_path / "d", progress=False).run()
    log = json.loads((tmp_path / "d" / "train.json").read_text())["log"]
    assert log[-1]["fvu"] < 0.5 * log[0]["fvu"]
    loaded = load_dictionary(tmp_path / "d")
    x = small_store.acts("blocks.1.resid_post", 0)[1:50]
    assert torch.equal(loaded.encode(x), d.encode(x))
    # the activation scale is folded into the saved weights: raw activations reconstruct raw activations
    fvu = (loaded(x) - x).pow(2).sum() / (x - x.mean(0)).pow(2).sum()
    assert fvu < 0.9
    assert not (tmp_path / ".d.checkpoint").exists()


class _Killed(Exception):
    pass


def test_a_killed_run_resumes_to_the_same_weights(small_store, tmp_path, monkeypatch):
    full = Trainer(small_store, "blocks.1.resid_post", _cfg(), tmp_path / "full", progress=False).run()
    t = Trainer(small_store, "blocks.1.resid_post", _cfg(), tmp_path / "resumed", progress=False)
    original = Trainer._normalise_decoder

    def die_at_step_37(self):
        original(self)
        if self.step == 36:
            raise _Killed
    monkeypatch.setattr(Trainer, "_normalise_decoder", die_at_step_37)
    with pytest.raises(_Killed):
        t.run()
    monkeypatch.setattr(Trainer, "_normalise_decoder", original)
    state = json.loads((tmp_path / ".resumed.checkpoint" / "state.json").read_text())
    assert state["step"] == 30
    resumed = Trainer(small_store, "blocks.1.resid_post", _cfg(), tmp_path / "resumed", progress=False).run()
    for (name, a), b in zip(full.state_dict().items(), resumed.state_dict().values()):
        assert torch.equal(a, b), name


def test_a_sweep_trained_together_equals_separate_runs(small_store, tmp_path):
    from unitscope.dictionaries.train import train_together

    cfgs = [_cfg(k=4, train_tokens=256 * 20), _cfg(k=8, train_tokens=256 * 20),
            _cfg(architecture="jumprelu", train_tokens=256 * 20)]
    together = train_together([Trainer(small_store, "blocks.1.resid_post", c, tmp_path / f"t{i}", progress=False)
                               for i, c in enumerate(cfgs)], progress=False)
    for i, c in enumerate(cfgs):
        alone = Trainer(small_store, "blocks.1.resid_post", c, tmp_path / f"a{i}", progress=False).run()
        for (name, a), b in zip(alone.state_dict().items(), together[i].state_dict().values()):
            assert torch.equal(a, b), (c.architecture, c.k, name)


def test_resampling_restarts_dead_latents_at_badly_reconstructed_inputs(small_store, tmp_path):
    t = Trainer(small_store, "blocks.1.resid_post", _cfg(architecture="standard", resample_every=5),
                tmp_path / "r", progress=False)
    t.begin()
    x, y = next(t._batches(0))
    x = x * t.scale
    for _ in range(3):
        t.train_step(*next(t._batches(t.step)))
    dead = torch.tensor([3, 17, 40])
    t.since_fired[dead] = 10**9
    before = t.sae.W_dec.detach().clone()
    assert t.resample_dead(x) == 3
    changed = (t.sae.W_dec.detach() != before).any(1)
    assert changed[dead].all() and changed.sum() == 3
    assert torch.allclose(t.sae.W_dec[dead].norm(dim=1), torch.ones(3), atol=1e-5)
    assert (t.opt.state[t.sae.W_dec]["exp_avg"][dead] == 0).all()
    assert (t.since_fired[dead] == 0).all()


def test_live_batches_are_the_store_rows_in_stream_order_and_resume_exactly(llama_subject, tmp_path):
    from unitscope.dictionaries.sources import LiveSource
    from unitscope.dictionaries.train import TrainConfig as Cfg

    st = record(llama_subject, Corpus("default"), ["blocks.1.resid_post"], 32 * 48, tmp_path / "s", ctx_len=32,
                batch_size=4, shard_tokens=32 * 48, progress=False)
    mask = fit_mask(st)
    rows = st.acts("blocks.1.resid_post", 0)[torch.from_numpy(mask)]
    live = LiveSource(llama_subject, Corpus("default"), "blocks.1.resid_post", None, batch_size=100, ctx_len=32,
                      forward_windows=4)
    it = live.batches(0)
    first = [next(it)[0] for _ in range(5)]
    assert torch.allclose(torch.cat(first), rows[:500], atol=1e-5)
    resumed = next(live.batches(3))[0]
    assert torch.equal(resumed, first[3])
    d = Trainer(live, "blocks.1.resid_post", Cfg(n_units=64, k=4, batch_size=100, train_tokens=100 * 30),
                tmp_path / "live", progress=False).run()
    log = json.loads((tmp_path / "live" / "train.json").read_text())["log"]
    assert log[-1]["fvu"] < log[0]["fvu"] and d.metadata["trained_live"] is True


def fit_mask(store):
    from unitscope.dictionaries.fit import _mask

    return _mask(store)


def test_a_kill_at_any_step_of_a_checkpoint_write_leaves_the_previous_or_the_new_checkpoint(
        small_store, tmp_path, monkeypatch):
    """Copy the checkpoint directory before every filesystem step of writing checkpoint 20 over checkpoint 10 (the
    state a kill there leaves): each copy resumes at step 10 or 20 with exactly the weights saved then."""
    import os
    import shutil
    from pathlib import Path

    from unitscope.dictionaries import train as train_mod

    t = Trainer(small_store, "blocks.1.resid_post", _cfg(), tmp_path / "r", progress=False)
    t.begin()
    saved = {}
    batches = t._batches(0)
    for _ in range(10):
        t.train_step(*next(batches))
    saved[10] = {k: v.clone() for k, v in t.sae.state_dict().items()}
    snaps = []

    def snapshot():
        dst = tmp_path / f"snap{len(snaps)}"
        dst.mkdir()
        if (tmp_path / ".r.checkpoint").exists():
            shutil.copytree(tmp_path / ".r.checkpoint", dst / ".r.checkpoint")
        snaps.append(dst)

    def before(fn):
        return calling_first(snapshot, fn)

    for mod, name in ((os, "replace"), (os, "rename"), (os, "unlink"), (shutil, "rmtree"), (Path, "rename"),
                      (Path, "unlink"), (Path, "write_text"), (train_mod, "save_file")):
        monkeypatch.setattr(mod, name, before(getattr(mod, name)))
    for _ in range(10):
        t.train_step(*next(batches))
    monkeypatch.undo()
    saved[20] = {k: v.clone() for k, v in t.sae.state_dict().items()}
    snapshot()
    assert len(snaps) >= 5
    steps = []
    for s in snaps:
        r = Trainer(small_store, "blocks.1.resid_post", _cfg(), s / "r", progress=False)
        r.begin()
        steps.append(r.step)
        assert r.step in saved, (s, r.step)
        for k, v in saved[r.step].items():
            assert torch.equal(r.sae.state_dict()[k], v), (s, k)
    assert steps[0] == 10 and steps[-1] == 20


def _sweep(small_store, out, cfgs):
    from unitscope.dictionaries.train import train_together

    return train_together([Trainer(small_store, "blocks.1.resid_post", c, out / f"m{i}", progress=False)
                           for i, c in enumerate(cfgs)], progress=False)


@pytest.mark.parametrize("where", ["between members' checkpoints", "between members' final saves"])
def test_a_sweep_killed_between_members_resumes_to_the_uninterrupted_weights(small_store, tmp_path, monkeypatch,
                                                                              where):
    from unitscope.dictionaries.base import Dictionary

    cfgs = [_cfg(k=4, train_tokens=256 * 30), _cfg(k=8, train_tokens=256 * 30),
            _cfg(architecture="jumprelu", train_tokens=256 * 30)]
    whole = _sweep(small_store, tmp_path / "whole", cfgs)
    calls = []
    if where == "between members' checkpoints":
        original = Trainer.save_checkpoint

        def dies(self, *a, **kw):
            calls.append(self.step)
            if self.step == 20 and self.out.name == "m1":
                raise _Killed
            return original(self, *a, **kw)
        monkeypatch.setattr(Trainer, "save_checkpoint", dies)
    else:
        original = Dictionary.save

        def dies(self, path, *a, **kw):
            calls.append(path)
            if path.name == "m1":
                raise _Killed
            return original(self, path, *a, **kw)
        monkeypatch.setattr(Dictionary, "save", dies)
    with pytest.raises(_Killed):
        _sweep(small_store, tmp_path / "killed", cfgs)
    monkeypatch.undo()
    assert len(calls) >= 2
    resumed = _sweep(small_store, tmp_path / "killed", cfgs)
    for w, r, c in zip(whole, resumed, cfgs):
        for (name, a), b in zip(w.state_dict().items(), r.state_dict().values()):
            assert torch.equal(a, b), (c.architecture, c.k, name)
    assert not list(tmp_path.glob("killed/.*checkpoint*"))


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "batchtopk", "topk", "matryoshka_topk", "transcoder",
                                  "skip_transcoder", "topk_transcoder"])
def test_train_json_records_the_compute_dtype_that_ran(small_store, tmp_path, arch):
    """Asked for bfloat16, a kind whose training forward gives the same numbers as in float32 did not use it:
    train.json must say what ran, found here by running one forward both ways."""
    from unitscope.dictionaries.train import build_dictionary

    site = "blocks.1.resid_post"
    cfg = _cfg(architecture=arch, compute_dtype="bfloat16", train_tokens=256 * 2)
    x = small_store.acts(site, 0)[:256].float()
    sae = build_dictionary(cfg, x.shape[1], {}, x.shape[1])
    a = sae.training_forward(x, compute_dtype=None).loss
    b = sae.training_forward(x, compute_dtype=torch.bfloat16).loss
    ran = "float32" if torch.equal(a, b) else "bfloat16"
    target = site if "transcoder" in arch else None  # a transcoder from a site to itself: enough to train
    Trainer(small_store, site, cfg, tmp_path / "d", progress=False, target_site=target).run()
    assert json.loads((tmp_path / "d" / "train.json").read_text())["compute_dtype"] == ran
    assert ran == ("bfloat16" if "topk" in arch else "float32")


def test_the_logged_fvu_of_a_matryoshka_sae_is_the_whole_dictionary_fvu(small_store, tmp_path):
    """The training log's FVU at a step equals the FVU of the full dictionary's reconstruction of that step's batch
    (recomputed with the dense inference path), not the mean over prefixes that is minimised."""
    import copy

    t = Trainer(small_store, "blocks.1.resid_post", _cfg(architecture="matryoshka_topk", compute_dtype="float32"),
                tmp_path / "m", progress=False)
    t.begin()
    batches = t._batches(0)
    for _ in range(19):
        t.train_step(*next(batches))
    x, y = next(batches)
    before = copy.deepcopy(t.sae)
    t.train_step(x, y)
    xs = x * t.scale
    with torch.no_grad():
        recon = before.reconstruct(xs)[1]
        whole = float((xs - recon).pow(2).sum() / (xs - xs.mean(0)).pow(2).sum())
    assert t.log[-1]["step"] == 20
    assert abs(t.log[-1]["fvu"] - whole) < 2e-5
    assert t.log[-1]["loss"] > whole + 0.01  # what is minimised (the prefix mean) is logged apart


def test_a_checkpoint_in_the_former_single_slot_layout_still_resumes(small_store, tmp_path):
    """Checkpoints written before the two-slot layout (state.json + state.safetensors) resume at their step."""
    t = Trainer(small_store, "blocks.1.resid_post", _cfg(), tmp_path / "o", progress=False)
    t.begin()
    batches = t._batches(0)
    for _ in range(10):
        t.train_step(*next(batches))
    d = tmp_path / ".o.checkpoint"
    (d / "000000010.json").replace(d / "state.json")
    (d / "000000010.safetensors").replace(d / "state.safetensors")
    r = Trainer(small_store, "blocks.1.resid_post", _cfg(), tmp_path / "o", progress=False)
    r.begin()
    assert r.step == 10 and all(torch.equal(a, b) for a, b in zip(r.sae.state_dict().values(),
                                                                   t.sae.state_dict().values()))
    r.train_step(*next(r._batches(r.step)))  # the next checkpoint replaces the old layout
    for _ in range(9):
        r.train_step(*next(r._batches(r.step)))
    assert sorted(p.name for p in d.iterdir()) == ["000000020.json", "000000020.safetensors", "state.json"]


def test_a_checkpoint_made_from_other_data_is_refused(tmp_path, llama_subject, monkeypatch):
    """Re-recording the store under a killed training run must not resume the old run's weights on new data."""
    store = record(llama_subject, Corpus("default"), ["blocks.1.resid_post"], 6000, tmp_path / "s", ctx_len=32,
                   batch_size=8, shard_tokens=1024, progress=False)
    original = Trainer._normalise_decoder

    def die_at_step_12(self):
        original(self)
        if self.step == 12:
            raise _Killed
    monkeypatch.setattr(Trainer, "_normalise_decoder", die_at_step_12)
    with pytest.raises(_Killed):
        Trainer(store, "blocks.1.resid_post", _cfg(), tmp_path / "d", progress=False).run()
    monkeypatch.setattr(Trainer, "_normalise_decoder", original)
    other = record(llama_subject, Corpus("default"), ["blocks.1.resid_post"], 7000, tmp_path / "s", ctx_len=32,
                   batch_size=8, shard_tokens=1024, progress=False, overwrite=True)
    with pytest.raises(UnitscopeError, match="made from other data"):
        Trainer(other, "blocks.1.resid_post", _cfg(), tmp_path / "d", progress=False).run()


def test_a_training_step_keeps_no_autograd_graph_alive(small_store, tmp_path):
    """The decoder-gradient projection once ran under autograd: every step's graph stayed reachable from
    W_dec.grad, and resident memory grew by ~B x n floats per step. Anonymous memory must stay flat."""
    t = Trainer(small_store, "blocks.1.resid_post", _cfg(n_units=2048, train_tokens=256 * 200), tmp_path / "d",
                progress=False)
    t.begin()
    batches = t._batches(0)

    def anon_mb():
        with open("/proc/self/status") as f:
            return int(f.read().split("RssAnon:")[1].split()[0]) / 1024

    x, y = next(batches)
    for _ in range(20):  # warm up: Adam state, allocator pools
        t.train_step(x, y)
    assert t.sae.W_dec.grad is not None and t.sae.W_dec.grad.grad_fn is None
    before = anon_mb()
    for _ in range(120):
        t.train_step(x, y)
    grown = anon_mb() - before
    per_step_leak = 256 * 2048 * 4 / 2**20  # one [B, n] float32 per step, the size of the old leak
    assert grown < 20 * per_step_leak, f"resident memory grew {grown:.0f} MB over 120 steps"


# ---- kinds' options and defaults (a synthetic store: no model needed) ---------------------------------------------
@pytest.fixture(scope="module")
def syn_store(tmp_path_factory):
    from unitscope.synthetic import SyntheticSpec, write_synthetic_store

    spec = SyntheticSpec(n_features=32, d=16, rows=6000, active=2.0, correlated_pairs=2)
    return write_synthetic_store(spec, tmp_path_factory.mktemp("syn") / "s")


def test_the_default_learning_rate_scales_with_units_and_input_width():
    # tuned at SmolLM2's 576 -> 4608; a unit-norm row's entries shrink as 1/sqrt(d_in), and so does the step
    assert TrainConfig(n_units=4608).learning_rate_for(576) == pytest.approx(1e-3)
    assert TrainConfig(n_units=1152).learning_rate_for(144) == pytest.approx(4e-3)
    assert TrainConfig(n_units=1152, lr=5e-4).learning_rate_for(144) == 5e-4


def test_a_kinds_options_reach_it_and_are_refused_for_other_kinds(syn_store, tmp_path, capsys):
    from unitscope.cli import main

    base = ["train", "--store", str(syn_store.root), "--units", "64", "--k", "3", "--train-tokens", "20000",
            "--batch-size", "500", "--quiet"]
    assert main([*base, "--out", str(tmp_path / "t"), "--architecture", "topk", "--l1-coefficient", "0.1"]) == 2
    err = capsys.readouterr().err
    assert "--l1-coefficient applies to" in err and "standard" in err and err.count("\n") == 1
    assert not (tmp_path / "t").exists()
    assert main([*base, "--out", str(tmp_path / "m"), "--architecture", "matryoshka_topk",
                 "--matryoshka-prefixes", "64"]) == 2
    assert "below --units" in capsys.readouterr().err
    assert main([*base, "--out", str(tmp_path / "s"), "--architecture", "standard", "--l1-coefficient", "0.02",
                 "--aux-coefficient", "0"]) == 0
    summary = json.loads((tmp_path / "s" / "train.json").read_text())
    assert summary["config"]["extra"] == {"l1_coefficient": 0.02, "aux_coef": 0.0}
    # a fixed coefficient stays fixed (no L0 target); the saved weights hold no training-only state
    assert {e["sparsity_coefficient"] for e in summary["log"]} == {0.02}
    from safetensors.torch import load_file
    assert not [k for k in load_file(str(tmp_path / "s" / "sae_weights.safetensors")) if k.startswith("train_")]
    assert main([*base, "--out", str(tmp_path / "m"), "--architecture", "matryoshka_topk",
                 "--matryoshka-prefixes", "8", "32", "--dead-tokens", "1000"]) == 0
    assert load_dictionary(tmp_path / "m").prefixes == [8, 32, 64]
    assert json.loads((tmp_path / "m" / "train.json").read_text())["config"]["dead_tokens"] == 1000


@pytest.mark.parametrize("arch", ["standard", "jumprelu"])
def test_penalised_kinds_settle_at_the_target_l0(syn_store, tmp_path, arch):
    """`k` sets the target L0 of the penalised kinds (k for jumprelu, 2k for standard, whose L1 shrinkage needs the
    room): their coefficient adapts until the mean L0 gets there (a fixed coefficient of the former defaults gave an
    L0 in the tens on 2-sparse data)."""
    t = Trainer(syn_store, "synthetic", TrainConfig(architecture=arch, n_units=64, k=3, batch_size=500,
                                                    train_tokens=500 * 150, seed=0), tmp_path / "d", progress=False)
    t.run()
    late = [e["l0"] for e in t.log[-5:]]
    target = 3 * (2 if arch == "standard" else 1)
    assert all(0.5 * target <= v <= 2 * target for v in late), late  # the former defaults: tens


@pytest.mark.parametrize("device, says", [("auto", "device map"), ("auto:0=10GiB", "device map"),
                                          ("tpu", "unknown device"), ("cuda:7" if torch.cuda.is_available()
                                                                          else "cuda", "CUDA device")])
def test_a_training_device_that_is_not_one_device_of_this_machine_is_refused_in_one_sentence(device, says):
    with pytest.raises(UnitscopeError, match=says):
        TrainConfig(device=device).validate()
