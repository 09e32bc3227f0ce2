"""`unitscope serve`: a real uvicorn server on the tiny run. API answers against computations made here without
the server (plain torch forward hooks); refusals (traversal, oversized bodies, long generations, a non-local host)
each with their sentence; concurrent requests give exactly their sequential answers."""

import json
import socket
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest
import torch
from conftest import run_cli, serving
from test_report import tiny_run  # noqa: F401 -- the shared tiny run fixture

from unitscope.dictionaries import load_dictionary
from unitscope.errors import UnitscopeError
from unitscope.serve import Limits, create_app, safe_file

DID = "topk-64-k4"
LIMITS = Limits(body_bytes=4096, text_tokens=64, new_tokens=8)


@pytest.fixture(scope="module")
def server(tiny_run, llama_subject):  # noqa: F811
    app = create_app(tiny_run, llama_subject, LIMITS)
    with serving(app) as port:
        yield f"http://127.0.0.1:{port}", port


def block_output(subject, ids, edit=None):
    """blocks.1.resid_post by a plain forward hook on the decoder layer (optionally editing it), and the logits."""
    seen = {}

    def hook(module, args, out):
        h = out[0] if isinstance(out, tuple) else out
        seen["h"] = h.detach().clone()
        if edit is not None:
            h = edit(h)
            return (h, *out[1:]) if isinstance(out, tuple) else h
        return None

    handle = subject.model.model.layers[1].register_forward_hook(hook)
    try:
        with torch.no_grad():
            logits = subject.model(input_ids=ids, use_cache=False).logits
    finally:
        handle.remove()
    return seen["h"][0], logits[0, -1].double()


def test_activations_are_the_units_codes(server, tiny_run, llama_subject):  # noqa: F811
    url, _ = server
    text = "The for statement iterates over the items of any sequence."
    r = httpx.post(url + "/api/activations", json={"text": text, "dictionary": DID, "units": [3, 5]}, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    ids = llama_subject.tokenizer(text, return_tensors="pt").input_ids
    d = load_dictionary(tiny_run / "dictionaries" / DID)
    h, _ = block_output(llama_subject, ids)
    with torch.no_grad():
        codes = d.encode(h)
    assert got["tokens"] == [llama_subject.tokenizer.decode([int(i)]) for i in ids[0]]
    for u in (3, 5):
        assert got["activations"][str(u)] == pytest.approx(codes[:, u].tolist(), abs=1e-4)
    for t, top in enumerate(got["top"]):  # the top units per token: the k largest non-zero codes, in order
        want = [(int(i), float(v)) for v, i in zip(*codes[t].topk(LIMITS.top)) if v != 0]
        assert [u for u, _ in top] == [u for u, _ in want]
        assert [v for _, v in top] == pytest.approx([v for _, v in want], abs=1e-4)


def test_ablation_changes_next_token_probabilities_as_a_by_hand_edit(server, tiny_run, llama_subject):  # noqa: F811
    url, _ = server
    text = "Assignment statements are used to bind names to values"
    top = httpx.post(url + "/api/activations", json={"text": text, "dictionary": DID, "units": [0]}).json()["top"]
    units = [top[-1][0][0]]  # the unit with the largest code on the last token
    r = httpx.post(url + "/api/ablate", json={"text": text, "dictionary": DID, "units": units}, timeout=60)
    assert r.status_code == 200, r.text
    got = r.json()
    ids = llama_subject.tokenizer(text, return_tensors="pt").input_ids
    d = load_dictionary(tiny_run / "dictionaries" / DID)

    def zero_units(h):  # r' = r - sum over the units of code * decoder row (the error term kept)
        with torch.no_grad():
            c = d.encode(h)
            return h - c[..., units] @ d.W_dec[units]

    _, clean = block_output(llama_subject, ids)
    _, ablated = block_output(llama_subject, ids, zero_units)
    p, q = clean.softmax(-1), ablated.softmax(-1)
    assert got["kl"] == pytest.approx(float((p * (p.log() - q.log())).sum()), rel=1e-3, abs=1e-7)
    assert got["kl"] > 0  # the unit fires on the last token, so zeroing it changes the prediction
    for c in got["changes"]:
        assert c["p_clean"] == pytest.approx(float(p[c["id"]]), abs=1e-6)
        assert c["p_ablated"] == pytest.approx(float(q[c["id"]]), abs=1e-6)
    biggest = (q - p).abs().topk(3).indices.tolist()
    assert [c["id"] for c in got["changes"][:3]] == biggest


def test_steering_returns_the_generations_of_causal_steer(server, tiny_run, llama_subject):  # noqa: F811
    from unitscope.causal.steer import steer

    url, _ = server
    body = {"prompt": "The for statement", "dictionary": DID, "unit": 5, "alpha": 3000.0, "max_new_tokens": 6}
    r = httpx.post(url + "/api/steer", json=body, timeout=120)
    assert r.status_code == 200, r.text
    got = r.json()
    want = steer(llama_subject, "The for statement", dictionary=load_dictionary(tiny_run / "dictionaries" / DID),
                 unit=5, alpha=3000.0, n=1, max_new_tokens=6, seed=0)
    assert (got["baseline"], got["steered"], got["alpha"]) == (want["baseline"], want["steered"], 3000.0)
    # the tiny random model's next-token distribution moves little (seeded samples may even coincide), but it moves
    assert got["kl"] == pytest.approx(want["kl"]) and got["kl"] > 0


def test_refusals_each_have_their_sentence(server):
    url, _ = server
    r = httpx.post(url + "/api/steer", json={"prompt": "The for", "dictionary": DID, "unit": 5, "alpha": 1.0,
                                             "max_new_tokens": LIMITS.new_tokens + 1})
    assert r.status_code == 400 and r.json()["error"] == (
        f"max_new_tokens must be an integer from 1 to {LIMITS.new_tokens}, not {LIMITS.new_tokens + 1}")
    big = json.dumps({"text": "x" * LIMITS.body_bytes, "dictionary": DID, "units": [0]})
    for content in (big.encode(), iter([big[:3000].encode(), big[3000:].encode()])):  # declared, then chunked
        r = httpx.post(url + "/api/activations", content=content, headers={"content-type": "application/json"})
        assert r.status_code == 413
        assert r.json()["error"] == f"the request body is larger than the limit of {LIMITS.body_bytes} bytes"
    r = httpx.post(url + "/api/activations", json={"text": "for " * 200, "dictionary": DID, "units": [0]})
    assert r.status_code == 400 and "the limit is 64" in r.json()["error"]
    r = httpx.post(url + "/api/activations", json={"text": "for", "dictionary": "../../etc", "units": [0]})
    assert r.status_code == 400 and r.json()["error"].startswith("unknown dictionary '../../etc'")
    r = httpx.post(url + "/api/ablate", json={"text": "for", "dictionary": DID, "units": [64]})
    assert r.status_code == 400 and "valid units are 0 to 63" in r.json()["error"]
    r = httpx.post(url + "/api/activations", content=b"{not json")
    assert r.status_code == 400 and r.json()["error"] == "the request body is not JSON"


def raw_get(port: int, target: str) -> tuple[int, bytes]:
    """One GET with the request target sent as written (HTTP clients would normalise `..` away)."""
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(f"GET {target} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n".encode())
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    return int(head.split()[1]), body


def test_only_files_inside_the_report_are_served(server, tiny_run):  # noqa: F811
    _, port = server
    status, body = raw_get(port, "/index.html")
    assert status == 200 and body == (tiny_run / "report" / "index.html").read_bytes()
    status, body = raw_get(port, "/data/topk-64-k4/list.js")
    assert status == 200 and body == (tiny_run / "report" / "data" / "topk-64-k4" / "list.js").read_bytes()
    secret = (tiny_run / "run.json").read_bytes()
    for target in ("/../run.json", "/%2e%2e/run.json", "/data/..%2f..%2frun.json", "/data/%2E%2E/%2e%2e/run.json",
                   "//etc/passwd", "/%2fetc%2fpasswd", "/..%5c..%5crun.json", "/.hidden"):
        status, body = raw_get(port, target)
        assert status == 400, target
        assert b"is not a file of this report" in body and secret not in body and b"root:" not in body
    status, body = raw_get(port, "/etc/passwd")  # a relative name inside the report that is not there
    assert status == 404 and b"root:" not in body


def test_safe_file_refuses_a_link_out_of_the_report(tmp_path):
    site = tmp_path / "report"
    site.mkdir()
    (tmp_path / "secret.txt").write_text("s")
    (site / "ok.js").write_text("x")
    (site / "leak.js").symlink_to(tmp_path / "secret.txt")
    assert safe_file(site, "ok.js") == (site / "ok.js").resolve()
    with pytest.raises(UnitscopeError, match="leads outside the report"):
        safe_file(site, "leak.js")


def test_concurrent_requests_get_their_sequential_answers(server):
    """Hooks live on the one shared model: requests at once must not see each other's hooks (the lock)."""
    url, _ = server
    texts = ["The for statement iterates", "Assignment statements bind names", "The while loop repeats",
             "Exceptions are raised", "Import statements load modules", "A class definition defines"]
    jobs = [("/api/activations", {"text": t, "dictionary": DID, "units": [1, 2, 3]}) for t in texts] + \
           [("/api/ablate", {"text": t, "dictionary": DID, "units": [1, 2, 3, 4]}) for t in texts]
    with httpx.Client(timeout=120) as c:
        alone = [c.post(url + p, json=b).json() for p, b in jobs]
    with ThreadPoolExecutor(len(jobs)) as pool, httpx.Client(timeout=120) as c:
        together = list(pool.map(lambda job: c.post(url + job[0], json=job[1]).json(), jobs * 2))
    assert together == alone + alone


def test_loopback_addresses_are_local_and_others_need_allow_remote():
    from unitscope.serve.app import check_host

    for host in ("127.0.0.1", "127.0.0.2", "::1", "[::1]", "localhost", "LOCALHOST"):
        check_host(host, allow_remote=False)
    for host in ("0.0.0.0", "192.168.1.4", "::", "example.com"):
        with pytest.raises(UnitscopeError, match="--allow-remote"):
            check_host(host, allow_remote=False)
        check_host(host, allow_remote=True)


def test_a_non_local_host_needs_allow_remote(tiny_run):  # noqa: F811
    p = run_cli("serve", tiny_run, "--host", "0.0.0.0", timeout=120)
    assert p.returncode == 2 and "Traceback" not in p.stderr
    assert "--host '0.0.0.0' would let other machines reach the server" in p.stderr and "--allow-remote" in p.stderr


def test_the_runs_own_model_is_loaded_from_its_store(server, tiny_run, tiny_model_dir, tmp_path):  # noqa: F811
    """Without a subject, the server loads the model the store names (here a local directory holding the same
    tiny Llama) on the first request, and answers as the server given the subject does."""
    import shutil

    from starlette.testclient import TestClient

    run = tmp_path / "run"
    shutil.copytree(tiny_run, run, ignore=shutil.ignore_patterns("shards"))
    manifest = json.loads((run / "store" / "store.json").read_text())
    (run / "store" / "store.json").write_text(json.dumps({**manifest, "model_spec": str(tiny_model_dir)}))
    body = {"text": "The for statement iterates", "dictionary": DID, "units": [5]}
    with TestClient(create_app(run, limits=LIMITS)) as client:
        assert client.app.state.backend.subject is None
        got = client.post("/api/activations", json=body)
    assert got.status_code == 200, got.text
    assert got.json() == httpx.post(server[0] + "/api/activations", json=body, timeout=60).json()
