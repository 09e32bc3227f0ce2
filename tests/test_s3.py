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
from hypothesis import given, settings
from hypothesis import strategies as st
from safetensors.torch import load_file
from test_kill import _stage_running

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


def _saved(fs, url_path, name):
    """The bytes of file `name` of the dictionary saved at bucket path `url_path` (the version its pointer names)."""
    vid = json.loads(fs.cat_file(f"{url_path}/current.json"))["version"]
    return fs.cat_file(f"{url_path}/.versions/{vid}/{name}")


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
            assert _saved(fs, f"bucket/dicts/{did}", name) == (tmp_path / "local" / did / name).read_bytes()
        remote = json.loads(_saved(fs, f"bucket/dicts/{did}", "train.json")) if did != "pca" else None
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


def _pair(url_seed=0):
    """Two TopK SAEs with other weights and another cfg.json (k), at one site."""
    from unitscope.dictionaries.sae import TopKSAE

    torch.manual_seed(url_seed)
    old, new = TopKSAE(16, 32, k=2), TopKSAE(16, 32, k=3)
    old.metadata["hook_name"] = new.metadata["hook_name"] = "blocks.0.resid_post"
    return old, new


def _which(url, old, new):
    """'old', 'new', 'mixed' (loaded but neither, bit for bit) or 'refused: ...' for the dictionary at `url`."""
    from unitscope.dictionaries import load_dictionary
    from unitscope.errors import UnitscopeError

    try:
        d = load_dictionary(url)
    except UnitscopeError as e:
        return "refused: " + str(e)
    w = _weights_of(d)
    for tag, ref in (("old", old), ("new", new)):
        if d.k == ref.k and _same_weights(w, _weights_of(ref)):
            return tag
    return "mixed"


def test_a_reader_sees_the_old_or_the_new_dictionary_at_every_step_of_a_save_on_s3(s3, tmp_path, monkeypatch):
    """Over plain files another tool wrote (the SAELens layout, no pointer) and then over a versioned save: at every
    object operation of the save, a reader loads the old dictionary or the new one, bit for bit, never a refusal
    and never a mix; the replaced files go once the pointer has moved."""
    import unitscope.fs as ufs

    fs, _ = s3
    old, new = _pair()
    url = "s3://bucket/swap"
    old.save(tmp_path / "plain", extra={"train.json": {"old": True}})  # uploaded as plain files, as by another tool
    for f in (tmp_path / "plain").iterdir():
        fs.put_file(str(f), f"bucket/swap/{f.name}")
    assert _which(url, old, new) == "old"  # plain files still load
    for before, after in ((old, new), (new, old)):
        seen, ops = [], []

        def watched(method, real, ops=ops, seen=seen, before=before, after=after):
            def op(*a, **kw):
                ops.append(method)
                seen.append(_which(url, before, after))
                return real(*a, **kw)
            return op

        with monkeypatch.context() as m:
            for method in ("put_file", "pipe_file", "rm_file", "rm"):
                m.setattr(fs, method, watched(method, getattr(fs, method)))
            after.save(url)
        seen.append(_which(url, before, after))
        assert set(seen) == {"old", "new"} and seen[0] == "old" and seen[-1] == "new", seen
        assert seen.index("new") == ops.index("pipe_file") + 1 and len(ops) >= 4, (seen, ops)  # the pointer's PUT
        versions = fs.ls("bucket/swap/.versions")
        assert len(versions) == 1  # the replaced version is gone
    assert not fs.exists("bucket/swap/cfg.json") and not fs.exists("bucket/swap/train.json")  # the plain files too
    # a save that moves the pointer (and drops the version) while a reader downloads it: the reader reads again
    real_get, calls = ufs._get_version, []

    def get_during_save(*a, **kw):
        calls.append(1)
        if len(calls) == 1:
            new.save(url)
        return real_get(*a, **kw)

    monkeypatch.setattr(ufs, "_get_version", get_during_save)
    assert _which(url, old, new) == "new" and len(calls) == 2  # it began with old's pointer: the retry gives new


SAVER = """
import sys, torch
from unitscope.dictionaries.sae import TopKSAE
torch.manual_seed(0)
old, new = TopKSAE(16, 32, k=2), TopKSAE(16, 32, k=3)
new.metadata["hook_name"] = "blocks.0.resid_post"
print("saving", flush=True)
new.save(sys.argv[1], extra={"train.json": {"new": True}})
print("saved", flush=True)
"""


def test_a_save_to_s3_killed_at_any_point_leaves_the_old_or_the_new_dictionary(s3, tmp_path):
    """kill -9 of a saving process (it pauses 0.25 s after each object) once 0, 1, 2 and 3 of its files are
    uploaded, once its pointer has moved, and not at all, while another thread reads the URL without pause: every
    read, during the save and after the kill, is the old dictionary or the new one, bit for bit."""
    import threading

    fs, env = s3
    old, new = _pair()
    url = "s3://bucket/killed-save"
    env = {**os.environ, **env, "UNITSCOPE_TEST_SAVE_PAUSE": "0.25"}

    def state(old_vid):
        """(files of versions other than `old_vid` uploaded, whether the pointer names another version)"""
        fs.invalidate_cache()
        others = [v for v in fs.ls("bucket/killed-save/.versions", detail=False) if not v.endswith(old_vid)]
        n = sum(len(fs.ls(v, detail=False)) for v in others)
        return n, json.loads(fs.cat_file("bucket/killed-save/current.json"))["version"] != old_vid

    outcomes = {}
    for point in (0, 1, 2, 3, "pointer", None):
        old.save(url)
        fs.rm("bucket/killed-save/.versions", recursive=True)  # only old's version from here on
        old.save(url)
        old_vid = json.loads(fs.cat_file("bucket/killed-save/current.json"))["version"]
        reads, stop = [], threading.Event()

        def reader(reads=reads, stop=stop):
            while not stop.is_set():
                reads.append(_which(url, old, new))

        proc = subprocess.Popen([sys.executable, "-c", SAVER, url], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                env=env, text=True)
        assert proc.stdout.readline().strip() == "saving", proc.stderr.read()
        t = threading.Thread(target=reader)
        t.start()
        deadline = time.time() + 60
        while point is not None and proc.poll() is None and time.time() < deadline:
            n, moved = state(old_vid)
            if (point == "pointer" and moved) or (point != "pointer" and n >= point):
                os.kill(proc.pid, signal.SIGKILL)
                break
            time.sleep(0.02)
        proc.wait()
        stop.set()
        t.join()
        outcomes[point] = (_which(url, old, new), proc.returncode)
        assert reads and set(reads) <= {"old", "new"}, (point, set(reads))
    assert all(rc == -signal.SIGKILL for _, rc in list(outcomes.values())[:-1]), outcomes
    assert [o for o, _ in outcomes.values()] == ["old"] * 4 + ["new"] * 2, outcomes
    assert len(fs.ls("bucket/killed-save/.versions")) == 1  # the save that finished removed the one it replaced


def test_a_damaged_pointer_or_version_on_s3_is_one_sentence_and_a_new_save_repairs_it(s3, tmp_path):
    from unitscope.fs import _parse_pointer

    fs, _ = s3
    old, new = _pair()
    url = "s3://bucket/damaged"
    old.save(url)
    ptr = fs.cat_file("bucket/damaged/current.json")
    vid = json.loads(ptr)["version"]
    store_args = ["--store", "unused"]  # eval refuses the dictionary before it opens a store
    cases = {
        "truncated pointer": (ptr[: len(ptr) // 2], "current.json' is corrupt"),
        "empty pointer": (b"", "current.json' is corrupt"),
        "version outside .versions": (ptr.replace(vid.encode(), b"../../x"), "current.json' is corrupt"),
        "file name with a slash": (ptr.replace(b'"cfg.json"', b'"../cfg.json"'), "current.json' is corrupt"),
        "missing version": (ptr.replace(vid.encode(), b"0" * 20 + b"-" + b"0" * 8),
                            "names version 00000000000000000000-00000000, whose file 'cfg.json' is missing"),
    }
    for what, (data, message) in cases.items():
        fs.pipe_file("bucket/damaged/current.json", data)
        assert _which(url, old, new).startswith("refused: ") and message in _which(url, old, new), what
        assert main(["eval", "--dictionary", url, *store_args, "--out", str(tmp_path / "e.json"), "--quiet"]) == 2
    fs.pipe_file("bucket/damaged/current.json", ptr)
    assert _which(url, old, new) == "old"  # the version the pointer names was never touched
    fs.pipe_file(f"bucket/damaged/.versions/{vid}/sae_weights.safetensors", b"\0" * 64)  # a file changed there
    assert "whose file 'sae_weights.safetensors' does not match its SHA-256" in _which(url, old, new)
    assert not (tmp_path / "e.json").exists()
    new.save(url)  # a new save over the damage
    assert _which(url, old, new) == "new"
    for raw in (b"[]", b"{}", b'{"version": 3}', b"\xff", b'{"version": "' + vid.encode() + b'", "files": {}}'):
        with pytest.raises(Exception, match="is corrupt"):
            _parse_pointer(raw, "p")


@settings(max_examples=150, deadline=None)
@given(st.binary(max_size=300) | st.from_regex(r'\{"version": ?"[0-9a-f./-]{0,40}", ?"files": ?\{.{0,80}\}\}'
                                               ).map(str.encode))
def test_any_pointer_bytes_are_a_pointer_or_one_sentence(raw):
    from unitscope.errors import UnitscopeError
    from unitscope.fs import _VERSION_ID, _parse_pointer

    try:
        vid, files = _parse_pointer(raw, "p")
    except UnitscopeError as e:
        assert str(e).startswith("'p' is corrupt")
        return
    assert _VERSION_ID.fullmatch(vid) and all("/" not in n and n not in (".", "..") for n in files)


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
    assert not fs.exists("bucket/killed-sae/current.json")  # killed mid-training: no dictionary on s3 yet
    steps = [int(p.stem) for p in ckpts.glob("*.checkpoint/*.json") if p.stem.isdigit()]
    assert steps and max(steps) < 400
    p = run_cli(*args, "--out", url, env=env)
    assert p.returncode == 0, p.stderr
    s3_weights = safetensors.torch.load(_saved(fs, "bucket/killed-sae", "sae_weights.safetensors"))
    assert _same_weights(s3_weights, load_file(str(tmp_path / "ref" / "sae_weights.safetensors")))
    assert json.loads(_saved(fs, "bucket/killed-sae", "train.json"))["steps"] == 400
    assert not list(ckpts.glob("*.checkpoint"))  # the checkpoints go once the dictionary is uploaded


# ---- a whole run kept on S3 ------------------------------------------------------------------------------------

RUN = ["--site", "blocks.1.resid_post", "--tokens", "3000", "--ctx-len", "16", "--record-batch-size", "1",
       "--shard-tokens", "512", "--units", "64", "--k", "4", "--batch-size", "128", "--train-tokens", "25600",
       "--checkpoint-every", "20", "--eval-tokens", "512", "--eval-batch-size", "1", "--top", "5", "--quiet"]
DID = "topk-64-k4"


def _remote_results(fs, url_path):
    from unitscope.dictionaries import load_dictionary

    metrics = json.loads(fs.cat_file(f"{url_path}/evals/{DID}/core.json"))["eval_result_metrics"]
    weights = _weights_of(load_dictionary(f"s3://{url_path}/dictionaries/{DID}"))
    tables = {n: pq.read_table(fs.open(f"{url_path}/explain/{DID}/{n}.parquet", "rb")).to_pylist()
              for n in ("units", "examples")}
    return metrics, weights, tables


def _local_results(root):
    from unitscope.dictionaries import load_dictionary

    metrics = json.loads((root / "evals" / DID / "core.json").read_text())["eval_result_metrics"]
    weights = _weights_of(load_dictionary(root / "dictionaries" / DID))
    tables = {n: pq.read_table(root / "explain" / DID / f"{n}.parquet").to_pylist() for n in ("units", "examples")}
    return metrics, weights, tables


def test_a_run_kept_on_s3_killed_twice_and_resumed_on_another_machine_is_the_local_run(tmp_path, tiny_model_dir, s3):
    """`run --out s3://...` killed while it trains, resumed on a machine without its scratch folder (it downloads
    the run) and killed while it explains, then finished: the store, dictionary, evaluation and tables on S3 are
    those of an uninterrupted local run, and run.json there calls every stage done."""
    from unitscope.run_sync import RemoteRun

    fs, env = s3
    assert main(["run", "--model", str(tiny_model_dir), *RUN, "--runs-dir", str(tmp_path / "ref")]) == 0
    ref = tmp_path / "ref" / "default"
    url = "s3://bucket/run"
    args = [sys.executable, "-m", "unitscope", "run", "--model", str(tiny_model_dir), *RUN, "--out", url]

    def scratch_of(cache):
        with pytest.MonkeyPatch.context() as m:
            m.setenv("UNITSCOPE_CACHE", str(cache))
            m.setattr("unitscope.fs.cache_root", lambda: cache / "remote")
            return RemoteRun(url).scratch

    landed, recorded = [], None
    for cache, stage in ((tmp_path / "machine-1", "train"), (tmp_path / "machine-2", "explain")):
        scratch = scratch_of(cache)
        proc = subprocess.Popen(args, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                                env={**os.environ, **env, "UNITSCOPE_CACHE": str(cache)})
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and not _stage_running(scratch, stage):
            time.sleep(0.01)
        time.sleep(0.05)
        if proc.poll() is None:
            os.kill(proc.pid, signal.SIGKILL)
            landed.append(stage)
        proc.wait()
        remote_state = json.loads(fs.cat_file("bucket/run/run.json"))["stages"]
        assert remote_state["record"]["status"] == "done"  # uploaded after the record stage
        assert remote_state.get(stage, {}).get("status") != "done"  # the kill landed before the stage ended
        recorded = recorded if landed[1:] else remote_state["record"]["finished"]
    assert landed == ["train", "explain"]
    p = run_cli(*args[3:], env={**env, "UNITSCOPE_CACHE": str(tmp_path / "machine-2")})
    assert p.returncode == 0, p.stderr
    assert "[record] already done" in p.stdout and "[eval] already done" in p.stdout
    state = json.loads(fs.cat_file("bucket/run/run.json"))
    assert all(state["stages"][s]["status"] == "done" for s in ("record", "train", "eval", "explain", "report"))
    assert state["stages"]["record"]["finished"] == recorded  # machine 2 took machine 1's record stage as done
    assert Store.open(f"{url}/store").manifest == Store.open(ref / "store").manifest
    (m1, w1, t1), (m2, w2, t2) = _local_results(ref), _remote_results(fs, "bucket/run")
    assert _same_weights(w1, w2) and m1 == m2 and t1 == t2
    assert fs.exists(f"bucket/run/report/{DID}/index.html") and fs.exists("bucket/run/compare.parquet")
    assert not fs.exists("bucket/run/store/run.json") and not [p for p in fs.find("bucket/run") if "checkpoint" in p]


def test_a_run_refuses_a_url_where_it_would_write_locally(tmp_path, capsys):
    assert main(["run", "--runs-dir", "s3://bucket/runs", "--quiet"]) == 2
    assert "--runs-dir takes a local folder, not 's3://bucket/runs'" in capsys.readouterr().err
    assert main(["run", "--out", str(tmp_path / "r"), "--quiet"]) == 2
    assert "--out takes an object store URL" in capsys.readouterr().err
    assert not (tmp_path / "r").exists() and not os.path.exists("s3:")
