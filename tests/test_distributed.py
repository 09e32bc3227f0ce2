"""`torchrun --nproc-per-node 2 -m unitscope record|train` on CPU (gloo), against one process on the same arguments.

Record: the same store byte for byte (manifest and every shard). Train: the same weights as one process stepping
on the whole global batch, within float tolerance (the ranks sum the same terms in another order); a distributed
run killed with kill -9 (the whole job) at several points resumes to exactly the uninterrupted distributed result.
"""

import json
import os
import random
import signal
import subprocess
import sys
import time

import pytest
import torch
from safetensors.torch import load_file

ENV = {"OMP_NUM_THREADS": "1", "TOKENIZERS_PARALLELISM": "false"}  # one thread in every process: same kernels
RECORD = ["--site", "blocks.1.resid_post", "--ctx-len", "16", "--record-batch-size", "4", "--tokens", "5500",
          "--shard-tokens", "512", "--quiet"]
TRAIN = ["--units", "64", "--k", "4", "--batch-size", "128", "--compute-dtype", "float32", "--quiet"]


def torchrun(*args, timeout=600, **kw):
    return subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                           "-m", "unitscope", *map(str, args)], capture_output=True, text=True, timeout=timeout,
                          env={**os.environ, **ENV}, **kw)


def torchrun_popen(*args):
    """The job in its own process group, so that kill -9 reaches torchrun and both ranks at once."""
    return subprocess.Popen([sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
                             "-m", "unitscope", *map(str, args)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            env={**os.environ, **ENV}, start_new_session=True)


@pytest.fixture(scope="module")
def store(tmp_path_factory, tiny_model_dir):
    """One process's store: 344 windows in shards of 32, so 11 shards: the last round has one shard (rank 1 idles
    under torchrun) and it is truncated (5500 tokens are not whole windows)."""
    out = tmp_path_factory.mktemp("dist") / "store"
    assert in_process("record", "--model", tiny_model_dir, *RECORD, "--out", out) == 0
    return out


def in_process(*args):
    """The command in this process (no second import of torch and transformers), on one thread like the ranks."""
    from unitscope.cli import main

    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        return main([str(a) for a in args])
    finally:
        torch.set_num_threads(threads)


def test_record_under_torchrun_writes_the_store_one_process_writes(tmp_path, tiny_model_dir, store):
    two = torchrun("record", "--model", tiny_model_dir, *RECORD, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    m1, m2 = (json.loads((d / "store.json").read_text()) for d in (store, tmp_path / "two"))
    assert m1 == m2 and len(m1["shards"]) == 11 and m1["tokens"] == 5500 and m1["complete"]
    for entry in m1["shards"]:
        assert (store / entry["file"]).read_bytes() == (tmp_path / "two" / entry["file"]).read_bytes()
    assert sorted(p.name for p in (tmp_path / "two" / "shards").iterdir()) == \
        sorted(p.name for p in (store / "shards").iterdir())


def test_commands_without_a_distributed_path_run_once_on_rank_0(monkeypatch):
    from unitscope import distributed

    for rank, runs in (("1", False), ("0", True)):
        monkeypatch.setenv("WORLD_SIZE", "2")
        monkeypatch.setenv("RANK", rank)
        assert distributed.for_command("train") and distributed.for_command("record")
        assert distributed.for_command("eval") is runs
        # rank 0 runs it as one process: no group to join, so nothing waits for the ranks that left
        assert distributed.launched() is (not runs)


def test_a_fit_under_torchrun_runs_once_on_rank_0(tmp_path, store, monkeypatch):
    """Fitted kinds have no data-parallel path: rank 1 leaves at once, rank 0 fits as one process (no group)."""
    monkeypatch.setenv("WORLD_SIZE", "2")
    monkeypatch.setenv("RANK", "1")
    assert in_process("train", "--store", store, "--architecture", "pca", "--units", "4", "--out", tmp_path / "r1") == 0
    assert not (tmp_path / "r1").exists()
    monkeypatch.setenv("RANK", "0")
    assert in_process("train", "--store", store, "--architecture", "pca", "--units", "4", "--out", tmp_path / "r0") == 0
    assert (tmp_path / "r0" / "sae_weights.safetensors").is_file() and os.environ["WORLD_SIZE"] == "1"


def _weights(d):
    return load_file(str(d / "sae_weights.safetensors"))


def test_data_parallel_training_matches_one_process_and_resumes_after_kill_9(tmp_path, store):
    # dead latents (AuxK, whose residual mean is a batch statistic) appear within the run: --dead-tokens 1280
    args = ["train", "--store", store, *TRAIN, "--train-tokens", "25600", "--dead-tokens", "1280",
            "--checkpoint-every", "10"]
    assert in_process(*args, "--out", tmp_path / "one") == 0
    two = torchrun(*args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    diff = max(float((w1[k] - w2[k]).abs().max() / w1[k].abs().max()) for k in w1)
    print(f"max abs weight difference / max abs weight after 200 steps: {diff:.2e}")
    assert diff < 1e-4
    log1, log2 = (json.loads((tmp_path / d / "train.json").read_text())["log"] for d in ("one", "two"))
    assert [r["step"] for r in log1] == [r["step"] for r in log2]
    assert any(r["dead_frac"] > 0 for r in log1)  # AuxK really ran
    for a, b in zip(log1, log2):
        assert a["fvu"] == pytest.approx(b["fvu"], abs=2e-5) and a["l0"] == pytest.approx(b["l0"], abs=0.02)
        assert a["dead_frac"] == b["dead_frac"]

    out = tmp_path / "killed"
    ckpt = tmp_path / ".killed.checkpoint"
    rng = random.Random(11)
    landed = []
    def checkpointed():
        try:
            return json.loads((ckpt / "state.json").read_text())["step"]
        except (FileNotFoundError, json.JSONDecodeError):
            return 0

    for least in (10, 80):  # after the first checkpoint, then later (a kill may fall inside a checkpoint write)
        proc = torchrun_popen(*args, "--out", out)
        deadline = time.time() + 300
        while time.time() < deadline and proc.poll() is None and checkpointed() < least:
            time.sleep(0.005)
        time.sleep(rng.uniform(0, 0.3))
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
            landed.append(checkpointed())
        proc.wait()
    assert len(landed) == 2 and landed[1] > landed[0] and not (out / "sae_weights.safetensors").exists(), landed
    final = torchrun(*args, "--out", out)
    assert final.returncode == 0, final.stderr
    w3 = _weights(out)
    assert all(torch.equal(w2[k], w3[k]) for k in w2)  # exactly the uninterrupted distributed run
    assert not ckpt.exists()


def test_batchtopk_with_resampling_under_torchrun_matches_one_process(tmp_path):
    """The CLI path for the kinds that needed the global batch: BatchTopK's cut and resampling's choice of rows."""
    from unitscope.synthetic import SyntheticSpec, write_synthetic_store

    write_synthetic_store(SyntheticSpec(n_features=64, d=32, rows=20000, correlated_pairs=2), tmp_path / "syn",
                          shard_rows=4096)
    args = ["train", "--store", tmp_path / "syn", "--architecture", "batchtopk", "--units", "64", "--k", "4",
            "--batch-size", "256", "--train-tokens", "20000", "--dead-tokens", "512", "--resample-every", "10",
            "--compute-dtype", "float32", "--quiet"]
    assert in_process(*args, "--out", tmp_path / "one") == 0
    two = torchrun(*args, "--out", tmp_path / "two")
    assert two.returncode == 0, two.stderr
    w1, w2 = _weights(tmp_path / "one"), _weights(tmp_path / "two")
    diff = max(float((w1[k] - w2[k]).abs().max() / w1[k].abs().max()) for k in w1)
    print(f"batchtopk with resampling, torchrun: max abs weight difference / max abs weight after 78 steps: {diff:.2e}")
    assert diff < 1e-4  # resampled rows are normalised residuals: small ones amplify the ranks' 3e-7 a little
    s1, s2 = (json.loads((tmp_path / d / "train.json").read_text()) for d in ("one", "two"))
    assert s1["resampled"] == s2["resampled"] > 0
    assert two.stdout.count("dictionary ") == 1  # one summary line, from rank 0


class _Rows:
    """A training source of seeded sparse rows (no store, no model): batch b is the same on every call and rank."""

    def __init__(self, d=16, batch=64):
        self.d, self.batch = d, batch
        self.dirs = torch.nn.functional.normalize(torch.randn(48, d, generator=torch.Generator().manual_seed(0)), dim=1)

    def widths(self):
        return self.d, None

    def metadata(self):
        return {}

    def batches(self, start):
        b = start
        while True:
            g = torch.Generator().manual_seed(1000 + b)
            codes = torch.rand(self.batch, 48, generator=g) * (torch.rand(self.batch, 48, generator=g) < 0.08)
            yield (x := codes @ self.dirs + 0.01 * torch.randn(self.batch, self.d, generator=g)), x
            b += 1


# every trainable kind's step, and resampling (chosen on rank 0 from the gathered global batch); batchtopk picks the
# k x 64 largest activations of the global batch, not k x 32 of each rank's half
KINDS = ("topk", "batchtopk", "matryoshka_topk", "standard", "jumprelu", "topk-resample")


def _train_kinds(rank, world, init_file, root):
    import torch.distributed as dist

    from unitscope.dictionaries.train import TrainConfig, Trainer

    torch.set_num_threads(1)
    if world > 1:
        dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=world)
    for kind in KINDS:
        extra = {"prefixes": [8, 16]} if kind == "matryoshka_topk" else {}
        resample = kind.endswith("-resample")  # latents dead after 3 batches without firing are resampled
        cfg = TrainConfig(architecture=kind.removesuffix("-resample"), n_units=32, k=4, batch_size=64,
                          train_tokens=64 * 60, dead_tokens=192 if resample else 640, checkpoint_every=1000,
                          compute_dtype="float32", resample_every=10 if resample else 0, extra=extra)
        Trainer(_Rows(), "x", cfg, f"{root}/{kind}-{world}", progress=False).run()
    if world > 1:
        dist.destroy_process_group()


def test_every_data_parallel_kind_matches_one_process(tmp_path):
    """Two gloo ranks spawned here (torch only, no model) against this process, on each kind with an exact step."""
    import torch.multiprocessing as mp

    _train_kinds(0, 1, None, tmp_path)
    mp.spawn(_train_kinds, args=(2, tmp_path / "init", tmp_path), nprocs=2)
    for kind in KINDS:
        w1, w2 = _weights(tmp_path / f"{kind}-1"), _weights(tmp_path / f"{kind}-2")
        diff = max(float((w1[k] - w2[k]).abs().max() / w1[k].abs().max().clamp_min(1e-12)) for k in w1)
        print(f"{kind}: max abs weight difference / max abs weight after 60 steps: {diff:.2e}")
        assert diff < 1e-4, kind
        log1, log2 = (json.loads((tmp_path / f"{kind}-{w}" / "train.json").read_text())["log"] for w in (1, 2))
        assert [r["l0"] for r in log1] == pytest.approx([r["l0"] for r in log2], abs=0.02)
    summaries = [json.loads((tmp_path / f"topk-resample-{w}" / "train.json").read_text()) for w in (1, 2)]
    assert summaries[0]["resampled"] == summaries[1]["resampled"] > 0  # resampling really ran, the same on both
    # BatchTopK's running threshold (saved as the JumpReLU threshold) is the global batch's smallest kept value
    th1, th2 = (_weights(tmp_path / f"batchtopk-{w}")["threshold"] for w in (1, 2))
    assert torch.allclose(th1, th2, rtol=1e-5) and float(th1[0]) > 0
