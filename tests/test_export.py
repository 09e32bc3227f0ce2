"""`unitscope export`: Neuronpedia's batch layout and SAEDashboard per-feature JSON, checked against the tables."""

import json

import numpy as np
import pyarrow.parquet as pq
import pytest
from test_report import DICTS, LLM_LABEL, tiny_run  # noqa: F401 -- the shared tiny run fixture

from unitscope.cli import main
from unitscope.dictionaries import load_dictionary
from unitscope.errors import UnitscopeError
from unitscope.report.export import BATCH, export_run

# the keys of SAEDashboard's NeuronpediaDashboardFeature.to_dict() and NeuronpediaDashboardActivation.to_dict()
FEATURE_KEYS = {"feature_index", "neuron_alignment_indices", "neuron_alignment_values", "neuron_alignment_l1",
                "correlated_neurons_indices", "correlated_neurons_l1", "correlated_neurons_pearson",
                "correlated_features_indices", "correlated_features_l1", "correlated_features_pearson", "neg_str",
                "neg_values", "pos_str", "pos_values", "frac_nonzero", "freq_hist_data_bar_values",
                "freq_hist_data_bar_heights", "logits_hist_data_bar_heights", "logits_hist_data_bar_values",
                "n_prompts_total", "n_tokens_in_prompt", "dataset", "decoder_weights_dist", "activations"}
ACTIVATION_KEYS = {"bin_min", "bin_max", "bin_contains", "tokens", "values"}


def check_feature(f, unit, examples, cos):
    assert set(f) - {"explanations"} == FEATURE_KEYS
    assert f["feature_index"] == unit["unit"] and f["frac_nonzero"] == unit["frequency"]
    assert f["pos_str"] == unit["promoted_tokens"] and f["neg_str"] == unit["suppressed_tokens"]
    assert f["freq_hist_data_bar_heights"] == [float(c) for c in unit["hist_counts"]]
    centres = np.linspace(unit["hist_min"], unit["hist_max"], len(unit["hist_counts"]) + 1)
    np.testing.assert_allclose(f["freq_hist_data_bar_values"], (centres[:-1] + centres[1:]) / 2, atol=1e-3)
    kept = [e for e in examples if e["kind"] in ("top", "quantile")]
    assert len(f["activations"]) == len(kept)
    for a, e in zip(f["activations"], kept):
        assert set(a) == ACTIVATION_KEYS and a["tokens"] == e["tokens"]
        np.testing.assert_allclose(a["values"], e["acts"], atol=6e-4)
        if e["kind"] == "top":
            assert (a["bin_min"], a["bin_contains"]) == (-1, -1)
        else:
            lo, hi = unit["quantile_edges"][e["quantile"]], unit["quantile_edges"][e["quantile"] + 1]
            assert (a["bin_min"], a["bin_max"]) == (round(lo, 3), round(hi, 3))
            assert a["bin_contains"] == -1 or 0 <= a["bin_contains"] <= 1
    want = np.argsort(-cos[unit["unit"]], kind="stable")[:8]
    np.testing.assert_allclose(f["correlated_features_l1"], cos[unit["unit"], want], atol=2e-3)


def cosines(run, did):
    dec = load_dictionary(run / "dictionaries" / did).directions.detach().double().numpy()
    dec /= np.linalg.norm(dec, axis=1, keepdims=True)
    cos = dec @ dec.T
    np.fill_diagonal(cos, -np.inf)
    return cos


@pytest.mark.parametrize("fmt", ["neuronpedia", "saedashboard"])
def test_export_holds_every_unit_as_the_tables_say(tiny_run, tmp_path, fmt):  # noqa: F811
    out = tmp_path / fmt
    assert main(["export", str(tiny_run), "--format", fmt, "--out", str(out)]) == 0
    assert sorted(p.name for p in out.iterdir()) == sorted(DICTS)
    for did, (n, _) in DICTS.items():
        units = pq.read_table(tiny_run / "explain" / did / "units.parquet").to_pylist()
        examples = pq.read_table(tiny_run / "explain" / did / "examples.parquet").to_pylist()
        cos = cosines(tiny_run, did)
        if fmt == "neuronpedia":
            batches = sorted(out.glob(f"{did}/batch-*.json"), key=lambda p: int(p.stem.split("-")[1]))
            assert len(batches) == -(-n // BATCH)
            feats = []
            for b in batches:
                batch = json.loads(b.read_text())
                assert (batch["layer"], batch["sae_set"]) == (1, did) and batch["model_id"]
                feats += batch["features"]
            settings = json.loads((out / did / "run_settings.json").read_text())
            assert settings["n_tokens_in_prompt"] == 32 and settings["sae_set"] == did
            explanations = json.loads((out / did / "explanations.json").read_text())
            if did == "topk-64-k4":
                assert [(e["index"], e["description"]) for e in explanations] == [(str(LLM_LABEL[0]), LLM_LABEL[1])]
        else:
            index = json.loads((out / did / "index.json").read_text())
            assert index["features"] == list(range(n))
            feats = [json.loads((out / did / "features" / f"{u}.json").read_text()) for u in range(n)]
            if did == "topk-64-k4":
                assert feats[LLM_LABEL[0]]["explanations"][0]["description"] == LLM_LABEL[1]
        assert [f["feature_index"] for f in feats] == list(range(n))
        for f, u in zip(feats, units):
            check_feature(f, u, [e for e in examples if e["unit"] == u["unit"]], cos)


def test_export_refuses_an_unknown_format_and_a_folder_of_other_files(tiny_run, tmp_path):  # noqa: F811
    with pytest.raises(UnitscopeError, match="unknown export format 'html'; valid formats are neuronpedia, "):
        export_run(tiny_run, "html", tmp_path / "x")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")
    with pytest.raises(UnitscopeError, match="other files"):
        export_run(tiny_run, "neuronpedia", tmp_path / "mine")
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"
