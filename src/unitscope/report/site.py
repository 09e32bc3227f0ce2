"""The static feature browser: one page application over compact data files, one site per run.

Layout of the output folder (replaced whole, in one step, by `atomic.replace_dir`)::

    index.html app.js style.css      the application (package data, the same for every run)
    compare.png                      the run's FVU-vs-L0 plot, when it has one
    data/run.js                      overview: model, site, corpus, dictionaries and their fidelity, comparison
    data/D/list.js                   dictionary D's unit list, column-wise (unit, frequency, max, label, ...)
    data/D/u/K.js                    units K*SHARD .. K*SHARD+SHARD-1: histogram, examples, labels, neighbours
    data/D/img/U.png                 dissection images, when the run has them
    D/index.html                     a link into the site at #/D (the per-dictionary address earlier reports had)

Browsers refuse fetch() of file:// URLs, so each data file is a script calling a global registration
function; the page adds a <script> tag when it needs a shard. A data file's payload is gzip-compressed JSON
in base64 (decoded with the browser's DecompressionStream), which makes the report about 5x smaller than
the JSON itself. Text from the corpus, the tokenizer or the run never becomes markup: it is JSON inside the
payload, inserted by the page with textContent only.
"""

from __future__ import annotations

import base64
import gzip
import json
import shutil
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..atomic import recover, replace_dir
from ..errors import UnitscopeError
from . import data as D

SHARD = 64  # units per data file: one unit page loads one small file
ASSETS = ("index.html", "app.js", "style.css")
_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(obj: Any) -> str:
    """JSON that is safe inside a script: nothing in it can close the element or start markup."""
    text = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False)
    return text.translate(str.maketrans(_JSON_ESCAPES))


def packed(obj: Any) -> str:
    """base64 of gzip-compressed JSON (deterministic: no timestamp in the gzip header)."""
    raw = json.dumps(obj, ensure_ascii=False, separators=(",", ":"), allow_nan=False).encode()
    return base64.b64encode(gzip.compress(raw, compresslevel=9, mtime=0)).decode("ascii")


def _data_file(path: Path, fn: str, *args: Any) -> None:
    """A data script: `US.fn(arg, ..., "payload")`; arguments are JSON, the payload packed."""
    head = ",".join(script_json(a) for a in args[:-1])
    path.write_text(f'US.{fn}({head}{"," if head else ""}"{packed(args[-1])}");\n', encoding="ascii")


def _metrics(eval_json: Path | None) -> dict[str, Any]:
    if not eval_json or not eval_json.is_file():
        return {}
    try:
        m = json.loads(eval_json.read_text())["eval_result_metrics"]
        return {"fvu": m["reconstruction_quality"]["fvu"], "l0": m["sparsity"]["l0"],
                "ce_loss_score": m["model_performance_preservation"]["ce_loss_score"],
                "kl_div_with_sae": m["model_behavior_preservation"]["kl_div_with_sae"],
                "frac_dead_units": m["misc"]["frac_dead_units"], "frac_dense_units": m["misc"]["frac_dense_units"]}
    except (KeyError, TypeError, json.JSONDecodeError):
        raise UnitscopeError(f"{str(eval_json)!r} is not an evaluation written by `unitscope eval`") from None


class Source:
    """One dictionary's inputs: its explanation tables and, when present, eval JSON, labels, effects, weights."""

    def __init__(self, name: str, explain_dir: str | Path, eval_json: str | Path | None = None,
                 labels: str | Path | None = None, dictionary: str | Path | None = None,
                 info: dict[str, Any] | None = None, dissection: str | Path | None = None) -> None:
        self.name = name
        self.dissection = Path(dissection) if dissection else None
        self.explain_dir = recover(explain_dir)
        self.eval_json = Path(eval_json) if eval_json else None
        self.labels = Path(labels) if labels else None
        self.dictionary = Path(dictionary) if dictionary else None
        self.info = info or {}


def _directions(path: Path | None):
    if path is None or not (path / "cfg.json").is_file():
        return None
    from ..dictionaries import load_dictionary

    return load_dictionary(path).directions


def write_dictionary(tmp: Path, src: Source, progress: bool = False) -> dict[str, Any]:
    """Write data/NAME/ for one dictionary; returns its overview entry."""
    out = tmp / "data" / src.name
    (out / "u").mkdir(parents=True)
    units = D.read_units(src.explain_dir)
    unit_ids = units.column("unit").to_numpy().astype(np.int64)
    concepts = D.read_concepts(src.explain_dir)
    llm = D.read_labels(src.labels)
    effects, effect_key = D.read_effects(src.explain_dir / "effects.parquet")
    dissection = D.read_dissection(src.dissection)
    examples_path = src.explain_dir / "examples.parquet"
    cofire = D.cofiring(pq.read_table(examples_path, columns=["unit", "kind", "window"]))
    directions = _directions(src.dictionary)
    near_idx = near_val = None
    if directions is not None and directions.shape[0] > 1:
        near_idx, near_val = D.nearest_by_cosine(directions, unit_ids)
    images = {}
    img_dir = src.explain_dir / "dissection"
    if img_dir.is_dir():
        (out / "img").mkdir()
        for p in img_dir.glob("*.png"):
            if p.stem.isdigit():
                shutil.copyfile(p, out / "img" / p.name)
                images[int(p.stem)] = f"data/{src.name}/img/{p.name}"

    # the list: column-wise, so 65k units cost a few bytes each
    rows = units.to_pylist()
    pos = {int(u): i for i, u in enumerate(unit_ids)}
    peak_tokens: dict[int, list[str]] = {}
    shards: dict[int, D.ShardBuilder] = {}
    pf = pq.ParquetFile(examples_path)
    by_unit: dict[int, list[dict[str, Any]]] = {}
    last = None
    for rg in range(pf.num_row_groups):  # examples are written sorted by unit, in row groups
        for ex in pf.read_row_group(rg, columns=["unit", "kind", "rank", "quantile", "window", "max_activation",
                                                 "tokens", "acts"]).to_pylist():
            last = int(ex["unit"])
            by_unit.setdefault(last, []).append(ex)
        # every unit but the last one read is complete (its rows may go on in the next row group)
        done = [u for u in by_unit if u != last] if rg + 1 < pf.num_row_groups else list(by_unit)
        for u in done:  # a unit whose rows are all read (row groups follow the unit order)
            _add_unit(u, by_unit.pop(u), rows[pos[u]] if u in pos else None, shards, peak_tokens, src, out,
                      concepts, llm, effects, cofire, near_idx, near_val, pos, images, dissection)
    for u in unit_ids:  # units with no examples at all still get a page
        if int(u) not in peak_tokens:
            _add_unit(int(u), [], rows[pos[int(u)]], shards, peak_tokens, src, out, concepts, llm, effects, cofire,
                      near_idx, near_val, pos, images, dissection)
    for k in sorted(shards):
        _data_file(out / "u" / f"{k}.js", "shard", src.name, k, shards[k].payload())

    def label_of(u: int) -> tuple[str, float | None, str]:
        if u in llm:
            return llm[u]["label"], llm[u].get("detection"), "llm"
        if u in concepts:
            return concepts[u]["label"], concepts[u].get("f1"), "concepts"
        return "", None, ""

    labels = [label_of(int(u)) for u in unit_ids]
    freq = units.column("frequency").to_numpy()
    columns = {
        "unit": unit_ids.tolist(),
        "freq": [D.sig(f, 3) for f in freq],
        "max": [D.sig(v, 3) for v in units.column("max_activation").to_numpy(zero_copy_only=False)],
        "label": [x[0] for x in labels], "score": [x[1] for x in labels], "lsrc": [x[2] for x in labels],
        "tokens": [" ".join(dict.fromkeys([*peak_tokens.get(int(u), []),
                                           *[t.strip() for t in (rows[i].get("promoted_tokens") or [])[:3]]]))
                   for i, u in enumerate(unit_ids)],
        "effect": [D.sig((effects.get(int(u)) or {}).get(effect_key), 3) if effect_key else None for u in unit_ids],
    }
    _data_file(out / "list.js", "list", src.name, columns)
    return {"name": src.name, "units": len(unit_ids), "shard": SHARD, "metrics": _metrics(src.eval_json),
            "effect": effect_key, "has_labels": bool(llm), "has_nearest": near_idx is not None,
            "dead": int((freq == 0).sum()), **{k: v for k, v in src.info.items() if isinstance(v, (str, int, float))}}


def _add_unit(u: int, exs: list, row: dict | None, shards: dict, peak_tokens: dict, src: Source, out: Path,
              concepts: dict, llm: dict, effects: dict, cofire: dict, near_idx, near_val, pos: dict,
              images: dict, dissection: dict) -> None:
    if row is None:
        return
    exs.sort(key=lambda e: (D.KIND_CODE.get(e["kind"], 9), e["quantile"] or 0, e["rank"]))
    peaks = []
    for e in exs:
        if e["kind"] == "top" and len(peaks) < D.SEARCH_TOKENS and e["tokens"]:
            peaks.append(e["tokens"][int(np.argmax(e["acts"]))].strip())
    peak_tokens[u] = peaks
    labels = []
    if u in llm:
        labels.append(llm[u])
    if u in concepts:
        labels.append(concepts[u])
    labels += dissection.get(u, [])
    extra: dict[str, Any] = {"labels": labels, "effects": effects.get(u), "cofire": cofire.get(u),
                             "img": images.get(u)}
    if near_idx is not None:
        i = pos[u]
        extra["near"] = [[int(a), D.sig(b, 3)] for a, b in zip(near_idx[i], near_val[i])]
    shards.setdefault(u // SHARD, D.ShardBuilder()).units.append(D.unit_record(row, exs, shards[u // SHARD], extra))


def write_site(out: str | Path, sources: list[Source], overview: dict[str, Any] | None = None,
               comparison: list[dict[str, Any]] | None = None, comparison_plot: str | Path | None = None,
               progress: bool = False, links: bool = False) -> Path:
    """Write the browser of `sources` into `out` (replaced whole); returns the path of index.html.

    `links`: also write D/index.html for each dictionary D, a link into the site (a run's report/D/index.html)."""
    out = Path(out)
    if not sources:
        raise UnitscopeError("there is nothing to report: no dictionary has explanation tables")
    names = [s.name for s in sources]
    if len(set(names)) != len(names):
        raise UnitscopeError(f"two dictionaries share a name in the report: {names}")
    allowed = {*ASSETS, "data", "compare.png", *names}
    with replace_dir(out, allowed) as tmp:
        pkg = resources.files("unitscope.report") / "assets"
        for a in ASSETS:
            (tmp / a).write_bytes((pkg / a).read_bytes())
        plot = bool(comparison and comparison_plot and Path(comparison_plot).is_file())
        if plot:
            shutil.copyfile(comparison_plot, tmp / "compare.png")
        dicts = [write_dictionary(tmp, s, progress) for s in sources]
        for s in sources if links else []:  # the address earlier reports had: report/D/index.html
            (tmp / s.name).mkdir()
            (tmp / s.name / "index.html").write_text(_link_page(s.name), encoding="utf-8")
        run = {**(overview or {}), "dictionaries": dicts, "comparison": _plain(comparison), "plot": plot}
        _data_file(tmp / "data" / "run.js", "run", run)
    return out / "index.html"


def _plain(rows: list[dict[str, Any]] | None) -> list[dict[str, Any]] | None:
    """The comparison's rows with the printed table's columns and headers (unitscope.compare.COLUMNS)."""
    if not rows:
        return None
    from ..compare import COLUMNS

    return [{h: (D.sig(r.get(k)) if isinstance(r.get(k), float) else r.get(k)) for k, h, _ in COLUMNS
             if isinstance(r.get(k), (str, int, float, type(None)))} for r in rows]


def _link_page(name: str) -> str:
    from urllib.parse import quote

    target = "../index.html#/" + quote(name, safe="")
    esc = target.replace("&", "&amp;").replace('"', "&quot;").replace("<", "&lt;")
    return (f'<!doctype html><meta charset=utf-8><meta http-equiv=refresh content="0; url={esc}">'
            f'<title>unitscope report</title><a href="{esc}">open the report</a>\n')


def read_state(root: Path) -> dict[str, Any]:
    state_path = root / "run.json"
    if not state_path.is_file():
        raise UnitscopeError(f"{str(root)!r} is not a run directory: it has no run.json")
    try:
        state = json.loads(state_path.read_text())
        state["config"], state["stages"]  # noqa: B018 -- both must be there
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UnitscopeError(f"{str(state_path)!r} is corrupt; rerun `unitscope run` with --overwrite all") from None
    return state


def report_run(root: str | Path, progress: bool = False) -> Path:
    """Write RUN/report/ from what the run's stages wrote; returns the path of index.html."""
    from ..compare import for_report

    root = Path(root)
    state = read_state(root)
    cfg = state["config"]
    explain = sorted(p.parent.name for p in (root / "explain").glob("*/units.parquet")
                     if not p.parent.name.startswith("."))
    if not explain:
        raise UnitscopeError(f"run {str(root)!r} has no explanation tables yet; run `unitscope explain` first")
    model, corpus, tokens = cfg.get("model"), cfg.get("corpus"), None
    store_json = root / "store" / "store.json"
    if store_json.is_file():
        manifest = json.loads(store_json.read_text())
        model, tokens = manifest.get("model", model), manifest.get("tokens")
        if not corpus and isinstance(manifest.get("corpus"), dict):
            corpus = manifest["corpus"].get("spec")
    sources = []
    for did in explain:
        arch = None
        cfg_json = root / "dictionaries" / did / "cfg.json"
        if cfg_json.is_file():
            arch = json.loads(cfg_json.read_text()).get("architecture")
        sources.append(Source(did, root / "explain" / did, eval_json=root / "evals" / did / "core.json",
                              labels=root / "labels" / did / "labels.parquet",
                              dictionary=root / "dictionaries" / did, info={"kind": arch or ""},
                              dissection=root / "dissect" / did / "dissection.parquet"))
    sites = cfg.get("site") or cfg.get("sites")
    overview = {"title": f"{root.name} · {model or ''}", "model": model, "site": sites, "corpus": corpus,
                "tokens": tokens, "run": root.name}
    comparison = for_report(root)
    return write_site(root / "report", sources, overview, comparison.get("comparison"),
                      comparison.get("comparison_plot"), progress, links=True)


def write_report(out: str | Path, explain_dir: str | Path, title: str, eval_json: str | Path | None = None,
                 info: dict[str, Any] | None = None, comparison: list[dict[str, Any]] | None = None,
                 comparison_plot: str | Path | None = None, dictionary: str | Path | None = None,
                 labels: str | Path | None = None, name: str | None = None) -> Path:
    """A site for one explanation directory (the dictionary named `name`, by default the directory's name)."""
    out = Path(out)
    src = Source(name or recover(explain_dir).name, explain_dir, eval_json, labels, dictionary)
    return write_site(out, [src], {"title": title, **(info or {})}, comparison, comparison_plot)

