"""Site names -> (module path, input|output), per architecture family, plus raw module paths.

A site is where activations are read or written. Canonical transformer names (DESIGN.md):
`embed`, `blocks.{i}.resid_pre`, `blocks.{i}.resid_post`, `blocks.{i}.attn_out`, `blocks.{i}.mlp_in`,
`blocks.{i}.mlp_hidden`, `blocks.{i}.mlp_out`, `final_norm`. Any model can also be addressed by raw
module path: `model.layers.3.mlp.down_proj:input` or `features.10:output`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Literal

from torch import nn

from .errors import UnitscopeError

Io = Literal["input", "output"]


@dataclass(frozen=True)
class SiteRef:
    """Where a site lives: a module (by dotted path) and whether its input or output is meant."""

    name: str
    module_path: str
    io: Io


@dataclass(frozen=True)
class Family:
    """Module paths of one transformer family; `{i}` is the block index."""

    name: str
    blocks: str
    embed: str
    final_norm: str
    attn: str
    mlp: str
    mlp_down: str
    unembed: str


FAMILIES: dict[str, Family] = {
    "llama": Family("llama", "model.layers", "model.embed_tokens", "model.norm", "self_attn", "mlp",
                    "mlp.down_proj", "lm_head"),
    "gpt2": Family("gpt2", "transformer.h", "transformer.wte", "transformer.ln_f", "attn", "mlp",
                   "mlp.c_proj", "lm_head"),
    "gpt_neox": Family("gpt_neox", "gpt_neox.layers", "gpt_neox.embed_in", "gpt_neox.final_layer_norm",
                       "attention", "mlp", "mlp.dense_4h_to_h", "embed_out"),
}
# transformers model_type -> family. Llama-like decoders share module names.
MODEL_TYPES = {
    "llama": "llama", "mistral": "llama", "mixtral": "llama", "qwen2": "llama", "qwen3": "llama",
    "gemma": "llama", "gemma2": "llama", "gemma3_text": "llama", "olmo": "llama", "olmo2": "llama",
    "phi3": "llama", "granite": "llama", "smollm3": "llama",
    "gpt2": "gpt2", "gpt_neox": "gpt_neox",
}
BLOCK_SITES = ("resid_pre", "resid_post", "attn_out", "mlp_in", "mlp_hidden", "mlp_out")
_BLOCK_RE = re.compile(r"^blocks\.(\d+)\.([a-z_]+)$")
_RAW_RE = re.compile(r"^([\w.]+):(input|output)$")


def family_of(model: nn.Module) -> Family | None:
    """The transformer family of a Hugging Face model, or None for any other module."""
    model_type = getattr(getattr(model, "config", None), "model_type", None)
    name = MODEL_TYPES.get(model_type or "")
    return FAMILIES[name] if name else None


def n_blocks(model: nn.Module, family: Family) -> int:
    return len(model.get_submodule(family.blocks))


def canonical_sites(model: nn.Module) -> list[str]:
    """Every canonical site name of a known transformer, in forward order; [] for other models."""
    fam = family_of(model)
    if fam is None:
        return []
    names = ["embed"]
    for i in range(n_blocks(model, fam)):
        names += [f"blocks.{i}.{s}" for s in BLOCK_SITES]
    return names + ["final_norm"]


def resolve_site(model: nn.Module, name: str) -> SiteRef:
    """Turn a site name into a module reference, with one clear error for unknown names."""
    raw = _RAW_RE.match(name)
    if raw:
        path, io = raw.groups()
        try:
            model.get_submodule(path)
        except AttributeError:
            raise UnitscopeError(
                f"unknown module path {path!r} in site {name!r}; valid paths are the names printed by "
                f"`model.named_modules()` (e.g. {_example_paths(model)})"
            ) from None
        return SiteRef(name, path, io)  # type: ignore[arg-type]
    fam = family_of(model)
    if fam is not None:
        if name == "embed":
            return SiteRef(name, fam.embed, "output")
        if name == "final_norm":
            return SiteRef(name, fam.final_norm, "output")
        m = _BLOCK_RE.match(name)
        if m and int(m.group(1)) < n_blocks(model, fam) and m.group(2) in BLOCK_SITES:
            block = f"{fam.blocks}.{m.group(1)}"
            kind = m.group(2)
            path, io = {
                "resid_pre": (block, "input"),
                "resid_post": (block, "output"),
                "attn_out": (f"{block}.{fam.attn}", "output"),
                "mlp_in": (f"{block}.{fam.mlp}", "input"),
                "mlp_hidden": (f"{block}.{fam.mlp_down}", "input"),
                "mlp_out": (f"{block}.{fam.mlp}", "output"),
            }[kind]
            return SiteRef(name, path, io)  # type: ignore[arg-type]
        last = n_blocks(model, fam) - 1
        raise UnitscopeError(
            f"unknown site {name!r}; valid sites are embed, final_norm, blocks.{{0..{last}}}."
            f"{{{','.join(BLOCK_SITES)}}}, or a raw module path such as '{fam.blocks}.0.mlp:output'"
        )
    raise UnitscopeError(
        f"unknown site {name!r}; this model has no canonical site names, so give a raw module path "
        f"'PATH:input' or 'PATH:output' (e.g. {_example_paths(model)})"
    )


def _example_paths(model: nn.Module) -> str:
    paths = [n for n, _ in model.named_modules() if n][:3]
    return ", ".join(f"'{p}:output'" for p in paths) or "none"


def unembed_modules(model: nn.Module) -> tuple[nn.Module, nn.Module]:
    """(final norm, unembedding) of a known transformer, for the logit lens."""
    fam = family_of(model)
    if fam is None:
        raise UnitscopeError("the logit lens needs a known transformer family (llama, gpt2, gpt_neox)")
    return model.get_submodule(fam.final_norm), model.get_submodule(fam.unembed)


def down_projection(model: nn.Module, site: str) -> nn.Module | None:
    """The module that maps `blocks.{i}.mlp_hidden` back into the residual stream, if the site is one."""
    fam = family_of(model)
    m = _BLOCK_RE.match(site)
    if fam is None or not m or m.group(2) != "mlp_hidden":
        return None
    return model.get_submodule(f"{fam.blocks}.{m.group(1)}.{fam.mlp_down}")
