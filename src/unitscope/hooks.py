"""capture(...) and intervene(...): plain PyTorch forward (pre-)hooks on the unmodified model.

Each context removes exactly the hooks it added, also after an exception and when nested. Module inputs
and outputs that are tuples in one transformers version and tensors in another are normalised here, in
`_primary` and `_with_primary`, and nowhere else.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass

import torch
from torch import nn

from .sites import SiteRef

Edit = Callable[[torch.Tensor], torch.Tensor]


class StopForward(Exception):
    """Raised inside a hook to end a forward pass once every needed site has been seen."""


def _primary(value):
    if isinstance(value, torch.Tensor):
        return value
    if isinstance(value, (tuple, list)) and value and isinstance(value[0], torch.Tensor):
        return value[0]
    if hasattr(value, "last_hidden_state"):
        return value.last_hidden_state
    raise TypeError(f"cannot find the activation tensor in a {type(value).__name__}")


def _with_primary(value, new: torch.Tensor):
    if isinstance(value, torch.Tensor):
        return new
    if isinstance(value, tuple):
        return (new, *value[1:])
    if isinstance(value, list):
        return [new, *value[1:]]
    value.last_hidden_state = new
    return value


def _input_of(args: tuple, kwargs: dict) -> torch.Tensor:
    if args:
        return _primary(args)
    for v in kwargs.values():
        if isinstance(v, torch.Tensor):
            return v
    raise TypeError("module was called without a tensor input")


def _replace_input(args: tuple, kwargs: dict, new: torch.Tensor) -> tuple[tuple, dict]:
    if args:
        return (new, *args[1:]), kwargs
    for k, v in kwargs.items():
        if isinstance(v, torch.Tensor):
            return args, {**kwargs, k: new}
    raise TypeError("module was called without a tensor input")


def add_hook(model: nn.Module, ref: SiteRef, fn: Callable[[torch.Tensor], torch.Tensor | None]):
    """Attach `fn` at a site; a non-None return replaces the activation. Returns the hook handle."""
    module = model.get_submodule(ref.module_path)
    if ref.io == "input":
        def pre_hook(_mod, args, kwargs):
            new = fn(_input_of(args, kwargs))
            return None if new is None else _replace_input(args, kwargs, new)

        return module.register_forward_pre_hook(pre_hook, with_kwargs=True)

    def hook(_mod, _args, output):
        new = fn(_primary(output))
        return None if new is None else _with_primary(output, new)

    return module.register_forward_hook(hook)


@contextmanager
def capture(model: nn.Module, refs: Sequence[SiteRef], stop: bool = False,
            detach: bool = True) -> Iterator[dict[str, torch.Tensor]]:
    """Record the activation at each site into the yielded dict (name -> tensor).

    With `stop=True` the forward raises StopForward as soon as every site has been seen, so a
    recording of early sites does not pay for the rest of the model; the caller catches it.
    """
    acts: dict[str, torch.Tensor] = {}
    wanted = {r.name for r in refs}
    handles = []

    def make(name: str):
        def fn(x: torch.Tensor):
            acts[name] = x.detach() if detach else x
            if stop and wanted.issubset(acts):
                raise StopForward
            return None
        return fn

    try:
        for r in refs:
            handles.append(add_hook(model, r, make(r.name)))
        yield acts
    finally:
        for h in handles:
            h.remove()


@dataclass
class Intervention:
    """Replace the activation at `site` by `edit(activation)`; an identity edit is a bit-exact no-op."""

    site: SiteRef
    edit: Edit


@contextmanager
def intervene(model: nn.Module, interventions: Sequence[Intervention]) -> Iterator[None]:
    handles = []
    try:
        for iv in interventions:
            handles.append(add_hook(model, iv.site, iv.edit))
        yield
    finally:
        for h in handles:
            h.remove()
