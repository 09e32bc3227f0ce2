"""Label units with an LLM and score each label by detection and fuzzing, resumably.

Output directory (`--out`): `labels.parquet` (one row per unit: the label, the metrics, the model, endpoint,
temperature, seed and prompts it was made with, and an `error` column), `answers.parquet` (one row per
scored excerpt: the tokens and activations shown, what was marked, the truth, the model's raw answer, the
parsed yes/no and P(yes)) and `label.json` (the settings that the labels depend on). After every batch of
units the three are written into a temporary directory and swapped in whole (`atomic.replace_dir`), so a
kill loses at most the batch in flight. A rerun skips units already labelled without error, retries the
others, and refuses an output made with other settings (model, temperature, seed, prompts, example counts
or another explanation), since its rows would not be comparable.
"""

from __future__ import annotations

import json
import math
import threading
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from ..atomic import recover, replace_dir, write_json_atomic
from ..errors import UnitscopeError
from ..fs import file_sha256
from . import prompts
from .client import EndpointError
from .scoring import Excerpt, auc, balanced_accuracy, crop, f1, fuzz_marks, split

OUTPUTS = {"labels.parquet", "answers.parquet", "label.json"}
SCORERS = ("detection", "fuzzing")


@dataclass
class LabelSettings:
    """What a label depends on (recorded in label.json; a rerun must match) besides the model itself."""

    n_explain: int = 10  # excerpts the explainer sees
    n_score: int = 10  # held-out firing excerpts (and as many non-firing) per scorer
    excerpt_tokens: int = 32  # tokens per excerpt shown to the model
    explain_max_tokens: int = 48
    temperature: float = 0.0
    seed: int = 0


LABEL_SCHEMA = pa.schema([
    ("unit", pa.int32()), ("label", pa.string()), ("source", pa.string()), ("backend", pa.string()),
    ("endpoint", pa.string()), ("model", pa.string()), ("temperature", pa.float64()), ("seed", pa.int64()),
    ("prompt_version", pa.string()), ("prompts", pa.string()), ("explainer_prompt", pa.string()),
    ("explainer_answer", pa.string()), ("explain_windows", pa.list_(pa.int64())),
    ("detection_balanced_accuracy", pa.float64()), ("detection_f1", pa.float64()), ("detection_auc", pa.float64()),
    ("detection_n", pa.int32()), ("detection_n_firing", pa.int32()),
    ("fuzzing_balanced_accuracy", pa.float64()), ("fuzzing_f1", pa.float64()), ("fuzzing_auc", pa.float64()),
    ("fuzzing_n", pa.int32()), ("fuzzing_n_correct_marks", pa.int32()),
    ("n_unparsed", pa.int32()), ("requests", pa.int32()), ("error", pa.string()), ("labelled_at", pa.string()),
])
ANSWER_SCHEMA = pa.schema([
    ("unit", pa.int32()), ("scorer", pa.string()), ("window", pa.int64()), ("tokens", pa.list_(pa.string())),
    ("acts", pa.list_(pa.float32())), ("marked", pa.list_(pa.bool_())), ("excerpt", pa.string()),
    ("truth", pa.bool_()), ("answer", pa.string()), ("prediction", pa.bool_()), ("p_yes", pa.float64()),
    ("attempts", pa.int32()),
])



def explanation_units(explanations: Path) -> list[int]:
    """Every unit of an explanation directory (units.parquet, else the units that have examples)."""
    if not (explanations / "examples.parquet").is_file():
        raise UnitscopeError(f"{str(explanations)!r} is not an explanation directory (it has no examples.parquet); "
                             "make one with `unitscope explain`")
    src = explanations / "units.parquet"
    if not src.is_file():
        src = explanations / "examples.parquet"
    col = pq.read_table(src, columns=["unit"]).column("unit").to_numpy()
    return sorted(set(int(u) for u in col))


def load_excerpts(explanations: Path, units: Sequence[int]) -> dict[int, list[Excerpt]]:
    """The example rows of `units`, read with a filter (the table may hold thousands of units)."""
    path = explanations / "examples.parquet"
    names = set(pq.read_schema(path).names)
    missing = {"unit", "window", "tokens", "acts"} - names
    if missing:
        raise UnitscopeError(f"{str(path)!r} lacks the column(s) {', '.join(sorted(missing))}; remake it with "
                             "`unitscope explain`")
    cols = ["unit", "window", "tokens", "acts"] + [c for c in ("kind", "rank", "quantile") if c in names]
    table = pq.read_table(path, columns=cols, filters=[("unit", "in", [int(u) for u in units])])
    order = [("unit", "ascending")] + [("quantile", "descending")] * ("quantile" in names)
    table = table.sort_by(order + [("rank", "ascending")] * ("rank" in names))  # strongest first
    d = table.to_pydict()
    kinds = d.get("kind") or ["top"] * table.num_rows
    out: dict[int, list[Excerpt]] = {int(u): [] for u in units}
    for u, k, w, toks, acts in zip(d["unit"], kinds, d["window"], d["tokens"], d["acts"]):
        out[int(u)].append(Excerpt(int(w), str(k), list(toks), np.asarray(acts, dtype=np.float32)))
    return out


class Bounded:
    """A backend with at most `n` requests in flight, whatever thread asks."""

    def __init__(self, backend: Any, n: int):
        self.backend, self._sem = backend, threading.BoundedSemaphore(n)

    def complete(self, *a, **kw):
        with self._sem:
            return self.backend.complete(*a, **kw)


def _nan_to_none(x: float) -> float | None:
    return None if x is None or (isinstance(x, float) and math.isnan(x)) else x


def label_unit(unit: int, rows: list[Excerpt], backend: Any, info: dict[str, Any], settings: LabelSettings,
               pool: ThreadPoolExecutor, max_retries: int) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """One unit's label row and answer rows; an endpoint failure becomes the row's `error`, never an exception."""
    row: dict[str, Any] = {name: None for name in LABEL_SCHEMA.names}
    row.update(unit=unit, source="llm", prompt_version=prompts.PROMPT_VERSION,
               prompts=json.dumps(prompts.TEMPLATES), labelled_at=time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
               **info)
    rng = np.random.default_rng([settings.seed, unit])
    sp = split(rows, settings.n_explain, settings.n_score, settings.seed * 1_000_003 + unit)
    if not sp.explain:
        row["error"] = "the unit fires in none of its example windows, so there is nothing to explain"
        return row, []
    requests = 0
    try:
        shown = [crop(e, settings.excerpt_tokens, rng) for e in sp.explain]
        messages = prompts.explain_messages([prompts.render(e.tokens, e.fires) for e in shown])
        row["explainer_prompt"] = messages[1]["content"]
        row["explain_windows"] = [e.window for e in sp.explain]
        label = None
        for _ in range(max_retries + 1):
            ans = backend.complete(messages, settings.explain_max_tokens)
            requests += ans.attempts
            row["explainer_answer"] = ans.text
            label = prompts.parse_explanation(ans.text)
            if label:
                break
        if not label:
            raise EndpointError(f"the explainer's answer held no phrase {max_retries + 1} time(s) "
                                f"(last: {row['explainer_answer']!r})")
        row["label"] = label

        items: list[tuple[str, Excerpt, np.ndarray | None, bool]] = []  # scorer, excerpt, marks, truth
        for ex in sp.positives + sp.negatives:
            c = crop(ex, settings.excerpt_tokens, rng)
            items.append(("detection", c, None, bool(c.fires.any())))
        for ex in sp.positives:
            c = crop(ex, settings.excerpt_tokens, rng)
            items.append(("fuzzing", c, c.fires.copy(), True))
            wrong = fuzz_marks(c, rng)
            if wrong is not None:
                items.append(("fuzzing", c, wrong, False))

        def ask(item):
            scorer, c, marks, _truth = item
            text = prompts.render(c.tokens, marks)
            return text, backend.complete(prompts.score_messages(scorer, label, text), 3, top_logprobs=20)

        answers = []
        for (scorer, c, marks, truth), (text, ans) in zip(items, pool.map(ask, items)):
            requests += ans.attempts
            answers.append({"unit": unit, "scorer": scorer, "window": c.window, "tokens": c.tokens,
                            "acts": c.acts.tolist(), "marked": None if marks is None else marks.tolist(),
                            "excerpt": text, "truth": truth, "answer": ans.text,
                            "prediction": prompts.parse_yes_no(ans.text), "p_yes": prompts.p_yes(ans.top_logprobs),
                            "attempts": ans.attempts})
    except EndpointError as e:
        row["error"] = str(e)
        row["requests"] = requests
        return row, []
    row["requests"] = requests
    row["n_unparsed"] = sum(a["prediction"] is None for a in answers)
    for scorer in SCORERS:
        mine = [a for a in answers if a["scorer"] == scorer]
        truth = [a["truth"] for a in mine]
        row[f"{scorer}_balanced_accuracy"] = _nan_to_none(balanced_accuracy(truth, [a["prediction"] for a in mine]))
        row[f"{scorer}_f1"] = _nan_to_none(f1(truth, [a["prediction"] for a in mine]))
        row[f"{scorer}_auc"] = _nan_to_none(auc(truth, [a["p_yes"] for a in mine]))
        row[f"{scorer}_n"] = len(mine)
    row["detection_n_firing"] = sum(a["truth"] for a in answers if a["scorer"] == "detection")
    row["fuzzing_n_correct_marks"] = sum(a["truth"] for a in answers if a["scorer"] == "fuzzing")
    return row, answers


def _identity(settings: LabelSettings, backend_kind: str, model: str, examples_sha: str) -> dict[str, Any]:
    return {"backend": backend_kind, "model": model, "prompt_version": prompts.PROMPT_VERSION,
            "examples_sha256": examples_sha, **asdict(settings)}


def _read_previous(out: Path, identity: dict[str, Any]) -> tuple[pa.Table | None, pa.Table | None]:
    recover(out)
    if out.exists() and not out.is_dir():
        raise UnitscopeError(f"{str(out)!r} is an existing file; give a directory for the labels")
    foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUTS) if out.is_dir() else []
    if foreign:  # checked before any request: the output directory is replaced whole after each batch
        raise UnitscopeError(f"{str(out)!r} already holds other files ({', '.join(foreign[:3])}); give a new or empty "
                             "directory, or one that `unitscope label` wrote")
    if not (out / "labels.parquet").is_file():
        return None, None
    try:
        old = json.loads((out / "label.json").read_text())["identity"]
    except (OSError, ValueError, KeyError, TypeError):
        raise UnitscopeError(f"{str(out)!r} holds labels.parquet without a readable label.json; give another --out "
                             "or remove that directory") from None
    diff = [k for k in sorted(set(old) | set(identity)) if old.get(k) != identity.get(k)]
    if diff:
        k = diff[0]
        raise UnitscopeError(f"{str(out)!r} holds labels made with {k} {old.get(k)!r}, not {identity.get(k)!r}; give "
                             "another --out, or the same settings to resume")
    return pq.read_table(out / "labels.parquet"), pq.read_table(out / "answers.parquet")


def label_units(explanations: str | Path, out: str | Path, backend: Any, settings: LabelSettings,
                units: Sequence[int] | None = None, concurrency: int = 4, max_retries: int = 4,
                batch_units: int = 16, progress: Callable[[int], None] | None = None) -> dict[str, Any]:
    """Label `units` (default: all) of an explanation directory into `out`, resuming what is there.

    Returns a summary: units labelled now, units skipped as already done, and the units that failed with
    their error.
    """
    explanations, out = Path(explanations), Path(out)
    every = explanation_units(explanations)
    if units is None:
        units = every
    else:
        known = set(every)
        bad = [u for u in units if u not in known]
        if bad:
            raise UnitscopeError(f"unit {bad[0]} is not in {str(explanations)!r}, whose units are "
                                 f"{every[0]}..{every[-1]}" if every else f"{str(explanations)!r} has no units")
        units = list(dict.fromkeys(int(u) for u in units))
    model = backend.resolve_model()
    identity = _identity(settings, backend.kind, model, file_sha256(explanations / "examples.parquet"))
    labels, answers = _read_previous(out, identity)
    done = set()
    if labels is not None:
        ok = pc.is_null(labels.column("error"))
        done = set(int(u) for u in pc.filter(labels.column("unit"), ok).to_pylist())
    todo = [u for u in units if u not in done]
    info = {"backend": backend.kind, "endpoint": backend.url, "model": model,
            "temperature": settings.temperature, "seed": settings.seed}
    bounded = Bounded(backend, concurrency)
    failed: dict[int, str] = {}
    unit_pool, request_pool = ThreadPoolExecutor(concurrency), ThreadPoolExecutor(concurrency)
    try:
        for lo in range(0, len(todo), batch_units):
            batch = todo[lo:lo + batch_units]
            rows = load_excerpts(explanations, batch)
            results = list(unit_pool.map(
                lambda u, rows=rows: label_unit(u, rows[u], bounded, info, settings, request_pool, max_retries),
                batch))
            new_labels = pa.Table.from_pylist([r for r, _ in results], schema=LABEL_SCHEMA)
            new_answers = pa.Table.from_pylist([a for _, ans in results for a in ans], schema=ANSWER_SCHEMA)
            if labels is not None:
                keep = pc.invert(pc.is_in(labels.column("unit"), pa.array(batch, pa.int32())))
                labels = pa.concat_tables([labels.filter(keep), new_labels])
                keep = pc.invert(pc.is_in(answers.column("unit"), pa.array(batch, pa.int32())))
                answers = pa.concat_tables([answers.filter(keep), new_answers])
            else:
                labels, answers = new_labels, new_answers
            labels = labels.sort_by("unit")
            answers = answers.sort_by([("unit", "ascending")])
            with replace_dir(out, OUTPUTS) as tmp:
                pq.write_table(labels, tmp / "labels.parquet")
                pq.write_table(answers, tmp / "answers.parquet")
                write_json_atomic(tmp / "label.json", {"identity": identity, "endpoint": backend.url,
                                                        "explanations": str(explanations.resolve()),
                                                        "prompts": prompts.TEMPLATES})
            for r, _ in results:
                if r["error"]:
                    failed[r["unit"]] = r["error"]
            if progress:
                progress(len(batch))
    except BaseException:  # an interrupt: drop the queued requests instead of finishing the whole batch
        for pool in (unit_pool, request_pool):
            pool.shutdown(wait=False, cancel_futures=True)
        raise
    for pool in (unit_pool, request_pool):
        pool.shutdown()
    return {"labelled": len(todo) - len(failed), "skipped": len(units) - len(todo), "failed": failed,
            "out": out, "model": model}
