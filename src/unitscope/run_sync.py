"""A run kept on an object store (`unitscope run --out s3://bucket/run`): what is made where, and the upload.

The store is recorded straight to URL/store (whole shard objects, the manifest after them; see fs.py) and read
from there. Everything else is made in a local scratch folder (`remote/runs/` in unitscope's cache), where every
stage reads and replaces its own files exactly as in a local run, and is uploaded after each stage: each
dictionary as a versioned save at URL/dictionaries/ID (so `--dictionary URL/dictionaries/ID` loads it, and a kill
leaves the old or the new one), the other files (evals/, explain/, compare.*, report/) as plain objects, and
run.json last, so the run.json on the object store names only stages whose files are all uploaded. What has been
uploaded is recorded in the scratch folder; a rerun uploads what an interrupted upload missed, and on a machine
without the scratch folder it first downloads the run (all but the store).
"""

from __future__ import annotations

import hashlib
import json
import shutil
import tempfile
from pathlib import Path

from . import fs as rfs
from .atomic import write_json_atomic
from .fs import file_sha256, filesystem, get_dictionary_dir, put_versioned

UPLOADED = ".uploaded.json"


def scratch_dir(url: str) -> Path:
    """The local folder where the run kept at `url` is made (one per URL)."""
    return rfs.cache_root() / "runs" / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24]


class RemoteRun:
    """The scratch folder of the run kept at `url`, pulled from and pushed to it."""

    def __init__(self, url: str):
        self.url = url.rstrip("/")
        self.fs, self.rpath = filesystem(self.url)
        self.scratch = scratch_dir(self.url)
        self.store_url = f"{self.url}/store"

    def _record(self) -> dict[str, str]:
        try:
            return json.loads((self.scratch / UPLOADED).read_text())
        except (FileNotFoundError, json.JSONDecodeError):
            return {}

    def pull(self) -> bool:
        """Download the run at the URL (all but its store) if this machine has no scratch copy; returns whether
        it did. run.json comes last: a pull cut short leaves none, and the next run pulls again."""
        if (self.scratch / "run.json").is_file() or not self.fs.exists(f"{self.rpath}/run.json"):
            return False
        self.scratch.mkdir(parents=True, exist_ok=True)
        record = {}
        self.fs.invalidate_cache()
        for path in self.fs.find(self.rpath):
            rel = path[len(self.rpath) + 1:]
            if rel == "run.json" or rel.split("/", 1)[0] in ("store", "dictionaries"):
                continue
            local = self.scratch / rel
            local.parent.mkdir(parents=True, exist_ok=True)
            self.fs.get_file(path, str(local))
            record[rel] = file_sha256(local)
        try:
            ids = [p.rsplit("/", 1)[-1] for p in self.fs.ls(f"{self.rpath}/dictionaries", detail=False)]
        except FileNotFoundError:
            ids = []
        for did in ids:
            with tempfile.TemporaryDirectory(dir=self.scratch) as tmp:
                get_dictionary_dir(f"{self.url}/dictionaries/{did}", Path(tmp))
                dest = self.scratch / "dictionaries" / did
                shutil.rmtree(dest, ignore_errors=True)
                dest.parent.mkdir(parents=True, exist_ok=True)
                shutil.copytree(tmp, dest)
            record[f"dictionaries/{did}/"] = _dir_sha256(dest)
        write_json_atomic(self.scratch / UPLOADED, record)
        self.fs.get_file(f"{self.rpath}/run.json", str(self.scratch / "run.json"))
        return True

    def push(self) -> int:
        """Upload what changed in the scratch folder since the last upload, then run.json; returns how many
        dictionaries and files went up. Hidden paths (checkpoints, half-written folders) stay local."""
        record, sent = self._record(), 0
        for path in sorted(self.scratch.rglob("*")):
            rel = path.relative_to(self.scratch)
            if any(part.startswith(".") for part in rel.parts) or str(rel) == "run.json":
                continue
            if rel.parts[0] == "dictionaries" and len(rel.parts) == 2 and path.is_dir():
                key, digest = f"{rel.as_posix()}/", _dir_sha256(path)
                if record.get(key) != digest:
                    put_versioned(path, f"{self.url}/{rel.as_posix()}")
                    sent += 1
            elif path.is_file() and rel.parts[0] != "dictionaries":
                key, digest = rel.as_posix(), file_sha256(path)
                if record.get(key) != digest:
                    self.fs.put_file(str(path), f"{self.rpath}/{key}")
                    sent += 1
            else:
                continue
            record[key] = digest
            write_json_atomic(self.scratch / UPLOADED, record)
        if (self.scratch / "run.json").is_file():
            self.fs.put_file(str(self.scratch / "run.json"), f"{self.rpath}/run.json")
        return sent


def _dir_sha256(folder: Path) -> str:
    """One digest of a flat folder's files, names and contents."""
    h = hashlib.sha256()
    for f in sorted(p for p in folder.iterdir() if p.is_file()):
        h.update(f.name.encode() + b"\0" + file_sha256(f).encode())
    return h.hexdigest()
