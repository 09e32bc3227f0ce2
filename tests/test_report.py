"""The static report: its data equal the explanation tables (decoded here as the page decodes them), text from a
hostile corpus stays text in a real browser (headless Chromium from the file system), and the report directory
is only ever replaced whole. `build_run` makes the tiny run that test_browser, test_serve and test_export use."""

import base64
import gzip
import json
import re
import shutil
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch
from conftest import tiny_model, tiny_tokenizer
from test_explain import check_crashes

from unitscope import Corpus, load_subject, record
from unitscope.dictionaries import load_dictionary
from unitscope.dictionaries.sae import TopKSAE
from unitscope.errors import UnitscopeError
from unitscope.explain import logit_lens, write_tables
from unitscope.report import report_run, write_report
from unitscope.report.site import script_json

SITE = "blocks.1.resid_post"
# lower case on purpose: the old index put a lower-cased copy of tokens into its inline script
SCRIPT = "</script><script>window.pwned=1</script>"
IMG = "<img src=x onerror=window.pwned=2>"
PROSE = "The for statement iterates over the items of any sequence, in the order that they appear."
DICTS = {"topk-64-k4": (64, 4), "topk-32-k2": (32, 2)}
# (unit, label, detection, fuzzing): an LLM label given to topk-64-k4
LLM_LABEL = (5, "the word 'for' in loop statements", 0.91, 0.77)
EFFECT_UNITS = [5, 6]  # units of topk-64-k4 given intervention effects (causal.effects)


def build_run(root: Path, subject=None, tok=None) -> Path:
    """A run directory made stage by stage on the tiny Llama: store, two TopK SAEs (random, saved), real
    evaluations, explanation tables, one LLM label, the comparison, run.json; then `report_run`."""
    from pydoc_data.topics import topics

    from unitscope.compare import compare_run, write_compare
    from unitscope.evaluate import evaluate_fidelity
    from unitscope.label.run import LABEL_SCHEMA

    if subject is None:
        tok = tiny_tokenizer()
        subject = load_subject(tiny_model("llama", len(tok)), tokenizer=tok)
    corpus_path = root / "corpus.txt"
    corpus_path.write_text("\n\n".join(topics[k] for k in sorted(topics)[:30]))
    corpus = Corpus(str(corpus_path))
    store = record(subject, corpus, [SITE], 3000, root / "store", ctx_len=32, batch_size=4, shard_tokens=640,
                   progress=False)
    for seed, (did, (n, k)) in enumerate(DICTS.items()):
        torch.manual_seed(seed)
        d = TopKSAE(32, n, k=k, metadata={"hook_name": SITE})
        d.save(root / "dictionaries" / did)
        core = evaluate_fidelity(subject, d, corpus, 32, start_window=store.n_windows, n_tokens=256, batch_size=4,
                                 progress=False)
        (root / "evals" / did).mkdir(parents=True)
        (root / "evals" / did / "core.json").write_text(json.dumps(core))
        write_tables(root / "explain" / did, d, store, SITE, tok, lens=logit_lens(subject, d), top_n=5,
                     progress=False)
    from unitscope.causal.effects import unit_effects, write_effects

    d = load_dictionary(root / "dictionaries" / "topk-64-k4")
    write_effects(root / "explain" / "topk-64-k4", unit_effects(subject, d, root / "explain" / "topk-64-k4",
                                                               units=EFFECT_UNITS, windows=2, top=3))
    unit, label, det, fuzz = LLM_LABEL
    row = {f.name: None for f in LABEL_SCHEMA}
    row.update(unit=unit, label=label, source="llm", model="tiny-judge", detection_balanced_accuracy=det,
               fuzzing_balanced_accuracy=fuzz)
    (root / "labels" / "topk-64-k4").mkdir(parents=True)
    pq.write_table(pa.Table.from_pylist([row], schema=LABEL_SCHEMA), root / "labels" / "topk-64-k4" / "labels.parquet")
    (root / "run.json").write_text(json.dumps({"config": {"model": subject.name, "site": SITE,
                                                          "corpus": str(corpus_path)}, "stages": {}}))
    write_compare(root, compare_run(root))
    report_run(root)
    return root


_RUNS: dict[str, Path] = {}


@pytest.fixture(scope="session")
def tiny_run(tmp_path_factory, llama_subject):
    """Built once per test process, also when test_browser/test_serve/test_export import this fixture."""
    if "run" not in _RUNS:
        _RUNS["run"] = build_run(tmp_path_factory.mktemp("run"), llama_subject, llama_subject.tokenizer)
    return _RUNS["run"]


def unpack_script(path: Path) -> tuple[list, object]:
    """A data file's arguments and its payload, decoded as app.js decodes it (base64, gunzip, JSON)."""
    text = path.read_text(encoding="ascii")
    m = re.fullmatch(r'US\.\w+\((.*)"([A-Za-z0-9+/=]*)"\);\n', text, re.S)
    assert m, text[:200]
    args = json.loads(f"[{m.group(1).rstrip(',')}]")
    return args, json.loads(gzip.decompress(base64.b64decode(m.group(2))))


def unit_records(report: Path, did: str) -> dict[int, tuple[dict, list[str]]]:
    out = {}
    for shard in (report / "data" / did / "u").glob("*.js"):
        (name, k), payload = unpack_script(shard)
        assert name == did and shard.stem == str(k)
        for rec in payload["units"]:
            assert rec["u"] // 64 == k
            out[rec["u"]] = (rec, payload["strings"])
    return out


def test_site_data_equal_the_tables(tiny_run):
    """Every unit's page data, decoded, against the tables: statistics, each example's snippet token by token
    with its non-zero codes, labels; nearest units against a brute-force cosine matrix; co-firing against a
    brute-force count of shared example windows."""
    report = tiny_run / "report"
    assert {p.name for p in report.iterdir()} == {"index.html", "app.js", "style.css", "data", "compare.png",
                                                  *DICTS}
    _, run = unpack_script(report / "data" / "run.js")
    assert [d["name"] for d in run["dictionaries"]] == sorted(DICTS)
    for entry in run["dictionaries"]:
        core = json.loads((tiny_run / "evals" / entry["name"] / "core.json").read_text())["eval_result_metrics"]
        assert entry["metrics"]["fvu"] == core["reconstruction_quality"]["fvu"]
        assert entry["metrics"]["l0"] == core["sparsity"]["l0"]
    assert [r["dictionary"] for r in run["comparison"]] == [r["dictionary"] for r in
                                                           pq.read_table(tiny_run / "compare.parquet").to_pylist()]
    for did, (n, _) in DICTS.items():
        units = pq.read_table(tiny_run / "explain" / did / "units.parquet").to_pylist()
        examples = pq.read_table(tiny_run / "explain" / did / "examples.parquet").to_pylist()
        recs = unit_records(report, did)
        assert sorted(recs) == list(range(n))
        _, lst = unpack_script(report / "data" / did / "list.js")
        assert lst["unit"] == [u["unit"] for u in units]
        np.testing.assert_allclose(lst["freq"], [u["frequency"] for u in units], rtol=5e-3)
        for u in units:
            rec, strings = recs[u["unit"]]
            assert rec["hist"] == u["hist_counts"]
            assert rec["max"] == pytest.approx(u["max_activation"], rel=1e-3)
            assert [t for t, _ in rec["promoted"]] == u["promoted_tokens"]
            mine = [e for e in examples if e["unit"] == u["unit"]]
            assert len(rec["ex"]) == len(mine)
            for e, x in zip(sorted(mine, key=lambda e: ("top bottom quantile random".split().index(e["kind"]),
                                                        e["quantile"] or 0, e["rank"])), rec["ex"]):
                lo = x[5]
                shown = [strings[i] for i in x[6]]
                assert shown == e["tokens"][lo:lo + len(shown)] and len(shown) <= 33
                peak = int(np.argmax(e["acts"])) if e["kind"] != "bottom" else int(np.argmin(e["acts"]))
                assert lo <= peak < lo + len(shown)  # the snippet holds the peak
                codes = dict(zip(x[7][::2], x[7][1::2]))
                for p, v in enumerate(e["acts"][lo:lo + len(shown)]):
                    assert codes.get(p, 0.0) == pytest.approx(v, rel=2e-3, abs=1e-9)
        # nearest by decoder cosine: brute force over the whole matrix
        dec = load_dictionary(tiny_run / "dictionaries" / did).directions.detach().double().numpy()
        dec /= np.linalg.norm(dec, axis=1, keepdims=True)
        cos = dec @ dec.T
        np.fill_diagonal(cos, -np.inf)
        for u in range(n):
            want = np.argsort(-cos[u], kind="stable")[:8]
            got = [a for a, _ in recs[u][0]["near"]]
            np.testing.assert_allclose([cos[u, a] for a in got], cos[u, want], atol=2e-3)
        # co-firing: units sharing top/quantile windows, counted by brute force
        windows = {}
        for e in examples:
            if e["kind"] in ("top", "quantile"):
                windows.setdefault(e["unit"], set()).add(e["window"])
        for u in range(n):
            shared = {b: len(windows.get(u, set()) & windows.get(b, set())) for b in range(n) if b != u}
            for b, c in recs[u][0].get("cofire") or []:
                assert shared[b] == c and c >= 1
            best = max(shared.values(), default=0)
            if best:
                assert recs[u][0]["cofire"][0][1] == best
    effects = {r["unit"]: r for r in pq.read_table(tiny_run / "explain" / "topk-64-k4" / "effects.parquet").to_pylist()}
    assert sorted(effects) == EFFECT_UNITS
    _, lst = unpack_script(report / "data" / "topk-64-k4" / "list.js")
    for u in range(64):  # the list's effect column: KL when ablated, where measured
        want = effects[u]["kl_ablate"] if u in effects else None
        assert lst["effect"][u] == (None if want is None else pytest.approx(want, rel=5e-3))
    for u in EFFECT_UNITS:
        got = unit_records(report, "topk-64-k4")[u][0]["effects"]
        assert got["kl_ablate"] == pytest.approx(effects[u]["kl_ablate"], rel=1e-3)
        assert [t for t, _ in got["boosted"]] == effects[u]["boosted_tokens"]
        assert [v for _, v in got["suppressed"]] == pytest.approx(effects[u]["suppressed_dlogp"], rel=5e-3)
    rec, _ = unit_records(report, "topk-64-k4")[LLM_LABEL[0]]
    assert rec["labels"][0] == {"label": LLM_LABEL[1], "source": "llm", "model": "tiny-judge",
                                "detection": LLM_LABEL[2], "fuzzing": LLM_LABEL[3]}
    assert (report / "topk-64-k4" / "index.html").read_text().count("../index.html#/topk-64-k4") == 2


def test_report_command_rewrites_the_same_site(tiny_run, tmp_path):
    """`unitscope report RUN` rewrites the same site (byte for byte: the data files are deterministic)."""
    from unitscope.cli import main

    copy = tmp_path / tiny_run.name  # the run's name is in the overview
    shutil.copytree(tiny_run, copy)
    before = {p.relative_to(copy / "report"): p.read_bytes() for p in (copy / "report").rglob("*") if p.is_file()}
    assert main(["report", str(copy)]) == 0
    after = {p.relative_to(copy / "report"): p.read_bytes() for p in (copy / "report").rglob("*") if p.is_file()}
    assert before == after


@pytest.fixture(scope="module")
def hostile(tmp_path_factory):
    """A tiny model whose tokenizer has the two payloads as single tokens, a corpus full of them, and a
    dictionary whose units 0 and 1 promote them in the logit lens, explained into tables."""
    root = tmp_path_factory.mktemp("hostile")
    tok = tiny_tokenizer()
    tok.add_tokens([SCRIPT, IMG])
    subject = load_subject(tiny_model("llama", len(tok)), tokenizer=tok)
    corpus = root / "corpus.txt"
    corpus.write_text("\n\n".join(f"{PROSE} {SCRIPT} {i} & {IMG} <b>bold</b> \u2028 end." for i in range(40)))
    store = record(subject, Corpus(str(corpus)), [SITE], 800, root / "store", ctx_len=16, batch_size=4,
                   shard_tokens=160, progress=False)
    torch.manual_seed(0)
    d = TopKSAE(32, 8, k=2, metadata={"hook_name": SITE})
    ids = tok.convert_tokens_to_ids([SCRIPT, IMG])
    with torch.no_grad():
        d.W_dec[:2] = subject.model.lm_head.weight[ids]
    lens = logit_lens(subject, d)
    assert lens["promoted_tokens"][0][0] == SCRIPT and lens["promoted_tokens"][1][0] == IMG
    write_tables(root / "explain", d, store, SITE, tok, lens=lens, top_n=3, progress=False)
    examples = pq.read_table(root / "explain" / "examples.parquet").to_pylist()
    for markup in (SCRIPT, IMG, "<b>bold</b>"):
        assert any(markup in "".join(e["tokens"]) for e in examples)
    return root, d, store, tok


PROBE = """return {pwned: typeof window.pwned, imgs: document.querySelectorAll('img').length,
scripts: [...document.scripts].map(s => s.getAttribute('src')), bold: document.querySelectorAll('b').length,
rows: document.querySelectorAll('#list tbody tr').length, examples: document.querySelectorAll('.ex').length,
text: document.body.textContent, fetched: performance.getEntriesByType('resource').map(e => e.name)}"""


def wait_for(browser, script: str, timeout: float = 20):
    from selenium.webdriver.support.ui import WebDriverWait

    return WebDriverWait(browser, timeout).until(lambda b: b.execute_script(script))


def test_hostile_text_stays_text_in_chromium(hostile, browser, tmp_path):
    root, d, store, tok = hostile
    index = write_report(tmp_path / "r", root / "explain", f"title {SCRIPT}", info={"model": IMG})
    base = (tmp_path / "r").as_uri() + "/"
    browser.get(index.as_uri() + "#/explain")
    wait_for(browser, "return document.querySelectorAll('#list tbody tr').length > 0")
    page = browser.execute_script(PROBE)
    assert page["pwned"] == "undefined" and page["imgs"] == 0 and page["bold"] == 0
    assert all(f.startswith(base) for f in page["fetched"])  # only the report's own files, nothing from anywhere
    assert sorted(page["scripts"]) == ["app.js", "data/explain/list.js", "data/run.js"]  # none came from the data
    assert page["rows"] == d.n_units
    assert SCRIPT.strip() in page["text"] or "window.pwned=1" in page["text"]  # tokens shown as text

    box = browser.find_element("id", "q")  # searching for the payload filters the table, still as text
    box.send_keys("window.pwned=1")
    page = browser.execute_script(PROBE)
    assert 1 <= page["rows"] < d.n_units and page["imgs"] == 0 and page["pwned"] == "undefined"

    browser.get(index.as_uri() + "#/")
    wait_for(browser, "return document.querySelector('h1') && document.querySelector('h1').textContent.length > 0")
    page = browser.execute_script(PROBE)
    assert f"title {SCRIPT}" in page["text"] and IMG in page["text"] and page["imgs"] == 0
    assert browser.title == f"title {SCRIPT}"

    examples = pq.read_table(root / "explain" / "examples.parquet").to_pylist()
    for unit in range(d.n_units):
        browser.get(index.as_uri() + f"#/explain/{unit}")
        browser.refresh()
        wait_for(browser, f"return document.querySelector('h1') && document.querySelector('h1').textContent"
                          f".endsWith('unit {unit}')")
        page = browser.execute_script(PROBE)
        assert page["pwned"] == "undefined" and all(f.startswith(base) for f in page["fetched"])
        assert (page["imgs"], page["bold"]) == (0, 0)
        if unit < 2:
            assert (SCRIPT, IMG)[unit] in page["text"]  # the promoted token, as text
        mine = [e for e in examples if e["unit"] == unit]
        assert page["examples"] == len(mine)
        for e in mine:  # every example's snippet appears as the characters it is made of
            peak = int(np.argmax(e["acts"])) if e["kind"] != "bottom" else int(np.argmin(e["acts"]))
            assert "".join(e["tokens"][max(0, peak - 16):peak + 17]) in page["text"]


def test_report_is_replaced_whole_at_any_crash(hostile, tmp_path, monkeypatch):
    root, d, store, tok = hostile
    other = tmp_path / "other-explain"  # a second explanation: fewer examples, other logit lens
    write_tables(other, TopKSAE(32, 8, k=2, metadata={"hook_name": SITE}), store, SITE, tok, top_n=1,
                 progress=False)
    for exchange in (True, False):
        points = check_crashes(monkeypatch, tmp_path / str(exchange),
                               lambda out: write_report(out, root / "explain", "old"),
                               lambda out: write_report(out, other, "new"), exchange)
        assert points >= 4  # the list, the shard, run.js (each a write_text step), then the swap


def test_report_refuses_a_directory_holding_other_files(hostile, tmp_path):
    root = hostile[0]
    (tmp_path / "r").mkdir()
    (tmp_path / "r" / "keep.txt").write_text("mine")
    with pytest.raises(UnitscopeError, match="other files"):
        write_report(tmp_path / "r", root / "explain", "t")
    assert (tmp_path / "r" / "keep.txt").read_text() == "mine"


def test_script_json_round_trips_and_never_closes_a_script():
    value = {"t": [SCRIPT, IMG, "<!--", "a\u2028b\u2029c", "&amp;", "ünï"]}
    text = script_json(value)
    assert not any(c in text for c in "<>&\u2028\u2029")
    assert json.loads(text) == value


def test_the_runs_comparison_is_shown_with_its_plot_and_stays_text(hostile, browser, tmp_path):
    """A run's compare rows and plot on the overview: the plot is the report's own copy (it loads from the
    report folder), and a hostile dictionary name is text, never markup."""
    from unitscope.compare import plot_png

    root = hostile[0]
    rows = [{"dictionary": "topk-32-k2", "kind": "topk", "units": 32, "l0": 2.0, "fvu": 0.25},
            {"dictionary": SCRIPT, "kind": IMG, "units": 8, "l0": 8.0, "fvu": 0.0}]
    plot = tmp_path / "compare.png"
    plot.write_bytes(plot_png(rows))
    index = write_report(tmp_path / "report" / "topk-32-k2", root / "explain", "t", comparison=rows,
                         comparison_plot=plot)
    plot.unlink()  # the report keeps its own copy
    browser.get(index.as_uri())
    wait_for(browser, "return document.querySelector('#comparison') !== null")
    wait_for(browser, "return [...document.images].every(i => i.complete)")
    page = browser.execute_script(PROBE.replace(
        "return {", "return {loaded: [...document.images].map(i => i.complete && i.naturalWidth), "
                    "cells: [...document.querySelectorAll('#comparison tbody tr')].map(r => r.cells[0].textContent), ",
        1))
    assert page["pwned"] == "undefined" and page["imgs"] == 1 and page["loaded"][0] > 0
    assert page["cells"] == ["topk-32-k2", SCRIPT] and page["bold"] == 0
    assert SCRIPT in page["text"] and IMG in page["text"]


def test_dissection_concepts_and_images_reach_the_unit_page(tiny_run, tmp_path):  # noqa: F811
    """`unitscope dissect`'s table (RUN/dissect/ID/dissection.parquet): a unit's three best concepts by IoU, in
    rank order, as labels; a PNG in explain/ID/dissection/ copied into the report and linked from its unit."""
    run = tmp_path / tiny_run.name
    shutil.copytree(tiny_run, run)
    rows = [(1, "sky", 0.31, 1, True), (1, "tree", 0.12, 2, False), (1, "grass", 0.05, 3, False),
            (1, "road", 0.01, 4, False), (2, "water", 0.2, 1, True)]
    (run / "dissect" / "topk-64-k4").mkdir(parents=True)
    pq.write_table(pa.table({k: [r[i] for r in rows] for i, k in enumerate(["unit", "concept", "iou", "rank",
                                                                              "detector"])}),
                   run / "dissect" / "topk-64-k4" / "dissection.parquet")
    png = (tiny_run / "report" / "compare.png").read_bytes()  # any PNG
    (run / "explain" / "topk-64-k4" / "dissection").mkdir()
    (run / "explain" / "topk-64-k4" / "dissection" / "2.png").write_bytes(png)
    report_run(run)
    recs = unit_records(run / "report", "topk-64-k4")
    got = [(lab["label"], lab["iou"], lab["detector"]) for lab in recs[1][0]["labels"] if lab["source"] == "dissection"]
    assert got == [("sky", 0.31, True), ("tree", 0.12, False), ("grass", 0.05, False)]
    assert recs[2][0]["img"] == "data/topk-64-k4/img/2.png"
    assert (run / "report" / recs[2][0]["img"]).read_bytes() == png
    assert "img" not in recs[1][0] and not any(lab["source"] == "dissection" for lab in recs[3][0].get("labels", []))
