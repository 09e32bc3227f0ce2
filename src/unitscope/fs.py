"""Stores and dictionaries on any fsspec file system (s3://, gs://, memory://, ...): whole objects, read locally.

An object store has no rename and no partial object: a PUT lands whole or not at all. So a remote store is
written object by object, shards first and the manifest last (a reader that sees a manifest sees every shard it
lists), and read by downloading each shard once into a local mirror (`remote/` in unitscope's cache
folder, `~/.cache/unitscope/remote/` by default), checked against the manifest's SHA-256 and then memory-mapped
like a local one. A dictionary is saved as a new version behind a one-object pointer (`put_versioned`) and read
from the version the pointer names (`get_dictionary_dir`).
Local paths never come here: they keep the rename-based writes of `atomic.py`.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import secrets
import time
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


# ---- dictionaries: versioned saves behind one pointer -------------------------------------------------------
# An object store has no rename, so a save cannot swap a folder. Each save uploads its files under a fresh
# `URL/.versions/ID/` and then replaces one small object, `URL/current.json`, that names the version and the
# SHA-256 of each of its files: one PUT, which S3 applies whole, so a reader sees the old pointer or the new one,
# and the version either names is complete (it was uploaded before the pointer moved). A kill at any moment leaves
# the old dictionary or the new one, never neither. After the pointer moves, the version it replaced (and any left
# by saves killed over a day ago) is deleted, best effort: a leftover is harmless. A reader follows the pointer,
# checks every file against it, and reads again if a save moved the pointer meanwhile (its old version deleted
# under it). A URL without a pointer holds plain files (the SAELens layout written by another tool, or an older
# unitscope save): read as before, `cfg.json` first and last.

POINTER = "current.json"
VERSIONS = ".versions"
KEEP_ORPHANS_S = 24 * 3600  # a version no pointer names, younger than this, may be a concurrent save's upload
_VERSION_ID = re.compile(r"[0-9]{20}-[0-9a-f]{8}")
_FILE_NAME = re.compile(r"[A-Za-z0-9_][A-Za-z0-9_.-]{0,127}")


def put_versioned(local: Path, url: str) -> str:
    """Upload the files of the local folder `local` as a new version of the dictionary at `url` and point `url`
    at it (see above); returns the version's ID."""
    fs, root = filesystem(url)
    names = sorted(p.name for p in Path(local).iterdir() if p.is_file())
    vid = f"{time.time_ns():020d}-{secrets.token_hex(4)}"
    files = {}
    for name in names:
        files[name] = {"sha256": file_sha256(Path(local) / name)}
        fs.put_file(str(Path(local) / name), f"{root}/{VERSIONS}/{vid}/{name}")
        _pause_for_tests()
    before = _pointer_version(fs, root)
    put_json(fs, f"{root}/{POINTER}", {"format": "unitscope-versioned-directory", "version": vid, "files": files})
    _pause_for_tests()
    try:
        _drop_replaced(fs, root, vid, before)
    except Exception:  # noqa: BLE001 - best effort: the new dictionary is in place; a leftover is harmless
        pass
    return vid


def _pause_for_tests() -> None:
    """$UNITSCOPE_TEST_SAVE_PAUSE seconds between the objects of a save, so a test can kill it between any two."""
    pause = os.environ.get("UNITSCOPE_TEST_SAVE_PAUSE")
    if pause:
        time.sleep(float(pause))


def file_sha256(path: Path) -> str:
    """The SHA-256 of a local file, read in 4 MiB pieces."""
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


def _pointer_version(fs, root: str) -> str | None:
    ptr = read_json(fs, f"{root}/{POINTER}")
    return ptr.get("version") if isinstance(ptr, dict) and isinstance(ptr.get("version"), str) else None


def _drop_replaced(fs, root: str, keep: str, replaced: str | None) -> None:
    """Delete the version the pointer named before, versions of killed saves over a day old, and the plain files
    of an older plain save at the root (the pointer now decides what the URL holds)."""
    fs.invalidate_cache(f"{root}/{VERSIONS}")  # it and its parents: this process may have listed them before
    now = time.time_ns()
    try:
        versions = [p.rsplit("/", 1)[-1] for p in fs.ls(f"{root}/{VERSIONS}", detail=False)]
    except FileNotFoundError:
        versions = []
    for v in versions:
        if v == keep or not _VERSION_ID.fullmatch(v):
            continue
        if v == replaced or (int(v[:20]) < int(keep[:20]) and now - int(v[:20]) > KEEP_ORPHANS_S * 1e9):
            fs.rm(f"{root}/{VERSIONS}/{v}", recursive=True)
    for path in fs.ls(root, detail=False):
        name = path.rsplit("/", 1)[-1]
        if name in ("cfg.json", "sae_weights.safetensors", "train.json", "sae.safetensors") and fs.isfile(path):
            fs.rm_file(path)


def get_dictionary_dir(url: str, into: Path, tries: int = 5) -> Path:
    """Download the dictionary at `url` into the empty local folder `into`: the version `current.json` names,
    each file checked against it, or, with no pointer, the plain files of one save (`cfg.json` read first and
    last). A folder of the caller's: two processes reading the same URL never touch each other's files."""
    fs, root = filesystem(url)
    into = Path(into)
    for attempt in range(tries):
        for stale in into.iterdir():  # a read that a save overlapped
            stale.unlink()
        try:
            raw = fs.cat_file(f"{root}/{POINTER}")
        except FileNotFoundError:
            raw = None
        try:
            if raw is None:
                _get_plain(fs, root, url, into)
            else:
                _get_version(fs, root, url, raw, into)
            return into
        except _Changed:
            time.sleep(0.2 * (attempt + 1))
    raise UnitscopeError(f"{url!r} changed on every one of {tries} reads (saves there are under way); read it "
                         "again when they have finished")


def read_saved_json(url: str, name: str) -> Any:
    """The JSON file `name` of the dictionary saved at `url` (e.g. train.json), or None if it has none."""
    import tempfile

    with tempfile.TemporaryDirectory(prefix="unitscope-dictionary-") as tmp:
        get_dictionary_dir(url, Path(tmp))
        path = Path(tmp) / name
        return json.loads(path.read_text()) if path.is_file() else None


def _parse_pointer(raw: bytes, where: str) -> tuple[str, dict[str, str]]:
    """(version ID, {file name: SHA-256}) from a pointer's bytes; anything else is one sentence."""
    try:
        ptr = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        ptr = None
    files = ptr.get("files") if isinstance(ptr, dict) else None
    vid = ptr.get("version") if isinstance(ptr, dict) else None
    ok = (isinstance(vid, str) and _VERSION_ID.fullmatch(vid) and isinstance(files, dict) and files
          and all(isinstance(n, str) and _FILE_NAME.fullmatch(n) and isinstance(m, dict)
                  and isinstance(m.get("sha256"), str) and re.fullmatch(r"[0-9a-f]{64}", m["sha256"])
                  for n, m in files.items()))
    if not ok:
        raise UnitscopeError(f"{where!r} is corrupt: it is not the pointer a unitscope save writes (a version ID "
                             "and the SHA-256 of each file); save the dictionary there again")
    return vid, {n: m["sha256"] for n, m in files.items()}


def _get_version(fs, root: str, url: str, raw: bytes, into: Path) -> None:
    where = f"{url.rstrip('/')}/{POINTER}"
    vid, files = _parse_pointer(raw, where)
    for name, sha in files.items():
        try:
            fs.get_file(f"{root}/{VERSIONS}/{vid}/{name}", str(into / name))
            problem = None if file_sha256(into / name) == sha else "does not match its SHA-256 there"
        except FileNotFoundError:
            problem = "is missing"
        if problem:
            try:
                now = fs.cat_file(f"{root}/{POINTER}")
            except FileNotFoundError:
                now = None
            if now != raw:
                raise _Changed  # a save moved the pointer and dropped this version: read the new one
            raise UnitscopeError(f"{where!r} names version {vid}, whose file {name!r} {problem}; the "
                                 "dictionary there is damaged: save it again")


def _get_plain(fs, root: str, url: str, into: Path) -> None:
    try:
        first = fs.cat_file(f"{root}/cfg.json")
    except FileNotFoundError:
        raise UnitscopeError(f"{url!r} is not a dictionary directory: it has no cfg.json and no "
                             f"{POINTER}") from None
    fs.invalidate_cache(root)  # another process may have saved since this one last listed it
    for path in fs.ls(root, detail=False):
        name = path.rsplit("/", 1)[-1]
        if name != "cfg.json" and fs.isfile(path):
            try:
                fs.get_file(path, str(into / name))
            except FileNotFoundError:
                pass  # removed by a save that began meanwhile: the check below sees it
    (into / "cfg.json").write_bytes(first)
    try:
        again = fs.cat_file(f"{root}/cfg.json")
    except FileNotFoundError:
        again = None
    if again != first or fs.exists(f"{root}/{POINTER}"):
        raise _Changed  # a save overlapped the read: read again (the pointer, if one appeared)


class _Changed(Exception):
    """A save changed the URL while its files were read."""
