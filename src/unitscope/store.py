"""Sharded on-disk activation store; memory-mapped, shuffled batch reader.

Layout (DESIGN.md): `store.json` (model, sites and widths, dtype, tokens, context length, corpus
provenance, complete shards with token counts and checksums) and `shards/NNNNNN.safetensors`, each
holding `tokens`, `doc`, `pos` (int32 [n]) and `acts.<site>` [n, d]. A shard is written to a temporary
name and renamed when complete; the manifest is rewritten atomically after it, so a killed writer leaves
at worst an orphan shard that the next writer replaces. A store may also live on any fsspec file system
(`s3://bucket/store`): each shard and the manifest are one whole-object write, the manifest last, and shards
are read from a verified local mirror (see fs.py). Under torchrun each rank writes its own shards
(`write_shard`) and rank 0 lists them (`add_shards`).
"""

from __future__ import annotations

import hashlib
import json
import os
import struct
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import save, save_file
from tqdm.auto import tqdm

from . import fs as rfs
from .atomic import write_json_atomic
from .errors import UnitscopeError
from .fs import file_sha256

FORMAT = "unitscope.store/1"
# safetensors dtype names -> (numpy storage dtype, torch dtype)
_ST_DTYPES = {
    "F32": (np.float32, torch.float32), "F16": (np.float16, torch.float16),
    "BF16": (np.uint16, torch.bfloat16), "I32": (np.int32, torch.int32), "I64": (np.int64, torch.int64),
}
IDENTITY_KEYS = ("model", "model_fingerprint", "sites", "dtype", "ctx_len", "corpus")


def _count(v: Any, least: int = 0) -> bool:
    return isinstance(v, int) and not isinstance(v, bool) and v >= least


def _valid_manifest(m: Any) -> bool:
    """Every field the readers use, checked by type and range (never with `assert`, which `python -O` removes)."""
    if not isinstance(m, dict) or m.get("format") != FORMAT or not isinstance(m.get("shards"), list):
        return False
    if not (isinstance(m.get("model"), str) and isinstance(m.get("dtype"), str) and _count(m.get("ctx_len"), 2)
            and _count(m.get("tokens"))):
        return False
    corpus = m.get("corpus")
    if not (isinstance(corpus, dict) and isinstance(corpus.get("spec"), str) and isinstance(corpus.get("field"), str)
            and _count(corpus.get("seed"))):
        return False
    if not isinstance(m.get("sites"), dict) or not m["sites"]:
        return False
    for site in m["sites"].values():
        if not isinstance(site, dict) or not _count(site.get("width"), 1):
            return False
    for e in m["shards"]:
        if not (isinstance(e, dict) and isinstance(e.get("file"), str) and _count(e.get("tokens"), 1)
                and _count(e.get("windows"), 1) and isinstance(e.get("sha256"), str)):
            return False
        if not e["file"].startswith("shards/") or "/" in e["file"][7:] or ".." in e["file"]:
            return False  # a manifest never points outside its own shards/ folder
        if e["windows"] * m["ctx_len"] < e["tokens"]:
            return False
    return m["tokens"] == sum(e["tokens"] for e in m["shards"])


def shard_name(i: int) -> str:
    return f"shards/{i:06d}.safetensors"


def _valid_entry(info: Any) -> bool:
    """One safetensors header entry a reader can trust: a known dtype, a shape, offsets that span exactly it."""
    if not isinstance(info, dict) or info.get("dtype") not in _ST_DTYPES:
        return False
    shape, offsets = info.get("shape"), info.get("data_offsets")
    if not (isinstance(shape, list) and all(_count(v) for v in shape)):
        return False
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(_count(v) for v in offsets)):
        return False
    itemsize = np.dtype(_ST_DTYPES[info["dtype"]][0]).itemsize
    return offsets[1] - offsets[0] == int(np.prod(shape, dtype=object)) * itemsize


def part_bounds(n: int, rank: int, world: int) -> tuple[int, int]:
    """Rows [lo, hi) of a batch of `n` that rank `rank` of `world` takes (the first n % world ranks one more)."""
    per, extra = divmod(n, world)
    lo = rank * per + min(rank, extra)
    return lo, lo + per + (rank < extra)


class Shard:
    """One shard, memory-mapped: tensors are views on the file, read from disk only when touched."""

    def __init__(self, path: Path, expected_bytes: int | None = None):
        self.path = path
        if not path.is_file():
            raise UnitscopeError(f"store shard {path.name} is missing from {str(path.parent.parent)!r}")
        size = path.stat().st_size
        if expected_bytes is not None and size != expected_bytes:
            raise UnitscopeError(
                f"store shard {path.name} is truncated or corrupt ({size} bytes, manifest says {expected_bytes})"
            )
        try:
            with open(path, "rb") as f:
                (n,) = struct.unpack("<Q", f.read(8))
                header = json.loads(f.read(n))
        except (struct.error, json.JSONDecodeError, UnicodeDecodeError, OverflowError, MemoryError):
            raise UnitscopeError(f"store shard {path.name} is corrupt: its safetensors header cannot be read") from None
        if not isinstance(header, dict) or not all(_valid_entry(v) for k, v in header.items() if k != "__metadata__"):
            raise UnitscopeError(f"store shard {path.name} is corrupt: its safetensors header does not describe "
                                 "arrays (dtype, shape and byte offsets that agree)")
        self._offset = 8 + n
        self._header = {k: v for k, v in header.items() if k != "__metadata__"}
        self._mm = np.memmap(path, dtype=np.uint8, mode="r")

    def keys(self) -> list[str]:
        return list(self._header)

    def get(self, key: str) -> torch.Tensor:
        if key not in self._header:
            raise UnitscopeError(f"store shard {self.path.name} has no array {key!r}")
        info = self._header[key]
        np_dt, t_dt = _ST_DTYPES[info["dtype"]]
        lo, hi = info["data_offsets"]
        if self._offset + hi > len(self._mm):
            raise UnitscopeError(f"store shard {self.path.name} is truncated: array {key!r} runs past its end")
        arr = self._mm[self._offset + lo:self._offset + hi].view(np_dt).reshape(info["shape"])
        with warnings.catch_warnings():  # a read-only view: torch warns, and we never write to it
            warnings.simplefilter("ignore", UserWarning)
            t = torch.from_numpy(arr)
        return t.view(t_dt) if t_dt == torch.bfloat16 else t


class Store:
    """An activation store on disk. `Store.open(dir)` for reading, `Store.create(...)` for writing."""

    def __init__(self, root: Path, manifest: dict[str, Any], url: str | None = None):
        self.root, self.manifest = root, manifest
        self._shards: dict[int, Shard] = {}
        # a remote store: `url` names it, `root` is its local mirror (shards are fetched there when first read)
        self.url = url
        self._fs, self._rpath = rfs.filesystem(url) if url else (None, None)

    @property
    def location(self) -> str:
        """Where the store is, as the user named it (a path or a URL)."""
        return self.url or str(self.root)

    def _write_manifest(self) -> None:
        if self.url:
            rfs.put_json(self._fs, f"{self._rpath}/store.json", self.manifest)
        else:
            write_json_atomic(self.root / "store.json", self.manifest)

    # ---- opening and creating -------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> Store:
        if rfs.is_url(root):
            return cls._open_remote(str(root))
        root = Path(root)
        mpath = root / "store.json"
        if not mpath.is_file():
            raise UnitscopeError(f"{str(root)!r} is not an activation store: it has no store.json")
        try:
            manifest = json.loads(mpath.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError):
            manifest = None
        if not _valid_manifest(manifest):
            raise UnitscopeError(f"the manifest {str(mpath)!r} is corrupt; re-record the store")
        return cls(root, manifest)

    @classmethod
    def _open_remote(cls, url: str) -> Store:
        fs, rpath = rfs.filesystem(url)
        manifest = rfs.read_json(fs, f"{rpath}/store.json")
        if manifest is None and not fs.exists(f"{rpath}/store.json"):
            raise UnitscopeError(f"{url!r} is not an activation store: it has no store.json")
        if not _valid_manifest(manifest):
            raise UnitscopeError(f"the manifest {url.rstrip('/') + '/store.json'!r} is corrupt; re-record the store")
        return cls(rfs.mirror_dir(url), manifest, url=url)

    @classmethod
    def create(cls, root: str | Path, identity: dict[str, Any], overwrite: bool = False) -> Store:
        """Open `root` for appending if it holds a store with the same identity, else start a new one."""
        if rfs.is_url(root):
            return cls._create_remote(str(root), identity, overwrite)
        root = Path(root)
        if (root / "store.json").exists() and not overwrite:
            store = cls.open(root)
            store._check_identity(identity)
            store._drop_orphans()
            return store
        if root.exists() and not root.is_dir():
            raise UnitscopeError(f"{str(root)!r} is a file, not a directory; choose a directory for the store")
        if root.exists() and any(root.iterdir()) and not (root / "store.json").exists() and not overwrite:
            raise UnitscopeError(f"{str(root)!r} is not empty and holds no store; choose an empty or new directory")
        (root / "shards").mkdir(parents=True, exist_ok=True)
        store = cls(root, {"format": FORMAT, **identity, "tokens": 0, "shards": []})
        # the new (empty) manifest goes in first: from then on the old shards are orphans, dropped here or by the
        # next writer, so a kill at any moment leaves either the old store or the new one
        write_json_atomic(root / "store.json", store.manifest)
        if overwrite:
            store._drop_orphans()
        return store

    @classmethod
    def _create_remote(cls, url: str, identity: dict[str, Any], overwrite: bool) -> Store:
        fs, rpath = rfs.filesystem(url)
        if fs.exists(f"{rpath}/store.json") and not overwrite:
            store = cls._open_remote(url)
            store._check_identity(identity)
            store._drop_orphans()
            return store
        if fs.isfile(rpath):
            raise UnitscopeError(f"{url!r} is an object, not a folder; choose a folder URL for the store")
        if not fs.exists(f"{rpath}/store.json") and fs.exists(rpath) and fs.ls(rpath) and not overwrite:
            raise UnitscopeError(f"{url!r} is not empty and holds no store; choose an empty or new folder")
        store = cls(rfs.mirror_dir(url), {"format": FORMAT, **identity, "tokens": 0, "shards": []}, url=url)
        store._write_manifest()  # the empty manifest first: every shard object there is an orphan from now on
        store._drop_orphans()
        return store

    def _check_identity(self, identity: dict[str, Any]) -> None:
        for key in IDENTITY_KEYS:
            if key == "model_fingerprint" and key not in self.manifest:
                continue  # stores recorded before fingerprints: the model name is compared instead
            if self.manifest.get(key) != identity.get(key):
                raise UnitscopeError(
                    f"{self.location!r} holds a store recorded with a different {key} "
                    f"({self.manifest.get(key)!r}, not {identity.get(key)!r}); choose another --out "
                    "or pass --overwrite"
                )

    def _drop_orphans(self) -> None:
        listed = {s["file"] for s in self.manifest["shards"]}
        if self.url:
            shards = f"{self._rpath}/shards"
            for p in (self._fs.ls(shards, detail=False) if self._fs.exists(shards) else []):
                if f"shards/{p.rstrip('/').rsplit('/', 1)[-1]}" not in listed:
                    self._fs.rm(p, recursive=True)
            return
        for p in (self.root / "shards").glob("*"):
            if f"shards/{p.name}" not in listed:
                p.unlink()

    # ---- writing ----------------------------------------------------------------------------------
    def append_shard(self, tokens: np.ndarray, doc: np.ndarray, pos: np.ndarray,
                     acts: dict[str, torch.Tensor], windows: int) -> None:
        self.add_shards([self.write_shard(len(self.manifest["shards"]), tokens, doc, pos, acts, windows)])

    def write_shard(self, i: int, tokens: np.ndarray, doc: np.ndarray, pos: np.ndarray,
                    acts: dict[str, torch.Tensor], windows: int) -> dict[str, Any]:
        """Write shard number `i` whole (not yet listed: `add_shards` does that); returns its manifest entry."""
        rel = shard_name(i)
        tensors = {
            "tokens": torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int32)),
            "doc": torch.from_numpy(np.ascontiguousarray(doc, dtype=np.int32)),
            "pos": torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int32)),
            **{f"acts.{k}": v.contiguous() for k, v in acts.items()},
        }
        if self.url:  # one PUT: the object appears whole or not at all
            data = save(tensors)
            self._fs.pipe_file(f"{self._rpath}/{rel}", data)
            return {"file": rel, "tokens": int(len(tokens)), "windows": windows, "bytes": len(data),
                    "sha256": hashlib.sha256(data).hexdigest()}
        final = self.root / rel
        tmp = final.with_name(f".{final.name}.tmp")
        save_file(tensors, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        return {"file": rel, "tokens": int(len(tokens)), "windows": windows,
                "bytes": final.stat().st_size, "sha256": file_sha256(final)}

    def add_shards(self, entries: list[dict[str, Any]], write: bool = True) -> None:
        """List written shards (in order, after the ones listed) in the manifest, rewritten whole (`write=False`:
        in memory only, as the ranks other than the manifest's writer keep it)."""
        self.manifest["shards"].extend(entries)
        self.manifest["tokens"] = int(sum(s["tokens"] for s in self.manifest["shards"]))
        if write:
            self._write_manifest()

    def finish(self, **fields: Any) -> None:
        self.manifest.update(fields)
        self._write_manifest()

    # ---- reading ----------------------------------------------------------------------------------
    @property
    def sites(self) -> list[str]:
        return list(self.manifest["sites"])

    def width(self, site: str) -> int:
        if site not in self.manifest["sites"]:
            raise UnitscopeError(f"the store has no site {site!r}; it holds {', '.join(self.sites)}")
        return int(self.manifest["sites"][site]["width"])

    @property
    def n_tokens(self) -> int:
        return int(self.manifest["tokens"])

    @property
    def n_windows(self) -> int:
        return int(sum(s["windows"] for s in self.manifest["shards"]))

    @property
    def n_shards(self) -> int:
        return len(self.manifest["shards"])

    def shard(self, i: int) -> Shard:
        if i not in self._shards:
            entry = self.manifest["shards"][i]
            if self.url:  # fetched once into the mirror, checked against the manifest's SHA-256
                rfs.fetch(self._fs, f"{self._rpath}/{entry['file']}", self.root / entry["file"], entry["sha256"])
            self._shards[i] = Shard(self.root / entry["file"], entry.get("bytes"))
        return self._shards[i]

    def verify(self, progress: bool = False) -> int:
        """Check every shard's size and SHA-256 against the manifest; raise naming the first bad one.

        Returns the number of bytes checked."""
        checked = 0
        shards = self.manifest["shards"]
        for i, entry in enumerate(tqdm(shards, unit="shard", desc="verify", disable=not progress)):
            if self.url:  # the objects themselves, not the mirror
                if not self._fs.exists(f"{self._rpath}/{entry['file']}"):
                    raise UnitscopeError(f"store shard {Path(entry['file']).name} is missing from {self.url!r}")
                sha = rfs.object_sha256(self._fs, f"{self._rpath}/{entry['file']}")
            else:
                self.shard(i)
                sha = file_sha256(self.root / entry["file"])
            if sha != entry["sha256"]:
                raise UnitscopeError(f"store shard {Path(entry['file']).name} is corrupt: its checksum does not match "
                                     "the manifest; re-record the store (or record again with --overwrite)")
            checked += int(entry.get("bytes", 0))
        return checked

    def provenance(self) -> dict[str, Any]:
        """What a dictionary trained on this store learned from, for its metadata: the model, the text and how
        much of it (the first `trained_windows` windows of `context_size` tokens), so that later evaluations can
        refuse another model and keep off the training windows."""
        m = self.manifest
        return {"model_name": m["model"], "model_spec": m.get("model_spec"),
                "model_fingerprint": m.get("model_fingerprint"), "context_size": m["ctx_len"],
                "dataset_path": m["corpus"]["spec"], "corpus_fingerprint": m.get("corpus_fingerprint"),
                "trained_windows": self.n_windows, "trained_tokens": self.n_tokens}

    def check_corpus(self, corpus: Any) -> None:
        """Refuse a corpus whose content differs from the one recorded: its windows would not line up, and the
        'held-out' windows after the store could overlap the recorded ones."""
        recorded = self.manifest.get("corpus_fingerprint")
        if recorded is None:
            return
        now = corpus.fingerprint()
        if now != recorded:
            raise UnitscopeError(
                f"corpus {corpus.spec!r} is not the text this store was recorded from (its content changed: "
                f"fingerprint {now}, recorded {recorded}); its windows would not line up with the store's, so "
                "held-out windows could overlap recorded ones; use the original corpus or record a new store")

    def acts(self, site: str, shard: int) -> torch.Tensor:
        self.width(site)
        return self.shard(shard).get(f"acts.{site}")

    def column(self, key: str) -> np.ndarray:
        """A small per-token array (`tokens`, `doc`, `pos`) over the whole store."""
        if not self.n_shards:
            return np.zeros(0, dtype=np.int32)
        return np.concatenate([self.shard(i).get(key).numpy() for i in range(self.n_shards)])

    def batches(self, site: str | list[str], batch_size: int, mask: np.ndarray | None = None, seed: int = 0,
                start_batch: int = 0, epochs: int | None = None, drop_last: bool = True,
                part: tuple[int, int] | None = None) -> Iterator:
        """Shuffled batches of rows of `site` (rows where `mask` holds), deterministic in (seed, epoch).

        Rows are drawn shard-group by shard-group (up to `group` shards at a time), so memory stays
        bounded by a few shards however large the store is; `start_batch` skips ahead without reading
        the skipped data, which is what makes resumed training exact. `part=(rank, world)` reads only that
        rank's contiguous slice of each (sorted) global batch: the slices of all ranks make up the batch.
        """
        sites = [site] if isinstance(site, str) else list(site)
        for _, shard_rows in self.batch_plan(batch_size, mask, seed, start_batch, epochs, drop_last=drop_last,
                                             part=part):
            outs = []
            for name in sites:
                parts = [self.acts(name, s)[torch.from_numpy(rows)] for s, rows in shard_rows]
                out = torch.cat(parts) if len(parts) > 1 else parts[0]
                if not torch.isfinite(out).all():
                    bad = sorted({Path(self.manifest["shards"][s]["file"]).name for s, rows in shard_rows
                                  if not torch.isfinite(self.acts(name, s)[torch.from_numpy(rows)]).all()})
                    raise UnitscopeError(
                        f"non-finite activations (NaN or inf) at site {name!r} in shard(s) {', '.join(bad)}")
                outs.append(out)
            yield outs[0] if isinstance(site, str) else tuple(outs)

    def batch_plan(self, batch_size: int, mask: np.ndarray | None, seed: int, start_batch: int = 0,
                   epochs: int | None = None, group: int = 4, drop_last: bool = True,
                   part: tuple[int, int] | None = None):
        sizes = [s["tokens"] for s in self.manifest["shards"]]
        offsets = np.concatenate([[0], np.cumsum(sizes)])
        valid = np.flatnonzero(mask) if mask is not None else np.arange(offsets[-1])
        if len(valid) < batch_size:
            raise UnitscopeError(f"the store holds {len(valid)} usable tokens, fewer than one batch of {batch_size}")
        per_epoch = len(valid) // batch_size if drop_last else -(-len(valid) // batch_size)
        epoch = start_batch // per_epoch
        skip = start_batch % per_epoch
        batch_idx = start_batch
        while epochs is None or epoch < epochs:
            rng = np.random.default_rng([seed, epoch])
            # shuffle shard order, then rows within groups of shards: bounded memory, good mixing
            order = rng.permutation(len(sizes))
            rows = np.concatenate([valid[(valid >= offsets[s]) & (valid < offsets[s + 1])] for s in order])
            chunk = max(batch_size, int(np.mean(sizes)) * group)
            shuffled = np.concatenate([rng.permutation(rows[a:a + chunk]) for a in range(0, len(rows), chunk)])
            for b in range(skip, per_epoch):
                sel = np.sort(shuffled[b * batch_size:(b + 1) * batch_size])
                if part is not None:
                    sel = sel[slice(*part_bounds(len(sel), *part))]
                shard_of = np.searchsorted(offsets, sel, side="right") - 1
                plan = []
                for s in np.unique(shard_of):
                    local = sel[shard_of == s] - offsets[s]
                    plan.append((int(s), local))
                yield batch_idx, plan
                batch_idx += 1
            skip = 0
            epoch += 1
