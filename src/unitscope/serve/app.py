"""`unitscope serve`: the run's feature browser plus a JSON API over the live subject (Starlette).

Routes: the report's files (only files inside RUN/report; `..` segments, absolute paths and anything that
resolves outside are refused), `GET /api/info`, `POST /api/activations`, `POST /api/ablate`, `POST /api/steer`.
Every model call holds one lock: hooks live on the shared model, so two requests at once would see each
other's hooks. Request bodies, texts and generation lengths are bounded; a refusal is JSON `{"error": ...}`
with one sentence (413 for a body over the limit, 400 for bad values, 404 for a missing file).
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass
from pathlib import Path, PurePosixPath
from typing import Any

import torch
from starlette.applications import Starlette
from starlette.concurrency import run_in_threadpool
from starlette.requests import Request
from starlette.responses import FileResponse, JSONResponse, Response
from starlette.routing import Route

from ..errors import UnitscopeError


@dataclass(frozen=True)
class Limits:
    body_bytes: int = 64 * 1024  # request body
    text_tokens: int = 512  # tokens of a text or prompt
    new_tokens: int = 64  # generated tokens per steering request
    units: int = 64  # units asked for at once
    top: int = 5  # top units per token


class TooLarge(Exception):
    pass


class Backend:
    """The subject and the run's dictionaries, behind one lock."""

    def __init__(self, run_dir: Path, subject: Any, limits: Limits) -> None:
        self.run_dir, self.subject, self.limits = run_dir, subject, limits
        self.lock = threading.RLock()  # re-entrant: helpers below take it inside request handlers that hold it
        self._dicts: dict[str, Any] = {}

    def load(self) -> None:
        """The run's model, loaded once on the first request (under the lock: two first requests load it once)."""
        with self.lock:
            if self.subject is None:
                self.subject = load_run_subject(self.run_dir)

    def names(self) -> list[str]:
        root = self.run_dir / "dictionaries"
        return sorted(p.parent.name for p in root.glob("*/cfg.json") if not p.parent.name.startswith("."))

    def dictionary(self, name: Any) -> Any:
        if not isinstance(name, str) or name not in self.names():
            raise UnitscopeError(f"unknown dictionary {name!r}; this run has {', '.join(self.names()) or 'none'}")
        with self.lock:  # two first requests load it once
            if name not in self._dicts:
                from ..dictionaries import load_dictionary

                self._dicts[name] = load_dictionary(self.run_dir / "dictionaries" / name).eval()
            return self._dicts[name]

    def ids(self, text: Any, what: str = "text") -> torch.Tensor:
        if not isinstance(text, str) or not text.strip():
            raise UnitscopeError(f"the {what} must be non-empty text")
        with self.lock:  # fast tokenizers are not thread-safe ("Already borrowed")
            ids = self.subject.tokenizer(text, return_tensors="pt").input_ids
        if ids.shape[1] > self.limits.text_tokens:
            raise UnitscopeError(f"the {what} has {ids.shape[1]} tokens; the limit is {self.limits.text_tokens}")
        if ids.shape[1] == 0:
            raise UnitscopeError(f"the {what} tokenises to no tokens")
        return ids

    def units(self, d: Any, units: Any) -> list[int]:
        if not isinstance(units, list) or not units or len(units) > self.limits.units:
            raise UnitscopeError(f"units must be a list of 1 to {self.limits.units} unit numbers, not {units!r}"[:200])
        for u in units:
            if isinstance(u, bool) or not isinstance(u, int) or not 0 <= u < d.n_units:
                raise UnitscopeError(f"unit {u!r} is not a unit of this dictionary (valid units are 0 to "
                                     f"{d.n_units - 1})")
        return units

    def tokens(self, ids: torch.Tensor) -> list[str]:
        with self.lock:
            return [self.subject.tokenizer.decode([int(i)]) for i in ids[0]]

    def activations(self, body: dict[str, Any]) -> dict[str, Any]:
        d = self.dictionary(body.get("dictionary"))
        units = self.units(d, body.get("units", [0]))
        ids = self.ids(body.get("text"))
        site = d.input_site
        with self.lock, torch.inference_mode():
            x = self.subject.collect(ids, [site])[site][0]
            codes = d.encode(x.to(next(d.parameters()).dtype)).float()
        k = min(self.limits.top, d.n_units)
        val, idx = codes.topk(k, dim=1)
        return {"tokens": self.tokens(ids), "site": site,
                "activations": {str(u): [round(float(v), 5) for v in codes[:, u]] for u in units},
                "top": [[[int(i), round(float(v), 5)] for i, v in zip(ri, rv) if v != 0]
                        for ri, rv in zip(idx.tolist(), val.tolist())]}

    def ablate(self, body: dict[str, Any]) -> dict[str, Any]:
        """Zero the units (the reconstruction error kept) and compare the next-token distribution."""
        from ..causal.interventions import UnitEdit

        d = self.dictionary(body.get("dictionary"))
        units = self.units(d, body.get("units"))
        ids = self.ids(body.get("text"))
        edit = UnitEdit(dictionary=d, units=tuple(units), op="zero")
        with self.lock, torch.inference_mode():
            clean = self.subject.logits(ids)[0, -1].double().log_softmax(-1)
            with self.subject.intervene([edit]):
                ablated = self.subject.logits(ids)[0, -1].double().log_softmax(-1)
            p, q = clean.exp(), ablated.exp()
            change = q - p
            order = change.abs().topk(min(10, len(change))).indices
            return {"kl": float((p * (clean - ablated)).sum()), "units": units,
                    "changes": [{"token": self.subject.tokenizer.decode([int(i)]), "id": int(i),
                                 "p_clean": float(p[i]), "p_ablated": float(q[i]), "change": float(change[i])}
                                for i in order]}

    def steer(self, body: dict[str, Any]) -> dict[str, Any]:
        from ..causal.steer import steer

        d = self.dictionary(body.get("dictionary"))
        unit = body.get("unit")
        self.units(d, [unit])
        self.ids(body.get("prompt"), "prompt")
        n_new = body.get("max_new_tokens", 20)
        if isinstance(n_new, bool) or not isinstance(n_new, int) or not 1 <= n_new <= self.limits.new_tokens:
            raise UnitscopeError(f"max_new_tokens must be an integer from 1 to {self.limits.new_tokens}, not "
                                 f"{n_new!r}")
        alpha, kl = body.get("alpha"), body.get("kl")
        for name, v in (("alpha", alpha), ("kl", kl)):
            if v is not None and (isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v)):
                raise UnitscopeError(f"{name} must be a finite number, not {v!r}")
        n = body.get("n", 1)
        if isinstance(n, bool) or not isinstance(n, int) or not 1 <= n <= 4:
            raise UnitscopeError(f"n must be an integer from 1 to 4, not {n!r}")
        seed = body.get("seed", 0)
        if isinstance(seed, bool) or not isinstance(seed, int) or not 0 <= seed < 2**63:
            raise UnitscopeError(f"seed must be a whole number from 0 to 2**63 - 1, not {seed!r}"[:200])
        with self.lock:
            r = steer(self.subject, body["prompt"], dictionary=d, unit=unit, alpha=alpha, kl=kl, n=n,
                      max_new_tokens=n_new, seed=seed)
        return {k: r[k] for k in ("alpha", "kl", "target_kl", "baseline", "steered", "prompt", "site", "unit",
                                  "max_new_tokens", "seed", "intervention")}


def _error(status: int, message: str) -> JSONResponse:
    return JSONResponse({"error": message}, status_code=status)


async def _body(request: Request, limit: int) -> dict[str, Any]:
    declared = request.headers.get("content-length")
    if declared is not None and declared.isdigit() and int(declared) > limit:
        raise TooLarge
    chunks, size = [], 0
    async for chunk in request.stream():
        size += len(chunk)
        if size > limit:
            raise TooLarge
        chunks.append(chunk)
    try:
        body = json.loads(b"".join(chunks) or b"null")
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UnitscopeError("the request body is not JSON") from None
    if not isinstance(body, dict):
        raise UnitscopeError("the request body must be a JSON object")
    return body


def safe_file(root: Path, path: str) -> Path:
    """The file `path` names inside `root`; refused (UnitscopeError) if it could name anything outside it."""
    if not path or path.endswith("/"):
        path = path + "index.html"
    if "\x00" in path or "\\" in path or path.startswith("/") or PurePosixPath(path).is_absolute():
        raise UnitscopeError(f"the path {path[:80]!r} is not a file of this report")
    parts = PurePosixPath(path).parts
    if any(p in ("..", ".") or p.startswith(".") for p in parts) or ":" in parts[0]:
        raise UnitscopeError(f"the path {path[:80]!r} is not a file of this report: '..', hidden and absolute "
                             "paths are refused")
    base = root.resolve()
    target = (base / path).resolve()
    if not target.is_relative_to(base):  # a link pointing out of the report
        raise UnitscopeError(f"the path {path[:80]!r} leads outside the report")
    return target


def create_app(run_dir: str | Path, subject: Any = None, limits: Limits | None = None) -> Starlette:
    """The server's ASGI app. `subject`: the loaded model (None: loaded from the run's store on first use)."""
    run_dir = Path(run_dir)
    site = run_dir / "report"
    if not (site / "index.html").is_file():
        raise UnitscopeError(f"run {str(run_dir)!r} has no report yet; run `unitscope report {run_dir}` first")
    limits = limits or Limits()
    backend = Backend(run_dir, subject, limits)

    def api(fn):
        async def endpoint(request: Request) -> Response:
            try:
                body = await _body(request, limits.body_bytes)
                if backend.subject is None:
                    await run_in_threadpool(backend.load)
                return JSONResponse(await run_in_threadpool(fn, body))
            except TooLarge:
                return _error(413, f"the request body is larger than the limit of {limits.body_bytes} bytes")
            except UnitscopeError as e:
                return _error(400, str(e))
        return endpoint

    async def info(request: Request) -> Response:
        return JSONResponse({"dictionaries": backend.names(), "limits": limits.__dict__})

    async def files(request: Request) -> Response:
        try:
            target = safe_file(site, request.path_params.get("path", ""))
        except UnitscopeError as e:
            return _error(400, str(e))
        if not target.is_file():
            return _error(404, f"the report has no file {request.path_params.get('path', '')[:80]!r}")
        return FileResponse(target)

    routes = [Route("/api/info", info), Route("/api/activations", api(backend.activations), methods=["POST"]),
              Route("/api/ablate", api(backend.ablate), methods=["POST"]),
              Route("/api/steer", api(backend.steer), methods=["POST"]),
              Route("/{path:path}", files)]
    app = Starlette(routes=routes)
    app.state.backend = backend
    return app


def load_run_subject(run_dir: Path) -> Any:
    """The run's model, as its store names it (refused if its weights are not the store's)."""
    from ..commands.inputs import check_same_model
    from ..subject import load_subject

    path = run_dir / "store" / "store.json"
    manifest = json.loads(path.read_text()) if path.is_file() else {}
    spec = manifest.get("model_spec") or manifest.get("model")
    if not spec:
        raise UnitscopeError(f"run {str(run_dir)!r} has no store naming its model; pass --model")
    subject = load_subject(spec)
    check_same_model(subject, manifest.get("model_fingerprint"), manifest.get("model"), f"run {str(run_dir)!r}")
    return subject


LOCAL_HOSTS = ("localhost",)


def _is_loopback(host: str) -> bool:
    import ipaddress

    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host.lower() in LOCAL_HOSTS


def check_host(host: str, allow_remote: bool) -> None:
    if not _is_loopback(host) and not allow_remote:
        raise UnitscopeError(f"--host {host!r} would let other machines reach the server (which runs any text through "
                             "the model); add --allow-remote to do that on purpose, or leave --host out for 127.0.0.1")
