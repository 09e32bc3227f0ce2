"""Ground truth: known features in superposition, written as an ordinary store, and how well a dictionary finds them.

A `SyntheticSpec` plants `n_features` unit-norm random directions in `d` dimensions. Each row is a sparse,
non-negative combination of them plus Gaussian noise:

- feature i fires with probability p_i ∝ (i + 1)^-power_law, scaled so that sum_i p_i = `active` (the mean
  number of active features per row; p_i is capped at 1 and the rest rescaled when the power law is steep);
- `correlated_pairs` disjoint pairs (a, b) share a common event: with probability c = min(p_a, p_b) / 2 both
  fire, and each also fires on its own with the probability that keeps its marginal exactly p_i, so the
  frequencies follow the power law and the pair co-fires far more often than independence would give;
- an active feature's magnitude is uniform on [0.5, 1.5] (so no firing is lost in the noise);
- the noise has per-coordinate standard deviation `noise` × the signal's rms per coordinate.

`write_synthetic_store` writes rows as a store with one site, `synthetic`, that `unitscope train` and
`unitscope eval` read unchanged (every row a training position), plus `truth.safetensors` (the directions);
`recovery` scores any learned dictionary's directions against the truth. Random streams are separate: the
structure (directions, pairs) from (seed, 0), the store's rows from (seed, 1), held-out rows from (seed, 2).
"""

from __future__ import annotations

import hashlib
import json
import math
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .atomic import replace_dir
from .errors import UnitscopeError
from .store import Store

SITE = "synthetic"
TRUTH_FILE = "truth.safetensors"
MAG_LOW, MAG_HIGH = 0.5, 1.5  # magnitudes of active features: uniform on [MAG_LOW, MAG_HIGH]
PAIR_SHARE = 0.5  # a correlated pair fires together with probability PAIR_SHARE * min(p_a, p_b)
SIGNED_NOTE = "cos for dictionaries whose codes are never negative, |cos| for signed codes"


@dataclass
class SyntheticSpec:
    """Known features in superposition: see the module docstring for how rows are drawn."""

    n_features: int = 512
    d: int = 128
    rows: int = 200_000
    active: float = 4.0  # mean number of active features per row
    power_law: float = 1.0  # firing probability of the feature of rank r ∝ r^-power_law
    correlated_pairs: int = 16  # disjoint pairs of features that tend to fire together
    noise: float = 0.01  # noise std per coordinate, relative to the signal's rms per coordinate
    seed: int = 0

    def validate(self) -> None:
        def whole(v: Any) -> bool:
            return isinstance(v, int) and not isinstance(v, bool)

        def number(v: Any) -> bool:
            return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)

        for name in ("n_features", "d", "rows", "correlated_pairs", "seed"):
            if not whole(getattr(self, name)):
                raise UnitscopeError(f"a synthetic spec's {name} must be a whole number, not {getattr(self, name)!r}")
        for name in ("active", "power_law", "noise"):
            if not number(getattr(self, name)):
                raise UnitscopeError(f"a synthetic spec's {name} must be a finite number, not {getattr(self, name)!r}")
        if self.n_features < 1 or self.d < 1 or self.rows < 1:
            raise UnitscopeError(f"a synthetic spec needs at least one feature, one dimension and one row, not "
                                 f"{self.n_features} features in {self.d} dimensions and {self.rows} rows")
        if not self.active > 0:
            raise UnitscopeError(f"a synthetic spec needs a positive mean number of active features, not {self.active}")
        if self.active > self.d:
            raise UnitscopeError(f"a synthetic spec with more active features than dimensions ({self.active} > "
                                 f"{self.d}) has no sparse structure to recover; use --active <= --dims")
        if self.active > self.n_features:
            raise UnitscopeError(f"a synthetic spec cannot have more active features per row ({self.active}) than "
                                 f"features ({self.n_features})")
        if self.power_law < 0 or self.noise < 0 or self.seed < 0 or self.correlated_pairs < 0:
            raise UnitscopeError("a synthetic spec's power law, noise, correlated pairs and seed must not be negative")
        if 2 * self.correlated_pairs > self.n_features:
            raise UnitscopeError(f"a synthetic spec cannot have {self.correlated_pairs} disjoint correlated pairs "
                                 f"among {self.n_features} features; use at most {self.n_features // 2}")

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> SyntheticSpec:
        names = {f.name for f in fields(cls)}
        if not isinstance(data, dict) or set(data) - names:
            raise UnitscopeError(f"not a synthetic spec: {data!r}")
        spec = cls(**data)
        spec.validate()
        return spec


def _rng(spec: SyntheticSpec, stream: int) -> np.random.Generator:
    return np.random.default_rng([spec.seed, stream])


def generator(spec: SyntheticSpec, stream: int) -> torch.Generator:
    """A torch generator for one of the spec's random streams (1: the store's rows, 2: held-out rows)."""
    return torch.Generator().manual_seed(int(_rng(spec, stream).integers(2 ** 62)))


def firing_probabilities(spec: SyntheticSpec) -> torch.Tensor:
    """p_i ∝ (i + 1)^-power_law with sum p_i = active, capped at 1 (the uncapped rest rescaled)."""
    spec.validate()
    w = np.arange(1, spec.n_features + 1, dtype=np.float64) ** -float(spec.power_law)
    p = np.zeros_like(w)
    capped = np.zeros(len(w), dtype=bool)
    for _ in range(len(w)):
        p = np.where(capped, 1.0, w * (spec.active - capped.sum()) / w[~capped].sum())
        over = (p > 1) & ~capped
        if not over.any():
            break
        capped |= over
    return torch.from_numpy(np.minimum(p, 1.0))


def correlated_pairs(spec: SyntheticSpec) -> torch.Tensor:
    """[correlated_pairs, 2] feature indices: disjoint pairs drawn at random from every rank."""
    spec.validate()
    perm = _rng(spec, 0).permutation(spec.n_features)[: 2 * spec.correlated_pairs]
    return torch.from_numpy(np.sort(perm.reshape(-1, 2), axis=1).astype(np.int64))


def truth_directions(spec: SyntheticSpec) -> torch.Tensor:
    """[n_features, d] unit-norm random directions (float32)."""
    spec.validate()
    g = torch.Generator().manual_seed(int(_rng(spec, 0).integers(2 ** 62)) ^ 0x5EED)
    w = torch.randn(spec.n_features, spec.d, generator=g, dtype=torch.float64)
    return (w / w.norm(dim=1, keepdim=True)).float()


def noise_std(spec: SyntheticSpec) -> float:
    """Per-coordinate noise std: `noise` × sqrt(E||signal||² / d), with E||signal||² ≈ active × E[m²]."""
    mean_sq = (MAG_HIGH ** 3 - MAG_LOW ** 3) / (3 * (MAG_HIGH - MAG_LOW))
    return float(spec.noise * math.sqrt(spec.active * mean_sq / spec.d))


def sample_codes(spec: SyntheticSpec, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, n_features] true non-negative codes (magnitudes of the active features, 0 elsewhere)."""
    p = firing_probabilities(spec)
    pairs = correlated_pairs(spec)
    base = p.clone()
    shared = torch.zeros(0, dtype=torch.float64)
    if len(pairs):
        shared = PAIR_SHARE * torch.minimum(p[pairs[:, 0]], p[pairs[:, 1]])
        for col in (0, 1):  # own probability r with 1 - (1 - c)(1 - r) = p: the marginal stays p
            i = pairs[:, col]
            base[i] = (1 - (1 - p[i]) / (1 - shared)).clamp(0, 1)
    fire = torch.rand(n, spec.n_features, generator=generator, dtype=torch.float64) < base
    if len(pairs):
        together = torch.rand(n, len(pairs), generator=generator, dtype=torch.float64) < shared
        fire[:, pairs[:, 0]] |= together
        fire[:, pairs[:, 1]] |= together
    mags = MAG_LOW + (MAG_HIGH - MAG_LOW) * torch.rand(n, spec.n_features, generator=generator)
    return mags * fire


def rows_from_codes(spec: SyntheticSpec, codes: torch.Tensor, generator: torch.Generator,
                    directions: torch.Tensor | None = None) -> torch.Tensor:
    """codes @ directions + Gaussian noise, float32 [n, d]."""
    directions = truth_directions(spec) if directions is None else directions
    x = codes @ directions
    if spec.noise > 0:
        x = x + noise_std(spec) * torch.randn(x.shape, generator=generator)
    return x


def sample_rows(spec: SyntheticSpec, n: int, generator: torch.Generator) -> torch.Tensor:
    """[n, d] rows: sparse non-negative magnitudes × the true directions + noise."""
    return rows_from_codes(spec, sample_codes(spec, n, generator), generator)


def spec_fingerprint(spec: SyntheticSpec) -> str:
    return hashlib.sha256(json.dumps(asdict(spec), sort_keys=True).encode()).hexdigest()


def write_synthetic_store(spec: SyntheticSpec, out: str | Path, shard_rows: int = 32768, overwrite: bool = False,
                          progress: bool = False) -> Store:
    """Write `spec.rows` rows as an ordinary store at `out` (site `synthetic`) with `truth.safetensors` beside
    the manifest. The whole store is written beside `out` and swapped in at the end, so a kill leaves the old
    copy or the new one. Each row is a window of two tokens whose second is stored, so every row trains."""
    spec.validate()
    if shard_rows < 1:
        raise UnitscopeError(f"shard_rows must be at least 1, not {shard_rows}")
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UnitscopeError(f"{str(out)!r} is an existing file; give a directory for the synthetic store")
    if out.is_dir() and any(out.iterdir()):
        if not (out / "store.json").is_file():
            raise UnitscopeError(f"{str(out)!r} is not empty and holds no store; choose an empty or new directory")
        if not overwrite:
            raise UnitscopeError(f"{str(out)!r} already holds a store; pass --overwrite to replace it")
    fingerprint = spec_fingerprint(spec)
    identity = {
        "model": "synthetic", "model_fingerprint": fingerprint, "sites": {SITE: {"width": spec.d}},
        "dtype": "float32", "ctx_len": 2, "corpus": {"spec": "synthetic", "field": "text", "seed": spec.seed},
    }
    directions = truth_directions(spec)
    gen = generator(spec, 1)
    with replace_dir(out) as tmp:
        store = Store.create(tmp, identity)
        save_file({"directions": directions.contiguous()}, str(tmp / TRUTH_FILE))
        bar = tqdm(total=spec.rows, unit="row", desc="synthetic", disable=not progress)
        done = 0
        while done < spec.rows:
            n = min(shard_rows, spec.rows - done)
            x = rows_from_codes(spec, sample_codes(spec, n, gen), gen, directions)
            store.append_shard(np.zeros(n, np.int32), np.arange(done, done + n, dtype=np.int32),
                               np.ones(n, np.int32), {SITE: x.float()}, windows=n)
            done += n
            bar.update(n)
        bar.close()
        store.finish(tokens_requested=spec.rows, complete=True, corpus_fingerprint=fingerprint, model_spec="none",
                     specials=[], synthetic=asdict(spec))
    return Store.open(out)


def store_spec(store: Store) -> SyntheticSpec | None:
    """The spec a synthetic store was written from; None for a store recorded from a model."""
    data = store.manifest.get("synthetic")
    return None if data is None else SyntheticSpec.from_dict(data)


def load_truth(store: Store) -> torch.Tensor:
    path = store.root / TRUTH_FILE
    if not path.is_file():
        raise UnitscopeError(f"the synthetic store at {str(store.root)!r} has no {TRUTH_FILE}; write it again")
    return load_file(str(path))["directions"].float()


def recovery(directions: torch.Tensor, truth: torch.Tensor, threshold: float = 0.9,
             signed: bool = True) -> dict[str, Any]:
    """How well learned `directions` [n_units, d] find the true ones [n_features, d].

    For each true feature, the best cosine with any unit; `signed=True` takes cos itself (a unit whose code is
    never negative adds its direction, so -f is not f: SAEs, k-means, semi-NMF), `signed=False` |cos| (a unit
    with signed codes represents f and -f alike: PCA, neurons). Returns the mean of those best cosines and the
    fraction of features whose best cosine exceeds `threshold`."""
    if directions.ndim != 2 or truth.ndim != 2 or directions.shape[1] != truth.shape[1]:
        raise UnitscopeError(f"directions {tuple(directions.shape)} and truth {tuple(truth.shape)} are not in "
                             "the same space")
    u = directions.double()
    u = u / u.norm(dim=1, keepdim=True).clamp_min(1e-12)
    t = truth.double()
    t = t / t.norm(dim=1, keepdim=True).clamp_min(1e-12)
    best = torch.full((len(t),), -1.0, dtype=torch.float64)
    for a in range(0, len(u), 4096):  # bounded memory for wide dictionaries
        cos = t @ u[a:a + 4096].t()
        best = torch.maximum(best, (cos if signed else cos.abs()).max(1).values)
    return {"mean_max_cos": float(best.mean()), "frac_recovered": float((best > threshold).double().mean()),
            "threshold": threshold, "signed": signed, "n_features": len(t), "n_units": len(u),
            "best_cos": [round(float(b), 5) for b in best]}


@torch.inference_mode()
def evaluate_synthetic(dictionary: Any, store: Store, n_rows: int = 8192, batch_size: int = 4096,
                       threshold: float = 0.9, progress: bool = False) -> dict[str, Any]:
    """Reconstruction and sparsity on fresh held-out rows of the store's spec (stream 2: never in the store),
    and the ground-truth recovery of the dictionary's directions. SAEBench-shaped like `evaluate_fidelity`."""
    import time
    import uuid

    from .versions import versions

    spec = store_spec(store)
    if spec is None:
        raise UnitscopeError(f"the store at {str(store.root)!r} is not synthetic")
    if n_rows < 1:
        raise UnitscopeError(f"--eval-tokens must be a positive number, not {n_rows}")
    truth = load_truth(store)
    gen = generator(spec, 2)
    param = next(dictionary.parameters(), None)
    ddtype = param.dtype if param is not None else torch.float32
    n, sq_err, sum_y, sum_y2, l0_sum, negative = 0, 0.0, torch.zeros(spec.d, dtype=torch.float64), 0.0, 0.0, False
    fired = torch.zeros(dictionary.n_units, dtype=torch.long)
    bar = tqdm(total=n_rows, unit="row", desc="eval", disable=not progress)
    while n < n_rows:
        x = rows_from_codes(spec, sample_codes(spec, min(batch_size, n_rows - n), gen), gen, truth)
        codes, recon = dictionary.reconstruct(x.to(ddtype))
        xd, rd = x.double(), recon.double()
        sq_err += float((xd - rd).pow(2).sum())
        sum_y += xd.sum(0)
        sum_y2 += float(xd.pow(2).sum())
        nz = codes != 0
        l0_sum += float(nz.sum())
        fired += nz.sum(0)
        negative |= bool((codes < 0).any())
        n += len(x)
        bar.update(len(x))
    bar.close()
    total_var = sum_y2 - float(sum_y.pow(2).sum()) / n
    fvu = sq_err / max(total_var, 1e-12)
    if not math.isfinite(fvu):
        raise UnitscopeError("the dictionary's reconstruction is not finite (NaN or inf) on the synthetic rows")
    freq = (fired.float() / n).numpy()
    truth_fit = recovery(dictionary.directions.detach().float().cpu(), truth, threshold, signed=not negative)
    return {
        "eval_type_id": "core",
        "eval_config": {"model_name": "synthetic", "input_site": SITE, "output_site": SITE, "synthetic": asdict(spec),
                        "held_out": "fresh rows from the spec's held-out stream (seed, 2), never in the store",
                        "n_rows": n},
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": {
            "reconstruction_quality": {"fvu": fvu, "explained_variance": 1 - fvu, "mse": sq_err / (n * spec.d)},
            "sparsity": {"l0": l0_sum / n},
            "misc": {"frac_dead_units": float((freq == 0).mean()), "frac_dense_units": float((freq > 0.1).mean()),
                     "n_tokens": n, "n_units": dictionary.n_units},
            "ground_truth": {k: v for k, v in truth_fit.items() if k != "best_cos"}
            | {"cosine": SIGNED_NOTE},
        },
        "eval_result_details": [{"unit": i, "frequency": float(f)} for i, f in enumerate(freq)],
        "eval_result_unstructured": {"ground_truth_best_cos": truth_fit["best_cos"]},
        "dictionary": {"architecture": dictionary.architecture, "d_in": dictionary.d_in,
                       "n_units": dictionary.n_units},
        "versions": versions(),
    }


def print_synthetic_metrics(result: dict[str, Any]) -> None:
    m = result["eval_result_metrics"]
    g = m["ground_truth"]
    print(f"FVU {m['reconstruction_quality']['fvu']:.4f}  L0 {m['sparsity']['l0']:.2f}  "
          f"dead {m['misc']['frac_dead_units']:.3f}  dense {m['misc']['frac_dense_units']:.3f}  "
          f"recovered {g['frac_recovered']:.3f} of {g['n_features']} true features above "
          f"{'cos' if g['signed'] else '|cos|'} {g['threshold']} (mean max {'cos' if g['signed'] else '|cos|'} "
          f"{g['mean_max_cos']:.4f})")
