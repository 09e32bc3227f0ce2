"""Stores on any fsspec file system (s3://, gs://, memory://, ...): whole objects, a local mirror for reading.

An object store has no rename and no partial object: a PUT lands whole or not at all. So a remote store is
written object by object, shards first and the manifest last (a reader that sees a manifest sees every shard it
lists), and read by downloading each shard once into a local mirror (`remote/` in unitscope's cache
folder, `~/.cache/unitscope/remote/` by default), checked against the manifest's SHA-256 and then memory-mapped
like a local one.
Local paths never come here: they keep the rename-based writes of `atomic.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

from .errors import UnitscopeError


def is_url(path: Any) -> bool:
    """True for `PROTOCOL://...` other than `file://` (a local path stays a Path)."""
    return isinstance(path, str) and "://" in path and not path.startswith("file://")


def filesystem(url: str):
    """(fsspec file system, path inside it) for `url`; a missing backend (s3fs, gcsfs) is named in one sentence."""
    import fsspec

    try:
        fs, path = fsspec.core.url_to_fs(url)
    except ImportError as e:
        proto = url.split("://", 1)[0]
        extra = {"s3": "pip install 'unitscope[s3]'", "gs": "pip install gcsfs", "gcs": "pip install gcsfs"}
        raise UnitscopeError(f"{url!r} needs the {proto} file system: {extra.get(proto, str(e))}") from None
    except ValueError as e:
        raise UnitscopeError(f"{url!r} is not a file system URL fsspec knows ({e})") from None
    return fs, path.rstrip("/")


def read_json(fs, path: str) -> Any:
    """The JSON object at `path`, or None if there is none or it is not JSON."""
    try:
        data = fs.cat_file(path)
    except FileNotFoundError:
        return None
    try:
        return json.loads(data)
    except (json.JSONDecodeError, UnicodeDecodeError):
        return None


def put_json(fs, path: str, obj: Any) -> None:
    """One whole-object write (the object store's PUT is atomic: readers see the old object or the new one)."""
    fs.pipe_file(path, json.dumps(obj, indent=2).encode())


def cache_root() -> Path:
    """`remote/` under unitscope's cache ($UNITSCOPE_CACHE, else $XDG_CACHE_HOME/unitscope, else ~/.cache/unitscope)."""
    if os.environ.get("UNITSCOPE_CACHE"):
        return Path(os.environ["UNITSCOPE_CACHE"]) / "remote"
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "unitscope" / "remote"


def mirror_dir(url: str) -> Path:
    """The local folder that mirrors the remote store at `url` (one per URL)."""
    return cache_root() / hashlib.sha256(url.rstrip("/").encode()).hexdigest()[:24]


def fetch(fs, rpath: str, local: Path, sha256: str) -> Path:
    """Download `rpath` to `local` unless the copy there is the one with `sha256`; checked before it is used."""
    stamp = local.with_name(f".{local.name}.sha256")
    if local.is_file() and stamp.is_file() and stamp.read_text() == sha256:
        return local
    local.parent.mkdir(parents=True, exist_ok=True)
    tmp = local.with_name(f".{local.name}.{os.getpid()}.part")
    h = hashlib.sha256()
    try:
        with fs.open(rpath, "rb") as src, open(tmp, "wb") as dst:
            for chunk in iter(lambda: src.read(1 << 22), b""):
                h.update(chunk)
                dst.write(chunk)
    except FileNotFoundError:
        tmp.unlink(missing_ok=True)
        raise UnitscopeError(f"store shard {rpath!r} is missing from the object store") from None
    if h.hexdigest() != sha256:
        tmp.unlink(missing_ok=True)
        raise UnitscopeError(f"store shard {rpath!r} is corrupt: its checksum does not match the manifest; "
                             "re-record the store")
    os.replace(tmp, local)
    stamp.write_text(sha256)
    return local


def object_sha256(fs, path: str) -> str:
    h = hashlib.sha256()
    with fs.open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()
