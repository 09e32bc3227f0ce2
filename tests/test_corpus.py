"""Corpus sources, deterministic packing, and bad corpus paths."""

import json

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from unitscope import Corpus, UnitscopeError
from unitscope.corpus import default_documents, training_mask


def test_default_corpus_is_python_documentation_deduplicated():
    docs = default_documents()
    assert len(docs) > 300
    assert len(set(docs)) == len(docs)
    assert any("The \"for\" statement" in d or "for_stmt" in d for d in docs)
    assert sum(len(d) for d in docs) > 1_500_000


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
