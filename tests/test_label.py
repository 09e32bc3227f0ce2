"""`unitscope label` without a server: metrics against brute force, the held-out split, the excerpt markers,
a local Hugging Face judge on a real `unitscope explain` output (every metric recomputed from its recorded
answers), and failure injection (a refused URL, a server that answers 500s, garbage or too slowly)."""

from __future__ import annotations

import http.server
import itertools
import json
import math
import socket
import threading
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
from conftest import run_cli

from unitscope.errors import UnitscopeError
from unitscope.label import HFChat, LabelSettings, OpenAIEndpoint, label_units, prompts
from unitscope.label.scoring import Excerpt, auc, balanced_accuracy, f1, fuzz_marks, split

EXAMPLE_SCHEMA = pa.schema([("unit", pa.int32()), ("kind", pa.string()), ("rank", pa.int32()), ("window", pa.int64()),
                            ("max_activation", pa.float32()), ("token_ids", pa.list_(pa.int32())),
                            ("tokens", pa.list_(pa.string())), ("acts", pa.list_(pa.float32()))])
PLANTED = {  # unit -> which tokens it fires on (the planted truth)
    0: lambda t: any(c.isdigit() for c in t),
    1: lambda t: t.strip().lower() == "the",
    2: lambda t: t.strip() in {"(", ")", "()", "):", "),"},
}


def planted_explanation(root: Path, tokenizer, n: int = 8, ctx: int = 24, units=(0, 1, 2)) -> Path:
    """An explanation directory in `unitscope explain`'s layout whose units fire by a known rule on real text
    (default corpus): `top` rows (most firing tokens), `quantile` rows (the rest of the firing windows) and
    `random` rows (windows where the unit never fires)."""
    from unitscope import Corpus

    windows = [w.tokens for _, w in zip(range(600), Corpus("default").windows(tokenizer, ctx))]
    strings = {int(i): tokenizer.decode([int(i)]) for w in windows for i in w}
    rows = {k: [] for k in EXAMPLE_SCHEMA.names}
    for unit in units:
        acts = [np.array([0.0] + [1.0 + (j % 3) * 0.5 if PLANTED[unit](strings[int(i)]) else 0.0 for j, i in
                                  enumerate(w[1:])], np.float32) for w in windows]
        firing = sorted((w for w in range(len(windows)) if acts[w].any()), key=lambda w: (-acts[w].sum(), w))
        quiet = [w for w in range(len(windows)) if not acts[w].any()]
        step = max(1, (len(firing) - n) // n)
        picks = [("top", firing[:n]), ("quantile", firing[n::step][:n]), ("random", quiet[::7][:n])]
        for kind, ws in picks:
            for rank, w in enumerate(ws):
                rows["unit"].append(unit)
                rows["kind"].append(kind)
                rows["rank"].append(rank)
                rows["window"].append(w)
                rows["max_activation"].append(float(acts[w].max()))
                rows["token_ids"].append([int(i) for i in windows[w]])
                rows["tokens"].append([strings[int(i)] for i in windows[w]])
                rows["acts"].append(acts[w].tolist())
    root.mkdir(parents=True, exist_ok=True)
    pq.write_table(pa.table(rows, schema=EXAMPLE_SCHEMA), root / "examples.parquet")
    pq.write_table(pa.table({"unit": np.asarray(units, np.int32)}), root / "units.parquet")
    return root


def check_metrics_from_answers(out: Path, units) -> tuple[pa.Table, pa.Table]:
    """Every label's metrics recomputed by brute force from the recorded per-excerpt answers; the truths from
    the recorded activations; each prediction from the raw answer text. Returns both tables."""
    labels = pq.read_table(out / "labels.parquet").to_pylist()
    answers = pq.read_table(out / "answers.parquet").to_pylist()
    assert sorted(r["unit"] for r in labels) == sorted(units)
    for row in labels:
        assert row["error"] is None, row["error"]
        assert row["label"] and row["model"] and row["prompts"] and row["prompt_version"]
        mine = [a for a in answers if a["unit"] == row["unit"]]
        for a in mine:
            fires = [x > 0 for x in a["acts"]]
            if a["scorer"] == "detection":
                assert a["truth"] == any(fires) and a["marked"] is None
            else:
                assert a["truth"] == (a["marked"] == fires)
                assert sum(a["marked"]) == sum(fires)
            words = a["answer"].strip().lower()
            assert a["prediction"] == (True if words.startswith("yes") else False if words.startswith("no") else None)
            assert a["window"] not in row["explain_windows"]  # held out
        for scorer in ("detection", "fuzzing"):
            got = [a for a in mine if a["scorer"] == scorer]
            assert row[f"{scorer}_n"] == len(got) > 0
            pos = [a for a in got if a["truth"]]
            neg = [a for a in got if not a["truth"]]
            hit = [a["prediction"] is True for a in pos]  # no answer or a wrong one is a miss
            rej = [a["prediction"] is False for a in neg]
            if pos and neg:
                ba = (sum(hit) / len(pos) + sum(rej) / len(neg)) / 2
                assert row[f"{scorer}_balanced_accuracy"] == pytest.approx(ba)
                scored = [(a["truth"], a["p_yes"]) for a in got if a["p_yes"] is not None]
                ps = [p for t, p in scored if t]
                ns = [p for t, p in scored if not t]
                if ps and ns:
                    brute = sum((p > q) + 0.5 * (p == q) for p in ps for q in ns) / (len(ps) * len(ns))
                    assert row[f"{scorer}_auc"] == pytest.approx(brute)
            else:
                assert row[f"{scorer}_balanced_accuracy"] is None
            tp, fn = sum(hit), len(pos) - sum(hit)
            fp = len(neg) - sum(rej)
            if pos:
                assert row[f"{scorer}_f1"] == pytest.approx(2 * tp / (2 * tp + fp + fn))
    return pq.read_table(out / "labels.parquet"), pq.read_table(out / "answers.parquet")


# ---- metrics, split, markers --------------------------------------------------------------------------------


def test_metrics_match_brute_force():
    rng = np.random.default_rng(0)
    for trial in range(200):
        n = int(rng.integers(2, 30))
        truth = (rng.random(n) < 0.5).tolist()
        pred = [None if r < 0.1 else bool(r < 0.55) for r in rng.random(n)]
        score = np.round(rng.random(n), 1).tolist()  # rounded: ties happen
        pos = [i for i in range(n) if truth[i]]
        neg = [i for i in range(n) if not truth[i]]
        if not pos or not neg:
            assert math.isnan(balanced_accuracy(truth, pred)) and math.isnan(auc(truth, score))
            continue
        tpr = sum(pred[i] is True for i in pos) / len(pos)
        tnr = sum(pred[i] is False for i in neg) / len(neg)
        assert balanced_accuracy(truth, pred) == pytest.approx((tpr + tnr) / 2)
        tp = sum(pred[i] is True for i in pos)
        fp = sum(pred[i] is not False for i in neg)
        assert f1(truth, pred) == pytest.approx(2 * tp / (2 * tp + fp + len(pos) - tp))
        pairs = [(score[i] > score[j]) + 0.5 * (score[i] == score[j]) for i in pos for j in neg]
        assert auc(truth, score) == pytest.approx(sum(pairs) / len(pairs)), trial


def test_p_yes_reads_both_cases_and_needs_a_yes_or_no():
    lp = [{"**": -0.1}, {"Yes": math.log(0.3), " yes": math.log(0.1), "No": math.log(0.2), "Maybe": -1.0}]
    assert prompts.p_yes(lp) == pytest.approx(0.4 / 0.6)
    assert prompts.p_yes([{"Maybe": -0.1}]) is None and prompts.p_yes(None) is None


def test_render_marks_exactly_the_marked_tokens():
    rng = np.random.default_rng(1)
    pool = [" the", " cat", "(", ")", " 1", "9", "\n", "  ", "x", " Yes"]
    for _ in range(300):
        toks = [pool[i] for i in rng.integers(0, len(pool), int(rng.integers(1, 12)))]
        marks = (rng.random(len(toks)) < 0.4).tolist()
        text = prompts.render(toks, marks)
        assert " ".join(text.replace("<<", "").replace(">>", "").split()) == " ".join("".join(toks).split())
        inside = "".join(part.split(">>")[0] for part in text.split("<<")[1:])
        expected = "".join(t for t, m in zip(toks, marks) if m)
        assert "".join(inside.split()) == "".join(expected.split())


def _excerpt(window, kind, acts):
    return Excerpt(window, kind, [f"t{i}" for i in range(len(acts))], np.asarray(acts, np.float32))


def test_split_holds_out_windows_and_takes_negatives_only_from_quiet_rows():
    rows = ([_excerpt(w, "top", [0, 2, 0, 1]) for w in range(10)] + [_excerpt(100 + w, "quantile", [0, 0, 1, 0])
                                                                       for w in range(10)]
            + [_excerpt(200 + w, "random", [0, 0, 0, 0]) for w in range(10)] + [_excerpt(5, "top", [0, 1, 0, 0])])
    sp = split(rows, n_explain=6, n_score=5, seed=3)
    seen = {e.window for e in sp.explain}
    assert len(sp.explain) == 6 and {e.kind for e in sp.explain} == {"top", "quantile"}
    assert not seen & {e.window for e in sp.positives + sp.negatives}
    assert len(sp.positives) == 5 and all(e.fires.any() for e in sp.positives)
    assert len(sp.negatives) == 5 and not any(e.fires.any() for e in sp.negatives)
    assert len({e.window for e in sp.positives}) == 5  # window 5 appears twice in the rows, once at most here
    old = split([r for r in rows if r.kind == "top"], 6, 5, 3)  # explain's older layout: top rows only
    assert old.explain and old.positives and not old.negatives
    marks = fuzz_marks(_excerpt(0, "top", [0, 2, 0, 1, 0, 0]), np.random.default_rng(0))
    assert marks.sum() == 2 and not marks[[1, 3]].any()


# ---- a local Hugging Face judge on a real explanation ---------------------------------------------------------


@pytest.fixture(scope="module")
def explanation(tmp_path_factory, llama_subject):
    """A real `unitscope explain` output (tiny store of the default corpus, a random TopK SAE)."""
    import torch

    from unitscope import Corpus, record
    from unitscope.dictionaries.sae import TopKSAE
    from unitscope.explain import write_tables

    root = tmp_path_factory.mktemp("label")
    store = record(llama_subject, Corpus("default"), ["blocks.1.resid_post"], 1200, root / "s", ctx_len=16,
                   batch_size=4, shard_tokens=400, progress=False)
    torch.manual_seed(0)
    d = TopKSAE(32, 48, k=2, metadata={"hook_name": "blocks.1.resid_post"})  # sparse: quiet windows exist
    write_tables(root / "e", d, store, "blocks.1.resid_post", llama_subject.tokenizer, top_n=8, progress=False)
    return root / "e"


@pytest.fixture(scope="module")
def hf_judge():
    return HFChat("default")


def test_hf_judge_labels_a_real_explanation(explanation, hf_judge, tmp_path):
    settings = LabelSettings(n_explain=3, n_score=2, excerpt_tokens=12, explain_max_tokens=24)  # small: CPU
    summary = label_units(explanation, tmp_path / "l", hf_judge, settings, units=[0, 1], concurrency=2)
    assert summary["failed"] == {} and summary["labelled"] == 2
    labels, answers = check_metrics_from_answers(tmp_path / "l", [0, 1])
    examples = pq.read_table(explanation / "examples.parquet").to_pylist()
    for unit in (0, 1):  # non-firing excerpts exactly where explain kept windows in which the unit never fires
        quiet = {r["window"] for r in examples if r["unit"] == unit and not any(a > 0 for a in r["acts"])}
        negatives = {a["window"] for a in answers.to_pylist()
                     if a["unit"] == unit and a["scorer"] == "detection" and not a["truth"]}
        assert negatives <= quiet and len(negatives) == min(len(quiet), settings.n_score)
    assert all(p is not None for p in answers.column("p_yes").to_pylist())  # local logits: P(yes) everywhere
    assert labels.column("fuzzing_auc").null_count == 0
    again = label_units(explanation, tmp_path / "l", hf_judge, settings, units=[0, 1])
    assert again["skipped"] == 2 and again["labelled"] == 0
    assert pq.read_table(tmp_path / "l" / "labels.parquet").equals(labels)


# ---- failure injection: a URL that refuses, a server that answers 500s, garbage or too slowly --------------------


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class _Faulty(http.server.BaseHTTPRequestHandler):
    mode = "500"
    calls = itertools.count()

    def log_message(self, *a):
        pass

    def _send(self, code: int, body: bytes, ctype: str = "application/json") -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_GET(self):
        next(self.calls)
        self._send(200, json.dumps({"data": [{"id": "faulty"}]}).encode())

    def do_POST(self):
        next(self.calls)
        self.rfile.read(int(self.headers.get("Content-Length", 0)))
        if self.mode == "500":
            self._send(500, b"internal error")
        elif self.mode == "html":
            self._send(200, b"<html>not json</html>", "text/html")
        elif self.mode == "nochoices":
            self._send(200, json.dumps({"object": "chat.completion", "choices": []}).encode())
        elif self.mode == "slow":
            import time

            time.sleep(1.0)
            self._send(200, b"{}")


@pytest.fixture()
def faulty():
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Faulty)
    t = threading.Thread(target=server.serve_forever, daemon=True)
    t.start()
    yield server
    server.shutdown()
    server.server_close()


def _two_unit_explanation(root: Path) -> Path:
    ex = {k: [] for k in EXAMPLE_SCHEMA.names}
    for unit in (0, 1):
        for rank in range(4):
            for k, v in zip(EXAMPLE_SCHEMA.names, (unit, "top", rank, rank, 1.0, [1, 2, 3], [" a", " b", " c"],
                                                    [0.0, 1.0, 0.0])):
                ex[k].append(v)
    root.mkdir()
    pq.write_table(pa.table(ex, schema=EXAMPLE_SCHEMA), root / "examples.parquet")
    return root


@pytest.mark.parametrize("mode", ["500", "html", "nochoices", "slow"])
def test_a_faulty_endpoint_is_retried_then_reported_per_unit(mode, faulty, tmp_path):
    root = _two_unit_explanation(tmp_path / "e")
    _Faulty.mode, _Faulty.calls = mode, itertools.count()
    url = f"http://127.0.0.1:{faulty.server_address[1]}/v1"
    backend = OpenAIEndpoint(url, timeout=0.3, max_retries=2, backoff=0.01)
    summary = label_units(root, tmp_path / "l", backend, LabelSettings(), max_retries=2)
    assert sorted(summary["failed"]) == [0, 1] and summary["labelled"] == 0
    labels = pq.read_table(tmp_path / "l" / "labels.parquet").to_pylist()
    assert [row["unit"] for row in labels] == [0, 1]
    assert all(row["error"] and row["label"] is None for row in labels)
    assert all("3 time(s)" in row["error"] for row in labels)  # the explainer's request, tried 1 + 2 times
    assert next(_Faulty.calls) == 1 + 2 * 3  # the model list, then 3 attempts per unit


def test_failed_units_make_the_command_say_so(faulty, tmp_path):
    root = _two_unit_explanation(tmp_path / "e")
    _Faulty.mode = "500"
    url = f"http://127.0.0.1:{faulty.server_address[1]}/v1"
    r = run_cli("label", "--explanations", root, "--endpoint", url, "--out", tmp_path / "l", "--max-retries", "1",
                "--quiet", timeout=300)
    assert r.returncode == 1, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 1 and "2 unit(s) failed" in lines[0] and "run the same command again" in lines[0]
    assert "HTTP 500" in lines[0]


def test_a_refused_endpoint_is_one_sentence_and_nothing_is_lost(tmp_path, capsys):
    root = planted_explanation_small(tmp_path / "e")
    out = tmp_path / "l"
    out.mkdir()
    (out / "labels.parquet").write_bytes(b"previous")
    (out / "label.json").write_text("{}")
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    code, err = _main(capsys, "label", "--explanations", str(root), "--endpoint", url, "--out", str(out),
                      "--max-retries", "1", "--quiet")
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1 and "cannot be used" in lines[0] and "cannot connect" in lines[0], err
    assert (out / "labels.parquet").read_bytes() == b"previous"
    with pytest.raises(UnitscopeError, match="not an http"):
        OpenAIEndpoint("127.0.0.1:8000")


def _main(capsys, *argv: str) -> tuple[int, str]:
    """The CLI in this process (no interpreter start-up): exit status and stderr."""
    from unitscope.cli import main

    capsys.readouterr()
    try:
        code = main(list(argv))
    except SystemExit as e:
        code = e.code
    return code, capsys.readouterr().err


def planted_explanation_small(root: Path) -> Path:
    root.mkdir(parents=True)
    table = pa.table({"unit": [0], "kind": ["top"], "rank": [0], "window": [0], "max_activation": [1.0],
                      "token_ids": [[1, 2]], "tokens": [[" a", " b"]], "acts": [[0.0, 1.0]]}, schema=EXAMPLE_SCHEMA)
    pq.write_table(table, root / "examples.parquet")
    return root


def test_bad_inputs_are_one_sentence(tmp_path, capsys):
    root = planted_explanation_small(tmp_path / "e")
    cases = [
        (["--explanations", tmp_path / "nope", "--endpoint", "http://127.0.0.1:9/v1", "--out", tmp_path / "o"],
         "is not a directory"),
        (["--explanations", tmp_path, "--endpoint", "http://127.0.0.1:9/v1"], "neither an explanation directory"),
        (["--explanations", root, "--endpoint", "http://127.0.0.1:9/v1"], "give --out"),
        (["--explanations", root, "--endpoint", "ftp://x", "--out", tmp_path / "o"], "not an http"),
        (["--explanations", root, "--endpoint", "http://127.0.0.1:9/v1", "--units", "x"], "not a unit index"),
    ]
    for args, words in cases:
        code, err = _main(capsys, "label", *map(str, args), "--quiet")
        assert code == 2 and words in err and len(err.strip().splitlines()) == 1, (args, err)
    with pytest.raises(UnitscopeError, match="unit 7 is not in"):
        label_units(root, tmp_path / "o", _NeverCalled(), LabelSettings(), units=[7])
    assert not (tmp_path / "o").exists()
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep")  # refused before any request, kept
    with pytest.raises(UnitscopeError, match="already holds other files"):
        label_units(root, tmp_path / "mine", _NeverCalled(), LabelSettings())
    assert (tmp_path / "mine" / "notes.txt").read_text() == "keep"


class _NeverCalled:
    kind, url = "none", "none"

    def resolve_model(self):
        return "none"

    def complete(self, *a, **kw):
        raise AssertionError("no request expected")
