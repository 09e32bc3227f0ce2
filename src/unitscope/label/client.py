"""Chat backends for labelling: any OpenAI-compatible endpoint over HTTP, or a local Hugging Face chat model.

The HTTP client is `httpx` (the `llm` extra), not the `openai` package: every server we target (vLLM, Ollama,
llama.cpp's server, OpenAI) speaks the same JSON, and the `openai` package would add its own retry loop and
strict response types on top of httpx, while we need one retry policy that also covers answers that parse
as HTTP but are garbage (no choices, no text), and must read the two log-probability layouts that servers
return (OpenAI's `content` list and llama.cpp's completion-style `top_logprobs` dicts).

A backend answers `complete(messages, max_tokens, top_logprobs)` with an `Answer`: the text and, where the
server gives them, the top log-probabilities at each generated position. Transient failures (refused or
dropped connections, timeouts, HTTP 408/429/5xx, malformed bodies) are retried with exponential backoff and
jitter (`Retry-After` honoured); what still fails raises `EndpointError`, which the labelling loop records
against the unit it was working on.
"""

from __future__ import annotations

import json
import os
import random
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from ..errors import UnitscopeError

API_KEY_ENVS = ("UNITSCOPE_LLM_API_KEY", "OPENAI_API_KEY")
RETRY_STATUS = {408, 409, 425, 429, 500, 502, 503, 504}


class EndpointError(Exception):
    """A request that still failed after its retries; the message is one sentence naming why."""


@dataclass
class Answer:
    text: str
    top_logprobs: list[dict[str, float]] | None = None  # per generated position: token text -> log-probability
    attempts: int = 1


class RateLimiter:
    """At most `rate` request starts per second across threads (None: unlimited)."""

    def __init__(self, rate: float | None):
        self.interval = 1.0 / rate if rate else 0.0
        self._next = 0.0
        self._lock = threading.Lock()

    def wait(self) -> None:
        if not self.interval:
            return
        with self._lock:
            now = time.monotonic()
            start = max(now, self._next)
            self._next = start + self.interval
        if start > now:
            time.sleep(start - now)


def chat_url(url: str) -> tuple[str, str]:
    """(chat completions URL, models URL) from a server root, a `/v1` base, or the full completions URL."""
    u = url.strip().rstrip("/")
    if not u.startswith(("http://", "https://")):
        raise UnitscopeError(f"endpoint {url!r} is not an http:// or https:// URL (e.g. http://127.0.0.1:8000/v1)")
    if u.endswith("/chat/completions"):
        base = u[: -len("/chat/completions")]
    elif u.endswith("/v1"):
        base = u
    else:
        base = u + "/v1"
    return base + "/chat/completions", base + "/models"


def _logprobs(choice: dict[str, Any]) -> list[dict[str, float]] | None:
    """Top log-probabilities per generated position, from either layout servers use; None when absent."""
    lp = choice.get("logprobs")
    if not isinstance(lp, dict):
        return None
    out: list[dict[str, float]] = []
    if isinstance(lp.get("content"), list):  # OpenAI, vLLM, recent llama.cpp
        for pos in lp["content"]:
            top = {str(t["token"]): float(t["logprob"]) for t in pos.get("top_logprobs") or []
                   if isinstance(t, dict) and "token" in t and t.get("logprob") is not None}
            if "token" in pos and pos.get("logprob") is not None:
                top.setdefault(str(pos["token"]), float(pos["logprob"]))
            out.append(top)
    elif isinstance(lp.get("top_logprobs"), list):  # completion style (llama-cpp-python)
        for pos in lp["top_logprobs"]:
            out.append({str(k): float(v) for k, v in (pos or {}).items() if v is not None})
    return out or None


@dataclass
class OpenAIEndpoint:
    """An OpenAI-compatible `/v1/chat/completions` endpoint (vLLM, Ollama, llama.cpp's server, OpenAI)."""

    url: str
    model: str | None = None
    temperature: float = 0.0
    seed: int = 0
    timeout: float = 60.0
    max_retries: int = 4
    rate_limit: float | None = None
    backoff: float = 0.5  # seconds before the first retry; doubles each time, capped at 30 s
    kind: str = field(default="openai-compatible", init=False)

    def __post_init__(self) -> None:
        try:
            import httpx
        except ImportError:
            raise UnitscopeError("labelling through an endpoint needs httpx; install it with "
                                 "`pip install 'unitscope[llm]'`") from None
        self._httpx = httpx
        self.chat, self.models_url = chat_url(self.url)
        key = next((os.environ[k] for k in API_KEY_ENVS if os.environ.get(k)), None)
        headers = {"Authorization": f"Bearer {key}"} if key else {}
        self._client = httpx.Client(timeout=httpx.Timeout(self.timeout), headers=headers)
        self._limiter = RateLimiter(self.rate_limit)
        self._want_logprobs = True

    def close(self) -> None:
        self._client.close()

    def _sleep(self, attempt: int, retry_after: str | None) -> None:
        delay = min(30.0, self.backoff * 2 ** attempt) * (0.5 + random.random() / 2)
        if retry_after:
            try:
                delay = max(delay, min(60.0, float(retry_after)))
            except ValueError:
                pass
        time.sleep(delay)

    def _request(self, method: str, url: str, body: dict | None = None) -> tuple[dict, int]:
        """JSON body of a successful request and the attempts it took; transient failures are retried."""
        why, retry_after = "no attempt was made", None
        for attempt in range(self.max_retries + 1):
            if attempt:
                self._sleep(attempt - 1, retry_after)
                retry_after = None
            self._limiter.wait()
            try:
                r = self._client.request(method, url, json=body)
            except self._httpx.TimeoutException:
                why = f"no answer within {self.timeout:g} s"
                continue
            except self._httpx.TransportError as e:
                why = f"cannot connect ({type(e).__name__}: {e})"
                continue
            if r.status_code in RETRY_STATUS:
                why, retry_after = f"HTTP {r.status_code}: {r.text[:200].strip()!r}", r.headers.get("retry-after")
                continue
            if r.status_code >= 400:
                raise EndpointError(f"{url} refused the request with HTTP {r.status_code}: {r.text[:300].strip()!r}")
            try:
                data = r.json()
            except (json.JSONDecodeError, UnicodeDecodeError):
                why = f"the answer is not JSON: {r.text[:120]!r}"
                continue
            if not isinstance(data, dict):
                why = f"the answer is not a JSON object: {r.text[:120]!r}"
                continue
            return data, attempt + 1
        raise EndpointError(f"{url} failed {self.max_retries + 1} time(s); last: {why}")

    def resolve_model(self) -> str:
        """The model name to send: the one given, else the first the server lists (checks it is reachable)."""
        try:
            data, _ = self._request("GET", self.models_url)
        except EndpointError as e:
            if self.model:
                if "refused the request" in str(e):  # reachable, but no model list (some proxies): go on
                    return self.model
            raise UnitscopeError(f"the endpoint {self.url} cannot be used: {e}") from None
        ids = [m.get("id") for m in data.get("data") or [] if isinstance(m, dict) and m.get("id")]
        if self.model is None:
            if not ids:
                raise UnitscopeError(f"the endpoint {self.url} lists no models; name one with --model")
            self.model = str(ids[0])
        return self.model

    def complete(self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int = 0) -> Answer:
        body: dict[str, Any] = {"model": self.model, "messages": messages, "max_tokens": max_tokens,
                                "temperature": self.temperature, "seed": self.seed, "n": 1, "stream": False}
        if top_logprobs and self._want_logprobs:
            body.update(logprobs=True, top_logprobs=min(20, top_logprobs))
        why = ""
        spent = 0
        for _ in range(self.max_retries + 1):
            try:
                data, attempts = self._request("POST", self.chat, body)
            except EndpointError as e:
                if "logprobs" in body and "HTTP 400" in str(e):  # a server without log-probabilities
                    self._want_logprobs = False
                    body.pop("logprobs"), body.pop("top_logprobs")
                    continue
                raise
            spent += attempts
            choices = data.get("choices")
            if not (isinstance(choices, list) and choices and isinstance(choices[0], dict)):
                why = f"the answer has no choices: {json.dumps(data)[:160]}"
                continue
            message = choices[0].get("message") or {}
            text = message.get("content") if isinstance(message, dict) else None
            if not isinstance(text, str):
                why = f"the answer's message has no text: {json.dumps(choices[0])[:160]}"
                continue
            return Answer(text=text, top_logprobs=_logprobs(choices[0]), attempts=spent)
        raise EndpointError(f"{self.chat} answered garbage {self.max_retries + 1} time(s); last: {why}")


class HFChat:
    """A local Hugging Face chat model, loaded by the subject machinery (`default`: SmolLM2-135M-Instruct).

    One generation at a time (a lock), greedy at temperature 0, else sampled with `torch` seeded per request so
    the same prompt gives the same answer; log-probabilities are the raw logits' log-softmax at each step.
    """

    kind = "hf"

    def __init__(self, spec: str, temperature: float = 0.0, seed: int = 0, device: str = "cpu"):
        from ..subject import load_subject

        self.subject = load_subject(spec, device=device)
        self.model = self.subject.name if spec != "default" else "SmolLM2-135M-Instruct"
        self.url = f"hf:{spec}"
        self.temperature, self.seed = temperature, seed
        tok = self.subject.tokenizer
        if not getattr(tok, "chat_template", None):
            raise UnitscopeError(f"the model {spec!r} has no chat template; give a chat (instruct) model")
        self._lock = threading.Lock()

    def resolve_model(self) -> str:
        return self.model

    def close(self) -> None:
        pass

    def complete(self, messages: list[dict[str, str]], max_tokens: int, top_logprobs: int = 0) -> Answer:
        import torch

        tok, model = self.subject.tokenizer, self.subject.model
        ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt")
        if not isinstance(ids, torch.Tensor):  # newer transformers return a BatchEncoding
            ids = ids["input_ids"]
        ids = ids.to(self.subject.device)
        with self._lock, torch.inference_mode():
            torch.manual_seed(self.seed)
            sample = self.temperature > 0
            out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_tokens,
                                 do_sample=sample, temperature=self.temperature if sample else None,
                                 top_p=None, top_k=None, output_logits=True, return_dict_in_generate=True,
                                 pad_token_id=tok.eos_token_id)
        new = out.sequences[0, ids.shape[1]:]
        text = tok.decode(new, skip_special_tokens=True)
        lps = None
        if top_logprobs:
            lps = []
            for step in out.logits:
                lp = step[0].float().log_softmax(-1)
                vals, idx = lp.topk(top_logprobs)
                pos: dict[str, float] = {}
                for v, i in zip(vals.tolist(), idx.tolist()):
                    pos.setdefault(tok.decode([i]), v)  # two ids can decode alike; keep the likelier
                lps.append(pos)
        return Answer(text=text, top_logprobs=lps)
