"""Every file unitscope writes is replaced so that a kill at any moment leaves the old copy or the new one.

A JSON file (`write_json_atomic`) is written beside its target, fsynced and renamed over it. A directory
(`replace_dir`: a dictionary, the explanation tables, the report) is written into a temporary directory
beside the target, fsynced, and swapped in: on Linux by one `renameat2(RENAME_EXCHANGE)` (atomic: the
target always names a complete copy); elsewhere by two renames through `.NAME.old`, which `recover` (run
before every read and write of the target) puts back if a kill fell between them. So a reader never sees
a new `units.parquet` beside an old `examples.parquet`, or new weights beside an old cfg.json.
"""

from __future__ import annotations

import ctypes
import errno
import json
import os
import shutil
import sys
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from .errors import UnitscopeError

_AT_FDCWD = -100
_RENAME_EXCHANGE = 2


def _fsync_path(path: Path, directory: bool = False) -> None:
    try:
        fd = os.open(path, os.O_RDONLY | (getattr(os, "O_DIRECTORY", 0) if directory else 0))
    except OSError:
        return  # directories cannot be opened on some platforms
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def fsync(path: str | Path) -> None:
    """Flush a file, or a directory's entries (the renames made in it), to disk."""
    path = Path(path)
    _fsync_path(path, directory=path.is_dir())


def write_json_atomic(path: str | Path, obj: Any) -> None:
    """Write JSON so that a kill at any moment leaves the old file or the new one, never neither."""
    path = Path(path)
    if path.is_dir():
        raise UnitscopeError(f"{str(path)!r} is a directory; give a file name for the JSON output")
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "w") as f:
        json.dump(obj, f, indent=2)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_path(path.parent, directory=True)


def _fsync_tree(root: Path) -> None:
    for dirpath, _dirs, files in os.walk(root):
        for f in files:
            _fsync_path(Path(dirpath) / f)
        _fsync_path(Path(dirpath), directory=True)


def _exchange(a: Path, b: Path) -> bool:
    """Atomically swap two existing paths; False where the platform or file system cannot."""
    if not sys.platform.startswith("linux"):
        return False
    try:
        fn = ctypes.CDLL(None, use_errno=True).renameat2
    except (OSError, AttributeError):
        return False
    fn.argtypes = [ctypes.c_int, ctypes.c_char_p, ctypes.c_int, ctypes.c_char_p, ctypes.c_uint]
    fn.restype = ctypes.c_int
    if fn(_AT_FDCWD, os.fsencode(str(a)), _AT_FDCWD, os.fsencode(str(b)), _RENAME_EXCHANGE) == 0:
        return True
    err = ctypes.get_errno()
    if err in (errno.ENOSYS, errno.EINVAL, errno.EOPNOTSUPP, getattr(errno, "ENOTSUP", errno.EOPNOTSUPP)):
        return False
    raise OSError(err, os.strerror(err), str(b))


def _old(path: Path) -> Path:
    return path.with_name(f".{path.name}.old")


def recover(path: str | Path) -> Path:
    """Finish or undo a swap that a kill interrupted; returns `path` (absolute)."""
    path = Path(path).absolute()
    old = _old(path)
    if old.exists():
        if path.exists():
            shutil.rmtree(old, ignore_errors=True)  # the new copy is in place; the old one was being removed
        else:
            os.replace(old, path)  # killed between the two renames: the old copy comes back
            _fsync_path(path.parent, directory=True)
    return path


def _check_target(path: Path, allowed: set[str] | None) -> None:
    if path.exists() and not path.is_dir():
        raise UnitscopeError(f"{str(path)!r} is an existing file; give a directory for this output")
    if path.is_dir() and allowed is not None:
        foreign = sorted(p.name for p in path.iterdir() if p.name not in allowed)
        if foreign:
            raise UnitscopeError(f"{str(path)!r} already holds other files ({', '.join(foreign[:3])}); "
                                 f"give a new or empty directory, since this output replaces the whole directory")


@contextmanager
def replace_dir(path: str | Path, allowed: set[str] | None = None) -> Iterator[Path]:
    """Yield an empty temporary directory; on success its contents replace `path` in one step.

    `allowed` names the entries this output may contain: a target holding anything else is refused in
    one sentence rather than swapped away (None: the target is the output's own, e.g. a dictionary). On an
    exception the temporary directory is removed and the old copy stays untouched.
    """
    path = recover(path)
    _check_target(path, allowed)
    path.parent.mkdir(parents=True, exist_ok=True)
    for stale in path.parent.glob(f".{path.name}.tmp-*"):  # left by a killed earlier write
        shutil.rmtree(stale, ignore_errors=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()  # not mkdtemp: the result keeps the umask's permissions, not 0700
    try:
        yield tmp
        _fsync_tree(tmp)
        if not path.exists():
            os.replace(tmp, path)
        elif _exchange(tmp, path):
            shutil.rmtree(tmp)  # tmp now holds the old copy
        else:
            old = _old(path)
            os.replace(path, old)
            try:
                os.replace(tmp, path)
            except BaseException:
                if not path.exists():  # a failure (not a kill) here puts the old copy straight back
                    os.replace(old, path)
                raise
            _fsync_path(path.parent, directory=True)
            shutil.rmtree(old)
        _fsync_path(path.parent, directory=True)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
