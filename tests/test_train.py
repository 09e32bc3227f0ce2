"""Training: FVU falls, the decoder stays unit-norm, and a killed run resumes to identical weights."""

import json

import pytest
import torch

from unitscope import Corpus, load_dictionary, record
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
