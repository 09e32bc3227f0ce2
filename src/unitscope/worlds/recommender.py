"""A synthetic catalogue and a small sequential recommender trained on it (the RecSAE setting, offline).

Items carry attributes (a genre and a price band); each user prefers one genre and one price band, and each next
item keeps each preference most of the time, independently. A GRU reads the item sequence and predicts the
next item; its hidden state after each item is the activation studied, one row per sequence position.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from torch import nn

GENRES = ("action", "comedy", "drama", "horror", "scifi")
PRICES = ("budget", "standard", "premium")


@dataclass
class Catalogue:
    genre: np.ndarray  # (n_items,) index into GENRES
    price: np.ndarray  # (n_items,) index into PRICES

    @property
    def n_items(self) -> int:
        return len(self.genre)

    def attributes(self) -> dict[str, np.ndarray]:
        """Attribute value name -> (n_items,) bool, e.g. 'genre=drama'."""
        out = {f"genre={g}": self.genre == i for i, g in enumerate(GENRES)}
        out.update({f"price={p}": self.price == i for i, p in enumerate(PRICES)})
        return out


def make_catalogue(n_items: int = 300, seed: int = 0) -> Catalogue:
    rng = np.random.default_rng(seed)
    return Catalogue(rng.integers(0, len(GENRES), n_items), rng.integers(0, len(PRICES), n_items))


def make_sequences(cat: Catalogue, n_users: int, length: int = 20, loyalty: float = 0.9,
                   seed: int = 0) -> np.ndarray:
    """(n_users, length) item ids. Each step the genre is the user's with probability `loyalty` (else any genre)
    and, independently, so is the price band; the item is drawn from that (genre, band) cell. The two preferences
    are independent factors, as in a catalogue where taste and budget are separate."""
    rng = np.random.default_rng(seed)
    cells = {(g, p): np.flatnonzero((cat.genre == g) & (cat.price == p))
             for g in range(len(GENRES)) for p in range(len(PRICES))}
    seqs = np.zeros((n_users, length), np.int64)
    for u in range(n_users):
        g_pref, p_pref = rng.integers(len(GENRES)), rng.integers(len(PRICES))
        for t in range(length):
            g = g_pref if rng.random() < loyalty else rng.integers(len(GENRES))
            p = p_pref if rng.random() < loyalty else rng.integers(len(PRICES))
            seqs[u, t] = rng.choice(cells[(int(g), int(p))])
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


def train_recommender(seqs: np.ndarray, n_items: int, steps: int = 400, batch_size: int = 64, seed: int = 0,
                      lr: float = 3e-3) -> SequentialRecommender:
    torch.manual_seed(seed)
    model = SequentialRecommender(n_items)
    data = torch.from_numpy(seqs)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
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
    """Fraction of next items (from position 5 on) within the model's top k."""
    logits = model(torch.from_numpy(seqs[:, :-1]))[:, 4:]
    top = logits.topk(k, dim=-1).indices
    return float((top == torch.from_numpy(seqs[:, 5:])[..., None]).any(-1).float().mean())
