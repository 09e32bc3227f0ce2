"""`unitscope run` with several kinds covers each of them in every stage, and `unitscope compare` puts the figures
of every evaluation side by side: the table must equal the eval JSONs read independently, the plot be a real image."""

import json
import shutil

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from test_cli import _fails

from unitscope.compare import compare_run, format_table, write_compare

SITE = "blocks.1.mlp_hidden"  # the tiny Llama's intermediate_size: 64 neurons
KINDS = ["topk", "topk", "pca", "neurons"]
IDS = ["topk-128-k4", "topk-128-k8", "pca-64", "neurons-64"]  # PCA has at most 64 components at a width-64 site
RUN_ARGS = ["--site", SITE, "--architecture", "topk", "pca", "neurons", "--units", "128", "--k", "4", "8",
            "--tokens", "2048",
            "--ctx-len", "32", "--batch-size", "128", "--train-tokens", "1280", "--eval-tokens", "256", "--top", "2",
            "--quiet"]


@pytest.fixture(scope="module")
def several(tmp_path_factory, tiny_model_dir):
    runs = tmp_path_factory.mktemp("compare")
    p = run_cli("run", "--model", tiny_model_dir, "--runs-dir", runs, "--name", "kinds", *RUN_ARGS)
    assert p.returncode == 0, p.stderr
    return runs / "kinds", p.stdout


def _eval_figures(core: dict) -> dict:
    m = core["eval_result_metrics"]
    return {"l0": m["sparsity"]["l0"], "fvu": m["reconstruction_quality"]["fvu"],
            "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
            "kl_div": m["model_behavior_preservation"]["kl_div_with_sae"],
            "frac_dead_units": m["misc"]["frac_dead_units"], "frac_dense_units": m["misc"]["frac_dense_units"]}


def test_every_stage_covers_every_kind_and_the_table_equals_the_evaluations(several, tiny_model_dir):
    root, stdout = several
    assert "already done" not in stdout  # the two TopK SAEs train together; nothing is reported as skipped
    state = json.loads((root / "run.json").read_text())
    assert [s for s, e in state["stages"].items() if e["status"] == "done"] == \
        ["record", "train", "eval", "explain", "compare", "report"]
    assert state["stages"]["train"]["dictionaries"] == IDS
    assert list(state["stages"]["eval"]["items"]) == IDS
    width = json.loads((tiny_model_dir / "config.json").read_text())["intermediate_size"]
    rows = pq.read_table(root / "compare.parquet").to_pylist()
    assert [r["dictionary"] for r in rows] == IDS
    for row, did, kind in zip(rows, IDS, KINDS):
        cfg = json.loads((root / "dictionaries" / did / "cfg.json").read_text())
        core = json.loads((root / "evals" / did / "core.json").read_text())
        assert (row["kind"], cfg["architecture"]) == (kind, kind)
        assert row["units"] == cfg["d_sae"] and row["site"] == SITE
        assert {k: row[k] for k in _eval_figures(core)} == _eval_figures(core)  # exactly, not approximately
        geometry = core.get("geometry") or {}
        assert row["uniqueness_fraction"] == (geometry.get("whitened") or {}).get("uniqueness_fraction")
        assert row["uniqueness_fraction_euclidean"] == (geometry.get("euclidean") or {}).get("uniqueness_fraction")
        assert (root / "explain" / did / "units.parquet").is_file()
        concepts = root / "explain" / did / "concepts.parquet"
        if concepts.is_file():  # label scores, when the explanation has them: the mean F1 over labelled units
            f1 = pq.read_table(concepts).column("f1").to_numpy(zero_copy_only=False).astype(float)
            assert row["label_f1"] == pytest.approx(float(np.nanmean(f1)) if np.isfinite(f1).any() else None)
        else:
            assert row["label_f1"] is None
        # one site per run (report/index.html, every dictionary's data); report/D/index.html links into it at #/D
        assert f'href="../index.html#/{did}"' in (root / "report" / did / "index.html").read_text()
        assert (root / "report" / "data" / did / "list.js").is_file()
        assert (root / "report" / "compare.png").read_bytes() == (root / "compare.png").read_bytes()
        printed = next(line.split() for line in stdout.splitlines() if line.startswith(did + " "))
        assert printed[:3] == [did, kind, str(cfg["d_sae"])] and printed[4] == f"{_eval_figures(core)['fvu']:.4f}"
        assert f"report: {(root / 'report' / did / 'index.html').resolve()}" in stdout
    units = {r["dictionary"]: r["units"] for r in rows}
    assert units["neurons-64"] == width and units["pca-64"] == width and units["topk-128-k4"] == 128
    assert rows[3]["fvu"] == 0.0  # neurons are the site itself: nothing is lost
    assert rows[0]["l0"] <= 4 and rows[1]["l0"] <= 8 and rows[2]["l0"] > 8  # TopK's codes are k-sparse; PCA's dense


def test_the_plot_is_a_real_image_of_fvu_against_l0(several):
    from matplotlib.image import imread

    root, _ = several
    data = (root / "compare.png").read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    pixels = imread(root / "compare.png")
    assert pixels.ndim == 3 and pixels.shape[0] > 200 and pixels.shape[1] > 300
    assert pixels[..., :3].std() > 0.05  # not blank: axes, points and labels were drawn
    # every point is drawn in its kind's colour (kinds in sorted order take matplotlib's C0, C1, C2)
    from matplotlib.colors import to_rgb

    drawn = {tuple(c) for c in np.unique((pixels[..., :3].reshape(-1, 3) * 255).round().astype(int), axis=0)}
    for i, _kind in enumerate(sorted(set(KINDS))):
        assert tuple(round(255 * v) for v in to_rgb(f"C{i}")) in drawn


def _main(capsys, *args):
    """The CLI in this process (no interpreter start-up): exit status, stdout, stderr."""
    from unitscope.cli import main

    code = main([str(a) for a in args])
    out = capsys.readouterr()
    return code, out.out, out.err


def _main_fails(capsys, *args_and_words):
    """Like test_cli._fails, in this process: exit status 2 and one sentence naming each word."""
    i = args_and_words.index("--")
    code, _, err = _main(capsys, *args_and_words[:i])
    assert code == 2, err
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("unitscope: error:"), err
    for w in args_and_words[i + 1:]:
        assert w in lines[0], (w, lines[0])


def test_rerun_skips_every_stage_and_compare_alone_rewrites_the_same_table(several, tiny_model_dir, capsys):
    root, _ = several
    before = pq.read_table(root / "compare.parquet")
    code, out, err = _main(capsys, "run", "--model", tiny_model_dir, "--runs-dir", root.parent, "--name", "kinds",
                           *RUN_ARGS)
    assert code == 0, err
    assert out.count("already done") == 6
    code, out, err = _main(capsys, "compare", root)
    assert code == 0, err
    assert pq.read_table(root / "compare.parquet").equals(before)
    assert format_table(before.to_pylist()) in out


def test_uniqueness_and_label_scores_are_shown_when_present(several, tmp_path):
    """A geometry section in the eval JSON and a concepts table in the explanation are read as they are."""
    root, _ = several
    copy = tmp_path / "run"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("store", "report"))
    for did, geometry in (("topk-128-k4", {"whitened": {"uniqueness_fraction": 0.375, "median_uniqueness_ratio": 1.5},
                                           "euclidean": {"uniqueness_fraction": 0.125}}), ("neurons-64", None)):
        core_path = copy / "evals" / did / "core.json"
        core = json.loads(core_path.read_text())
        core.pop("geometry", None)
        if geometry:
            core["geometry"] = geometry
        core_path.write_text(json.dumps(core))
    for did in ("topk-128-k4", "neurons-64"):
        (copy / "explain" / did / "concepts.parquet").unlink(missing_ok=True)
    f1 = [0.5, None, 1.0, 0.25]
    pq.write_table(pa.table({"unit": [0, 1, 2, 3], "precision": [1.0, None, 1.0, 0.5], "recall": [0.5, None, 1.0, 1.0],
                             "f1": f1}), copy / "explain" / "pca-64" / "concepts.parquet")
    rows = {r["dictionary"]: r for r in compare_run(copy)}
    assert rows["topk-128-k4"]["uniqueness_fraction"] == 0.375
    assert rows["topk-128-k4"]["uniqueness_fraction_euclidean"] == 0.125
    assert rows["topk-128-k4"]["uniqueness_ratio"] == 1.5
    assert rows["pca-64"]["label_f1"] == pytest.approx((0.5 + 1.0 + 0.25) / 3)  # the unit without one is left out
    assert rows["neurons-64"]["uniqueness_fraction"] is None and rows["topk-128-k4"]["label_f1"] is None
    text = format_table(list(rows.values()))
    mean_f1 = sum(v for v in f1 if v is not None) / 3
    printed = {line.split()[0]: line.split() for line in text.splitlines()[1:]}
    assert printed["topk-128-k4"][-6:-2] == ["0.375", "0.125", "1.50", "-"]
    assert printed["pca-64"][-3] == f"{mean_f1:.3f}"
    assert printed["neurons-64"][-6:] == ["-"] * 6  # neurons: no figure, shown as '-'


def test_llm_label_scores_are_the_mean_over_units_labelled_without_error(several, tmp_path):
    """`unitscope label`'s labels.parquet (RUN/labels/ID) gives the detection and fuzzing columns; a unit whose
    labelling failed, or whose score is undefined, is left out of the mean rather than counted as zero."""
    from unitscope.label.run import LABEL_SCHEMA

    root, _ = several
    copy = tmp_path / "run"
    shutil.copytree(root, copy, ignore=shutil.ignore_patterns("store", "report"))
    rows = []
    for unit, det, fuzz, error in ((0, 0.9, 0.7, None), (1, 0.6, None, None), (2, None, None, "timed out"),
                                   (3, 0.3, 0.5, None), (4, float("nan"), 0.6, None)):
        row = {name: None for name in LABEL_SCHEMA.names}
        row.update(unit=unit, label=f"unit {unit}", detection_balanced_accuracy=det,
                   fuzzing_balanced_accuracy=fuzz, error=error)
        rows.append(row)
    (copy / "labels" / "pca-64").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist(rows, schema=LABEL_SCHEMA), copy / "labels" / "pca-64" / "labels.parquet")
    got = {r["dictionary"]: r for r in compare_run(copy)}
    assert got["pca-64"]["llm_labels"] == 4
    assert got["pca-64"]["detection_balanced_accuracy"] == pytest.approx((0.9 + 0.6 + 0.3) / 3)
    assert got["pca-64"]["fuzzing_balanced_accuracy"] == pytest.approx((0.7 + 0.5 + 0.6) / 3)
    assert got["topk-128-k4"]["llm_labels"] is None and got["topk-128-k4"]["detection_balanced_accuracy"] is None
    printed = {line.split()[0]: line.split() for line in format_table(list(got.values())).splitlines()[1:]}
    assert printed["pca-64"][-2:] == [f"{(0.9 + 0.6 + 0.3) / 3:.3f}", f"{(0.7 + 0.5 + 0.6) / 3:.3f}"]
    write_compare(copy, list(got.values()))
    assert pq.read_table(copy / "compare.parquet").column("llm_labels").to_pylist()[
        [r["dictionary"] for r in got.values()].index("pca-64")] == 4


def test_bad_input_is_one_sentence_and_writes_nothing(several, tmp_path, capsys):
    root, _ = several
    _fails(run_cli("compare", tmp_path / "nowhere"), "is not a run directory", "no run.json")  # as a user runs it
    (tmp_path / "plain").mkdir()
    _main_fails(capsys, "compare", tmp_path / "plain", "--", "is not a run directory")
    empty = tmp_path / "empty"
    shutil.copytree(root, empty, ignore=shutil.ignore_patterns("store", "report", "evals", "compare.*"))
    _main_fails(capsys, "compare", empty, "--", "has no evaluated dictionary")
    assert not (empty / "compare.parquet").exists() and not (empty / "compare.png").exists()
    broken = tmp_path / "broken"
    shutil.copytree(root, broken, ignore=shutil.ignore_patterns("store", "report"))
    before = (broken / "compare.parquet").read_bytes(), (broken / "compare.png").read_bytes()
    (broken / "evals" / "pca-64" / "core.json").write_text('{"eval_result_metrics": ')
    _main_fails(capsys, "compare", broken, "--", "core.json", "is corrupt")
    (broken / "evals" / "pca-64" / "core.json").write_text('{"eval_result_metrics": {"sparsity": {"l0": "4"}}}')
    _main_fails(capsys, "compare", broken, "--", "core.json", "sparsity.l0", "not a number")
    stale = json.loads((broken / "run.json").read_text())
    stale["stages"]["eval"]["status"] = "stale"
    (broken / "run.json").write_text(json.dumps(stale))
    _main_fails(capsys, "compare", broken, "--", "eval stage", "is stale")
    assert ((broken / "compare.parquet").read_bytes(), (broken / "compare.png").read_bytes()) == before
