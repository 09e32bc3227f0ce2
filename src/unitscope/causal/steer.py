"""Steering: generate with a unit's direction added at strength alpha, or with alpha found for a target KL.

The semi-NMF paper's protocol compares steering directions at matched effect size, not matched alpha: alpha is
chosen so that the KL divergence KL(p_clean || p_steered) of the next-token distribution at the last token of a
neutral prompt hits a target (0.025 ... 0.5). `find_alpha` brackets the target by doubling |alpha| from a scale
set by the site's activation norm, then bisects; KL(alpha) is continuous but need not be monotone, so the whole
search trace and whether the KL rose monotonically along it are returned, and a target that no alpha on the
doubling grid reaches (the KL saturates, or the logits stop being finite) is refused in one sentence.

Everything is a plain function of its arguments (no module state): a server may call `steer` from a worker
thread while holding its own lock around the model. Sampling reseeds the global torch generator inside
`torch.random.fork_rng`, so the caller's random state is left as it was.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from ..errors import UnitscopeError
from .interventions import AddDirection, Positions, unit_direction

KL_TARGETS = (0.025, 0.05, 0.1, 0.25, 0.5)  # the semi-NMF paper's grid
NEUTRAL_PROMPT = "I think that"


def dictionary_site(dictionary: Any, site: str | None = None) -> str:
    """The site a dictionary writes; a different `site` is refused (it was not trained there)."""
    own = dictionary.output_site
    if site is not None and own is not None and site != own:
        raise UnitscopeError(f"site {site!r} is not where this {dictionary.architecture} dictionary writes; it was "
                             f"trained on {dictionary.input_site!r}" + (f" and writes {own!r}" if own !=
                                                                         dictionary.input_site else ""))
    site = own or site
    if site is None:
        raise UnitscopeError(f"this {dictionary.architecture} dictionary does not record its site; give a site")
    return site


def steering_direction(dictionary: Any, unit: int, site: str | None = None) -> tuple[str, torch.Tensor, float]:
    """(output site, unit-norm direction, its raw norm) of a dictionary unit: what adding to its code writes."""
    site = dictionary_site(dictionary, site)
    raw = unit_direction(dictionary, unit)
    norm = float(raw.norm())
    if not norm > 0:
        raise UnitscopeError(f"unit {unit} of this {dictionary.architecture} dictionary has a zero direction; "
                             "it cannot steer")
    return site, raw / norm, norm


def _ids(subject: Any, text: str) -> torch.Tensor:
    if not isinstance(text, str) or not text.strip():
        raise UnitscopeError(f"a prompt must be non-empty text, not {text!r}")
    ids = subject.tokenizer(text, return_tensors="pt").input_ids
    if ids.shape[1] == 0:
        raise UnitscopeError(f"the prompt {text!r} tokenises to no tokens")
    return ids.to(subject.device)


def _last_logits(subject: Any, ids: torch.Tensor, edits: list) -> torch.Tensor:
    with torch.inference_mode(), subject.intervene(edits):
        return subject.model(input_ids=ids, use_cache=False).logits[0, -1].double()


def _finite(logits: torch.Tensor, alpha: float) -> bool:
    return bool(torch.isfinite(logits).all()) and math.isfinite(alpha)


def next_token_kl(subject: Any, ids: torch.Tensor, clean: torch.Tensor, site: str, direction: torch.Tensor,
                  alpha: float, positions: Positions) -> float:
    """KL(p_clean || p_steered) at the last token of `ids`; NaN when the steered logits are not finite."""
    steered = _last_logits(subject, ids, [AddDirection(site=site, direction=direction, alpha=alpha,
                                                       positions=positions)])
    if not _finite(steered, alpha):
        return math.nan
    lp, lq = torch.log_softmax(clean, -1), torch.log_softmax(steered, -1)
    return float((lp.exp() * (lp - lq)).sum())


def find_alpha(subject: Any, site: str, direction: torch.Tensor, target_kl: float, neutral_prompt: str = NEUTRAL_PROMPT,
               sign: int = 1, positions: Positions | str = "all", rel_tol: float = 0.02, max_doublings: int = 40,
               max_bisections: int = 60) -> dict[str, Any]:
    """alpha (with the given sign) whose next-token KL on the neutral prompt is within rel_tol of target_kl.

    Returns {alpha, kl, search: [{alpha, kl}], monotone}. Refuses a target no alpha on the doubling grid reaches.
    """
    if not (isinstance(target_kl, (int, float)) and math.isfinite(target_kl) and target_kl > 0):
        raise UnitscopeError(f"the target KL must be a number > 0, not {target_kl!r}")
    if sign not in (1, -1):
        raise UnitscopeError(f"the steering sign must be +1 or -1, not {sign!r}")
    positions = Positions.from_json(positions)
    ids = _ids(subject, neutral_prompt)
    clean = _last_logits(subject, ids, [])
    with torch.inference_mode(), subject.capture([site]) as acts:
        subject.model(input_ids=ids, use_cache=False)
    scale = float(acts[site].float().norm(dim=-1).mean())
    trace: list[dict[str, float]] = []

    def kl_at(a: float) -> float:
        value = next_token_kl(subject, ids, clean, site, direction, a, positions)
        trace.append({"alpha": a, "kl": value})
        return value

    def done(a: float, k: float) -> dict[str, Any]:
        grid = [t["kl"] for t in trace[:n_grid]]
        return {"alpha": a, "kl": k, "search": trace, "monotone": all(y >= x for x, y in zip(grid, grid[1:]))}

    lo, hi = 0.0, None
    a = 0.25 * max(scale, 1e-6)
    n_grid = 0
    for _ in range(max_doublings):
        k = kl_at(sign * a)
        n_grid += 1
        if math.isnan(k):
            break
        if abs(k - target_kl) <= rel_tol * target_kl:
            return done(sign * a, k)
        if k > target_kl:
            hi = a
            break
        lo = a
        a *= 2
    if hi is None:
        finite = [t for t in trace if not math.isnan(t["kl"])]
        best = max(finite, key=lambda t: t["kl"]) if finite else {"alpha": 0.0, "kl": 0.0}
        last = abs(trace[-1]["alpha"])
        why = (f"beyond |alpha| = {last:.4g} the logits are not finite" if math.isnan(trace[-1]["kl"])
               else f"|alpha| was doubled up to {last:.4g} and the KL saturates")
        raise UnitscopeError(f"no alpha reaches next-token KL {target_kl:g} on the neutral prompt {neutral_prompt!r}: "
                             f"the largest KL found was {best['kl']:.4g} at alpha {best['alpha']:.4g} ({why})")
    best = min(trace, key=lambda t: abs(t["kl"] - target_kl) if not math.isnan(t["kl"]) else math.inf)
    for _ in range(max_bisections):
        mid = (lo + hi) / 2
        k = kl_at(sign * mid)
        if not math.isnan(k) and abs(k - target_kl) < abs(best["kl"] - target_kl):
            best = trace[-1]
        if abs(k - target_kl) <= rel_tol * target_kl:
            return done(sign * mid, k)
        if math.isnan(k) or k > target_kl:
            hi = mid
        else:
            lo = mid
    raise UnitscopeError(f"the alpha search for next-token KL {target_kl:g} did not converge within {rel_tol:.0%}: "
                         f"the closest was KL {best['kl']:.4g} at alpha {best['alpha']:.4g} (the KL jumps there)")


def generate(subject: Any, prompt: str, edits: list, n: int, max_new_tokens: int, seed: int,
             temperature: float = 1.0) -> list[str]:
    """n sampled continuations of `prompt` under `edits` (new text only), reproducible from `seed`."""
    ids = _ids(subject, prompt)
    tok = subject.tokenizer
    pad = tok.pad_token_id if tok.pad_token_id is not None else tok.eos_token_id
    batch = ids.repeat(n, 1)
    devices = [subject.device] if subject.device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices), torch.inference_mode(), subject.intervene(edits):
        torch.manual_seed(seed)
        try:
            out = subject.model.generate(input_ids=batch, attention_mask=torch.ones_like(batch), do_sample=True,
                                         temperature=temperature, top_k=None, top_p=None, max_new_tokens=max_new_tokens,
                                         pad_token_id=pad)
        except RuntimeError as e:
            if "inf" in str(e) or "nan" in str(e):
                raise UnitscopeError("the steered model's probabilities became NaN or infinite while generating; "
                                     "use a smaller |alpha|") from None
            raise
    return [tok.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]


def _check_indices(positions: Positions, length: int, what: str) -> None:
    if max(positions.indices) >= length:
        raise UnitscopeError(f"position {max(positions.indices)} is past the sequence: {what} has {length} tokens "
                             f"(valid positions are 0 to {length - 1})")


def steer(subject: Any, prompt: str, *, dictionary: Any = None, unit: int | None = None,
          direction: Any = None, site: str | None = None, alpha: float | None = None, kl: float | None = None,
          sign: int = 1, n: int = 4, max_new_tokens: int = 40, seed: int = 0, temperature: float = 1.0,
          neutral_prompt: str = NEUTRAL_PROMPT, positions: Positions | str = "all",
          rel_tol: float = 0.02) -> dict[str, Any]:
    """Baseline and steered generations with a unit (dictionary + unit) or a raw direction (+ site) added at
    alpha, or at the alpha whose next-token KL on `neutral_prompt` is `kl`. Returns the JSON-able record."""
    if (alpha is None) == (kl is None):
        raise UnitscopeError("give exactly one of alpha (a fixed strength) and kl (a target next-token KL)")
    if (dictionary is None or unit is None) and direction is None:
        raise UnitscopeError("give a dictionary and a unit, or a direction and its site, to steer with")
    for name, value, least in (("n", n, 1), ("max_new_tokens", max_new_tokens, 1), ("seed", seed, 0)):
        if isinstance(value, bool) or not isinstance(value, int) or value < least:
            raise UnitscopeError(f"{name} must be an integer >= {least}, not {value!r}")
    if seed >= 2**63:
        raise UnitscopeError(f"seed must be below 2**63 (torch's generator takes a 64-bit seed), not {seed}")
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise UnitscopeError(f"the temperature must be a number > 0, not {temperature!r}")
    positions = Positions.from_json(positions)
    raw_norm = None
    if direction is not None:
        if dictionary is not None:
            site = dictionary_site(dictionary, site)
        if site is None:
            raise UnitscopeError("a steering direction needs the site to add it at")
        vec = AddDirection(site=site, direction=direction).direction
        raw_norm = float(vec.norm())
        if not raw_norm > 0:
            raise UnitscopeError("the steering direction is all zeros")
        vec = vec / raw_norm
    else:
        site, vec, raw_norm = steering_direction(dictionary, unit, site)
    subject.site(site)  # a site the model lacks is refused here
    if positions.kind == "indices":
        _check_indices(positions, len(_ids(subject, prompt)[0]) + max_new_tokens, "the prompt and its continuation")
        _check_indices(positions, len(_ids(subject, neutral_prompt)[0]),
                       "the neutral prompt (where the KL is measured)")
    if alpha is not None:
        if isinstance(alpha, bool) or not isinstance(alpha, (int, float)) or not math.isfinite(alpha):
            raise UnitscopeError(f"alpha must be a finite number, not {alpha!r}")
        ids = _ids(subject, neutral_prompt)
        got = next_token_kl(subject, ids, _last_logits(subject, ids, []), site, vec, float(alpha), positions)
        if math.isnan(got):
            raise UnitscopeError(f"alpha {alpha:g} makes the model's logits non-finite (NaN or infinite); use a "
                                 "smaller |alpha|")
        found = {"alpha": float(alpha), "kl": got, "search": [], "monotone": None}
    else:
        found = find_alpha(subject, site, vec, float(kl), neutral_prompt, sign, positions, rel_tol)
    edit = AddDirection(site=site, direction=vec, alpha=found["alpha"], positions=positions)
    check = _last_logits(subject, _ids(subject, prompt), [edit])
    if not _finite(check, found["alpha"]):
        raise UnitscopeError(f"alpha {found['alpha']:g} makes the model's logits non-finite on the prompt; use a "
                             "smaller |alpha|")
    baseline = generate(subject, prompt, [], n, max_new_tokens, seed, temperature)
    steered = generate(subject, prompt, [edit], n, max_new_tokens, seed, temperature)
    from ..versions import versions

    meta = getattr(dictionary, "metadata", {}) or {}
    return {
        "alpha": found["alpha"], "kl": found["kl"], "target_kl": kl, "sign": sign if kl is not None else None,
        "baseline": baseline, "steered": steered, "prompt": prompt, "neutral_prompt": neutral_prompt,
        "kl_measure": "KL(p_clean || p_steered) of the next token after the neutral prompt's last token",
        "search": found["search"], "monotone": found["monotone"], "rel_tol": rel_tol if kl is not None else None,
        "site": site, "unit": unit if direction is None else None,
        "dictionary": {"architecture": dictionary.architecture, "n_units": dictionary.n_units,
                       "input_site": dictionary.input_site, "output_site": dictionary.output_site,
                       "model_fingerprint": meta.get("model_fingerprint")} if dictionary is not None else None,
        "direction_norm": raw_norm,
        "direction_note": "alpha multiplies the unit-norm direction (decode(e_unit) - decode(0) for a unit)",
        "positions": positions.to_json(), "n": n, "max_new_tokens": max_new_tokens, "seed": seed,
        "sampling": {"do_sample": True, "temperature": temperature, "top_k": None, "top_p": None,
                     "seeding": "torch.manual_seed(seed) once before each batch of n"},
        "model": subject.spec or subject.name, "model_name": subject.name, "model_fingerprint": subject.fingerprint(),
        "intervention": edit.to_json(), "versions": versions(),
    }
