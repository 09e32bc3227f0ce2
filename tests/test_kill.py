"""kill -9 at several points of `unitscope run`, `eval` and `explain`; the rerun ends with the uninterrupted result.

Each kill lands while a given stage is running (read from run.json, as a user's monitor would), after a delay
drawn from a seeded generator, so the points differ between stages and between kills but repeat between runs.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pyarrow.parquet as pq
import pytest
import torch
from conftest import run_cli
from safetensors.torch import load_file

RUN = ["--site", "blocks.1.resid_post", "--tokens", "6000", "--ctx-len", "16", "--record-batch-size", "1",
       "--shard-tokens", "512", "--units", "64", "--k", "4", "--batch-size", "128", "--train-tokens", "64000",
       "--checkpoint-every", "25", "--eval-tokens", "2048", "--eval-batch-size", "1", "--top", "5", "--quiet"]
DID = "topk-64-k4"


def _popen(args):
    return subprocess.Popen([sys.executable, "-m", "unitscope", *map(str, args)], stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)


def _stage_running(root, stage):
    try:
        state = json.loads((root / "run.json").read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return False
    return state["stages"].get(stage, {}).get("status") == "running"


def _kill_when(proc, ready, delay, timeout=300):
    deadline = time.time() + timeout
    while time.time() < deadline and proc.poll() is None and not ready():
        time.sleep(0.005)
    time.sleep(delay)
    killed = proc.poll() is None
    if killed:
        os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    return killed


def _results(root):
    core = json.loads((root / "evals" / DID / "core.json").read_text())
    metrics = core["eval_result_metrics"]
    weights = load_file(str(root / "dictionaries" / DID / "sae_weights.safetensors"))
    tables = {n: pq.read_table(root / "explain" / DID / f"{n}.parquet").to_pylist() for n in ("units", "examples")}
    return metrics, weights, tables


def test_run_killed_in_every_stage_resumes_to_the_uninterrupted_result(tmp_path, tiny_model_dir):
    args = ["run", "--model", tiny_model_dir, *RUN]
    ref = run_cli(*args, "--runs-dir", tmp_path / "ref")
    assert ref.returncode == 0, ref.stderr
    rng = random.Random(6)
    root = tmp_path / "killed" / "default"
    landed = []
    for stage in ("record", "record", "train", "train", "eval", "eval", "explain", "explain", "report"):
        proc = _popen([*args, "--runs-dir", tmp_path / "killed"])
        if _kill_when(proc, lambda s=stage: _stage_running(root, s), rng.uniform(0, 0.4)):
            landed.append(stage)
    assert {"record", "train"} <= set(landed) and landed.count("eval") == 2, landed  # really interrupted
    final = run_cli(*args, "--runs-dir", tmp_path / "killed")
    assert final.returncode == 0, final.stderr
    state = json.loads((root / "run.json").read_text())
    assert all(state["stages"][s]["status"] == "done" for s in ("record", "train", "eval", "explain", "report"))
    (m1, w1, t1), (m2, w2, t2) = _results(tmp_path / "ref" / "default"), _results(root)
    assert w1.keys() == w2.keys() and all(torch.equal(w1[k], w2[k]) for k in w1)
    assert m1 == m2
    assert t1 == t2
    assert (root / "report" / DID / "index.html").is_file()


@pytest.fixture(scope="module")
def trained(tmp_path_factory, tiny_model_dir):
    """A store and a dictionary trained on its first windows (eval and explain read both)."""
    root = tmp_path_factory.mktemp("trained")
    base = ["--model", tiny_model_dir, "--site", "blocks.1.resid_post", "--ctx-len", "16", "--quiet"]
    store, d = root / "store", root / "d"
    assert run_cli("record", *base, "--tokens", "20000", "--out", store).returncode == 0
    p = run_cli("train", "--store", store, "--out", d, "--units", "512", "--k", "8", "--batch-size", "256",
                "--train-tokens", "2560", "--quiet")
    assert p.returncode == 0, p.stderr
    return store, d


def _timed(*args):
    t0 = time.perf_counter()
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    return time.perf_counter() - t0


def test_eval_killed_at_several_points_keeps_the_old_result_then_finishes_to_the_uninterrupted_one(tmp_path,
                                                                                                   trained):
    store, d = trained
    evaluate = ["eval", "--dictionary", d, "--store", store, "--eval-tokens", "512", "--eval-batch-size", "1",
                "--quiet"]
    took = _timed(*evaluate, "--out", tmp_path / "ref.json")  # kills land between 30% and 95% of it

    def result(path):  # the whole record but what names this evaluation: its id, clock and geometry's timing
        r = json.loads(path.read_text())
        del r["eval_id"], r["datetime_epoch_millis"], r["geometry"]["seconds"]
        return r

    ref = result(tmp_path / "ref.json")
    out = tmp_path / "killed.json"
    older = ["eval", "--dictionary", d, "--store", store, "--eval-tokens", "128", "--quiet", "--out", out]
    assert run_cli(*older).returncode == 0  # a result from before, which no kill may lose
    old = out.read_bytes()
    assert result(out) != ref
    rng = random.Random(8)
    landed = 0
    for _ in range(4):
        killed = _kill_when(_popen([*evaluate, "--out", out]), lambda: True, rng.uniform(0.3, 0.95) * took)
        if killed and out.read_bytes() == old:
            landed += 1  # the kill lost nothing and wrote nothing half
        else:  # it finished, or was killed while exiting after its write (CI saw one): the new result, whole
            assert result(out) == ref
            old = out.read_bytes()
    assert landed >= 2
    assert run_cli(*evaluate, "--out", out).returncode == 0
    assert result(out) == ref


def test_explain_killed_at_several_points_leaves_old_or_new_tables_then_finishes(tmp_path, trained):
    store, d = trained
    explain = ["explain", "--dictionary", d, "--store", store, "--top", "10", "--quiet"]
    took = _timed(*explain, "--out", tmp_path / "ref")  # kills land between 30% and 95% of an uninterrupted explain
    ref = {n: pq.read_table(tmp_path / "ref" / f"{n}.parquet").to_pylist() for n in ("units", "examples")}
    out = tmp_path / "killed"
    rng = random.Random(7)
    landed = 0
    for i in range(5):
        proc = _popen([*explain, "--out", out])
        if i < 2:  # while this process writes the tables into its temporary folder
            def writing(pid=proc.pid):
                return any(tmp_path.glob(f".killed.tmp-{pid}-*"))
            landed += _kill_when(proc, writing, 0.0) and writing()
        else:  # anywhere in the run
            landed += _kill_when(proc, lambda: True, rng.uniform(0.3, 0.95) * took)
        present = [n for n in ("units", "examples") if (out / f"{n}.parquet").exists()]
        assert present in ([], ["units", "examples"])  # never one table without the other
        for n in present:
            assert pq.read_table(out / f"{n}.parquet").to_pylist() == ref[n]  # never a partial table
    assert landed >= 3
    assert run_cli(*explain, "--out", out).returncode == 0
    assert {n: pq.read_table(out / f"{n}.parquet").to_pylist() for n in ("units", "examples")} == ref
