"""Stores and dictionaries on any fsspec file system (s3://, gs://, memory://, ...): whole objects, read locally.

An object store has no rename and no partial object: a PUT lands whole or not at all. So a remote store is
written object by object, shards first and the manifest last (a reader that sees a manifest sees every shard it
lists), and read by downloading each shard once into a local mirror (`remote/` in unitscope's cache
folder, `~/.cache/unitscope/remote/` by default), checked against the manifest's SHA-256 and then memory-mapped
like a local one. A dictionary is written with its cfg.json last and read all from one save (`put_dir`, `get_dir`).
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


# ---- directories of whole objects (dictionaries) ---------------------------------------------------------------
# A dictionary is a few objects of which one (`cfg.json`) says the directory holds one. Written: that object is
# deleted first, objects the new copy lacks next, the other objects put, and it last; so while a save runs the
# URL holds no dictionary (a reader is refused, never handed a mix). Read: it is fetched, then the others, then it
# again: unchanged, every object read belongs with it (a save that overlapped the read deleted it before putting
# anything), else the read starts over.

def put_dir(local: Path, url: str, last: str) -> None:
    """Upload the files of the local folder `local` to `url`, `last` after every other (see above)."""
    fs, root = filesystem(url)
    names = sorted(p.name for p in Path(local).iterdir() if p.is_file())
    if last not in names:
        raise ValueError(f"{last!r} is not in {str(local)!r}")
    if fs.exists(f"{root}/{last}"):
        fs.rm_file(f"{root}/{last}")
    fs.invalidate_cache(root)
    try:
        old = [p.rsplit("/", 1)[-1] for p in fs.ls(root, detail=False)]
    except FileNotFoundError:
        old = []
    for name in sorted(set(old) - set(names)):
        if fs.isfile(f"{root}/{name}"):
            fs.rm_file(f"{root}/{name}")
    for name in [n for n in names if n != last] + [last]:
        fs.put_file(str(Path(local) / name), f"{root}/{name}")


def get_dir(url: str, last: str, into: Path, what: str = "directory", tries: int = 5) -> Path:
    """Download the objects at `url` into the empty local folder `into`, all from the one save that wrote `last`.

    A folder of the caller's (not a shared mirror): two processes reading the same URL never touch each other's
    files."""
    import time

    fs, root = filesystem(url)
    into = Path(into)
    for attempt in range(tries):
        try:
            first = fs.cat_file(f"{root}/{last}")
        except FileNotFoundError:
            raise UnitscopeError(f"{url!r} is not a {what}: it has no {last} (or a save there has not "
                                 "finished)") from None
        for stale in into.iterdir():  # a read that a save overlapped
            stale.unlink()
        try:
            _fetch_all(fs, root, last, first, into)
            return into
        except _Changed:
            time.sleep(0.2 * (attempt + 1))
    raise UnitscopeError(f"{url!r} changed on every one of {tries} reads (a save there is under way); read it "
                         "again when the save has finished")


class _Changed(Exception):
    """The object written last changed while the others were read."""


def _fetch_all(fs, root: str, last: str, first: bytes, tmp: Path) -> None:
    fs.invalidate_cache(root)  # another process may have saved since this one last listed it
    for path in fs.ls(root, detail=False):
        name = path.rsplit("/", 1)[-1]
        if name != last and fs.isfile(path):
            try:
                fs.get_file(path, str(tmp / name))
            except FileNotFoundError:
                pass  # removed by a save that began meanwhile: the check below sees it
    (tmp / last).write_bytes(first)
    try:
        again = fs.cat_file(f"{root}/{last}")
    except FileNotFoundError:
        again = None
    if again != first:
        raise _Changed
