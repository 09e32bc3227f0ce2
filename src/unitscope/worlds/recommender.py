"""A synthetic catalogue and a small sequential recommender trained on it (the RecSAE setting, offline).

Items carry attributes as in MovieLens: several genres each (multi-label) and one price band. Sessions drift: the
next item keeps each of the current item's genres, and its price band, with high probability, independently, so the
exact next-item distribution is a product over attributes (`transitions`). A GRU reads the item sequence and predicts
the next item; its hidden state after each item is the activation studied, one row per sequence position.

Why this world and not "each user prefers one genre and one band" (the first world, docs/vision.md): there the
state is one of 15 genre x band clusters and a sparse dictionary of it codes the clusters, not the attributes; here
the attributes combine freely (8 genres x 3 bands: 765 combinations, as every item has a genre), and with weight
decay the state is close to a sum over the last item's attributes, which a dictionary can factor.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

GENRES = ("action", "comedy", "drama", "horror", "scifi", "romance", "thriller", "documentary")
PRICES = ("budget", "standard", "premium")


@dataclass
class Catalogue:
    genres: np.ndarray  # (n_items, len(GENRES)) bool: the item's genres (one or more)
    price: np.ndarray  # (n_items,) index into PRICES

    @property
    def n_items(self) -> int:
        return len(self.price)

    def attributes(self) -> dict[str, np.ndarray]:
        """Attribute value name -> (n_items,) bool, e.g. 'genre=drama', 'price=premium'."""
        out = {f"genre={g}": self.genres[:, i] for i, g in enumerate(GENRES)}
        out.update({f"price={p}": self.price == i for i, p in enumerate(PRICES)})
        return out


def make_catalogue(n_items: int = 500, genre_rate: float = 0.3, seed: int = 0) -> Catalogue:
    """Each genre independently with probability `genre_rate` (an item with none gets one at random)."""
    rng = np.random.default_rng(seed)
    genres = rng.random((n_items, len(GENRES))) < genre_rate
    empty = ~genres.any(1)
    genres[np.flatnonzero(empty), rng.integers(0, len(GENRES), int(empty.sum()))] = True
    return Catalogue(genres, rng.integers(0, len(PRICES), n_items))


def transitions(cat: Catalogue, keep_genre: float = 0.9, keep_price: float = 0.9) -> np.ndarray:
    """(n_items, n_items) next-item probabilities: P(j | i) is proportional to the product over genres of keep_genre
    where i and j agree on it (both have it or both lack it) and 1 - keep_genre where not, times keep_price for the
    same band and (1 - keep_price) / 2 for each other band; never the same item twice in a row."""
    agree = cat.genres[:, None, :] == cat.genres[None, :, :]
    logp = np.where(agree, np.log(keep_genre), np.log(1 - keep_genre)).sum(-1)
    same_band = cat.price[:, None] == cat.price[None, :]
    logp = logp + np.where(same_band, np.log(keep_price), np.log((1 - keep_price) / (len(PRICES) - 1)))
    np.fill_diagonal(logp, -np.inf)
    p = np.exp(logp - logp.max(1, keepdims=True))
    return p / p.sum(1, keepdims=True)


def make_sequences(cat: Catalogue, n_users: int, length: int = 20, seed: int = 0, **keep: float) -> np.ndarray:
    """(n_users, length) item ids: a uniform first item, then the Markov chain of `transitions`."""
    rng = np.random.default_rng(seed)
    cum = transitions(cat, **keep).cumsum(1)
    seqs = np.zeros((n_users, length), np.int64)
    seqs[:, 0] = rng.integers(0, cat.n_items, n_users)
    for t in range(1, length):
        u = rng.random(n_users)
        seqs[:, t] = np.minimum((cum[seqs[:, t - 1]] < u[:, None]).sum(1), cat.n_items - 1)
    return seqs


class SequentialRecommender(nn.Module):
    def __init__(self, n_items: int, dim: int = 32, hidden: int = 64):
        super().__init__()
        self.embed = nn.Embedding(n_items, dim)
        self.gru = nn.GRU(dim, hidden, batch_first=True)
        self.out = nn.Linear(hidden, n_items)

    def forward(self, items: torch.Tensor) -> torch.Tensor:
        """Next-item logits (B, T, n_items); the site `gru:output` is the hidden state after each item."""
        h, _ = self.gru(self.embed(items))
        return self.out(h)


def train_recommender(seqs: np.ndarray, n_items: int, steps: int = 1000, batch_size: int = 64, seed: int = 0,
                      lr: float = 3e-3, weight_decay: float = 1.0) -> SequentialRecommender:
    """AdamW with weight decay (GRU4Rec-style L2 regularisation): without it the item embeddings keep their random
    start in the directions the output ignores, and the state is mostly item identity (docs/vision.md)."""
    torch.manual_seed(seed)
    model = SequentialRecommender(n_items)
    data = torch.from_numpy(seqs)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=weight_decay)
    gen = torch.Generator().manual_seed(seed)
    for _ in range(steps):
        batch = data[torch.randint(len(data), (batch_size,), generator=gen)]
        logits = model(batch[:, :-1])
        loss = nn.functional.cross_entropy(logits.reshape(-1, n_items), batch[:, 1:].reshape(-1))
        opt.zero_grad()
        loss.backward()
        opt.step()
    return model.eval()


@torch.no_grad()
def hidden_states(model: SequentialRecommender, seqs: np.ndarray) -> torch.Tensor:
    """(n_users * length, hidden): the GRU state after each item, rows in (user, position) order."""
    h, _ = model.gru(model.embed(torch.from_numpy(seqs)))
    return h.reshape(-1, h.shape[-1])


@torch.no_grad()
def hit_rate(model: SequentialRecommender, seqs: np.ndarray, k: int = 10) -> float:
    """Fraction of next items within the model's top k (every position but the first)."""
    logits = model(torch.from_numpy(seqs[:, :-1]))
    top = logits.topk(k, dim=-1).indices
    return float((top == torch.from_numpy(seqs[:, 1:])[..., None]).any(-1).float().mean())


def best_hit_rate(cat: Catalogue, seqs: np.ndarray, k: int = 10, **keep: float) -> float:
    """The same fraction for the exact next-item distribution: the ceiling any recommender can reach."""
    top = np.argsort(-transitions(cat, **keep), axis=1, kind="stable")[:, :k]
    return float((top[seqs[:, :-1]] == seqs[:, 1:, None]).any(-1).mean())
