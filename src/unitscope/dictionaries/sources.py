"""Where training batches come from: a recorded store (shuffled), or the live model (sparsify's way: no store).

A source gives the site widths, the dictionary metadata, and `batches(start)`: (input, target) float32
batches from batch number `start` on, the same ones every time, which is what makes resumed training exact.
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import numpy as np
import torch

from ..corpus import Corpus, special_ids, training_mask
from ..errors import UnitscopeError
from ..store import Store


class StoreSource:
    """Shuffled batches of the training positions of a store (see Store.batches)."""

    def __init__(self, store: Store, site: str, target_site: str | None, batch_size: int, seed: int):
        self.store, self.site, self.target_site, self.batch_size, self.seed = store, site, target_site, batch_size, seed
        specials = np.asarray(store.manifest.get("specials", []), dtype=np.int32)
        self.mask = training_mask(store.column("tokens"), store.column("pos"), specials)

    def widths(self) -> tuple[int, int | None]:
        return self.store.width(self.site), self.store.width(self.target_site) if self.target_site else None

    def metadata(self) -> dict[str, Any]:
        return self.store.provenance()

    def batches(self, start: int, part: tuple[int, int] | None = None) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        """From batch `start` on; `part=(rank, world)`: that rank's slice of each batch (Store.batches)."""
        sites = [self.site, self.target_site] if self.target_site else [self.site]
        for batch in self.store.batches(sites, self.batch_size, self.mask, seed=self.seed, start_batch=start,
                                        part=part):
            yield batch[0].float(), batch[-1].float()


class LiveSource:
    """Batches straight from forward passes over a corpus, in stream order; the corpus repeats as epochs.

    Resuming at batch `start` skips whole windows by counting their training positions from the tokens
    alone (no forward pass), then drops the leftover rows of the first window it runs.
    """

    def __init__(self, subject: Any, corpus: Corpus, site: str, target_site: str | None, batch_size: int,
                 ctx_len: int = 128, forward_windows: int = 16):
        self.subject, self.corpus, self.site, self.target_site = subject, corpus, site, target_site
        self.batch_size, self.ctx_len, self.forward_windows = batch_size, ctx_len, forward_windows
        self.specials = special_ids(subject.tokenizer)
        subject.site(site)
        if target_site:
            subject.site(target_site)

    def widths(self) -> tuple[int, int | None]:
        return self.subject.width(self.site), self.subject.width(self.target_site) if self.target_site else None

    def metadata(self) -> dict[str, Any]:
        return {"model_name": self.subject.name, "model_spec": self.subject.spec,
                "model_fingerprint": self.subject.fingerprint(), "context_size": self.ctx_len,
                "dataset_path": self.corpus.spec, "trained_live": True}

    def _windows(self):
        while True:
            n = 0
            for w in self.corpus.windows(self.subject.tokenizer, self.ctx_len):
                n += 1
                yield w
            if n == 0:
                raise UnitscopeError(f"corpus {self.corpus.spec!r} holds less than one window of {self.ctx_len} tokens")

    def batches(self, start: int) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        skip = start * self.batch_size
        sites = [self.site, self.target_site] if self.target_site else [self.site]
        xs: list[torch.Tensor] = []
        ys: list[torch.Tensor] = []
        have = 0
        group, masks = [], []
        for w in self._windows():
            mask = training_mask(w.tokens, w.pos, self.specials)
            if skip >= mask.sum():
                skip -= int(mask.sum())
                continue
            group.append(w.tokens)
            masks.append(mask)
            if len(group) < self.forward_windows:
                continue
            acts = self.subject.collect(torch.from_numpy(np.stack(group)).long(), sites)
            m = torch.from_numpy(np.stack(masks))
            x = acts[self.site][m].float()
            y = acts[sites[-1]][m].float()
            if skip:
                x, y, skip = x[skip:], y[skip:], 0
            xs.append(x)
            ys.append(y)
            have += len(x)
            group, masks = [], []
            while have >= self.batch_size:
                X, Y = torch.cat(xs), torch.cat(ys)
                yield X[:self.batch_size], Y[:self.batch_size]
                xs, ys, have = [X[self.batch_size:]], [Y[self.batch_size:]], have - self.batch_size
