"""capture(...) and intervene(...): plain PyTorch forward (pre-)hooks on the unmodified model.

Each context removes exactly the hooks it added, also after an exception and when nested. Module inputs
and outputs that are tuples in one transformers version and tensors in another are normalised here, in
`_primary` and `_with_primary`, and nowhere else.

Positional interventions (`Intervention(..., positional=True)`) get a `Step` beside the activation: which
absolute columns and which per-row token indices the current forward covers. Under `generate()` with a KV
cache each forward sees only the new tokens, so positions are read from the attention mask (its length is
past + new) or the cache length, by a pre-hook on the whole model (`track_positions`).
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, nullcontext
from dataclasses import dataclass, field

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
class Step:
    """What the current forward pass covers, for a batch of B rows and T new tokens.

    columns: [T] absolute column of each new token in the (left-padded) sequence; index: [B, T] each
    token's position among its row's real tokens (-1 on padding); real: [B, T] False on padding;
    prompt_len: the number of columns of the first forward in the context (the prompt, under generate()).
    """

    columns: torch.Tensor
    index: torch.Tensor
    real: torch.Tensor
    prompt_len: int


@dataclass
class Tracker:
    """Positions of the current forward (`step`), and the longest row seen in the context (`longest`)."""

    step: Step | None = None
    longest: int = 0
    forwards: int = 0
    prompt_len: int | None = field(default=None, repr=False)


def _new_tokens(args: tuple, kwargs: dict) -> torch.Tensor | None:
    for key in ("input_ids", "inputs_embeds"):
        if isinstance(kwargs.get(key), torch.Tensor):
            return kwargs[key]
    return args[0] if args and isinstance(args[0], torch.Tensor) else None


def _past_length(kwargs: dict) -> int:
    for key in ("cache", "past_key_values"):
        cache = kwargs.get(key)
        if cache is not None and hasattr(cache, "get_seq_length"):
            return int(cache.get_seq_length())
    return 0


@contextmanager
def track_positions(model: nn.Module) -> Iterator[Tracker]:
    """Keep `tracker.step` up to date for every forward of `model` inside the context."""
    tracker = Tracker()

    def pre_hook(_mod, args, kwargs):
        tokens = _new_tokens(args, kwargs)
        if tokens is None:
            return None
        b, t = tokens.shape[0], tokens.shape[1]
        mask = kwargs.get("attention_mask")
        if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[0] == b and mask.shape[1] >= t:
            total = mask.shape[1]
            full = mask.to(torch.long)
        else:
            total = _past_length(kwargs) + t
            full = torch.ones(b, total, dtype=torch.long, device=tokens.device)
        index = (full.cumsum(1) - 1)[:, total - t:]
        real = full[:, total - t:].bool()
        if tracker.prompt_len is None:
            tracker.prompt_len = total
        tracker.forwards += 1
        tracker.longest = max(tracker.longest, int(full.sum(1).max()))
        tracker.step = Step(torch.arange(total - t, total, device=tokens.device), torch.where(real, index, -1),
                            real, tracker.prompt_len)
        return None

    handle = model.register_forward_pre_hook(pre_hook, with_kwargs=True)
    try:
        yield tracker
    finally:
        handle.remove()


@dataclass
class Intervention:
    """Replace the activation at `site` by `edit(activation)`; an identity edit is a bit-exact no-op.

    With `positional=True` the edit is called as `edit(activation, step)` (a `Step`, see `track_positions`).
    `check`, if given, is called with the context's `Tracker` when the context exits without error (e.g. to
    refuse a position past the sequence).
    """

    site: SiteRef
    edit: Callable
    positional: bool = False
    check: Callable[[Tracker], None] | None = None


def _positional(edit: Callable, tracker: Tracker) -> Callable[[torch.Tensor], torch.Tensor | None]:
    def fn(x: torch.Tensor):
        if tracker.step is None:
            raise RuntimeError("a positional intervention ran outside a forward of the tracked model")
        return edit(x, tracker.step)
    return fn


@contextmanager
def intervene(model: nn.Module, interventions: Sequence[Intervention]) -> Iterator[Tracker]:
    """Apply each intervention's edit at its site for every forward inside the context (nested contexts stack:
    the outer edit runs first). Yields the position `Tracker` (positional interventions read it)."""
    handles = []
    tracking = track_positions(model) if any(iv.positional for iv in interventions) else nullcontext(Tracker())
    with tracking as tracker:
        try:
            for iv in interventions:
                fn = _positional(iv.edit, tracker) if iv.positional else iv.edit
                handles.append(add_hook(model, iv.site, fn))
            yield tracker
        finally:
            for h in handles:
                h.remove()
    for iv in interventions:
        if iv.check is not None and tracker.forwards:
            iv.check(tracker)
