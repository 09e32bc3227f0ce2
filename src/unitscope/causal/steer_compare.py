"""Which unit kind steers best? The semi-NMF paper's experiment: steer with each kind's best unit for a concept
at matched next-token KL, and score concept presence and fluency of what the model then writes.

For each concept (a name and example texts; the other concepts' texts and any `negatives` are its contrast):
  - detector: the difference in means, at `site`, of the per-text mean activation (first token left out) on
    its texts and on the contrast texts. It is also the `diffmean` steering direction, and it scores generated text;
  - best unit of each dictionary: the unit with the largest mean code on its texts minus mean code on the
    contrast (per-text means, codes read at the dictionary's input site), steered positively: the unit that
    stands for the concept, as the paper steers a feature towards its concept (a unit that stands for the
    contrast, steered negatively, would remove other concepts rather than add this one);
  - the unsteered model (kind `unsteered`, target KL 0): n samples from each prompt, seeded;
  - for each target KL: alpha by `find_alpha`, n samples from each prompt with the same seeds as the unsteered
    ones (so generation i of every kind and of the baseline share their random draws), concept presence = mean
    over generated tokens of the projection on the unit-norm detector, in units where the contrast texts score 0
    and the concept's texts 1; `lift` = presence minus the unsteered presence of the same prompt and seed;
    fluency = the perplexity of the generated tokens under the unsteered model; optionally an LLM judge's 0-2
    concept rating of each generation (`steer_judge`), prompt and answers recorded.
Every row keeps its per-generation values (`*_each`, ordered prompt by prompt, then sample), so `summary` gives
each kind x KL cell a mean and a standard error over concepts x generations, and `paired_differences` the
difference between two kinds over the same (concept, prompt, seed) draws.
`write_steer_compare(dir, rows)` writes `steer_compare.parquet` and `steer_compare.png`.
"""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

import torch

from ..errors import UnitscopeError
from .interventions import AddDirection
from .steer import NEUTRAL_PROMPT, _ids, find_alpha, generate, steering_direction

TABLE, PLOT = "steer_compare.parquet", "steer_compare.png"
DIFFMEAN, UNSTEERED = "diffmean", "unsteered"


class _Acts:
    """Per-text activations at a site, first token left out, computed once per (site, text) for all dictionaries:
    the first token is an attention sink whose activation is several times the others' in norm (SmolLM2 blocks.6:
    ~700 against ~100), which would make the direction a first-token detector. Generated tokens are never first."""

    def __init__(self, subject: Any):
        self.subject, self.cache = subject, {}

    def __call__(self, site: str, text: str) -> torch.Tensor:
        key = (site, text)
        if key not in self.cache:
            x = self.subject.collect(_ids(self.subject, text), [site])[site][0].float()
            self.cache[key] = x[1:] if x.shape[0] > 1 else x
        return self.cache[key]


def _text_means(acts: _Acts, texts: Sequence[str], site: str, dictionary: Any = None) -> torch.Tensor:
    """[len(texts), width] per-text mean activation at `site` (or mean code of `dictionary` on it)."""
    out = []
    for text in texts:
        x = acts(site, text)
        if dictionary is not None:
            with torch.no_grad():
                x = dictionary.encode(x.to(next(dictionary.parameters()).dtype)).float()
        out.append(x.mean(0))
    return torch.stack(out)


def concept_detector(subject: Any, site: str, texts: Sequence[str], contrast: Sequence[str],
                     acts: _Acts | None = None) -> dict[str, Any]:
    """The concept's difference-in-means direction and the detector scale (contrast -> 0, concept -> 1)."""
    acts = acts or _Acts(subject)
    pos, neg = _text_means(acts, texts, site), _text_means(acts, contrast, site)
    direction = pos.mean(0) - neg.mean(0)
    norm = float(direction.norm())
    if not norm > 0:
        raise UnitscopeError(f"the concept texts and their contrast have the same mean activation at {site!r}")
    unit = direction / norm
    lo, hi = float((neg @ unit).mean()), float((pos @ unit).mean())
    return {"direction": direction, "unit": unit, "zero": lo, "one": hi}


def best_unit(subject: Any, dictionary: Any, texts: Sequence[str], contrast: Sequence[str],
              acts: _Acts | None = None) -> tuple[int, float]:
    """(unit, mean code difference) of the unit whose mean code exceeds the contrast's the most."""
    acts = acts or _Acts(subject)
    site = dictionary.input_site
    diff = _text_means(acts, texts, site, dictionary).mean(0) - _text_means(acts, contrast, site, dictionary).mean(0)
    unit = int(diff.argmax())
    return unit, float(diff[unit])


def _score(subject: Any, prompt: str, continuations: Sequence[str], site: str, detector: dict[str, Any]):
    """(presence, perplexity) per continuation, under the unsteered model."""
    p_ids = _ids(subject, prompt)
    presence, ppl = [], []
    for text in continuations:
        c_ids = subject.tokenizer(text, return_tensors="pt", add_special_tokens=False).input_ids.to(subject.device)
        if c_ids.shape[1] == 0:
            presence.append(math.nan)
            ppl.append(math.nan)
            continue
        ids = torch.cat([p_ids, c_ids], 1)
        with torch.inference_mode(), subject.capture([site]) as acts:
            logits = subject.model(input_ids=ids, use_cache=False).logits[0].double()
        p = p_ids.shape[1]
        x = acts[site][0, p:].float()
        proj = float((x @ detector["unit"].to(x.device)).mean())
        presence.append((proj - detector["zero"]) / (detector["one"] - detector["zero"]))
        nll = -logits[p - 1:-1].log_softmax(-1).gather(1, ids[0, p:, None]).squeeze(1)
        ppl.append(float(nll.mean().exp()))
    return presence, ppl


def _mean(values: Sequence[float]) -> float:
    finite = [v for v in values if math.isfinite(v)]
    return sum(finite) / len(finite) if finite else math.nan


def _se(values: Sequence[float]) -> float:
    """Standard error of the mean of the finite values (NaN with fewer than two)."""
    finite = [v for v in values if math.isfinite(v)]
    if len(finite) < 2:
        return math.nan
    m = sum(finite) / len(finite)
    return math.sqrt(sum((v - m) ** 2 for v in finite) / (len(finite) - 1) / len(finite))


def _samples(subject: Any, prompts: Sequence[str], edits: list, n: int, max_new_tokens: int, seed: int,
             site: str, detector: dict[str, Any], concept: str, judge: Any) -> dict[str, list]:
    """Generations from every prompt under `edits`, with their presence, perplexity and judge ratings."""
    gens, presence, ppl = [], [], []
    for p in prompts:
        texts = generate(subject, p, edits, n, max_new_tokens, seed)
        pres, pp = _score(subject, p, texts, site, detector)
        gens += texts
        presence += pres
        ppl += pp
    out = {"generations": gens, "presence_each": presence, "perplexity_each": ppl}
    if judge is not None:
        rated = [judge.rate(concept, t) for t in gens]
        out.update(judge_each=[r for r, _ in rated], judge_answers=[a for _, a in rated])
    return out


def steer_compare(subject: Any, concepts: Mapping[str, Sequence[str]], dictionaries: Mapping[str, Any], site: str,
                  kl_targets: Sequence[float] = (0.025, 0.1, 0.5), prompts: Sequence[str] = (NEUTRAL_PROMPT,),
                  negatives: Sequence[str] = (), n: int = 4, max_new_tokens: int = 30, seed: int = 0,
                  neutral_prompt: str = NEUTRAL_PROMPT, with_diffmean: bool = True,
                  judge: Any = None) -> list[dict[str, Any]]:
    """One row per (kind, concept, target KL) plus one `unsteered` row per concept; `dictionaries` maps a name to
    a loaded Dictionary; `judge` (optional) has `rate(concept, text) -> (0-2 rating or NaN, answer)` and
    `prompt_template` (a `steer_judge.ConceptJudge`)."""
    if len(concepts) + (1 if negatives else 0) < 2:
        raise UnitscopeError("steering comparison needs at least two concepts, or one concept and negatives")
    for name, texts in concepts.items():
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise UnitscopeError(f"concept {name!r} needs one or more non-empty example texts")
    if not dictionaries and not with_diffmean:
        raise UnitscopeError("nothing to compare: give dictionaries or keep the difference-in-means direction")
    if not prompts:
        raise UnitscopeError("give at least one prompt to continue")
    for name, d in dictionaries.items():
        if d.input_site is None:
            raise UnitscopeError(f"dictionary {name!r} does not record its site")
        subject.site(d.input_site)
    subject.site(site)
    acts = _Acts(subject)
    judged = {"judge_prompt": judge.prompt_template, "judge_model": judge.model} if judge is not None else {}
    rows: list[dict[str, Any]] = []
    for concept, texts in concepts.items():
        contrast = [t for c, ts in concepts.items() if c != concept for t in ts] + list(negatives)
        det = concept_detector(subject, site, texts, contrast, acts)
        common = {"concept": concept, "n": n * len(prompts), "prompts": list(prompts), "seed": seed, **judged}
        base = _samples(subject, prompts, [], n, max_new_tokens, seed, site, det, concept, judge)
        base_presence, base_ppl = _mean(base["presence_each"]), _mean(base["perplexity_each"])
        rows.append({"kind": UNSTEERED, "dictionary": UNSTEERED, **common, "unit": None, "unit_score": math.nan,
                     "site": site, "target_kl": 0.0, "sign": 0, "alpha": 0.0, "kl": 0.0, "error": None,
                     "baseline_presence": base_presence, "baseline_perplexity": base_ppl,
                     "presence": base_presence, "perplexity": base_ppl, "lift": 0.0,
                     "lift_each": [0.0 if math.isfinite(v) else math.nan for v in base["presence_each"]], **base})
        candidates = []  # (kind, dictionary name, unit, score, site, unit-norm direction, sign)
        if with_diffmean:
            candidates.append((DIFFMEAN, DIFFMEAN, None, float(det["direction"].norm()), site, det["unit"], 1))
        for name, d in dictionaries.items():
            unit, diff = best_unit(subject, d, texts, contrast, acts)
            out_site, vec, _ = steering_direction(d, unit)
            candidates.append((d.architecture, name, unit, diff, out_site, vec, 1 if diff >= 0 else -1))
        for kind, name, unit, score, out_site, vec, sign in candidates:
            for target in kl_targets:
                row = {"kind": kind, "dictionary": name, **common, "unit": unit, "unit_score": score,
                       "site": out_site, "target_kl": float(target), "sign": sign,
                       "baseline_presence": base_presence, "baseline_perplexity": base_ppl}
                try:
                    found = find_alpha(subject, out_site, vec, float(target), neutral_prompt, sign)
                except UnitscopeError as e:  # a target this direction cannot reach: a row that says so
                    rows.append({**row, "alpha": math.nan, "kl": math.nan, "presence": math.nan,
                                 "perplexity": math.nan, "lift": math.nan, "error": str(e)})
                    continue
                edit = AddDirection(site=out_site, direction=vec, alpha=found["alpha"])
                got = _samples(subject, prompts, [edit], n, max_new_tokens, seed, site, det, concept, judge)
                lift_each = [s - b for s, b in zip(got["presence_each"], base["presence_each"])]
                rows.append({**row, "alpha": found["alpha"], "kl": found["kl"],
                             "presence": _mean(got["presence_each"]), "perplexity": _mean(got["perplexity_each"]),
                             "lift": _mean(lift_each), "lift_each": lift_each, "error": None, **got})
    return rows


def _pooled(group: Sequence[Mapping[str, Any]], key: str) -> list[float]:
    return [v for r in group for v in (r.get(key) or [])]


def summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Per (kind, dictionary, target KL): presence, lift over the unsteered model, perplexity (and the judge's
    rating when there is one), each a mean over concepts x generations with its standard error (`*_se`), and
    `lift_se_concepts`, the standard error of the per-concept mean lifts (concepts as the only sample)."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["dictionary"], r["target_kl"]), []).append(r)
    out = []
    for (kind, name, target), g in sorted(groups.items(), key=lambda kv: (kv[0][0] != UNSTEERED, kv[0])):
        s = {"kind": kind, "dictionary": name, "target_kl": target, "concepts": len(g),
             "reached": sum(r["error"] is None for r in g)}
        for key in ("presence", "lift", "perplexity", "judge"):
            each = _pooled(g, f"{key}_each")
            s[key], s[f"{key}_se"] = _mean(each), _se(each)
        # generations the judge rated (a failed or unparseable answer is NaN, left out of the mean: say how many)
        s["judge_n"] = sum(math.isfinite(v) for v in _pooled(g, "judge_each"))
        s["generations"] = len(_pooled(g, "presence_each"))
        s["lift_se_concepts"] = _se([r["lift"] for r in g])
        out.append(s)
    return out


def paired_differences(rows: Sequence[Mapping[str, Any]], key: str = "presence") -> list[dict[str, Any]]:
    """At each target KL, the best dictionary by mean `key` against each other one: the mean difference over the
    (concept, prompt, seed) draws both have (the same seeds for every kind), with two standard errors: `se` treats
    the draws as independent, `se_concepts` takes each concept's mean difference as one sample (draws of one
    concept share its unit, alpha and detector, so this is the honest one when concepts differ). The best is
    picked on the same draws (post hoc), so its lead is optimistic. Rows of runs with different seeds may be
    pooled: draws are matched by concept and run seed."""
    by: dict[tuple, dict] = {}
    for r in rows:
        if r["error"] is None and r["kind"] != UNSTEERED:
            by.setdefault((r["target_kl"], r["dictionary"]), {})[(r["concept"], r.get("seed"))] = \
                r.get(f"{key}_each") or []
    out = []
    for target in sorted({t for t, _ in by}):
        names = [d for t, d in by if t == target]
        means = {d: _mean([v for each in by[(target, d)].values() for v in each]) for d in names}
        best = max(names, key=lambda d: means[d] if math.isfinite(means[d]) else -math.inf)
        for other in sorted(names):
            if other == best:
                continue
            per_draw: dict[str, list[float]] = {}  # concept -> paired differences (over prompts, seeds, runs)
            for (concept, _seed), each in by[(target, best)].items():
                if (concept, _seed) in by[(target, other)]:
                    per_draw.setdefault(concept, []).extend(
                        a - b for a, b in zip(each, by[(target, other)][(concept, _seed)]))
            diffs = [d for ds in per_draw.values() for d in ds]
            concept_means = [m for m in (_mean(ds) for ds in per_draw.values()) if math.isfinite(m)]
            out.append({"target_kl": target, "best": best, "other": other, "diff": _mean(diffs), "se": _se(diffs),
                        "se_concepts": _se(concept_means), "concepts": len(concept_means),
                        "pairs": sum(math.isfinite(d) for d in diffs)})
    return out


def plot_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax_p, ax_f = fig.subplots(1, 2)
    summ = summary(rows)
    steered = [s for s in summ if s["kind"] != UNSTEERED]
    for i, name in enumerate(sorted({s["dictionary"] for s in steered})):
        pts = [s for s in steered if s["dictionary"] == name]
        label = f"{pts[0]['kind']}" + (f" ({name})" if name != pts[0]["kind"] else "")
        for ax, key in ((ax_p, "lift"), (ax_f, "perplexity")):
            ax.errorbar([s["target_kl"] for s in pts], [s[key] for s in pts], yerr=[s[f"{key}_se"] for s in pts],
                        fmt="o-", capsize=3, color=f"C{i % 10}", label=label)
    base = [s for s in summ if s["kind"] == UNSTEERED]
    for ax, b, what in ((ax_p, 0.0, "presence lift over the unsteered model"),
                        (ax_f, base[0]["perplexity"] if base else math.nan, "perplexity under the unsteered model")):
        ax.axhline(b, color="grey", ls="--", lw=1, label="unsteered")
        ax.set_xscale("log")
        targets = sorted({s["target_kl"] for s in steered})
        ax.minorticks_off()
        ax.set_xticks(targets, [f"{t:g}" for t in targets])
        ax.set_xlabel("target next-token KL")
        ax.set_ylabel(what)
    ax_p.legend(fontsize=7)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_steer_compare(out: str | Path, rows: Sequence[Mapping[str, Any]]) -> dict[str, Path]:
    """Write the table and the plot into `out` together (the directory is replaced whole)."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    from ..atomic import replace_dir

    out = Path(out)
    with replace_dir(out, allowed={TABLE, PLOT}) as tmp:
        pq.write_table(pa.Table.from_pylist([dict(r) for r in rows]), tmp / TABLE)
        (tmp / PLOT).write_bytes(plot_png(rows))
    return {"table": out / TABLE, "plot": out / PLOT}
