"""Supervised checks of unit kinds on a task with known attributes: the indirect-object (IOI) task.

Why (Makelov et al., "Towards principled evaluations of sparse autoencoders"): when the attributes that the
model must use are known (which name is the indirect object IO, which the subject S, in which order they
came), a *supervised* dictionary built from them is a baseline any unsupervised dictionary can be held to.
Prompts come from a name template ("When A and B went to the store, B gave a drink to" -> " A"); the metric
is the logit difference LD = logit(IO) - logit(S) at the last position, where every edit is made (site
activation x of the last token).

- supervised mean dictionary (fitted on the `fit` half): x ~ m + u_IO[io] + u_S[s] + u_order[order], each u the
  attribute's class mean minus m (the features of Makelov et al.'s supervised dictionaries, mean form);
- sufficiency: x -> the reconstruction (supervised: m + sum u; a dictionary: decode(encode(x)), no error
  term); reported as mean LD / clean mean LD on the held-out half;
- necessity: x -> x with the dictionary's part replaced by its mean (supervised: x - sum u; a dictionary:
  x - decode(c) + decode(mean c), the error kept); LD / clean LD (lower means more necessary);
- sparse control: change the IO name to another name v' (the counterfactual prompt differs in that token
  only) by editing x alone. Supervised: x + u_IO[v'] - u_IO[io]. Dictionary: set the k units with the largest
  |c_cf - c| * |decode row| to their counterfactual codes (error kept), k = 1, 2, 4, ... up to every unit
  that differs; a row is controlled when logit(v') > logit(io) after the edit; reported: the fraction
  controlled and the mean smallest k over controlled rows. The full counterfactual patch (x -> x_cf) is the
  ceiling.
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from .. import hooks
from ..errors import UnitscopeError

TEMPLATE = "When{A} and{B} went to the store,{S} gave a drink to"
NAMES = (" Mary", " John", " Tom", " James", " Anna", " Sarah", " David", " Paul")


@dataclass
class IOIData:
    input_ids: torch.Tensor  # [N, T]
    cf_ids: torch.Tensor  # [N, T] the same prompts with the IO name replaced by `cf`
    io: torch.Tensor  # [N] name index of the indirect object
    s: torch.Tensor  # [N] name index of the subject
    order: torch.Tensor  # [N] 0: IO named first (ABB), 1: S named first (BAB)
    cf: torch.Tensor  # [N] name index of the counterfactual IO
    name_ids: torch.Tensor  # [n_names] token id of each name


def ioi_dataset(tokenizer: Any, n: int = 64, seed: int = 0, names: Sequence[str] = NAMES,
                template: str = TEMPLATE) -> IOIData:
    """`n` IOI prompts (and their counterfactuals) from one template; every name must be one token."""
    if len(names) < 3:
        raise UnitscopeError(f"the IOI task needs at least 3 names (IO, S and a counterfactual), not {len(names)}")
    name_ids = []
    for name in names:
        ids = tokenizer(name, add_special_tokens=False)["input_ids"]
        if len(ids) != 1:
            raise UnitscopeError(f"the name {name!r} is {len(ids)} tokens under this tokenizer; every name must be "
                                 f"one token (try it with a leading space)")
        name_ids.append(ids[0])
    rng = random.Random(seed)
    rows, cf_rows, io, s, order, cf = [], [], [], [], [], []
    for i in range(n):
        a, b, c = rng.sample(range(len(names)), 3)
        o = i % 2

        def text(io_name: int, o: int = o, b: int = b) -> str:
            f, g = (io_name, b) if o == 0 else (b, io_name)
            return template.format(A=names[f], B=names[g], S=names[b])

        rows.append(tokenizer(text(a))["input_ids"])
        cf_rows.append(tokenizer(text(c))["input_ids"])
        io.append(a), s.append(b), order.append(o), cf.append(c)
    if len({len(r) for r in rows + cf_rows}) != 1:
        raise UnitscopeError("the IOI prompts tokenise to different lengths; use single-token names and one template")
    t = torch.tensor
    return IOIData(t(rows), t(cf_rows), t(io), t(s), t(order), t(cf), t(name_ids))


def _last_edit(subject: Any, site: str, values: torch.Tensor) -> hooks.Intervention:
    """Replace the site's activation at the last position of each row by `values` [B, d]."""
    def fn(x: torch.Tensor) -> torch.Tensor:
        out = x.clone()
        out[:, -1] = values.to(x.device, x.dtype)
        return out
    return hooks.Intervention(subject.site(site), fn)


def _logits(subject: Any, ids: torch.Tensor, edits: Sequence[hooks.Intervention] = ()) -> torch.Tensor:
    with torch.inference_mode(), hooks.intervene(subject.model, list(edits)):
        return subject.model(input_ids=ids.to(subject.device), use_cache=False).logits[:, -1].float().cpu()


def _ld(logits: torch.Tensor, a: torch.Tensor, b: torch.Tensor, name_ids: torch.Tensor) -> torch.Tensor:
    rows = torch.arange(len(a))
    return logits[rows, name_ids[a]] - logits[rows, name_ids[b]]


class SupervisedMeans:
    """m + u_IO[io] + u_S[s] + u_order[order], each u a class mean minus the overall mean m."""

    def __init__(self, x: torch.Tensor, data: IOIData, idx: torch.Tensor, n_names: int):
        self.mean = x[idx].mean(0)
        self.parts = {}
        for key, n_cls in (("io", n_names), ("s", n_names), ("order", 2)):
            lab = getattr(data, key)[idx]
            u = torch.zeros(n_cls, x.shape[1])
            for v in range(n_cls):
                sel = lab == v
                if sel.any():
                    u[v] = x[idx][sel].mean(0) - self.mean
            self.parts[key] = u

    def features(self, data: IOIData, idx: torch.Tensor) -> torch.Tensor:
        return sum(self.parts[k][getattr(data, k)[idx]] for k in self.parts)


def supervised_checks(subject: Any, site: str, data: IOIData, dictionaries: dict[str, Any] | None = None,
                      fit_fraction: float = 0.5) -> list[dict[str, Any]]:
    """One row per method (`supervised`, each dictionary, and `counterfactual patch` as the ceiling of control)
    with sufficiency, necessity and sparse control on the held-out prompts (see the module docstring)."""
    n = data.input_ids.shape[0]
    n_fit = int(n * fit_fraction)
    if not 2 <= n_fit <= n - 2:
        raise UnitscopeError(f"{n} prompts are too few to fit on {fit_fraction:.0%} and test on the rest")
    fit, test = torch.arange(n_fit), torch.arange(n_fit, n)
    with torch.inference_mode():
        x = subject.collect(data.input_ids, [site])[site][:, -1].float().cpu()
        x_cf = subject.collect(data.cf_ids, [site])[site][:, -1].float().cpu()
    ids = data.input_ids[test]
    io, s, cf, names = data.io[test], data.s[test], data.cf[test], data.name_ids
    clean = _ld(_logits(subject, ids), io, s, names).mean()

    def ld_with(values: torch.Tensor) -> torch.Tensor:
        return _ld(_logits(subject, ids, [_last_edit(subject, site, values)]), io, s, names)

    def controlled(values: torch.Tensor) -> torch.Tensor:
        return _ld(_logits(subject, ids, [_last_edit(subject, site, values)]), cf, io, names) > 0

    sup = SupervisedMeans(x, data, fit, len(names))
    feats = sup.features(data, test)
    xt = x[test]
    swap = xt + sup.parts["io"][cf] - sup.parts["io"][io]
    rows = [{"method": "supervised", "units": int(sum(p.shape[0] for p in sup.parts.values())),
             "sufficiency": float(ld_with(sup.mean + feats).mean() / clean),
             "necessity": float(ld_with(xt - feats).mean() / clean),
             "control": float(controlled(swap).float().mean()), "control_k": None},
            {"method": "counterfactual patch", "units": None, "sufficiency": None, "necessity": None,
             "control": float(controlled(x_cf[test]).float().mean()), "control_k": None}]
    for name, d in (dictionaries or {}).items():
        rows.append(_dictionary_row(name, d, x, x_cf, fit, test, ld_with, controlled, clean))
    for r in rows:
        r["clean_logit_diff"] = float(clean)
    return rows


def _dictionary_row(name, d, x, x_cf, fit, test, ld_with, controlled, clean) -> dict[str, Any]:
    dt = next(d.parameters()).dtype
    with torch.no_grad():
        c = d.encode(x.to(dt)).float()
        c_cf = d.encode(x_cf[test].to(dt)).float()
        dec = lambda codes: d.decode(codes.to(dt)).float()  # noqa: E731
        ct = c[test]
        mean_c = c[fit].mean(0, keepdim=True).expand_as(ct)
        xt = x[test]
        suff = ld_with(dec(ct)).mean() / clean
        nec = ld_with(xt - dec(ct) + dec(mean_c)).mean() / clean
        weight = (c_cf - ct).abs() * d.directions.float().norm(dim=1)[None]
        order = weight.argsort(dim=1, descending=True)
        n_diff = int((weight > 0).sum(1).max())
        k_found = torch.full((len(test),), -1)
        k = 1
        while k_found.lt(0).any() and n_diff > 0:
            k = min(k, n_diff)
            mask = torch.zeros_like(ct, dtype=torch.bool).scatter(1, order[:, :k], True)
            edited = torch.where(mask, c_cf, ct)
            ok = controlled(xt + dec(edited) - dec(ct))
            k_found = torch.where(ok & (k_found < 0), torch.full_like(k_found, k), k_found)
            if k == n_diff:
                break
            k *= 2
    done = k_found > 0
    return {"method": name, "units": d.n_units, "sufficiency": float(suff), "necessity": float(nec),
            "control": float(done.float().mean()),
            "control_k": float(k_found[done].float().mean()) if done.any() else None}
