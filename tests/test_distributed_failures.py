"""A rank that fails or hangs never leaves the others waiting forever.

The ranks are started as separate processes with RANK/WORLD_SIZE/MASTER_* set, as a hand-started job or a cluster
launcher (srun) starts them: no torchrun agent stops the survivors there, so they must stop themselves. Rank 0 is
the real `unitscope train`; rank 1 is `unitscope train` on a store that does not exist (it never joins), or a peer
that joins the group and then crashes or hangs. Rank 0 must exit non-zero within a bounded time (the wait is
UNITSCOPE_DIST_TIMEOUT, 5 s here; the default is 600 s) with one sentence naming what happened, no traceback.
"""

import os
import socket
import subprocess
import sys
import time

import pytest

from unitscope import distributed
from unitscope.errors import UnitscopeError

WAIT = 5  # UNITSCOPE_DIST_TIMEOUT in these tests
DEADLINE = 120  # seconds for a whole job; two imports of torch on a loaded 2-core machine take part of it

PEER = """
import sys, time, torch.distributed as dist
dist.init_process_group("gloo")
dist.barrier()  # rank 0's first collective in train (after it clears an old checkpoint)
if sys.argv[1] == "crash":
    sys.exit(3)
time.sleep(600)  # joined, then never answers again
"""


def _port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _env(rank: int, port: int) -> dict[str, str]:
    return {**os.environ, "OMP_NUM_THREADS": "1", "RANK": str(rank), "LOCAL_RANK": str(rank), "WORLD_SIZE": "2",
            "LOCAL_WORLD_SIZE": "2", "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": str(port),
            "UNITSCOPE_DIST_TIMEOUT": str(WAIT)}


@pytest.fixture(scope="module")
def store(tmp_path_factory):
    from unitscope.synthetic import SyntheticSpec, write_synthetic_store

    out = tmp_path_factory.mktemp("fail") / "s"
    write_synthetic_store(SyntheticSpec(n_features=32, d=16, rows=4096, correlated_pairs=2), out, shard_rows=1024)
    return out


def _train(store, out, rank, port):
    return subprocess.Popen([sys.executable, "-m", "unitscope", "train", "--store", str(store), "--out", str(out),
                             "--units", "32", "--k", "4", "--batch-size", "128", "--train-tokens", "2560",
                             "--compute-dtype", "float32", "--quiet"],
                            env=_env(rank, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)


def _wait(p, started):
    """(returncode, stderr) of `p`; killed at DEADLINE, its stderr then starting with HUNG."""
    try:
        _, err = p.communicate(timeout=max(1, started + DEADLINE - time.time()))
    except subprocess.TimeoutExpired:
        p.kill()
        err = "HUNG: " + p.communicate()[1]
    return p.returncode, err


@pytest.mark.parametrize("peer", ["never joins", "crashes", "hangs"])
def test_the_other_rank_exits_with_one_sentence_when_a_rank_fails(tmp_path, store, peer):
    port, started = _port(), time.time()
    rank0 = _train(store, tmp_path / "sae", 0, port)
    if peer == "never joins":  # bad input on rank 1 alone: it stops before the group forms
        rank1 = _train(tmp_path / "missing-store", tmp_path / "sae", 1, port)
    else:
        rank1 = subprocess.Popen([sys.executable, "-c", PEER, "crash" if peer == "crashes" else "hang"],
                                 env=_env(1, port), stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        rc0, err0 = _wait(rank0, started)
        elapsed = time.time() - started
    finally:
        if peer == "hangs":
            rank1.kill()
        rc1, err1 = _wait(rank1, started)
    assert not err0.startswith("HUNG"), err0
    print(f"{peer}: rank 0 exited {rc0} after {elapsed:.1f} s")
    assert rc0 == 2 and elapsed < DEADLINE, (rc0, elapsed)
    lines = [line for line in err0.splitlines() if line.strip()]
    print(err0)
    assert "Traceback" not in err0 and len(lines) == 1, err0
    assert lines[0].startswith("unitscope: error: rank 0 of 2 lost the other ranks in "), lines[0]
    assert f"did not answer within {WAIT} s" in lines[0] and "UNITSCOPE_DIST_TIMEOUT" in lines[0]
    if peer == "never joins":
        assert rc1 == 2 and "missing-store" in err1, err1
        assert "init_process_group" in lines[0]  # it waited at the rendezvous for WAIT seconds, no longer
    if peer == "crashes":
        assert rc1 == 3, err1
    assert not (tmp_path / "sae").exists()  # nothing half-written where the dictionary goes


def test_the_wait_is_a_positive_number_of_seconds(monkeypatch):
    monkeypatch.delenv("UNITSCOPE_DIST_TIMEOUT", raising=False)
    assert distributed.timeout() == 600
    monkeypatch.setenv("UNITSCOPE_DIST_TIMEOUT", "2.5")
    assert distributed.timeout() == 2.5
    for bad in ("0", "-3", "ten", "inf", "nan"):
        monkeypatch.setenv("UNITSCOPE_DIST_TIMEOUT", bad)
        with pytest.raises(UnitscopeError, match=f"UNITSCOPE_DIST_TIMEOUT='{bad}' is not a number of seconds"):
            distributed.timeout()
