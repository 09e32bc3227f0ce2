"""Gradient x activation attribution of an output metric to the units of one or more dictionaries.

Why a splice with probes: each dictionary is spliced in at its output site as

    r' = r + (decode(c + z_c) - decode(c)) + z_e,     c = encode(x at the input site),

where `z_c` and `z_e` are zero tensors that require grad. The value is exactly the clean `r` (decode of the
same codes twice cancels to 0), so the spliced model computes exactly the clean output; the gradient reaching
the layers below through `r` is the real model's (the two decode terms cancel in the backward too), so an
upstream unit's attribution is its total effect through everything downstream, as a real ablation of it is.
d metric / d z_c = D^T g is the gradient at each unit's code (D: decoder rows, g: the gradient at the
output site) and d metric / d z_e = g the gradient at the reconstruction error e = r - reconstruct(x), kept as
its own node. Then, per position t:

    unit attribution  A[t, u] = c[t, u] * (D^T g)[t, u]   (linear estimate of metric(clean) - metric(unit zeroed))
    error attribution E[t]    = e[t] . g[t]
    rest R[t]                 = (reconstruct(x) - decode(c) + decode(0))[t] . g[t]    (bias, skip path)
    sum_u A[t, u] + E[t] + R[t] = r[t] . g[t]   (completeness, checked in tests)

Metrics (`Metric.parse`): `logit:TOKEN` (the next-token logit of TOKEN after the prompt), `logitdiff:A,B`
(logit A - logit B) and `loss` (mean next-token cross-entropy over the prompt).

Edges (`edges`): for chosen target nodes (dictionary j, position p, unit t) the attribution of the target's
pre-activation (the code itself for kinds without one) to every unit node of an earlier dictionary, again
c * gradient: the total effect in the real model (attention and norms live), which a real ablation of the
source unit at that position measures. These are not circuit-tracer's direct effects in a frozen
replacement model. For transcoders, `virtual_weights(a, b)` gives the input-independent weights
V[s, t] = (decode_a(e_s) - decode_a(0)) . W_enc_b[:, t]: what one unit of code of `a` written into the
residual stream adds to `b`'s pre-activation when it reaches `b`'s input unchanged (the norm before the MLP,
which scales by the input, is not folded in).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch

from .. import hooks
from ..errors import UnitscopeError

METRICS = ("logit:TOKEN", "logitdiff:A,B", "loss")
ERROR = -1  # the unit index of a site's reconstruction-error node in edges and graphs


def _token_id(tokenizer: Any, text: str) -> int:
    """One token id for `text`: an exact single token, or `#ID` for a raw id."""
    if text.startswith("#") and text[1:].isdigit():
        tid = int(text[1:])
        if tid >= len(tokenizer):
            raise UnitscopeError(f"token id {tid} is out of range: the vocabulary has {len(tokenizer)} tokens")
        return tid
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        raise UnitscopeError(f"the metric's token {text!r} is {len(ids)} tokens under this tokenizer; give one token "
                             f"(e.g. with its leading space) or a raw id as #ID")
    return int(ids[0])


@dataclass(frozen=True)
class Metric:
    """What is attributed: `kind` in logit / logitdiff / loss, with token ids for the logit kinds."""

    kind: str
    tokens: tuple[int, ...] = ()
    spec: str = ""

    @classmethod
    def parse(cls, spec: str, tokenizer: Any) -> Metric:
        kind, _, rest = spec.partition(":")
        if kind == "loss" and not rest:
            return cls("loss", (), spec)
        if kind == "logit" and rest:
            return cls("logit", (_token_id(tokenizer, rest),), spec)
        if kind == "logitdiff" and rest.count(",") == 1 and all(rest.split(",")):
            a, b = rest.split(",")
            return cls("logitdiff", (_token_id(tokenizer, a), _token_id(tokenizer, b)), spec)
        raise UnitscopeError(f"unknown metric {spec!r}; valid metrics are {', '.join(METRICS)}")

    def __call__(self, logits: torch.Tensor, input_ids: torch.Tensor) -> torch.Tensor:
        """The metric summed over the rows of a batch (one value per prompt would be `logits[i:i+1]`)."""
        logits = logits.float()
        if self.kind == "loss":
            if input_ids.shape[1] < 2:
                raise UnitscopeError("the loss metric needs a prompt of at least two tokens")
            lp = logits[:, :-1].log_softmax(-1)
            nll = -lp.gather(-1, input_ids[:, 1:, None].to(lp.device))[..., 0]
            return nll.mean(1).sum()
        last = logits[:, -1]
        if self.kind == "logit":
            return last[:, self.tokens[0]].sum()
        return (last[:, self.tokens[0]] - last[:, self.tokens[1]]).sum()


@dataclass
class SiteAttribution:
    """One dictionary's nodes on one prompt (batch row 0): codes, gradients and their products, [T, ...]."""

    name: str
    in_site: str
    out_site: str
    codes: torch.Tensor  # [T, n_units]
    grads: torch.Tensor  # [T, n_units]  d metric / d code (holding the error fixed)
    error: torch.Tensor  # [T, d_out]    r - reconstruct(x)
    error_grad: torch.Tensor  # [T, d_out]
    rest: torch.Tensor  # [T]  (reconstruct(x) - decode(c) + decode(0)) . g: biases and skip path
    output_dot_grad: torch.Tensor  # [T] r . g

    @property
    def attribution(self) -> torch.Tensor:
        """[T, n_units] code x gradient: the linear estimate of metric(clean) - metric(unit zeroed there)."""
        return self.codes * self.grads

    @property
    def error_attribution(self) -> torch.Tensor:
        return (self.error * self.error_grad).sum(-1)

    def unit_totals(self) -> torch.Tensor:
        """[n_units] attribution summed over positions (ablating the unit at every position)."""
        return self.attribution.sum(0)


@dataclass
class Attribution:
    metric: Metric
    value: float
    input_ids: torch.Tensor
    sites: list[SiteAttribution] = field(default_factory=list)


@dataclass
class _Splice:
    """The hooks that splice one dictionary in with probes, and what they saw on the last forward."""

    dictionary: Any
    name: str
    in_site: str
    out_site: str
    seen: dict[str, torch.Tensor] = field(default_factory=dict)

    def hooks(self, subject: Any) -> list[hooks.Intervention]:
        d = self.dictionary

        def read(x: torch.Tensor) -> None:
            self.seen["x"] = x
            return None

        def write(r: torch.Tensor) -> torch.Tensor:
            x = self.seen["x"] if self.in_site != self.out_site else r
            d.check_width(x)
            d.check_width(r, d.d_out, "output")
            dt = next(d.parameters()).dtype
            codes, recon = d.reconstruct(x.to(dt))
            z_c = torch.zeros_like(codes, requires_grad=True)
            z_e = torch.zeros_like(r, requires_grad=True)
            self.seen.update(codes=codes, recon=recon, r=r, z_c=z_c, z_e=z_e)
            return r + (d.decode(codes + z_c) - d.decode(codes)).to(r.dtype) + z_e

        out = [hooks.Intervention(subject.site(self.out_site), write)]
        if self.in_site != self.out_site:
            out.insert(0, hooks.Intervention(subject.site(self.in_site), read))
        return out


def _sites_of(dictionary: Any, subject: Any, site: str | None = None) -> tuple[str, str]:
    in_site, out_site = dictionary.input_site or site, dictionary.output_site or site
    if in_site is None:
        raise UnitscopeError(f"this {dictionary.architecture} dictionary does not record its site; give one")
    for s in {in_site, out_site}:
        try:
            subject.site(s)
        except UnitscopeError as e:
            raise UnitscopeError(f"this {dictionary.architecture} dictionary's site is not in the model: {e}") \
                from None
    return in_site, out_site


def _splices(subject: Any, dictionaries: Sequence[Any], names: Sequence[str] | None) -> list[_Splice]:
    names = list(names) if names is not None else [f"d{i}" for i in range(len(dictionaries))]
    if len(names) != len(dictionaries):
        raise UnitscopeError(f"{len(names)} names for {len(dictionaries)} dictionaries")
    out, used = [], set()
    for d, name in zip(dictionaries, names):
        in_site, out_site = _sites_of(d, subject)
        if out_site in used:
            raise UnitscopeError(f"two dictionaries write site {out_site!r}; attribute one dictionary per site")
        used.add(out_site)
        out.append(_Splice(d, name, in_site, out_site))
    return out


def _forward(subject: Any, splices: list[_Splice], input_ids: torch.Tensor) -> torch.Tensor:
    ivs = [iv for s in splices for iv in s.hooks(subject)]
    with torch.enable_grad(), hooks.intervene(subject.model, ivs):
        logits = subject.model(input_ids=input_ids.to(subject.device), use_cache=False).logits
    missing = [s.out_site for s in splices if "z_c" not in s.seen]
    if missing:
        raise UnitscopeError(f"site {missing[0]!r} was not reached by the forward pass")
    return logits


def attribute(subject: Any, dictionaries: Sequence[Any], input_ids: torch.Tensor, metric: Metric,
              names: Sequence[str] | None = None) -> Attribution:
    """Attribute `metric` on one prompt (`input_ids` [1, T]) to every unit and error node of each dictionary."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise UnitscopeError(f"attribution takes one prompt (input ids of shape [1, T]), not {tuple(input_ids.shape)}")
    splices = _splices(subject, dictionaries, names)
    logits = _forward(subject, splices, input_ids)
    value = metric(logits, input_ids.to(logits.device))
    probes = [t for s in splices for t in (s.seen["z_c"], s.seen["z_e"])]
    grads = torch.autograd.grad(value, probes, allow_unused=True)
    out = Attribution(metric, float(value.detach()), input_ids.detach().cpu())
    for i, s in enumerate(splices):
        g_c, g_e = grads[2 * i], grads[2 * i + 1]
        v = {k: t.detach()[0].float().cpu() for k, t in s.seen.items() if k in ("codes", "recon", "r")}
        g_c = torch.zeros_like(v["codes"]) if g_c is None else g_c[0].float().cpu()
        g_e = torch.zeros_like(v["r"]) if g_e is None else g_e[0].float().cpu()
        with torch.no_grad():
            codes = s.seen["codes"].detach()
            base = (s.dictionary.decode(codes) - s.dictionary.decode(torch.zeros_like(codes)))[0].float().cpu()
        rest = ((v["recon"] - base) * g_e).sum(-1)
        out.sites.append(SiteAttribution(s.name, s.in_site, s.out_site, v["codes"], g_c, v["r"] - v["recon"], g_e,
                                         rest, (v["r"] * g_e).sum(-1)))
    return out


def _target_value(d: Any, x: torch.Tensor) -> torch.Tensor:
    """A unit's pre-activation where the kind has one (differentiable through TopK), else its code."""
    dt = next(d.parameters()).dtype
    pre = getattr(d, "pre_activations", None)
    return pre(x.to(dt)) if pre is not None else d.encode(x.to(dt))


@dataclass
class Edge:
    source: tuple[int, int, int]  # (dictionary index, position, unit)
    target: tuple[int, int, int]
    weight: float


def edges(subject: Any, dictionaries: Sequence[Any], input_ids: torch.Tensor,
          targets: Sequence[tuple[int, int, int]], min_abs: float = 0.0) -> list[Edge]:
    """For each target node (dictionary j, position p, unit t): code x gradient of its pre-activation with respect
    to every active unit node of the dictionaries before j (positions <= p), the total effect in the real model.
    Error nodes of earlier dictionaries are sources too (unit `ERROR`): error . gradient at their position."""
    if input_ids.dim() != 2 or input_ids.shape[0] != 1:
        raise UnitscopeError(f"edges take one prompt (input ids of shape [1, T]), not {tuple(input_ids.shape)}")
    splices = _splices(subject, dictionaries, None)
    _forward(subject, splices, input_ids)
    T = input_ids.shape[1]
    out: list[Edge] = []
    for j, p, t in targets:
        if not (0 <= j < len(splices) and 0 <= p < T and 0 <= t < splices[j].dictionary.n_units):
            raise UnitscopeError(f"target node {(j, p, t)} is out of range: {len(splices)} dictionaries, "
                                 f"{T} positions, {splices[j].dictionary.n_units if 0 <= j < len(splices) else '?'} "
                                 f"units")
        s = splices[j]
        x = s.seen["x"] if s.in_site != s.out_site else s.seen["r"]
        value = _target_value(s.dictionary, x)[0, p, t]
        if j == 0:
            continue
        probes = [splices[i].seen[k] for i in range(j) for k in ("z_c", "z_e")]
        grads = torch.autograd.grad(value, probes, retain_graph=True, allow_unused=True)
        for i in range(j):
            g_c, g_e = grads[2 * i], grads[2 * i + 1]
            seen = splices[i].seen
            if g_c is not None:
                a = (seen["codes"].detach() * g_c)[0, :p + 1].float().cpu()
                for q, u in (a.abs() > min_abs).nonzero(as_tuple=False).tolist():
                    out.append(Edge((i, q, u), (j, p, t), float(a[q, u])))
            if g_e is not None:
                err = (seen["r"] - seen["recon"].to(seen["r"].dtype)).detach()
                e = (err * g_e)[0, :p + 1].sum(-1).float().cpu()
                for q in (e.abs() > min_abs).nonzero(as_tuple=False)[:, 0].tolist():
                    out.append(Edge((i, q, ERROR), (j, p, t), float(e[q])))
    return out


def pre_activation(subject: Any, dictionary: Any, input_ids: torch.Tensor,
                   interventions: Sequence[Any] = ()) -> torch.Tensor:
    """[B, T, n_units] pre-activations (codes for kinds without) of `dictionary` on a real forward, under
    `interventions`: what a real ablation of a source unit changes, to check `edges` against."""
    in_site = dictionary.input_site
    with torch.inference_mode(), subject.intervene(list(interventions)):
        acts = subject.collect(input_ids, [in_site])
        return _target_value(dictionary, acts[in_site]).float().cpu()


def virtual_weights(a: Any, b: Any) -> torch.Tensor:
    """[a.n_units, b.n_units] input-independent weights from the units of dictionary `a` (written at its output
    site) to the pre-activations of dictionary `b` (read at its input site), through the residual stream:
    (decode_a(e_s) - decode_a(0)) @ W_enc_b. `b` must be an SAE-like kind with an encoder matrix."""
    w_enc = getattr(b, "W_enc", None)
    if w_enc is None:
        raise UnitscopeError(f"virtual weights need an encoder matrix; a {b.architecture} dictionary has none")
    if a.d_out != b.d_in:
        raise UnitscopeError(f"the first dictionary writes width {a.d_out} but the second reads width {b.d_in}")
    dt = next(a.parameters()).dtype
    with torch.no_grad():
        eye = torch.eye(a.n_units, dtype=dt)
        dirs = a.decode(eye) - a.decode(torch.zeros(1, a.n_units, dtype=dt))
        return (dirs.float() @ w_enc.detach().float()).cpu()
