"""Which unit kind steers best? The semi-NMF paper's experiment: steer with each kind's best unit for a concept
at matched next-token KL, and score concept presence and fluency of what the model then writes.

For each concept (a name and example texts; the other concepts' texts and any `negatives` are its contrast):
  - detector: the difference in means, at `site`, of the per-text mean activation (first token left out) on
    its texts and on the contrast texts. It is also the `diffmean` steering direction, and it scores generated text;
  - best unit of each dictionary: the unit with the largest |mean code on its texts - mean code on the contrast|
    (per-text means, codes read at the dictionary's input site), steered with the sign of that difference;
  - for each target KL: alpha by `find_alpha`, n samples from each prompt (seeded; the same seeds for every
    kind), concept presence = mean over generated tokens of the projection on the unit-norm detector, in
    units where the contrast texts score 0 and the concept's texts 1; fluency = the perplexity of the
    generated tokens under the unsteered model.
`steer_compare(...)` returns the rows; `write_steer_compare(dir, rows)` writes `steer_compare.parquet` and
`steer_compare.png` (presence and perplexity against target KL, one line per kind, mean over concepts).
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
DIFFMEAN = "diffmean"


def _text_means(subject: Any, texts: Sequence[str], site: str, dictionary: Any = None) -> torch.Tensor:
    """[len(texts), width] per-text mean activation at `site` (or mean code of `dictionary` on it), leaving out
    each text's first token: an attention sink whose activation is several times the others' in norm (SmolLM2
    blocks.6: ~700 against ~100), which would make the direction a first-token detector. Generated tokens,
    which the detector scores, are never first."""
    out = []
    for text in texts:
        x = subject.collect(_ids(subject, text), [site])[site][0].float()
        x = x[1:] if x.shape[0] > 1 else x
        if dictionary is not None:
            with torch.no_grad():
                x = dictionary.encode(x.to(next(dictionary.parameters()).dtype)).float()
        out.append(x.mean(0))
    return torch.stack(out)


def concept_detector(subject: Any, site: str, texts: Sequence[str], contrast: Sequence[str]) -> dict[str, Any]:
    """The concept's difference-in-means direction and the detector scale (contrast -> 0, concept -> 1)."""
    pos, neg = _text_means(subject, texts, site), _text_means(subject, contrast, site)
    direction = pos.mean(0) - neg.mean(0)
    norm = float(direction.norm())
    if not norm > 0:
        raise UnitscopeError(f"the concept texts and their contrast have the same mean activation at {site!r}")
    unit = direction / norm
    lo, hi = float((neg @ unit).mean()), float((pos @ unit).mean())
    return {"direction": direction, "unit": unit, "zero": lo, "one": hi}


def best_unit(subject: Any, dictionary: Any, texts: Sequence[str], contrast: Sequence[str]) -> tuple[int, float]:
    """(unit, mean code difference) of the unit whose mean code differs most between concept and contrast."""
    site = dictionary.input_site
    diff = (_text_means(subject, texts, site, dictionary).mean(0)
            - _text_means(subject, contrast, site, dictionary).mean(0))
    unit = int(diff.abs().argmax())
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


def steer_compare(subject: Any, concepts: Mapping[str, Sequence[str]], dictionaries: Mapping[str, Any], site: str,
                  kl_targets: Sequence[float] = (0.025, 0.1, 0.5), prompts: Sequence[str] = (NEUTRAL_PROMPT,),
                  negatives: Sequence[str] = (), n: int = 4, max_new_tokens: int = 30, seed: int = 0,
                  neutral_prompt: str = NEUTRAL_PROMPT, with_diffmean: bool = True) -> list[dict[str, Any]]:
    """One row per (kind, concept, target KL); `dictionaries` maps a name to a loaded Dictionary."""
    if len(concepts) + (1 if negatives else 0) < 2:
        raise UnitscopeError("steering comparison needs at least two concepts, or one concept and negatives")
    for name, texts in concepts.items():
        if not texts or not all(isinstance(t, str) and t.strip() for t in texts):
            raise UnitscopeError(f"concept {name!r} needs one or more non-empty example texts")
    if not dictionaries and not with_diffmean:
        raise UnitscopeError("nothing to compare: give dictionaries or keep the difference-in-means direction")
    for name, d in dictionaries.items():
        if d.input_site is None:
            raise UnitscopeError(f"dictionary {name!r} does not record its site")
        subject.site(d.input_site)
    subject.site(site)
    baselines = {p: generate(subject, p, [], n, max_new_tokens, seed) for p in prompts}
    rows: list[dict[str, Any]] = []
    for concept, texts in concepts.items():
        contrast = [t for c, ts in concepts.items() if c != concept for t in ts] + list(negatives)
        det = concept_detector(subject, site, texts, contrast)
        base = [_score(subject, p, baselines[p], site, det) for p in prompts]
        base_presence = _mean([v for pres, _ in base for v in pres])
        base_ppl = _mean([v for _, pp in base for v in pp])
        candidates = []  # (kind, dictionary name, unit, score, site, unit-norm direction, sign)
        if with_diffmean:
            candidates.append((DIFFMEAN, DIFFMEAN, None, float(det["direction"].norm()), site, det["unit"], 1))
        for name, d in dictionaries.items():
            unit, diff = best_unit(subject, d, texts, contrast)
            out_site, vec, _ = steering_direction(d, unit)
            candidates.append((d.architecture, name, unit, diff, out_site, vec, 1 if diff >= 0 else -1))
        for kind, name, unit, score, out_site, vec, sign in candidates:
            for target in kl_targets:
                row = {"kind": kind, "dictionary": name, "concept": concept, "unit": unit, "unit_score": score,
                       "site": out_site, "target_kl": float(target), "sign": sign,
                       "baseline_presence": base_presence, "baseline_perplexity": base_ppl, "n": n * len(prompts)}
                try:
                    found = find_alpha(subject, out_site, vec, float(target), neutral_prompt, sign)
                except UnitscopeError as e:  # a target this direction cannot reach: a row that says so
                    rows.append({**row, "alpha": math.nan, "kl": math.nan, "presence": math.nan,
                                 "perplexity": math.nan, "error": str(e)})
                    continue
                edit = AddDirection(site=out_site, direction=vec, alpha=found["alpha"])
                scored = [_score(subject, p, generate(subject, p, [edit], n, max_new_tokens, seed), site, det)
                          for p in prompts]
                rows.append({**row, "alpha": found["alpha"], "kl": found["kl"],
                             "presence": _mean([v for pres, _ in scored for v in pres]),
                             "perplexity": _mean([v for _, pp in scored for v in pp]), "error": None})
    return rows


def summary(rows: Sequence[Mapping[str, Any]]) -> list[dict[str, Any]]:
    """Mean presence and perplexity over concepts for each (kind, dictionary, target KL)."""
    groups: dict[tuple, list] = {}
    for r in rows:
        groups.setdefault((r["kind"], r["dictionary"], r["target_kl"]), []).append(r)
    return [{"kind": k[0], "dictionary": k[1], "target_kl": k[2], "presence": _mean([r["presence"] for r in g]),
             "perplexity": _mean([r["perplexity"] for r in g]), "concepts": len(g),
             "reached": sum(r["error"] is None for r in g)} for k, g in sorted(groups.items())]


def plot_png(rows: Sequence[Mapping[str, Any]]) -> bytes:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(9, 3.8), dpi=110)
    FigureCanvasAgg(fig)
    ax_p, ax_f = fig.subplots(1, 2)
    summ = summary(rows)
    for i, name in enumerate(sorted({s["dictionary"] for s in summ})):
        pts = [s for s in summ if s["dictionary"] == name]
        label = f"{pts[0]['kind']}" + (f" ({name})" if name != pts[0]["kind"] else "")
        for ax, key in ((ax_p, "presence"), (ax_f, "perplexity")):
            ax.plot([s["target_kl"] for s in pts], [s[key] for s in pts], "o-", color=f"C{i % 10}", label=label)
    base = _mean([r["baseline_presence"] for r in rows]), _mean([r["baseline_perplexity"] for r in rows])
    for ax, b, what in ((ax_p, base[0], "concept presence (contrast 0, concept texts 1)"),
                        (ax_f, base[1], "perplexity under the unsteered model")):
        ax.axhline(b, color="grey", ls="--", lw=1, label="unsteered")
        ax.set_xscale("log")
        targets = sorted({s["target_kl"] for s in summ})
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
