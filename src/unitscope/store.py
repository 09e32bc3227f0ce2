"""Sharded on-disk activation store; memory-mapped, shuffled batch reader.

Layout (DESIGN.md): `store.json` (model, sites and widths, dtype, tokens, context length, corpus
provenance, complete shards with token counts and checksums) and `shards/NNNNNN.safetensors`, each
holding `tokens`, `doc`, `pos` (int32 [n]) and `acts.<site>` [n, d]. A shard is written to a temporary
name and renamed when complete; the manifest is rewritten atomically after it, so a killed writer leaves
at worst an orphan shard that the next writer replaces.
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
from safetensors.torch import save_file
from tqdm.auto import tqdm

from .atomic import write_json_atomic
from .errors import UnitscopeError

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


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()


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

    def __init__(self, root: Path, manifest: dict[str, Any]):
        self.root, self.manifest = root, manifest
        self._shards: dict[int, Shard] = {}

    # ---- opening and creating -------------------------------------------------------------------
    @classmethod
    def open(cls, root: str | Path) -> Store:
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
    def create(cls, root: str | Path, identity: dict[str, Any], overwrite: bool = False) -> Store:
        """Open `root` for appending if it holds a store with the same identity, else start a new one."""
        root = Path(root)
        if (root / "store.json").exists() and not overwrite:
            store = cls.open(root)
            for key in IDENTITY_KEYS:
                if key == "model_fingerprint" and key not in store.manifest:
                    continue  # stores recorded before fingerprints: the model name is compared instead
                if store.manifest.get(key) != identity.get(key):
                    raise UnitscopeError(
                        f"{str(root)!r} holds a store recorded with a different {key} "
                        f"({store.manifest.get(key)!r}, not {identity.get(key)!r}); choose another --out "
                        "or pass --overwrite"
                    )
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

    def _drop_orphans(self) -> None:
        listed = {s["file"] for s in self.manifest["shards"]}
        for p in (self.root / "shards").glob("*"):
            if f"shards/{p.name}" not in listed:
                p.unlink()

    # ---- writing ----------------------------------------------------------------------------------
    def append_shard(self, tokens: np.ndarray, doc: np.ndarray, pos: np.ndarray,
                     acts: dict[str, torch.Tensor], windows: int) -> None:
        i = len(self.manifest["shards"])
        rel = shard_name(i)
        final = self.root / rel
        tmp = final.with_name(f".{final.name}.tmp")
        tensors = {
            "tokens": torch.from_numpy(np.ascontiguousarray(tokens, dtype=np.int32)),
            "doc": torch.from_numpy(np.ascontiguousarray(doc, dtype=np.int32)),
            "pos": torch.from_numpy(np.ascontiguousarray(pos, dtype=np.int32)),
            **{f"acts.{k}": v.contiguous() for k, v in acts.items()},
        }
        save_file(tensors, str(tmp))
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, final)
        entry = {"file": rel, "tokens": int(len(tokens)), "windows": windows,
                 "bytes": final.stat().st_size, "sha256": file_sha256(final)}
        self.manifest["shards"].append(entry)
        self.manifest["tokens"] = int(sum(s["tokens"] for s in self.manifest["shards"]))
        write_json_atomic(self.root / "store.json", self.manifest)

    def finish(self, **fields: Any) -> None:
        self.manifest.update(fields)
        write_json_atomic(self.root / "store.json", self.manifest)

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
            self._shards[i] = Shard(self.root / entry["file"], entry.get("bytes"))
        return self._shards[i]

    def verify(self, progress: bool = False) -> int:
        """Check every shard's size and SHA-256 against the manifest; raise naming the first bad one.

        Returns the number of bytes checked."""
        checked = 0
        shards = self.manifest["shards"]
        for i, entry in enumerate(tqdm(shards, unit="shard", desc="verify", disable=not progress)):
            self.shard(i)
            if file_sha256(self.root / entry["file"]) != entry["sha256"]:
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
                start_batch: int = 0, epochs: int | None = None, drop_last: bool = True) -> Iterator:
        """Shuffled batches of rows of `site` (rows where `mask` holds), deterministic in (seed, epoch).

        Rows are drawn shard-group by shard-group (up to `group` shards at a time), so memory stays
        bounded by a few shards however large the store is; `start_batch` skips ahead without reading
        the skipped data, which is what makes resumed training exact.
        """
        sites = [site] if isinstance(site, str) else list(site)
        for _, shard_rows in self.batch_plan(batch_size, mask, seed, start_batch, epochs, drop_last=drop_last):
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
                   epochs: int | None = None, group: int = 4, drop_last: bool = True):
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
                shard_of = np.searchsorted(offsets, sel, side="right") - 1
                plan = []
                for s in np.unique(shard_of):
                    local = sel[shard_of == s] - offsets[s]
                    plan.append((int(s), local))
                yield batch_idx, plan
                batch_idx += 1
            skip = 0
            epoch += 1
