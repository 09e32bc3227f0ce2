"""The real default model: it loads offline, and `unitscope run` works end to end on a small budget."""

import json

import torch
from conftest import run_cli


def test_default_model_loads_and_predicts(default_subject):
    cfg = default_subject.model.config
    assert (cfg.num_hidden_layers, cfg.hidden_size, cfg.intermediate_size) == (30, 576, 1536)
    ids = default_subject.tokenizer("The capital of France is", return_tensors="pt").input_ids
    top = default_subject.logits(ids)[0, -1].argmax()
    assert default_subject.tokenizer.decode([int(top)]).strip() == "Paris"
    shapes = default_subject.site_shapes(["embed", "blocks.6.resid_post", "blocks.6.mlp_hidden", "final_norm"])
    assert shapes["blocks.6.mlp_hidden"] == (1, 4, 1536) and shapes["final_norm"] == (1, 4, 576)


def test_identity_intervention_on_the_default_model_is_bit_exact(default_subject):
    ids = torch.randint(0, 49152, (2, 12))
    clean = default_subject.logits(ids)
    with default_subject.intervene([default_subject.intervention("blocks.6.resid_post", lambda x: x)]):
        assert torch.equal(default_subject.logits(ids), clean)


def test_unitscope_run_end_to_end(tmp_path):
    args = ["run", "--runs-dir", tmp_path, "--name", "small", "--site", "blocks.3.resid_post", "--tokens", "8192",
            "--ctx-len", "64", "--units", "512", "--k", "16", "--batch-size", "1024", "--train-tokens", "40960",
            "--eval-tokens", "512", "--quiet"]
    p = run_cli(*args)
    assert p.returncode == 0, p.stderr
    root = tmp_path / "small"
    did = "topk-512-k16"
    assert f"report: {(root / 'report' / did / 'index.html').resolve()}" in p.stdout
    state = json.loads((root / "run.json").read_text())
    assert all(state["stages"][s]["status"] == "done" for s in ("record", "train", "eval", "explain", "report"))
    core = json.loads((root / "evals" / did / "core.json").read_text())
    fvu = core["eval_result_metrics"]["reconstruction_quality"]["fvu"]
    assert 0 < fvu < 1
    assert (root / "explain" / did / "units.parquet").is_file()
    assert len(list((root / "report" / "data" / did / "u").glob("*.js"))) == 512 // 64  # 64 units per data file
    # a second run skips every stage; --overwrite eval redoes eval and what follows it
    again = run_cli(*args)
    assert again.returncode == 0 and again.stdout.count("already done") == 6  # compare is a stage too
    redo = run_cli(*args, "--overwrite", "eval")
    assert redo.returncode == 0 and redo.stdout.count("already done") == 2
    rep = run_cli("report", root)
    assert rep.returncode == 0 and "index.html" in rep.stdout, rep.stderr
    changed = run_cli(*[a if a != "512" else "256" for a in args])
    assert changed.returncode == 2 and "other options" in changed.stderr
