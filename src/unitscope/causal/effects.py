"""Unit effects: what switching a unit off (or pinning it high) does to the next-token distribution, measured on
the windows where it fires, written beside the explanation tables as `effects.parquet`.

Why explain's windows: `examples.parquet` already holds each unit's top windows with their tokens and per-token
codes, so no new pass over the corpus is needed. For each unit, on up to `windows` of its `top` example windows,
each window is run on its own and the unit's code is recomputed in exactly that forward (at the dictionary's
input site); the *measured positions* are the included tokens (not the window's first, not a special token, as in
explain) where that code is > 0. The stored codes only choose the windows: where they disagree with the live
forward (a store recorded in another dtype, a near tie in a TopK selection) the live code decides, so no
position where the unit does not fire dilutes the averages. At the measured positions the unit is edited in unit
space (`causal.interventions.UnitEdit`: encode, change the unit, decode, add back the error, so every other unit
and the reconstruction error stay as they were), one window per forward:

- ablate: the unit's code set to 0;  clamp: set to `clamp_factor` x its largest activation in units.parquet
  (the window peak when the table lacks it).

Per unit, over all measured positions t of its windows (p: clean next-token distribution, q: edited):

- `kl_ablate` / `kl_clamp`: mean KL(p || q) in nats;
- `dlogp_next_ablate` / `dlogp_next_clamp`: mean change of log q(next token) - log p(next token) for the token
  that actually follows (positions with a next token in the window);
- `boosted_tokens` / `boosted_dlogp`: the `top` tokens whose mean log-probability drops most when the unit is
  ablated (the tokens the unit boosts; dlogp < 0), `suppressed_tokens` / `suppressed_dlogp` those that rise most;
- `token_dlogp_ablate`: the same mean change for chosen `tokens` (ids in `token_ids`), e.g. a concept's token;
- `n_positions` / `n_positions_stored`: positions measured, and positions where the stored code was > 0;
- `lens_promoted_tokens` / `lens_suppressed_tokens`: the logit lens of its direction from units.parquet, beside
  them, so a reader sees the direct (lens) and total (intervention) effects together.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch
from tqdm.auto import tqdm

from ..atomic import fsync
from ..errors import UnitscopeError
from .interventions import Positions, UnitEdit

TABLE = "effects.parquet"


def _examples(explanations: Path, units: Sequence[int] | None) -> pa.Table:
    path = explanations / "examples.parquet"
    if not path.is_file():
        raise UnitscopeError(f"{str(explanations)!r} holds no examples.parquet; give the output directory of "
                             f"`unitscope explain` (or --store to explain first)")
    table = pq.read_table(path, columns=["unit", "kind", "rank", "window", "token_ids", "acts"])
    table = table.filter(pa.compute.equal(table["kind"], "top"))
    if units is not None:
        have = set(table["unit"].to_pylist())
        missing = [u for u in units if u not in have]
        if missing:
            raise UnitscopeError(f"unit {missing[0]} has no top examples in {str(path)!r} (it was not explained, or "
                                 f"never fires); explained units with examples: {len(have)}")
        table = table.filter(pa.compute.is_in(table["unit"], pa.array(list(units), pa.int32())))
    return table


def _units_table(explanations: Path) -> dict[int, dict[str, Any]]:
    path = explanations / "units.parquet"
    if not path.is_file():
        return {}
    cols = [c for c in ("unit", "max_activation", "promoted_tokens", "suppressed_tokens")
            if c in pq.read_schema(path).names]
    rows = pq.read_table(path, columns=cols).to_pylist()
    return {int(r["unit"]): r for r in rows}


def model_logits(subject: Any, ids: torch.Tensor) -> torch.Tensor:
    """Logits [batch, seq, vocab] of token ids [batch, seq] from any subject: a Hugging Face model is called with
    `input_ids=` (no cache), any other module (`FILE.py:FUNCTION`, an nn.Module passed in) with the ids as its one
    argument, returning logits or an object whose `.logits` (or first element) they are."""
    model = subject.model
    ids = ids.to(subject.device)
    tf = sys.modules.get("transformers")
    if tf is not None and isinstance(model, tf.PreTrainedModel):
        out = model(input_ids=ids, use_cache=False)
    else:
        out = model(ids)
    logits = out if isinstance(out, torch.Tensor) else getattr(out, "logits", None)
    if logits is None and isinstance(out, (tuple, list)) and out:
        logits = out[0]
    if not isinstance(logits, torch.Tensor) or logits.dim() != 3 or logits.shape[:2] != ids.shape:
        raise UnitscopeError(f"the model's forward on token ids of shape {tuple(ids.shape)} must return logits of "
                             f"shape [batch, seq, vocab], not {type(out).__name__}"
                             + (f" of shape {tuple(logits.shape)}" if isinstance(logits, torch.Tensor) else ""))
    return logits


def _logprobs(subject: Any, ids: torch.Tensor, edits: Sequence[Any] = (), cache: dict | None = None) -> torch.Tensor:
    with torch.inference_mode(), subject.intervene(list(edits), cache):
        return model_logits(subject, ids)[0].float().log_softmax(-1).cpu()


def _clean(subject: Any, dictionary: Any, unit: int, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Clean log-probabilities [seq, vocab] and the unit's code [seq] in the same forward (the code read at the
    dictionary's input site, as `UnitEdit` reads it)."""
    site = dictionary.input_site
    if site is None:
        raise UnitscopeError(f"this {dictionary.architecture} dictionary does not record its site (metadata.hook_name)")
    with torch.inference_mode(), subject.capture([site]) as acts:
        logp = model_logits(subject, ids)[0].float().log_softmax(-1).cpu()
    dt = next(iter(dictionary.parameters()), torch.empty(0)).dtype
    with torch.inference_mode():
        code = dictionary.encode(acts[site][0].to(dt))[..., unit].float().cpu()
    return logp, code


def _included(ids: Sequence[int], specials: set[int]) -> torch.Tensor:
    """explain's positions: not a window's first token, not a special token (corpus.training_mask)."""
    return torch.tensor([t > 0 and i not in specials for t, i in enumerate(ids)], dtype=torch.bool)


def measure_unit(subject: Any, dictionary: Any, unit: int, windows: Sequence[Sequence[int]],
                 codes: Sequence[Sequence[float]], clamp_value: float, top: int = 10,
                 tokens: Sequence[int] = ()) -> dict[str, Any]:
    """Effects of one unit on its windows (token ids per window; the stored codes are only compared with the live
    ones, in `n_positions_stored`); see the module docstring."""
    tok = subject.tokenizer
    specials = set(getattr(tok, "all_special_ids", None) or [])
    sums = {k: 0.0 for k in ("kl_ablate", "kl_clamp", "next_ablate", "next_clamp")}
    n_pos = n_next = n_stored = 0
    delta_sum: torch.Tensor | None = None
    cache: dict = {}
    for ids_list, acts in zip(windows, codes):
        ids = torch.tensor([ids_list], dtype=torch.long)
        clean_all, code = _clean(subject, dictionary, unit, ids)
        n_stored += sum(1 for a in acts if a > 0)
        pos = ((code > 0) & _included(ids_list, specials)).nonzero()[:, 0].tolist()
        if not pos:
            continue
        where = Positions("indices", tuple(pos))
        clean = clean_all[pos]
        ablated = _logprobs(subject, ids, [UnitEdit(dictionary=dictionary, units=[unit], positions=where)],
                            cache)[pos]
        clamped = _logprobs(subject, ids, [UnitEdit(dictionary=dictionary, units=[unit], op="set",
                                                    value=float(clamp_value), positions=where)], cache)[pos]
        p = clean.exp()
        sums["kl_ablate"] += float((p * (clean - ablated)).sum())
        sums["kl_clamp"] += float((p * (clean - clamped)).sum())
        d = ablated - clean
        delta_sum = d.sum(0) if delta_sum is None else delta_sum + d.sum(0)
        n_pos += len(pos)
        has_next = [i for i, t in enumerate(pos) if t + 1 < len(ids_list)]
        if has_next:
            nxt = torch.tensor([ids_list[pos[i] + 1] for i in has_next])
            rows = torch.tensor(has_next)
            sums["next_ablate"] += float((ablated[rows, nxt] - clean[rows, nxt]).sum())
            sums["next_clamp"] += float((clamped[rows, nxt] - clean[rows, nxt]).sum())
            n_next += len(has_next)
    if delta_sum is None:
        raise UnitscopeError(f"unit {unit} does not fire (code > 0) at any included position of its windows when "
                             f"they are run again; nothing to measure")
    mean_delta = delta_sum / n_pos
    k = min(top, mean_delta.numel())
    boosted = mean_delta.topk(k, largest=False)
    suppressed = mean_delta.topk(k, largest=True)
    decode = tok.decode if tok is not None else (lambda ids: str(ids[0]))
    return {
        "unit": unit, "n_windows": len(windows), "n_positions": n_pos, "n_positions_stored": n_stored,
        "clamp_value": float(clamp_value),
        "kl_ablate": sums["kl_ablate"] / n_pos, "kl_clamp": sums["kl_clamp"] / n_pos,
        "dlogp_next_ablate": sums["next_ablate"] / n_next if n_next else None,
        "dlogp_next_clamp": sums["next_clamp"] / n_next if n_next else None,
        "boosted_tokens": [decode([i]) for i in boosted.indices.tolist()],
        "boosted_ids": boosted.indices.tolist(), "boosted_dlogp": boosted.values.tolist(),
        "suppressed_tokens": [decode([i]) for i in suppressed.indices.tolist()],
        "suppressed_ids": suppressed.indices.tolist(), "suppressed_dlogp": suppressed.values.tolist(),
        "token_ids": list(tokens), "token_dlogp_ablate": mean_delta[list(tokens)].tolist(),
    }


def unit_effects(subject: Any, dictionary: Any, explanations: str | Path, units: Sequence[int] | None = None,
                 windows: int = 5, clamp_factor: float = 2.0, top: int = 10, progress: bool = False,
                 tokens: Sequence[int] = ()) -> pa.Table:
    """One row per unit (those of `units`, else every unit with top examples) from `explanations`' tables;
    `tokens` (ids) get their mean log-probability change under ablation in `token_dlogp_ablate`, whatever
    their rank."""
    emb = getattr(subject.model, "get_output_embeddings", lambda: None)()
    if emb is not None:
        vocab = emb.weight.shape[0]
    else:  # any other module: one token through it
        with torch.inference_mode():
            vocab = model_logits(subject, torch.zeros(1, 1, dtype=torch.long)).shape[-1]
    bad_tokens = [t for t in tokens if not 0 <= t < vocab]
    if bad_tokens:
        raise UnitscopeError(f"token id {bad_tokens[0]} is out of range: the model has {vocab} output tokens")
    if windows < 1:
        raise UnitscopeError(f"the number of windows per unit must be at least 1, not {windows}")
    if not np.isfinite(clamp_factor):
        raise UnitscopeError(f"the clamp factor must be a finite number, not {clamp_factor}")
    if units is not None:
        bad = [u for u in units if not 0 <= u < dictionary.n_units]
        if bad:
            raise UnitscopeError(f"unit {bad[0]} is out of range: this {dictionary.architecture} dictionary has "
                                 f"{dictionary.n_units} units (valid units are 0 to {dictionary.n_units - 1})")
    explanations = Path(explanations)
    ex = _examples(explanations, units).to_pylist()
    info = _units_table(explanations)
    by_unit: dict[int, list[dict]] = {}
    for row in sorted(ex, key=lambda r: (r["unit"], r["rank"])):
        by_unit.setdefault(int(row["unit"]), []).append(row)
    order = list(units) if units is not None else sorted(by_unit)
    rows = []

    for u in tqdm(order, desc="effects", disable=not progress):
        chosen = by_unit[u][:windows]
        peak = max(max(r["acts"]) for r in chosen)
        top_act = info.get(u, {}).get("max_activation") or peak
        row = measure_unit(subject, dictionary, u, [r["token_ids"] for r in chosen], [r["acts"] for r in chosen],
                           clamp_factor * float(top_act), top, tokens)
        row["windows"] = [int(r["window"]) for r in chosen]
        row["lens_promoted_tokens"] = info.get(u, {}).get("promoted_tokens")
        row["lens_suppressed_tokens"] = info.get(u, {}).get("suppressed_tokens")
        rows.append(row)
    return pa.Table.from_pylist(rows, schema=SCHEMA)


SCHEMA = pa.schema([
    ("unit", pa.int32()), ("n_windows", pa.int32()), ("n_positions", pa.int32()), ("n_positions_stored", pa.int32()),
    ("windows", pa.list_(pa.int64())),
    ("clamp_value", pa.float64()), ("kl_ablate", pa.float64()), ("kl_clamp", pa.float64()),
    ("dlogp_next_ablate", pa.float64()), ("dlogp_next_clamp", pa.float64()),
    ("boosted_tokens", pa.list_(pa.string())), ("boosted_ids", pa.list_(pa.int64())),
    ("boosted_dlogp", pa.list_(pa.float64())),
    ("suppressed_tokens", pa.list_(pa.string())), ("suppressed_ids", pa.list_(pa.int64())),
    ("suppressed_dlogp", pa.list_(pa.float64())),
    ("token_ids", pa.list_(pa.int64())), ("token_dlogp_ablate", pa.list_(pa.float64())),
    ("lens_promoted_tokens", pa.list_(pa.string())), ("lens_suppressed_tokens", pa.list_(pa.string())),
])


def write_effects(out: str | Path, table: pa.Table) -> Path:
    """effects.parquet in `out`, written beside its target and renamed over it (a kill leaves the old or the new)."""
    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / TABLE
    tmp = out / f".{TABLE}.tmp-{os.getpid()}"
    pq.write_table(table, tmp)
    fsync(tmp)
    os.replace(tmp, path)
    fsync(out)
    return path
