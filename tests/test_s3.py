"""Stores on S3, against a real S3-compatible server (moto in server mode) started here on loopback.

A store recorded to `s3://bucket/...` holds the same bytes as one recorded to a local folder with the same
arguments, reads back identical, trains the same dictionary, and evaluates and explains it the same; a recording
killed with kill -9 while it uploads leaves a store every reader can open and verify (shards are whole objects,
the manifest is written after them), and the rerun finishes it to the uninterrupted store.
"""

import json
import logging
import os
import random
import signal
import subprocess
import sys
import time

import moto.server as moto_server  # moto[server] and s3fs are in the test extra
import pyarrow.parquet as pq
import pytest
import s3fs
import safetensors.torch
import torch
from conftest import run_cli
from safetensors.torch import load_file

from unitscope.cli import main
from unitscope.store import Store

ARGS = ["--site", "blocks.1.resid_post", "--ctx-len", "16", "--record-batch-size", "2", "--quiet"]


@pytest.fixture(scope="module")
def s3(tmp_path_factory):
    """A moto S3 server on 127.0.0.1 (a free port), a bucket, and the environment that points boto at it."""
    logging.getLogger("werkzeug").setLevel(logging.ERROR)
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    env = {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
           "AWS_ENDPOINT_URL": f"http://127.0.0.1:{server._server.server_port}",
           "OMP_NUM_THREADS": "1"}
    mirrors = tmp_path_factory.mktemp("mirrors")
    with pytest.MonkeyPatch.context() as mp:
        for k, v in env.items():
            mp.setenv(k, v)
        mp.setattr("unitscope.fs.cache_root", lambda: mirrors)  # not the user's cache (only this process reads)
        s3fs.S3FileSystem.clear_instance_cache()
        fs = s3fs.S3FileSystem()
        fs.mkdir("bucket")
        yield fs, env
        s3fs.S3FileSystem.clear_instance_cache()
    server.stop()


def test_a_store_on_s3_is_the_local_store_and_trains_the_same_dictionary(tmp_path, tiny_model_dir, s3):
    fs, _ = s3
    args = ["record", "--model", str(tiny_model_dir), *ARGS, "--tokens", "3000", "--shard-tokens", "256"]
    assert main([*args, "--out", str(tmp_path / "local")]) == 0
    assert main([*args, "--out", "s3://bucket/one"]) == 0
    local, remote = Store.open(tmp_path / "local"), Store.open("s3://bucket/one")
    assert remote.manifest == local.manifest and remote.n_shards == 12
    for entry in local.manifest["shards"]:  # the objects are the local files, byte for byte
        assert fs.cat_file(f"bucket/one/{entry['file']}") == (tmp_path / "local" / entry["file"]).read_bytes()
    assert remote.verify() == local.verify() > 0
    for key in ("tokens", "doc", "pos"):
        assert (remote.column(key) == local.column(key)).all()
    for i in range(local.n_shards):
        assert torch.equal(remote.acts("blocks.1.resid_post", i), local.acts("blocks.1.resid_post", i))
    train = ["train", "--units", "64", "--k", "4", "--batch-size", "128", "--train-tokens", "2560", "--quiet"]
    assert main([*train, "--store", str(tmp_path / "local"), "--out", str(tmp_path / "d-local")]) == 0
    assert main([*train, "--store", "s3://bucket/one", "--out", str(tmp_path / "d-s3")]) == 0
    w1, w2 = (load_file(str(tmp_path / d / "sae_weights.safetensors")) for d in ("d-local", "d-s3"))
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    # eval and explain read the remote store (identity, held-out start, every row) as they read the local one
    for store, tag in ((str(tmp_path / "local"), "local"), ("s3://bucket/one", "s3")):
        assert main(["eval", "--dictionary", str(tmp_path / "d-local"), "--store", store, "--eval-tokens", "256",
                     "--out", str(tmp_path / f"{tag}.json"), "--quiet"]) == 0
        assert main(["explain", "--dictionary", str(tmp_path / "d-local"), "--store", store, "--top", "5",
                     "--out", str(tmp_path / f"x-{tag}"), "--quiet"]) == 0
    e1, e2 = (json.loads((tmp_path / f"{t}.json").read_text())["eval_result_metrics"] for t in ("local", "s3"))
    assert e1 == e2
    for n in ("units", "examples"):
        assert pq.read_table(tmp_path / "x-s3" / f"{n}.parquet").to_pylist() == \
            pq.read_table(tmp_path / "x-local" / f"{n}.parquet").to_pylist()
    # a shard changed on the server is caught, by verify and by a reader with an empty mirror
    fs.pipe_file("bucket/one/shards/000003.safetensors", b"\0" * 100)
    with pytest.raises(Exception, match="000003.safetensors is corrupt"):
        Store.open("s3://bucket/one").verify()
    assert main(["verify", "s3://bucket/one"]) == 2


def test_a_recording_killed_while_uploading_leaves_a_readable_store_and_resumes(tmp_path, tiny_model_dir, s3):
    fs, env = s3
    args = [sys.executable, "-m", "unitscope", "record", "--model", str(tiny_model_dir), *ARGS, "--tokens", "2000",
            "--shard-tokens", "64"]
    assert main([*args[3:], "--out", str(tmp_path / "ref")]) == 0
    ref = json.loads((tmp_path / "ref" / "store.json").read_text())
    url, rng, landed = "s3://bucket/killed", random.Random(3), []

    def listed():
        try:
            return len(json.loads(fs.cat_file("bucket/killed/store.json"))["shards"])
        except (FileNotFoundError, json.JSONDecodeError, KeyError):
            return 0

    for least in (8,):  # one kill: the distributed and local kill tests cover several points
        proc = subprocess.Popen([*args, "--out", url], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, **env})
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and listed() < least:
            time.sleep(0.1)
        time.sleep(rng.uniform(0, 0.2))
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            landed.append(listed())
        proc.wait()
        st = Store.open(url)  # whatever the kill interrupted, the manifest names only whole shards
        assert st.verify() >= 0 and st.manifest["shards"] == ref["shards"][:st.n_shards]
    assert len(landed) == 1 and 0 < landed[0] < len(ref["shards"]), landed
    assert main([*args[3:], "--out", url]) == 0
    assert Store.open(url).manifest == ref
    names = {p.rsplit("/", 1)[-1] for p in fs.ls("bucket/killed/shards")}
    assert names == {e["file"][7:] for e in ref["shards"]}  # no orphan left from a shard the kill cut off


# ---- dictionaries on S3 ----------------------------------------------------------------------------------------

TRAIN = ["--units", "64", "--batch-size", "128", "--train-tokens", "2560", "--quiet"]


@pytest.fixture(scope="module")
def small_store(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("small") / "store"
    assert main(["record", "--model", str(tiny_model_dir), *ARGS, "--tokens", "3000", "--out", str(out)]) == 0
    return out


def _same_weights(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_dictionaries_trained_to_s3_are_the_local_ones_and_eval_and_explain_read_them(tmp_path, small_store, s3):
    fs, _ = s3
    train = ["train", "--store", str(small_store), *TRAIN]
    # a sweep (two dictionaries under one URL) and a fitted kind, each to a local folder and to s3
    for out in (str(tmp_path / "local"), "s3://bucket/dicts"):
        assert main([*train, "--k", "2", "4", "--out", out]) == 0
        assert main(["train", "--store", str(small_store), "--architecture", "pca", "--units", "8",
                     "--out", f"{out}/pca", "--quiet"]) == 0
    for did in ("topk-64-k2", "topk-64-k4", "pca"):
        for name in ("cfg.json", "sae_weights.safetensors"):  # the objects are the local files, byte for byte
            assert fs.cat_file(f"bucket/dicts/{did}/{name}") == (tmp_path / "local" / did / name).read_bytes()
        remote = json.loads(fs.cat_file(f"bucket/dicts/{did}/train.json")) if did != "pca" else None
        if remote is not None:
            assert remote["steps"] == 20 and remote["config"]["k"] == int(did[-1])
        assert not list((tmp_path / "local").glob(f".{did}.checkpoint"))  # none left behind
    # eval and explain take the dictionary from s3 and give what they give for the local copy
    store = str(small_store)
    for tag, d in (("local", str(tmp_path / "local" / "topk-64-k4")), ("s3", "s3://bucket/dicts/topk-64-k4")):
        assert main(["eval", "--dictionary", d, "--store", store, "--eval-tokens", "256",
                     "--out", str(tmp_path / f"{tag}.json"), "--quiet"]) == 0
        assert main(["explain", "--dictionary", d, "--store", store, "--top", "5",
                     "--out", str(tmp_path / f"x-{tag}"), "--quiet"]) == 0
    e1, e2 = (json.loads((tmp_path / f"{t}.json").read_text())["eval_result_metrics"] for t in ("local", "s3"))
    assert e1 == e2 and e1["reconstruction_quality"]["fvu"] < 1
    for n in ("units", "examples"):
        assert pq.read_table(tmp_path / "x-s3" / f"{n}.parquet").to_pylist() == \
            pq.read_table(tmp_path / "x-local" / f"{n}.parquet").to_pylist()
    # an unknown file system is refused before any training; a URL with no dictionary is one sentence, exit 2
    assert main([*train, "--out", "nope://bucket/d"]) == 2
    assert main(["eval", "--dictionary", "s3://bucket/dicts/none", "--store", store, "--eval-tokens", "256",
                 "--out", str(tmp_path / "none.json"), "--quiet"]) == 2


def _weights_of(d):
    return {k: v.clone() for k, v in d.state_dict().items()}


def test_a_reader_never_sees_half_a_dictionary_on_s3(s3, monkeypatch):
    """At every object operation of a save over an older dictionary, a reader gets the old one, the new one or a
    refusal; a save that lands between a reader's reads of cfg.json makes it read again, never mix the two."""
    from unitscope.dictionaries import load_dictionary
    from unitscope.dictionaries.sae import TopKSAE
    from unitscope.errors import UnitscopeError

    fs, _ = s3
    torch.manual_seed(0)
    old, new = TopKSAE(16, 32, k=2), TopKSAE(16, 32, k=3)  # other weights and another cfg.json
    old.metadata["hook_name"] = new.metadata["hook_name"] = "blocks.0.resid_post"
    url = "s3://bucket/swap"
    old.save(url, extra={"train.json": {"old": True}})
    seen = []

    def read():
        try:
            d = load_dictionary(url)
        except UnitscopeError as e:
            return "refused: " + str(e)
        w = _weights_of(d)
        for tag, ref in (("old", old), ("new", new)):
            if d.k == ref.k and _same_weights(w, _weights_of(ref)):
                return tag
        return "mixed"

    def watched(method):
        real = getattr(fs, method)

        def op(*a, **kw):
            seen.append(read())
            return real(*a, **kw)
        return op

    with monkeypatch.context() as m:
        for method in ("put_file", "rm_file"):
            m.setattr(fs, method, watched(method))
        new.save(url)
    seen.append(read())
    assert "mixed" not in seen and seen[0] == "old" and seen[-1] == "new", seen
    assert any(s.startswith("refused: 's3://bucket/swap' is not a dictionary directory") for s in seen), seen
    assert not fs.exists("bucket/swap/train.json")  # the old dictionary's files are gone with it
    # a save that completes while a reader fetches: the reader's second look at cfg.json sees it and reads again
    import unitscope.fs as ufs

    real_fetch, calls = ufs._fetch_all, []

    def fetch_during_save(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            old.save(url)
        return real_fetch(*a, **kw)

    monkeypatch.setattr(ufs, "_fetch_all", fetch_during_save)
    assert read() == "old" and len(calls) == 2  # (it started with the new cfg.json: the retry gives the old)


def test_training_to_s3_killed_mid_run_resumes_from_its_local_checkpoint_to_the_uninterrupted_weights(
        tmp_path, small_store, s3):
    fs, env = s3
    env = {**env, "UNITSCOPE_CACHE": str(tmp_path / "cache")}  # where the subprocess keeps its checkpoints
    args = ["train", "--store", small_store, "--units", "64", "--k", "4", "--batch-size", "64", "--train-tokens",
            "25600", "--checkpoint-every", "20", "--quiet"]
    assert run_cli(*args, "--out", tmp_path / "ref").returncode == 0
    url = "s3://bucket/killed-sae"
    proc = subprocess.Popen([sys.executable, "-m", "unitscope", *map(str, args), "--out", url],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env={**os.environ, **env})
    ckpts = tmp_path / "cache" / "remote"
    deadline = time.time() + 300
    while time.time() < deadline and proc.poll() is None and not list(ckpts.glob("*.checkpoint/000000040.json")):
        time.sleep(0.01)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert proc.returncode == -signal.SIGKILL
    assert not fs.exists("bucket/killed-sae/cfg.json")  # killed mid-training: no dictionary on s3 yet
    steps = [int(p.stem) for p in ckpts.glob("*.checkpoint/*.json") if p.stem.isdigit()]
    assert steps and max(steps) < 400
    p = run_cli(*args, "--out", url, env=env)
    assert p.returncode == 0, p.stderr
    s3_weights = safetensors.torch.load(fs.cat_file("bucket/killed-sae/sae_weights.safetensors"))
    assert _same_weights(s3_weights, load_file(str(tmp_path / "ref" / "sae_weights.safetensors")))
    assert json.loads(fs.cat_file("bucket/killed-sae/train.json"))["steps"] == 400
    assert not list(ckpts.glob("*.checkpoint"))  # the checkpoints go once the dictionary is uploaded
