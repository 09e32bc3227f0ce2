"""subject x corpus -> store: several sites from one (early-stopped) forward pass, resumable.

Shard boundaries depend only on the arguments, never on when a run was interrupted, so a recording that
is killed at any moment and run again with the same arguments ends with exactly the requested tokens:
no window missing, none twice.

The forward is the only work on the main thread: windows are tokenised ahead by one thread, and each shard is
hashed and written by another while the next shard's forwards run. A shard is listed in the manifest once its
write is done (one process: at the next batch; under torchrun: after the next round, when the ranks exchange
entries), so a kill can lose a written but unlisted shard, which the rerun records again, never a listed one.
"""

from __future__ import annotations

import itertools
import queue
import threading
from collections.abc import Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from tqdm.auto import tqdm

from . import distributed
from .corpus import Corpus
from .errors import UnitscopeError
from .store import Store
from .subject import Subject

T = TypeVar("T")
_END = object()


def prefetch(items: Iterator[T], depth: int = 64) -> Iterator[T]:
    """`items`, produced by a background thread up to `depth` ahead (tokenising overlaps the forward); an
    exception raised while producing is raised here, at the item where it happened."""
    q: queue.Queue = queue.Queue(maxsize=depth)
    stop = threading.Event()

    def put(item: object) -> bool:
        while not stop.is_set():
            try:
                q.put(item, timeout=0.1)
                return True
            except queue.Full:
                continue
        return False  # the consumer has gone

    def produce() -> None:
        try:
            for item in items:
                if not put(item):
                    return
            put(_END)
        except BaseException as e:  # handed to the consumer
            put(e)

    worker = threading.Thread(target=produce, name="unitscope-tokenise", daemon=True)
    worker.start()
    try:
        while True:
            item = q.get()
            if item is _END:
                return
            if isinstance(item, BaseException):
                raise item
            yield item
    finally:
        stop.set()


def store_identity(subject: Subject, corpus: Corpus, sites: Sequence[str], ctx_len: int) -> dict:
    widths = subject.site_shapes(sites, seq_len=2)
    return {
        "model": subject.name,
        "model_fingerprint": subject.fingerprint(),
        "sites": {s: {"width": int(widths[s][-1])} for s in sites},
        "dtype": str(subject.dtype).removeprefix("torch."),
        "ctx_len": int(ctx_len),
        "corpus": corpus.provenance(),
    }


def record(subject: Subject, corpus: Corpus, sites: Sequence[str], tokens: int, out: str | Path,
           ctx_len: int = 128, batch_size: int = 16, shard_tokens: int = 32768, overwrite: bool = False,
           progress: bool = True) -> Store:
    """Record `tokens` tokens of activations at `sites` into the store at `out` (resuming if present)."""
    for name, value, least in (("--tokens", tokens, 1), ("--ctx-len", ctx_len, 2), ("--record-batch-size",
                                                                                      batch_size, 1),
                               ("--shard-tokens", shard_tokens, 1)):
        if value < least:
            raise UnitscopeError(f"{name} must be at least {least}, not {value}")
    if not sites:
        raise UnitscopeError("give at least one --site to record")
    sites = list(dict.fromkeys(sites))
    for s in sites:
        subject.site(s)  # unknown sites fail here, before anything is written
    distributed.init(str(getattr(subject, "device", "cpu")))
    rank, world = distributed.rank(), distributed.world()
    identity = store_identity(subject, corpus, sites, ctx_len)
    failed: UnitscopeError | None = None
    if rank == 0:  # one writer of the manifest; the other ranks open the store it made
        try:
            store = Store.create(out, identity, overwrite=overwrite)
            if store.n_shards:  # resuming: the text and the shards it builds on must be the ones recorded
                store.check_corpus(corpus)
                store.verify(progress=progress)
            store.finish(tokens_requested=int(tokens), complete=store.n_tokens >= tokens,
                         corpus_fingerprint=corpus.fingerprint(), model_spec=subject.spec,
                         specials=[int(t) for t in getattr(subject.tokenizer, "all_special_ids", [])])
        except UnitscopeError as e:
            failed = e
    message = distributed.broadcast_object(str(failed) if failed else None)  # a refusal stops every rank
    if failed:
        raise failed
    if message:
        raise UnitscopeError(message)
    if rank:
        store = Store.open(out)
    done = store.n_tokens
    if done >= tokens:
        return store
    shard_windows = max(1, shard_tokens // ctx_len)
    total_windows = -(-tokens // ctx_len)
    win_iter = prefetch(corpus.windows(subject.tokenizer, ctx_len, start=store.n_windows))
    window_index = store.n_windows

    def take(n: int) -> list:
        got = list(itertools.islice(win_iter, n))
        if len(got) < n:
            have = window_index + len(got)
            raise UnitscopeError(f"corpus {corpus.spec!r} ran out after {have} windows of {ctx_len} tokens; "
                                 f"ask for at most {have * ctx_len} tokens or use a larger corpus")
        return got

    writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="unitscope-write")
    pending: Future | None = None  # the previous round's shard, being written while this round runs

    def list_pending() -> None:
        """Wait for the previous round's shard and list every rank's shard of that round in the manifest."""
        nonlocal pending
        if pending is None:
            return
        entry, pending = pending.result(), None
        entries = distributed.all_gather_object(entry)
        store.add_shards([e for e in entries if e is not None], write=rank == 0)

    bar = tqdm(total=tokens, initial=done, unit="tok", unit_scale=True, desc="record",
               disable=not progress or rank != 0)
    shard_index, tokens_before_round = store.n_shards, store.n_tokens
    try:
        # a round is one shard per rank (one shard for a single process); rank r records shard r of each round,
        # every shard's windows and length depend only on the arguments, and rank 0 lists the round's shards
        while window_index < total_windows:
            sizes = []
            for _ in range(world):
                first = window_index + sum(sizes)
                if first < total_windows:
                    sizes.append(min(shard_windows, total_windows - first))
            job: tuple[Any, ...] | None = None
            for j, n_shard in enumerate(sizes):
                if j != rank:
                    take(n_shard)  # another rank's windows: tokenised, not run
                    continue
                tokens_before = tokens_before_round + sum(sizes[:j]) * ctx_len  # earlier shards are full
                buf_tok, buf_doc, buf_pos = [], [], []
                buf_acts: dict[str, list[torch.Tensor]] = {s: [] for s in sites}
                got = 0
                while got < n_shard:
                    batch = take(min(batch_size, n_shard - got))
                    ids = torch.from_numpy(np.stack([w.tokens for w in batch])).long()
                    acts = subject.collect(ids, sites)
                    for w in batch:
                        buf_tok.append(w.tokens)
                        buf_doc.append(w.doc)
                        buf_pos.append(w.pos)
                    for s in sites:
                        buf_acts[s].append(acts[s].reshape(-1, acts[s].shape[-1]).cpu())
                    got += len(batch)
                    bar.update(min(len(batch) * ctx_len * len(sizes), tokens - bar.n))
                    if world == 1 and pending is not None and pending.done():
                        list_pending()  # one process lists a written shard at once: a kill loses one shard at most
                keep = min(n_shard * ctx_len, tokens - tokens_before)
                job = (shard_index + j, buf_tok, buf_doc, buf_pos, buf_acts, keep, n_shard)
            list_pending()
            pending = writer.submit(_write_shard, store, job) if job else _done(None)
            shard_index += len(sizes)
            tokens_before_round += sum(sizes) * ctx_len
            window_index += sum(sizes)
        list_pending()
    except BaseException:
        if pending is not None and world == 1:
            list_pending()  # keep the finished shard of the last complete round (a lone process needs no peers)
        raise
    finally:
        writer.shutdown(wait=True)
        win_iter.close()  # stops the tokenising thread now, not when the traceback's frames are collected
        bar.close()
    if rank == 0:
        store.finish(complete=True)
    distributed.barrier()
    return store if rank == 0 else Store.open(out)


def _write_shard(store: Store, job: tuple[Any, ...]) -> dict[str, Any]:
    index, buf_tok, buf_doc, buf_pos, buf_acts, keep, n_shard = job
    return store.write_shard(index, np.concatenate(buf_tok)[:keep], np.concatenate(buf_doc)[:keep],
                             np.concatenate(buf_pos)[:keep], {s: torch.cat(v)[:keep] for s, v in buf_acts.items()},
                             windows=n_shard)


def _done(value: Any) -> Future:
    f: Future = Future()
    f.set_result(value)
    return f
