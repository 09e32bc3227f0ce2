"""Interventions as small JSON-serialisable objects, applied through `Subject.intervene`.

Why objects and not lambdas: an experiment must be written down (in F.json, a run directory, a server
request) and replayed exactly; each class below validates itself on construction and on `from_json`, and
refuses bad input in one sentence (`UnitscopeError`).

Public API (every intervention has `positions: Positions`, default all real tokens):

    Positions(kind="all" | "prompt" | "generated" | "indices", indices=(...))
        which tokens are edited; padding (attention mask 0) never is. Under generate() "prompt" is the
        first forward's columns and "generated" the rest; "indices" are positions among a row's real tokens
        (0 = its first real token), refused at the end of the context if the sequence never reached them.
    Activation-space edits at a named site (`site` as in `Subject.site`, e.g. "blocks.1.resid_post"):
        Zero(site, dims=None)                 r[dims] = 0            (every coordinate when dims is None)
        MeanAblate(site, mean, dims=None)     r[dims] = mean[dims]
        Clamp(site, value, dims=None)         r[dims] = value        (a number or one value per dim)
        Scale(site, factor, dims=None)        r[dims] = factor * r[dims]
        AddDirection(site, direction, alpha)  r' = r + alpha * direction        (steering)
        ProjectOut(site, directions)          r' = r - P r    (P: orthogonal projector onto their span)
        ProjectOutAdd(site, directions, add)  r' = r - P r + add
        Dissect(site, alpha, k)               r' = (1 - alpha*p) * r + alpha*p * k  (GAN dissection; p is 1 on
                                              the selected positions, alpha and k scalars or per-dim vectors)
    Unit-space edits over any Dictionary:
        UnitEdit(dictionary, units, op="zero" | "set" | "scale" | "add", value=0.0, site=None)
            c = encode(x at the dictionary's input site); c' = c with `units` edited;
            r' = r + decode(c') - decode(c) at its output site (the two differ for transcoders). The
            reconstruction error and every untouched unit are kept, so an edit that changes no code is an
            exact no-op. `dictionary` is a path (serialised as such) or a loaded Dictionary.
    Positions under generate(): "prompt" is the first forward of the context, so use one context per
    generate() call (or per batch of forwards that share one prompt).
    unit_direction(dictionary, unit) -> decode(e_unit) - decode(0): what adding 1 to a unit's code writes.

    iv.to_json() -> dict;  intervention_from_json(dict | str) -> the right class, validated;
    iv.hooks(subject, dictionaries=None) -> [hooks.Intervention] (what Subject.intervene installs).

    with subject.intervene([UnitEdit("runs/r/dicts/topk", [3]), AddDirection("blocks.1.resid_post", d, 4.0)]):
        subject.model.generate(...)
"""

from __future__ import annotations

import json
import math
from collections.abc import Sequence
from dataclasses import MISSING, dataclass, field, fields
from typing import Any, ClassVar

import torch

from .. import hooks
from ..errors import UnitscopeError

KINDS = ("all", "prompt", "generated", "indices")
UNIT_OPS = ("zero", "set", "scale", "add")
TYPES: dict[str, type[Intervention]] = {}


def _register(name: str):
    def deco(cls):
        cls.type = name
        TYPES[name] = cls
        return cls
    return deco


def _finite_number(value: Any, what: str) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise UnitscopeError(f"{what} must be a finite number, not {value!r}")
    return float(value)


def _vector(value: Any, what: str, allow_scalar: bool = False) -> torch.Tensor | float:
    """A finite float32 vector from a list or tensor (or a finite number when allowed)."""
    if allow_scalar and isinstance(value, (int, float)) and not isinstance(value, bool):
        return _finite_number(value, what)
    if isinstance(value, torch.Tensor):
        t = value.detach().to("cpu", torch.float32)
    else:
        try:
            t = torch.tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise UnitscopeError(f"{what} must be a list of numbers, not {str(value)[:60]!r}") from None
    if t.dim() != 1 or t.numel() == 0:
        raise UnitscopeError(f"{what} must be a non-empty list of numbers (got shape {tuple(t.shape)})")
    if not bool(torch.isfinite(t).all()):
        raise UnitscopeError(f"{what} holds NaN or infinite values")
    return t


def _matrix(value: Any, what: str) -> torch.Tensor:
    t = value.detach().to("cpu", torch.float32) if isinstance(value, torch.Tensor) else None
    if t is None:
        try:
            t = torch.tensor(value, dtype=torch.float32)
        except (TypeError, ValueError, RuntimeError):
            raise UnitscopeError(f"{what} must be a list of equal-length lists of numbers") from None
    if t.dim() == 1:
        t = t[None]
    if t.dim() != 2 or t.numel() == 0 or not bool(torch.isfinite(t).all()):
        raise UnitscopeError(f"{what} must be one or more finite vectors of equal length (got shape "
                             f"{tuple(t.shape)})")
    return t


def _indices(value: Any, what: str) -> tuple[int, ...] | None:
    if value is None:
        return None
    if isinstance(value, int) and not isinstance(value, bool):
        value = [value]
    if not isinstance(value, (list, tuple)) or not value or not all(
            isinstance(i, int) and not isinstance(i, bool) and i >= 0 for i in value):
        raise UnitscopeError(f"{what} must be a non-empty list of integers >= 0, not {value!r}")
    return tuple(int(i) for i in value)


def _json_value(v: Any) -> Any:
    if isinstance(v, torch.Tensor):
        return v.tolist()
    if isinstance(v, tuple):
        return list(v)
    if isinstance(v, Positions):
        return v.to_json()
    return v


@dataclass(frozen=True)
class Positions:
    """Which tokens an intervention edits (see the module docstring); padding never."""

    kind: str = "all"
    indices: tuple[int, ...] = ()

    def __post_init__(self):
        if self.kind not in KINDS:
            raise UnitscopeError(f"unknown position selector {self.kind!r}; valid selectors are {', '.join(KINDS)}")
        if self.kind == "indices":
            object.__setattr__(self, "indices", _indices(list(self.indices), "position indices"))
        elif self.indices:
            raise UnitscopeError(f"position selector {self.kind!r} takes no indices; use kind='indices'")

    def mask(self, step: hooks.Step) -> torch.Tensor:
        """[B, T] bool: the tokens of this forward that are edited."""
        if self.kind == "all":
            return step.real
        if self.kind == "prompt":
            return step.real & (step.columns < step.prompt_len)[None]
        if self.kind == "generated":
            return step.real & (step.columns >= step.prompt_len)[None]
        wanted = torch.tensor(self.indices, device=step.index.device)
        return step.real & torch.isin(step.index, wanted)

    def check(self, tracker: hooks.Tracker) -> None:
        if self.kind == "indices" and max(self.indices) >= tracker.longest:
            raise UnitscopeError(f"position {max(self.indices)} is past the sequence: the longest row had "
                                 f"{tracker.longest} tokens (valid positions are 0 to {tracker.longest - 1})")

    def to_json(self) -> dict[str, Any]:
        return {"kind": self.kind, **({"indices": list(self.indices)} if self.kind == "indices" else {})}

    @classmethod
    def from_json(cls, obj: Any) -> Positions:
        if isinstance(obj, str):
            return cls(obj)
        if isinstance(obj, Positions):
            return obj
        if isinstance(obj, (list, tuple)):
            return cls("indices", tuple(obj))
        if not isinstance(obj, dict) or set(obj) - {"kind", "indices"}:
            raise UnitscopeError(f"a position selector is one of {', '.join(KINDS)} or "
                                 f"{{'kind': 'indices', 'indices': [...]}}, not {str(obj)[:80]!r}")
        return cls(obj.get("kind", "all"), tuple(obj.get("indices") or ()))


def _positions(value: Any) -> Positions:
    return Positions.from_json(value) if not isinstance(value, Positions) else value


@dataclass(eq=False, kw_only=True)
class Intervention:
    """Base of every serialisable intervention: a type name, a position selector, JSON in and out."""

    type: ClassVar[str] = "base"
    positions: Positions = field(default_factory=Positions)

    def to_json(self) -> dict[str, Any]:
        return {"type": self.type, **{f.name: _json_value(getattr(self, f.name)) for f in fields(self)}}

    def hooks(self, subject: Any, dictionaries: dict[str, Any] | None = None) -> list[hooks.Intervention]:
        raise NotImplementedError


@dataclass(eq=False, kw_only=True)
class SiteEdit(Intervention):
    """An edit of the activation vector at one site: subclasses give `edit(x) -> x'` on selected tokens."""

    site: str

    def __post_init__(self):
        if not isinstance(self.site, str) or not self.site:
            raise UnitscopeError(f"an intervention's site must be a site name such as 'blocks.1.resid_post', "
                                 f"not {self.site!r}")
        self.positions = _positions(self.positions)
        self.validate()

    def validate(self) -> None:
        """Check and convert the subclass's fields (one sentence per bad value)."""

    def edit(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def _check_width(self, x: torch.Tensor, n: int, what: str) -> None:
        if x.shape[-1] != n:
            raise UnitscopeError(f"the {what} of this {self.type} intervention has length {n}, but site "
                                 f"{self.site!r} has width {x.shape[-1]}")

    def hooks(self, subject: Any, dictionaries: dict[str, Any] | None = None) -> list[hooks.Intervention]:
        positions = self.positions

        def fn(x: torch.Tensor, step: hooks.Step) -> torch.Tensor | None:
            sel = _selection(positions, step, x, self.site)
            if sel is None:
                return self.edit(x)
            if not bool(sel.any()):
                return None
            return torch.where(sel[..., None], self.edit(x), x)

        return [hooks.Intervention(subject.site(self.site), fn, positional=True, check=positions.check)]


def _selection(positions: Positions, step: hooks.Step, x: torch.Tensor, site: str) -> torch.Tensor | None:
    """[B, T] tokens to edit, or None for every element (all positions of an unpadded batch, or a model whose
    activations are not [batch, sequence, width], where only `all` has a meaning)."""
    if positions.kind == "all" and bool(step.real.all()):
        return None
    if x.dim() != 3 or tuple(x.shape[:2]) != tuple(step.real.shape):
        raise UnitscopeError(f"position selector {positions.kind!r} needs [batch, sequence, width] activations, but "
                             f"site {site!r} has shape {tuple(x.shape)}; use 'all'")
    return positions.mask(step)


def _dims_check(dims: tuple[int, ...] | None, x: torch.Tensor, site: str) -> None:
    if dims is not None and max(dims) >= x.shape[-1]:
        raise UnitscopeError(f"dimension {max(dims)} is out of range: site {site!r} has width {x.shape[-1]} "
                             f"(valid dims are 0 to {x.shape[-1] - 1})")


def _set_dims(x: torch.Tensor, dims: tuple[int, ...] | None, values: torch.Tensor) -> torch.Tensor:
    """x with the coordinates `dims` (all when None) replaced by `values` (broadcast over leading dims)."""
    if dims is None:
        return values.expand_as(x).clone()
    out = x.clone()
    out[..., list(dims)] = values.expand(*x.shape[:-1], len(dims)) if values.dim() else values
    return out


@_register("zero")
@dataclass(eq=False, kw_only=True)
class Zero(SiteEdit):
    dims: tuple[int, ...] | None = None

    def validate(self):
        self.dims = _indices(self.dims, "dims")

    def edit(self, x):
        _dims_check(self.dims, x, self.site)
        return _set_dims(x, self.dims, torch.zeros((), dtype=x.dtype, device=x.device))


@_register("mean")
@dataclass(eq=False, kw_only=True)
class MeanAblate(SiteEdit):
    mean: Any
    dims: tuple[int, ...] | None = None

    def validate(self):
        self.mean = _vector(self.mean, "the mean vector")
        self.dims = _indices(self.dims, "dims")

    def edit(self, x):
        self._check_width(x, self.mean.numel(), "mean vector")
        _dims_check(self.dims, x, self.site)
        m = self.mean.to(x.device, x.dtype)
        return _set_dims(x, self.dims, m if self.dims is None else m[list(self.dims)])


@_register("clamp")
@dataclass(eq=False, kw_only=True)
class Clamp(SiteEdit):
    value: Any
    dims: tuple[int, ...] | None = None

    def validate(self):
        self.value = _vector(self.value, "the clamp value", allow_scalar=True)
        self.dims = _indices(self.dims, "dims")
        if isinstance(self.value, torch.Tensor) and self.dims is not None and self.value.numel() != len(self.dims):
            raise UnitscopeError(f"the clamp value has {self.value.numel()} entries for {len(self.dims)} dims")

    def edit(self, x):
        _dims_check(self.dims, x, self.site)
        v = torch.as_tensor(self.value, dtype=x.dtype, device=x.device)
        if v.dim() and self.dims is None:
            self._check_width(x, v.numel(), "clamp value")
        return _set_dims(x, self.dims, v)


@_register("scale")
@dataclass(eq=False, kw_only=True)
class Scale(SiteEdit):
    factor: float
    dims: tuple[int, ...] | None = None

    def validate(self):
        self.factor = _finite_number(self.factor, "the scale factor")
        self.dims = _indices(self.dims, "dims")

    def edit(self, x):
        _dims_check(self.dims, x, self.site)
        if self.dims is None:
            return x * self.factor
        out = x.clone()
        out[..., list(self.dims)] = x[..., list(self.dims)] * self.factor
        return out


@_register("add")
@dataclass(eq=False, kw_only=True)
class AddDirection(SiteEdit):
    direction: Any
    alpha: float = 1.0

    def validate(self):
        self.direction = _vector(self.direction, "the steering direction")
        self.alpha = _finite_number(self.alpha, "alpha")

    def edit(self, x):
        self._check_width(x, self.direction.numel(), "direction")
        return x + self.alpha * self.direction.to(x.device, x.dtype)


def _projector_basis(directions: torch.Tensor) -> torch.Tensor:
    """Orthonormal rows spanning `directions` (float64 QR; rank-deficient directions are dropped)."""
    q, r = torch.linalg.qr(directions.double().t())
    keep = r.diagonal().abs() > 1e-10 * r.diagonal().abs().max().clamp_min(1e-300)
    return q[:, keep].t()


@_register("project_out")
@dataclass(eq=False, kw_only=True)
class ProjectOut(SiteEdit):
    directions: Any

    def validate(self):
        self.directions = _matrix(self.directions, "the directions to project out")
        if not bool((self.directions.norm(dim=1) > 0).any()):
            raise UnitscopeError("the directions to project out are all zero")

    def _removed(self, x):
        self._check_width(x, self.directions.shape[1], "directions")
        q = _projector_basis(self.directions).to(x.device, torch.float64)
        return x - ((x.double() @ q.t()) @ q).to(x.dtype)

    def edit(self, x):
        return self._removed(x)


@_register("project_out_add")
@dataclass(eq=False, kw_only=True)
class ProjectOutAdd(ProjectOut):
    add: Any

    def validate(self):
        super().validate()
        self.add = _vector(self.add, "the vector to add")
        if self.add.numel() != self.directions.shape[1]:
            raise UnitscopeError(f"the vector to add has length {self.add.numel()}, but the directions have "
                                 f"length {self.directions.shape[1]}")

    def edit(self, x):
        return self._removed(x) + self.add.to(x.device, x.dtype)


@_register("dissect")
@dataclass(eq=False, kw_only=True)
class Dissect(SiteEdit):
    """GAN dissection's insertion/ablation r' = (1 - alpha*p) * r + alpha*p * k (Bau et al. 2019).

    Without `region`, p = 1 and alpha/k run along the last dimension. With `region` (an H×W 0/1 mask), the site
    must give (B, C, H, W) maps: p is the region and alpha/k run along the channels."""

    alpha: Any = 1.0
    k: Any = 0.0
    region: Any = None

    def validate(self):
        self.alpha = _vector(self.alpha, "alpha", allow_scalar=True)
        self.k = _vector(self.k, "k", allow_scalar=True)
        if self.region is not None:
            r = torch.as_tensor(self.region)
            if r.dim() != 2 or r.numel() == 0 or not bool(((r == 0) | (r == 1)).all()):
                raise UnitscopeError(f"a dissect region must be an H x W mask of 0s and 1s, not one of shape "
                                     f"{tuple(r.shape)}")
            self.region = r.to(torch.float32)

    def edit(self, x):
        a = torch.as_tensor(self.alpha, dtype=x.dtype, device=x.device)
        k = torch.as_tensor(self.k, dtype=x.dtype, device=x.device)
        if self.region is not None:
            if x.dim() != 4 or tuple(x.shape[2:]) != tuple(self.region.shape):
                raise UnitscopeError(f"the dissect region is {tuple(self.region.shape)} but site {self.site!r} gives "
                                     f"activations of shape {tuple(x.shape)}; it needs (batch, channels, H, W) maps")
            for name, t in (("alpha", a), ("k", k)):
                if t.dim() and t.numel() != x.shape[1]:
                    raise UnitscopeError(f"the {name} of this dissect intervention has length {t.numel()}, but site "
                                         f"{self.site!r} has {x.shape[1]} channels")
            a = (a[:, None, None] if a.dim() else a) * self.region.to(x.device, x.dtype)
            k = k[:, None, None] if k.dim() else k
            return (1 - a) * x + a * k
        for name, t in (("alpha", a), ("k", k)):
            if t.dim():
                self._check_width(x, t.numel(), name)
        return (1 - a) * x + a * k


@_register("units")
@dataclass(eq=False, kw_only=True)
class UnitEdit(Intervention):
    """Edit chosen units' codes of a dictionary and add back the reconstruction error (see module docstring)."""

    dictionary: Any
    units: tuple[int, ...]
    op: str = "zero"
    value: Any = 0.0
    site: str | None = None

    def __post_init__(self):
        from ..dictionaries import Dictionary

        if not isinstance(self.dictionary, (str, Dictionary)) or self.dictionary == "":
            raise UnitscopeError(f"a unit edit's dictionary must be a dictionary directory or a loaded Dictionary, "
                                 f"not {str(self.dictionary)[:60]!r}")
        self.units = _indices(self.units, "units")
        if self.op not in UNIT_OPS:
            raise UnitscopeError(f"unknown unit operation {self.op!r}; valid operations are {', '.join(UNIT_OPS)}")
        self.value = _vector(self.value, "the unit value", allow_scalar=True)
        if isinstance(self.value, torch.Tensor) and self.value.numel() != len(self.units):
            raise UnitscopeError(f"the unit value has {self.value.numel()} entries for {len(self.units)} units")
        if self.site is not None and (not isinstance(self.site, str) or not self.site):
            raise UnitscopeError(f"a unit edit's site must be a site name or null, not {self.site!r}")
        self.positions = _positions(self.positions)

    def to_json(self) -> dict[str, Any]:
        if not isinstance(self.dictionary, str):
            raise UnitscopeError("a unit edit on an in-memory dictionary cannot be written as JSON; save the "
                                 "dictionary and give its directory instead")
        return super().to_json()

    def resolve(self, dictionaries: dict[str, Any] | None = None):
        """The Dictionary (loaded once per `dictionaries` cache) and its (input site, output site)."""
        from ..dictionaries import load_dictionary

        d = self.dictionary
        if isinstance(d, str):
            cache = dictionaries if dictionaries is not None else {}
            if d not in cache:
                cache[d] = load_dictionary(d)
            d = cache[d]
        bad = [u for u in self.units if u >= d.n_units]
        if bad:
            raise UnitscopeError(f"unit {bad[0]} is out of range: this {d.architecture} dictionary has {d.n_units} "
                                 f"units (valid units are 0 to {d.n_units - 1})")
        in_site, out_site = d.input_site, d.output_site
        if self.site is not None:
            if in_site is not None and self.site != in_site:
                raise UnitscopeError(f"site {self.site!r} is not where this {d.architecture} dictionary was trained; "
                                     f"it reads {in_site!r}" + (f" and writes {out_site!r}" if out_site != in_site
                                                                else ""))
            in_site = in_site or self.site
            out_site = d.metadata.get("hook_name_out") or self.site
        if in_site is None:
            raise UnitscopeError(f"this {d.architecture} dictionary does not record its site; give site=...")
        return d, in_site, out_site

    def edited(self, codes: torch.Tensor) -> torch.Tensor:
        out = codes.clone()
        idx = list(self.units)
        v = torch.as_tensor(self.value, dtype=codes.dtype, device=codes.device)
        if self.op == "zero":
            out[..., idx] = 0
        elif self.op == "set":
            out[..., idx] = v.expand(*codes.shape[:-1], len(idx)) if v.dim() else v
        elif self.op == "scale":
            out[..., idx] = codes[..., idx] * v
        else:
            out[..., idx] = codes[..., idx] + v
        return out

    def delta(self, d: Any, x: torch.Tensor) -> torch.Tensor:
        """decode(c') - decode(c) for input activations x (exactly zero where the codes do not change).
        Differentiable when the caller enables gradients (attribution through an edit)."""
        codes = d.encode(x.to(next(d.parameters()).dtype))
        return d.decode(self.edited(codes)) - d.decode(codes)

    def hooks(self, subject: Any, dictionaries: dict[str, Any] | None = None) -> list[hooks.Intervention]:
        d, in_site, out_site = self.resolve(dictionaries)
        try:
            in_ref, out_ref = subject.site(in_site), subject.site(out_site)
        except UnitscopeError as e:
            raise UnitscopeError(f"this {d.architecture} dictionary's site is not in the model: {e}") from None
        positions = self.positions
        seen: dict[str, torch.Tensor] = {}

        def write(r: torch.Tensor, step: hooks.Step) -> torch.Tensor | None:
            x = seen.pop("x", r) if in_site != out_site else r
            sel = _selection(positions, step, r, out_site)
            if sel is not None and not bool(sel.any()):
                return None
            d.check_width(x)
            delta = self.delta(d, x).to(r.dtype)
            d.check_width(delta, r.shape[-1], "output")
            return r + delta if sel is None else torch.where(sel[..., None], r + delta, r)

        out = [hooks.Intervention(out_ref, write, positional=True, check=positions.check)]
        if in_site != out_site:
            def read(x: torch.Tensor) -> None:
                seen["x"] = x
                return None
            out.insert(0, hooks.Intervention(in_ref, read))
        return out


def unit_direction(dictionary: Any, unit: int) -> torch.Tensor:
    """decode(e_unit) - decode(0): the vector that adding 1 to the unit's code writes at the output site."""
    if not 0 <= unit < dictionary.n_units:
        raise UnitscopeError(f"unit {unit} is out of range: this {dictionary.architecture} dictionary has "
                             f"{dictionary.n_units} units (valid units are 0 to {dictionary.n_units - 1})")
    dtype = next(dictionary.parameters()).dtype
    e = torch.zeros(2, dictionary.n_units, dtype=dtype, device=next(dictionary.parameters()).device)
    e[0, unit] = 1
    with torch.no_grad():
        out = dictionary.decode(e)
    return (out[0] - out[1]).float().cpu()


def intervention_from_json(obj: dict[str, Any] | str) -> Intervention:
    """Build and validate an intervention from its JSON object (or JSON text)."""
    if isinstance(obj, str):
        try:
            obj = json.loads(obj)
        except json.JSONDecodeError as e:
            raise UnitscopeError(f"an intervention must be JSON; this text is not ({e.msg} at character {e.pos})") \
                from None
    if not isinstance(obj, dict):
        raise UnitscopeError(f"an intervention is a JSON object with a 'type', not a {type(obj).__name__}")
    kind = obj.get("type")
    if kind not in TYPES:
        raise UnitscopeError(f"unknown intervention type {kind!r}; valid types are {', '.join(sorted(TYPES))}")
    cls = TYPES[kind]
    names = {f.name for f in fields(cls)}
    extra = sorted(set(obj) - names - {"type"})
    if extra:
        raise UnitscopeError(f"unknown field {extra[0]!r} in a {kind} intervention; valid fields are "
                             f"{', '.join(sorted(names))}")
    required = {f.name for f in fields(cls) if f.default is MISSING and f.default_factory is MISSING}
    missing = sorted(required - set(obj))
    if missing:
        raise UnitscopeError(f"a {kind} intervention needs the field {missing[0]!r}")
    return cls(**{k: v for k, v in obj.items() if k != "type"})


Intervention.from_json = staticmethod(intervention_from_json)  # type: ignore[attr-defined]


def to_hooks(subject: Any, interventions: Sequence[Any],
             dictionaries: dict[str, Any] | None = None) -> list[hooks.Intervention]:
    """hooks.Intervention objects for a mixed list of serialisable interventions and raw hooks.Intervention."""
    out: list[hooks.Intervention] = []
    cache = dictionaries if dictionaries is not None else {}
    for iv in interventions:
        out.extend([iv] if isinstance(iv, hooks.Intervention) else iv.hooks(subject, cache))
    return out
