"""Any PyTorch module as a subject: `FILE.py:FUNCTION` (a function returning an nn.Module) and torchvision/timm
architectures whose weights are a local file (`torchvision:NAME@WEIGHTS`, `timm:NAME@WEIGHTS`; no download).

Weights are read from safetensors, or from a .pt/.pth through `torch.load(weights_only=True)` (no pickled code).
"""

from __future__ import annotations

import importlib.util
import re
import sys
from pathlib import Path

from torch import nn

from .errors import UnitscopeError

_FILE_RE = re.compile(r"^(?P<file>.+\.py):(?P<func>[A-Za-z_]\w*)$")
_ZOO_RE = re.compile(r"^(?P<zoo>torchvision|timm):(?P<name>[\w.\-]+)@(?P<weights>.+)$")


def is_module_spec(spec: object) -> bool:
    return isinstance(spec, str) and bool(_FILE_RE.match(spec) or _ZOO_RE.match(spec))


def load_module(spec: str) -> nn.Module:
    """Build the module a spec names; one sentence for a missing file or function, or one that is not a module."""
    m = _FILE_RE.match(spec)
    if m:
        return _from_file(Path(m["file"]), m["func"], spec)
    z = _ZOO_RE.match(spec)
    if z:
        return _from_zoo(z["zoo"], z["name"], Path(z["weights"]))
    raise UnitscopeError(f"{spec!r} is not FILE.py:FUNCTION, torchvision:NAME@WEIGHTS or timm:NAME@WEIGHTS")


def _from_file(path: Path, func: str, spec: str) -> nn.Module:
    if not path.is_file():
        raise UnitscopeError(f"model file {str(path)!r} does not exist (from --model {spec!r})")
    name = f"unitscope_user_{abs(hash(str(path.resolve())))}"
    mod_spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(mod_spec)  # type: ignore[arg-type]
    sys.modules[name] = module
    try:
        mod_spec.loader.exec_module(module)  # type: ignore[union-attr]
    except Exception as e:
        sys.modules.pop(name, None)
        raise UnitscopeError(f"importing model file {str(path)!r} failed: {type(e).__name__}: {e}") from None
    fn = getattr(module, func, None)
    if not callable(fn):
        raise UnitscopeError(f"model file {str(path)!r} has no function {func!r}; --model FILE.py:FUNCTION names a "
                             "function that takes no arguments and returns a torch.nn.Module")
    model = fn()
    if not isinstance(model, nn.Module):
        raise UnitscopeError(f"{func}() in {str(path)!r} returned a {type(model).__name__}, not a torch.nn.Module; "
                             "--model FILE.py:FUNCTION must name a function that returns the model")
    return model


def load_weights(path: Path) -> dict:
    if not path.is_file():
        raise UnitscopeError(f"weights file {str(path)!r} does not exist")
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        return load_file(str(path))
    if path.suffix in (".pt", ".pth", ".bin"):
        import pickle

        import torch

        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except (pickle.UnpicklingError, RuntimeError) as e:
            raise UnitscopeError(f"{str(path)!r} is not a plain state dict of tensors (weights_only load refused: "
                                 f"{str(e).splitlines()[0]}); save it with safetensors") from None
        if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
            state = state["state_dict"]
        return state
    raise UnitscopeError(f"weights file {str(path)!r} is neither .safetensors nor .pt/.pth/.bin")


def _from_zoo(zoo: str, name: str, weights: Path) -> nn.Module:
    state = load_weights(weights)
    try:
        if zoo == "torchvision":
            import torchvision.models as tvm

            model = tvm.get_model(name, weights=None)
        else:
            import timm

            model = timm.create_model(name, pretrained=False)
    except ImportError:
        raise UnitscopeError(f"--model {zoo}:{name} needs the {zoo} package, which is not installed; "
                             f"pip install {zoo}") from None
    except (ValueError, RuntimeError, KeyError) as e:
        raise UnitscopeError(f"{zoo} has no model {name!r} ({e})") from None
    missing, unexpected = model.load_state_dict(state, strict=False)
    if missing or unexpected:
        first = (list(missing) + list(unexpected))[0]
        raise UnitscopeError(f"weights {str(weights)!r} do not fit {zoo}:{name}: {len(missing)} missing and "
                             f"{len(unexpected)} unexpected parameter names (e.g. {first!r})")
    return model
