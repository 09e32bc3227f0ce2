"""Recording: several sites from one forward; a kill -9 at any moment resumes to the exact same store."""

import itertools
import os
import signal
import subprocess
import sys
import time

import numpy as np
import pytest
import torch

from unitscope import Corpus, Store, record

ARGS = ["--site", "blocks.0.resid_post", "--site", "blocks.1.mlp_hidden", "--tokens", "30000", "--ctx-len", "16",
        "--record-batch-size", "1", "--shard-tokens", "64", "--quiet"]


def test_record_several_sites_matches_a_direct_forward(tmp_path, llama_subject):
    st = record(llama_subject, Corpus("default"), ["blocks.0.resid_post", "blocks.2.mlp_out"], 100, tmp_path / "s",
                ctx_len=16, batch_size=3, shard_tokens=48, progress=False)
    assert st.n_tokens == 100 and st.n_shards == 3  # exactly the tokens asked for, last window truncated
    assert Store.open(tmp_path / "s").manifest["complete"] is True
    tokens = torch.from_numpy(st.column("tokens")[:16]).long()[None]
    with llama_subject.capture(["blocks.0.resid_post", "blocks.2.mlp_out"]) as acts:
        llama_subject.logits(tokens)
    assert torch.allclose(st.acts("blocks.0.resid_post", 0)[:16], acts["blocks.0.resid_post"][0], atol=1e-6)
    assert torch.allclose(st.acts("blocks.2.mlp_out", 0)[:16], acts["blocks.2.mlp_out"][0], atol=1e-6)
    again = record(llama_subject, Corpus("default"), ["blocks.0.resid_post", "blocks.2.mlp_out"], 100,
                   tmp_path / "s", ctx_len=16, batch_size=3, shard_tokens=48, progress=False)
    assert again.n_tokens == 100 and Store.open(tmp_path / "s").manifest["complete"] is True  # left as it is


def _record_cmd(model_dir, out):
    return [sys.executable, "-m", "unitscope", "record", "--model", str(model_dir), "--out", str(out), *ARGS]


def test_kill_9_then_rerun_gives_exactly_the_uninterrupted_store(tmp_path, tiny_model_dir):
    killed = tmp_path / "killed"
    proc = subprocess.Popen(_record_cmd(tiny_model_dir, killed), stdout=subprocess.DEVNULL, stderr=subprocess.PIPE)
    deadline = time.time() + 120
    while time.time() < deadline:
        manifest = killed / "store.json"
        if manifest.exists() and len(list((killed / "shards").glob("*.safetensors"))) >= 3:
            break
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    partial = Store.open(killed)
    assert 0 < partial.n_tokens < 30000, "the kill must land mid-recording"
    rerun = subprocess.run(_record_cmd(tiny_model_dir, killed), capture_output=True, text=True)
    assert rerun.returncode == 0, rerun.stderr
    whole = tmp_path / "whole"
    ref = subprocess.run(_record_cmd(tiny_model_dir, whole), capture_output=True, text=True)
    assert ref.returncode == 0, ref.stderr
    a, b = Store.open(killed), Store.open(whole)
    assert a.n_tokens == b.n_tokens == 30000
    a.verify()
    for key in ("tokens", "doc", "pos"):
        assert np.array_equal(a.column(key), b.column(key))
    for site in ("blocks.0.resid_post", "blocks.1.mlp_hidden"):
        for i in range(a.n_shards):
            assert torch.equal(a.acts(site, i), b.acts(site, i))


def test_prefetch_keeps_order_raises_where_the_producer_failed_and_stops_when_abandoned():
    import threading

    from unitscope.record import prefetch

    def failing():
        yield from range(5)
        raise ValueError("bad window")

    it = prefetch(failing(), depth=2)
    assert [next(it) for _ in range(5)] == list(range(5))
    with pytest.raises(ValueError, match="bad window"):
        next(it)

    endless = prefetch(itertools.count(), depth=4)
    assert [next(endless) for _ in range(10)] == list(range(10))
    endless.close()  # the consumer stops early (a recording that is done): the producer thread must end
    deadline = time.time() + 10
    while time.time() < deadline and any(t.name == "unitscope-tokenise" for t in threading.enumerate()):
        time.sleep(0.05)
    assert not any(t.name == "unitscope-tokenise" for t in threading.enumerate())
