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
  controlled and the mean k found over controlled rows (the smallest when control is monotone in k; k doubles
  until a row is controlled, then bisection between the last failing and the first working k, per row, all rows
  in one forward per step). The full
  counterfactual patch (x -> x_cf) is the ceiling. The supervised edit changes 2 features (its `control_k`).

Every row also has the FVU of its reconstruction of the held-out x (variance about the fit rows' mean).

Dictionaries of any kind enter only through `encode`, `decode` and `directions` (no branching on the kind); each
must read and write the site the checks edit. `run_task` builds a named task (`TASKS`), runs the checks and
`write_supervised` writes the table as `supervised.parquet` and `supervised.json` (one directory swap).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import torch

from .. import hooks
from ..atomic import replace_dir
from ..errors import UnitscopeError
from .effects import model_logits

TABLE, SUMMARY = "supervised.parquet", "supervised.json"

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
        return model_logits(subject, ids)[:, -1].float().cpu()


def _last(subject: Any, ids: torch.Tensor, site: str) -> torch.Tensor:
    """The site's activation at the last position [N, d] (the forward stops after the site)."""
    with torch.inference_mode(), subject.capture([site], stop=True) as acts:
        try:
            model_logits(subject, ids)
        except hooks.StopForward:
            pass
    return acts[site][:, -1].float().cpu()


def check_dictionary(name: str, d: Any, site: str, width: int) -> None:
    """A dictionary must read and write the edited site at its width; one sentence otherwise."""
    if d.input_site is not None and d.input_site != site:
        raise UnitscopeError(f"dictionary {name!r} was trained on site {d.input_site!r}, not {site!r} where these "
                             f"checks edit; give dictionaries of site {site!r}")
    if d.output_site is not None and d.output_site != (d.input_site or site):
        raise UnitscopeError(f"dictionary {name!r} reads {d.input_site!r} and writes {d.output_site!r} (a "
                             f"transcoder); the supervised checks read and write one site")
    if d.d_in != width or d.d_out != width:
        raise UnitscopeError(f"dictionary {name!r} has width {d.d_in} but site {site!r} has width {width}")


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


def supervised_checks(subject: Any, site: str, data: IOIData, dictionaries: Mapping[str, Any] | None = None,
                      fit_fraction: float = 0.5) -> list[dict[str, Any]]:
    """One row per method (`supervised`, each dictionary, and `counterfactual patch` as the ceiling of control)
    with sufficiency, necessity and sparse control on the held-out prompts (see the module docstring)."""
    n = data.input_ids.shape[0]
    n_fit = int(n * fit_fraction)
    if not 2 <= n_fit <= n - 2:
        raise UnitscopeError(f"{n} prompts are too few to fit on {fit_fraction:.0%} and test on the rest")
    fit, test = torch.arange(n_fit), torch.arange(n_fit, n)
    x = _last(subject, data.input_ids, site)
    x_cf = _last(subject, data.cf_ids, site)
    for name, d in (dictionaries or {}).items():
        check_dictionary(name, d, site, x.shape[1])
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
    rows = [{"method": "supervised", "kind": "supervised", "units": int(sum(p.shape[0] for p in sup.parts.values())),
             "fvu": _fvu(xt, sup.mean + feats, x[fit]),
             "sufficiency": float(ld_with(sup.mean + feats).mean() / clean),
             "necessity": float(ld_with(xt - feats).mean() / clean),
             "control": float(controlled(swap).float().mean()), "control_k": 2.0},
            {"method": "counterfactual patch", "kind": "patch", "units": None, "fvu": None, "sufficiency": None,
             "necessity": None, "control": float(controlled(x_cf[test]).float().mean()), "control_k": None}]
    for name, d in (dictionaries or {}).items():
        rows.append(_dictionary_row(name, d, x, x_cf, fit, test, ld_with, controlled, clean))
    for r in rows:
        r["clean_logit_diff"] = float(clean)
        r["n_test"] = len(test)
    return rows


def _fvu(x: torch.Tensor, x_hat: torch.Tensor, ref: torch.Tensor) -> float:
    """Fraction of variance unexplained on the held-out rows (variance about the fit rows' mean)."""
    return float((x - x_hat).pow(2).sum() / (x - ref.mean(0)).pow(2).sum())


def _smallest_k(order: torch.Tensor, n_diff: torch.Tensor, ct: torch.Tensor, c_cf: torch.Tensor,
                try_codes) -> torch.Tensor:
    """Per row, a k (-1: none) for which setting its k highest-ranked units to their counterfactual codes controls
    it: k doubles (all rows together) up to the row's number of differing units, then bisection between the last
    failing and the first working k, each step one forward over the rows still open. It is the smallest such k
    when control is monotone in k; adding units can overshoot, and then it is a working k, not always the least."""
    rank = torch.empty_like(order).scatter_(1, order, torch.arange(order.shape[1]).expand_as(order).contiguous())

    def works(k: torch.Tensor) -> torch.Tensor:
        return try_codes(torch.where(rank < k[:, None], c_cf, ct))

    n_rows = len(ct)
    lo = torch.zeros(n_rows, dtype=torch.long)  # largest k known to fail (0: none tried)
    hi = torch.full((n_rows,), -1, dtype=torch.long)  # smallest k known to work
    k = 1
    while True:
        k_row = torch.minimum(torch.full_like(n_diff, k), n_diff)
        open_ = (hi < 0) & (k_row > lo)
        if not open_.any():
            break
        ok = works(k_row)
        hi = torch.where(open_ & ok, k_row, hi)
        lo = torch.where(open_ & ~ok, k_row, lo)
        k *= 2
    while True:
        open_ = (hi > 0) & (hi - lo > 1)
        if not open_.any():
            return hi
        mid = torch.where(open_, (lo + hi) // 2, hi)
        ok = works(mid)
        hi = torch.where(open_ & ok, mid, hi)
        lo = torch.where(open_ & ~ok, mid, lo)


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
        k_found = _smallest_k(order, (weight > 0).sum(1), ct, c_cf,
                              lambda codes: controlled(xt + dec(codes) - dec(ct)))
        fvu = _fvu(xt, dec(ct), x[fit])
    done = k_found > 0
    return {"method": name, "kind": d.architecture, "units": d.n_units, "fvu": fvu, "sufficiency": float(suff),
            "necessity": float(nec), "control": float(done.float().mean()),
            "control_k": float(k_found[done].float().mean()) if done.any() else None}


TASKS = {"ioi": ioi_dataset}


def build_task(task: str, tokenizer: Any, n: int = 64, seed: int = 0, names: Sequence[str] | None = None) -> IOIData:
    """The prompts of a named task (`TASKS`)."""
    if task not in TASKS:
        raise UnitscopeError(f"unknown task {task!r}; valid tasks are {', '.join(TASKS)}")
    if tokenizer is None:
        raise UnitscopeError("the supervised checks build their prompts with the model's tokenizer, and this model "
                             "has none")
    return TASKS[task](tokenizer, n=n, seed=seed, **({"names": tuple(names)} if names else {}))


def write_supervised(out: str | Path, rows: Sequence[Mapping[str, Any]],
                     settings: Mapping[str, Any]) -> dict[str, Path]:
    """`supervised.parquet` (the rows) and `supervised.json` (settings and rows) in `out`, swapped in together."""
    out = Path(out)
    with replace_dir(out, allowed={TABLE, SUMMARY}) as tmp:
        pq.write_table(pa.Table.from_pylist([dict(r) for r in rows], schema=SCHEMA), tmp / TABLE)
        (tmp / SUMMARY).write_text(json.dumps({"settings": dict(settings), "rows": [dict(r) for r in rows]}, indent=2))
    return {"table": out / TABLE, "json": out / SUMMARY}


SCHEMA = pa.schema([("method", pa.string()), ("kind", pa.string()), ("units", pa.int64()), ("fvu", pa.float64()),
                    ("sufficiency", pa.float64()), ("necessity", pa.float64()), ("control", pa.float64()),
                    ("control_k", pa.float64()), ("clean_logit_diff", pa.float64()), ("n_test", pa.int64())])


def format_table(rows: Sequence[Mapping[str, Any]]) -> str:
    """The rows as aligned text ('-' where a figure does not apply)."""
    def f(v, spec):
        return "-" if v is None else format(v, spec)

    lines = [f"{'method':<24} {'kind':<12} {'units':>6} {'FVU':>7} {'sufficiency':>11} {'necessity':>9} "
             f"{'control':>7} {'k':>6}"]
    for r in rows:
        lines.append(f"{str(r['method'])[:24]:<24} {str(r['kind'])[:12]:<12} {f(r['units'], 'd'):>6} "
                     f"{f(r['fvu'], '.3f'):>7} {f(r['sufficiency'], '.3f'):>11} {f(r['necessity'], '.3f'):>9} "
                     f"{f(r['control'], '.2f'):>7} {f(r['control_k'], '.1f'):>6}")
    return "\n".join(lines)
