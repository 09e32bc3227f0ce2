"""One protocol for every unit kind, a registry by `architecture` name, and the SAELens file layout.

Files: `cfg.json` (`architecture`, `d_in`, `d_sae`, `dtype`, arch fields, a `metadata` block with model
and hook names) and `sae_weights.safetensors`. Never pickle: weights are safetensors, the rest JSON.
"""

from __future__ import annotations

import json
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any, ClassVar

import torch
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import recover, replace_dir
from ..errors import UnitscopeError
from ..fs import get_dictionary_dir, is_url, put_versioned

CFG = "cfg.json"
WEIGHTS = "sae_weights.safetensors"
ARCHITECTURES: dict[str, type[Dictionary]] = {}
# Other libraries' file layouts: (recognise(path) -> bool, load(path) -> Dictionary), registered by kinds.
FORMATS: list[tuple[Callable[[Path], bool], Callable[[Path], Dictionary]]] = []


def register(name: str):
    """Class decorator: make a dictionary kind loadable by its `architecture` name."""
    def deco(cls: type[Dictionary]) -> type[Dictionary]:
        cls.architecture = name
        ARCHITECTURES[name] = cls
        return cls
    return deco


class Dictionary(nn.Module):
    """A dictionary of units over the activations at one site.

    encode(x[..., d_in]) -> codes[..., n_units]; decode(codes) -> x̂[..., d_out]; `directions` are the
    decoder rows [n_units, d_out] (used by steering and the logit lens). Leading dimensions of any shape.
    """

    architecture: ClassVar[str] = "base"

    def __init__(self, d_in: int, n_units: int, d_out: int | None = None,
                 metadata: dict[str, Any] | None = None):
        super().__init__()
        self.d_in, self.n_units = int(d_in), int(n_units)
        self.d_out = int(d_out if d_out is not None else d_in)
        self.metadata: dict[str, Any] = dict(metadata or {})

    # ---- protocol ---------------------------------------------------------------------------------
    def encode(self, x: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    def decode(self, codes: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError

    @property
    def directions(self) -> torch.Tensor:
        raise NotImplementedError

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.reconstruct(x)[1]

    def reconstruct(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(codes, reconstruction at the output site); skip transcoders add their linear path here."""
        codes = self.encode(x)
        return codes, self.decode(codes)

    @property
    def input_site(self) -> str | None:
        return self.metadata.get("hook_name")

    @property
    def output_site(self) -> str | None:
        return self.metadata.get("hook_name_out") or self.input_site

    def check_width(self, x: torch.Tensor, width: int | None = None, what: str = "input") -> None:
        width = self.d_in if width is None else width
        if x.shape[-1] != width:
            raise UnitscopeError(
                f"the {what} has width {x.shape[-1]}, but this {self.architecture} dictionary expects "
                f"width {width} (site {self.input_site or 'unknown'})"
            )

    # ---- files ------------------------------------------------------------------------------------
    def arch_config(self) -> dict[str, Any]:
        """Architecture fields written to cfg.json beside the common ones."""
        return {}

    def weights(self) -> dict[str, torch.Tensor]:
        """Tensors written to sae_weights.safetensors, under SAELens names."""
        return {k: v.detach() for k, v in self.state_dict().items()}

    @classmethod
    def from_weights(cls, cfg: dict[str, Any], weights: dict[str, torch.Tensor]) -> Dictionary:
        raise NotImplementedError

    def config(self) -> dict[str, Any]:
        dtype = next(iter(self.weights().values())).dtype if self.weights() else torch.float32
        return {
            "architecture": self.architecture,
            "d_in": self.d_in,
            "d_sae": self.n_units,
            **({"d_out": self.d_out} if self.d_out != self.d_in else {}),
            "dtype": str(dtype).removeprefix("torch."),
            "device": "cpu",
            **self.arch_config(),
            "metadata": self.metadata,
        }

    def save(self, path: str | Path, extra: dict[str, Any] | None = None) -> str | Path:
        """Write cfg.json, sae_weights.safetensors and the JSON files in `extra` (name -> object) so that a
        kill at any moment leaves a complete old or new dictionary (`atomic.replace_dir`). At a URL (s3://...) the
        files are written locally, uploaded as a new version, and the URL's one-object pointer is then moved to it
        (`fs.put_versioned`): until then readers get the old dictionary, after it the new one."""
        if is_url(path):
            with tempfile.TemporaryDirectory(prefix="unitscope-dictionary-") as tmp:
                self._write_files(Path(tmp), extra)
                put_versioned(Path(tmp), str(path))
            return path
        path = Path(path)
        with replace_dir(path) as tmp:
            self._write_files(tmp, extra)
        return path

    def _write_files(self, folder: Path, extra: dict[str, Any] | None) -> None:
        save_file({k: v.contiguous().cpu() for k, v in self.weights().items()}, str(folder / WEIGHTS))
        for name, obj in (extra or {}).items():
            (folder / name).write_text(json.dumps(obj, indent=2))
        (folder / CFG).write_text(json.dumps(self.config(), indent=2))


def require_weights(cfg: dict[str, Any], weights: dict[str, torch.Tensor], *keys: str) -> None:
    """One clear error when a weights file lacks a tensor its architecture needs."""
    for key in keys:
        if key not in weights:
            raise UnitscopeError(f"the weights of this {cfg.get('architecture')} dictionary lack {key!r}")


def load_dictionary(path: str | Path, device: str = "cpu") -> Dictionary:
    """Load any saved dictionary: the SAELens layout (cfg.json + sae_weights.safetensors, every kind here),
    or another library's layout registered in FORMATS (sparsify: cfg.json + sae.safetensors). A URL (s3://...) is
    downloaded into a private temporary folder, every file from the version its pointer names, checked against
    it, or the plain files of one save where there is no pointer (`fs.get_dictionary_dir`), and loaded from there
    (the tensors are read into memory; the folder is then removed)."""
    if is_url(path):
        with tempfile.TemporaryDirectory(prefix="unitscope-dictionary-", ignore_cleanup_errors=True) as tmp:
            local = get_dictionary_dir(str(path), Path(tmp)).absolute()
            try:
                return load_dictionary(local, device)
            except UnitscopeError as e:  # name the URL the user gave, not the temporary folder
                raise UnitscopeError(str(e).replace(str(local), str(path).rstrip("/"))) from None
    path = recover(path)
    for recognise, load in FORMATS:
        if recognise(path):
            return load(path).to(device).eval()
    cfg_path = path / CFG
    if not cfg_path.is_file():
        raise UnitscopeError(f"{str(path)!r} is not a dictionary directory: it has no {CFG}")
    try:
        cfg = json.loads(cfg_path.read_bytes().decode("utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError):
        raise UnitscopeError(f"{str(cfg_path)!r} is not valid JSON") from None
    if not isinstance(cfg, dict):
        raise UnitscopeError(f"{str(cfg_path)!r} holds a JSON {type(cfg).__name__}, not an object of settings")
    arch = cfg.get("architecture")
    if not isinstance(arch, str):
        arch = repr(arch)
    if arch not in ARCHITECTURES:
        raise UnitscopeError(
            f"unknown dictionary architecture {arch!r} in {str(cfg_path)!r}; known architectures are "
            f"{', '.join(sorted(ARCHITECTURES))}"
        )
    wpath = path / WEIGHTS
    if not wpath.is_file():
        raise UnitscopeError(f"{str(path)!r} has no {WEIGHTS}")
    try:
        weights = load_file(str(wpath), device=device)
    except Exception as e:  # noqa: BLE001 - safetensors raises its own error type for bad files
        raise UnitscopeError(f"{str(wpath)!r} is not a readable safetensors file ({e})") from None
    for key, tensor in weights.items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            bad = int((~torch.isfinite(tensor)).sum())
            raise UnitscopeError(f"{str(wpath)!r} is unusable: its tensor {key!r} holds {bad} NaN or infinite "
                                 "value(s); retrain the dictionary or restore an earlier copy")
    try:
        d = ARCHITECTURES[arch].from_weights(cfg, weights)
    except UnitscopeError:
        raise
    except (KeyError, TypeError, ValueError, RuntimeError, OverflowError, AttributeError) as e:
        # a hand-edited or mismatched cfg.json (wrong type, size or shape): name the files, not the internals
        why = (str(e).strip().splitlines() or [type(e).__name__])[0][:200]
        raise UnitscopeError(f"{str(path)!r} does not hold a valid {arch} dictionary: its {CFG} and {WEIGHTS} "
                             f"disagree or a setting is invalid ({why})") from None
    return d.to(device).eval()
