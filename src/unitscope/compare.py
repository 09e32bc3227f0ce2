"""One table of every dictionary in a run, so unit kinds can be compared side by side.

Rows come from what the run's stages wrote: `dictionaries/ID/cfg.json` (kind, units, site),
`evals/ID/core.json` (L0, FVU, CE loss recovered, KL, dead and dense units, and the fraction of codes that
meet the uniqueness condition, under the whitened and the Euclidean inner product, when the eval JSON has a
`geometry` section), `explain/ID/concepts.parquet` (the mean precision, recall and F1 of the units' concept
labels when that table exists) and `labels/ID/labels.parquet` (the mean detection and fuzzing balanced
accuracy of the LLM-written labels that `unitscope label` scored without error). Nothing is recomputed, so
the table agrees with those files by construction. A figure that a file does not hold is None (shown `-`).

`compare_run(root)` reads the rows; `write_compare(root, rows)` writes `compare.parquet` and `compare.png`
(FVU against L0, drawn with matplotlib's Agg canvas: no display, no global backend change), each replaced
atomically; `format_table(rows)` is the aligned text the CLI prints.
"""

from __future__ import annotations

import io
import json
import math
import os
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq

from .atomic import fsync, recover
from .errors import UnitscopeError

TABLE = "compare.parquet"
PLOT = "compare.png"

SCHEMA = pa.schema([
    ("dictionary", pa.string()), ("kind", pa.string()), ("units", pa.int64()), ("site", pa.string()),
    ("l0", pa.float64()), ("fvu", pa.float64()), ("ce_loss_score", pa.float64()),
    ("ce_loss_score_zero_evaluated_positions", pa.float64()), ("kl_div", pa.float64()),
    ("frac_dead_units", pa.float64()), ("frac_dense_units", pa.float64()), ("uniqueness_fraction", pa.float64()),
    ("uniqueness_fraction_euclidean", pa.float64()), ("uniqueness_ratio", pa.float64()),
    ("label_precision", pa.float64()),
    ("label_recall", pa.float64()), ("label_f1", pa.float64()), ("llm_labels", pa.int64()),
    ("detection_balanced_accuracy", pa.float64()), ("fuzzing_balanced_accuracy", pa.float64()),
    ("eval_tokens", pa.int64()),
])

# (column, heading, format) of the printed table; CE loss recovered is the SAELens/SAEBench-comparable score
COLUMNS = (("dictionary", "dictionary", "{}"), ("kind", "kind", "{}"), ("units", "units", "{}"),
           ("l0", "L0", "{:.1f}"), ("fvu", "FVU", "{:.4f}"), ("ce_loss_score", "CE rec", "{:.4f}"),
           ("kl_div", "KL", "{:.4f}"), ("frac_dead_units", "dead", "{:.3f}"), ("frac_dense_units", "dense", "{:.3f}"),
           ("uniqueness_fraction", "unique", "{:.3f}"), ("uniqueness_fraction_euclidean", "unique E", "{:.3f}"),
           ("uniqueness_ratio", "(2K-1)mu", "{:.2f}"),
           ("label_f1", "label F1", "{:.3f}"), ("detection_balanced_accuracy", "detect", "{:.3f}"),
           ("fuzzing_balanced_accuracy", "fuzz", "{:.3f}"))

# where each eval figure sits in the SAEBench-shaped JSON
_EVAL_FIELDS = {"l0": ("sparsity", "l0"), "fvu": ("reconstruction_quality", "fvu"),
                "ce_loss_score": ("model_performance_preservation", "ce_loss_score"),
                "ce_loss_score_zero_evaluated_positions": ("model_performance_preservation",
                                                           "ce_loss_score_zero_evaluated_positions"),
                "kl_div": ("model_behavior_preservation", "kl_div_with_sae"),
                "frac_dead_units": ("misc", "frac_dead_units"), "frac_dense_units": ("misc", "frac_dense_units")}


def _visible_dirs(parent: Path) -> list[Path]:
    """Subfolders that are not a writer's temporary or previous copy (after finishing any interrupted swap)."""
    if not parent.is_dir():
        return []
    for old in parent.glob(".*.old"):
        recover(parent / old.name[1:-len(".old")])
    return sorted(p for p in parent.iterdir() if p.is_dir() and not p.name.startswith("."))


def _number(value: Any, what: str, path: Path) -> float | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise UnitscopeError(f"{str(path)!r} holds {value!r} for {what}, not a number; rerun its evaluation")
    return float(value)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        obj = json.loads(path.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UnitscopeError(f"{str(path)!r} is corrupt (not JSON); rerun the stage that wrote it") from None
    if not isinstance(obj, dict):
        raise UnitscopeError(f"{str(path)!r} is not a JSON object; rerun the stage that wrote it")
    return obj


def uniqueness(result: dict[str, Any], path: Path) -> dict[str, float | None]:
    """From the eval JSON's `geometry` section (evaluate/geometry.py): the whitened and Euclidean fraction of codes
    meeting the uniqueness condition, and the whitened median of (2K − 1)·μ_A (below 1 means unique), which still
    orders kinds when the strict condition holds for almost no code (large K); None where absent (e.g. a kind
    without directions). The whitened figures use the Atoms paper's inner product, the one to compare kinds by."""
    geometry = result.get("geometry")
    fields = {"uniqueness_fraction": ("whitened", "uniqueness_fraction"),
              "uniqueness_fraction_euclidean": ("euclidean", "uniqueness_fraction"),
              "uniqueness_ratio": ("whitened", "median_uniqueness_ratio")}
    out: dict[str, float | None] = dict.fromkeys(fields)
    if not isinstance(geometry, dict):
        return out
    for column, (space, key) in fields.items():
        section = geometry.get(space)
        value = section.get(key) if isinstance(section, dict) else None
        out[column] = _number(value, f"geometry.{space}.{key}", path)
    return out


def _eval_row(path: Path) -> dict[str, Any]:
    result = _read_json(path)
    metrics = result.get("eval_result_metrics")
    if not isinstance(metrics, dict):
        raise UnitscopeError(f"{str(path)!r} has no eval_result_metrics; it is not a unitscope evaluation")
    row: dict[str, Any] = {}
    for column, (group, key) in _EVAL_FIELDS.items():
        value = (metrics.get(group) or {}).get(key)
        row[column] = _number(value, f"{group}.{key}", path)
    row["eval_tokens"] = (metrics.get("misc") or {}).get("n_tokens")
    row.update(uniqueness(result, path))
    about = result.get("dictionary") or {}
    row["kind"], row["units"] = about.get("architecture"), about.get("n_units")
    row["site"] = (result.get("eval_config") or {}).get("input_site")
    return row


def label_scores(explain_dir: Path) -> dict[str, float | None]:
    """Mean precision, recall and F1 over the units that have them in `concepts.parquet` (None where absent)."""
    out: dict[str, float | None] = {"label_precision": None, "label_recall": None, "label_f1": None}
    path = recover(explain_dir) / "concepts.parquet"
    if not path.is_file():
        return out
    try:
        table = pq.read_table(path)
    except (pa.ArrowInvalid, OSError):
        raise UnitscopeError(f"{str(path)!r} is not a readable Parquet table; rerun `unitscope explain`") from None
    for column, key in (("label_precision", "precision"), ("label_recall", "recall"), ("label_f1", "f1")):
        if key in table.column_names:
            values = [float(v) for v in table.column(key).to_pylist() if v is not None and math.isfinite(float(v))]
            out[column] = sum(values) / len(values) if values else None
    return out


def llm_label_scores(labels_dir: Path) -> dict[str, float | int | None]:
    """Mean detection and fuzzing balanced accuracy over the units `unitscope label` scored without error."""
    out: dict[str, float | int | None] = {"llm_labels": None, "detection_balanced_accuracy": None,
                                          "fuzzing_balanced_accuracy": None}
    path = recover(labels_dir) / "labels.parquet"
    if not path.is_file():
        return out
    try:
        table = pq.read_table(path).to_pydict()
    except (pa.ArrowInvalid, OSError):
        raise UnitscopeError(f"{str(path)!r} is not a readable Parquet table; rerun `unitscope label`") from None
    ok = [i for i, e in enumerate(table.get("error") or []) if e is None]
    out["llm_labels"] = len(ok)
    for column in ("detection_balanced_accuracy", "fuzzing_balanced_accuracy"):
        values = [float(table[column][i]) for i in ok if column in table and table[column][i] is not None]
        values = [v for v in values if math.isfinite(v)]
        out[column] = sum(values) / len(values) if values else None
    return out


def _order(root: Path, ids: set[str]) -> list[str]:
    """The run's own dictionaries in the order it made them, then any others by name."""
    try:
        listed = json.loads((root / "run.json").read_text())["stages"]["train"]["dictionaries"]
        first = [i for i in listed if i in ids]
    except (OSError, ValueError, KeyError, TypeError):
        first = []
    return first + sorted(ids - set(first))


def _check_run(root: Path) -> None:
    state_path = root / "run.json"
    if not state_path.is_file():
        raise UnitscopeError(f"{str(root)!r} is not a run directory: it has no run.json (`unitscope run` makes one)")
    try:
        stages = json.loads(state_path.read_text())["stages"]
        statuses = {s: (stages.get(s) or {}).get("status") for s in ("eval", "explain")}
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UnitscopeError(f"{str(state_path)!r} is corrupt; rerun `unitscope run` with --overwrite all") from None
    for stage, status in statuses.items():
        if status in ("stale", "running"):
            raise UnitscopeError(f"the {stage} stage of run {str(root)!r} is {status} (an earlier stage was redone or "
                                 "it was interrupted); finish the run with `unitscope run` first")


def compare_run(root: str | Path) -> list[dict[str, Any]]:
    """One row per dictionary of the run (those with an evaluation, and those still without one)."""
    root = Path(root)
    _check_run(root)
    dicts = {p.name: p for p in _visible_dirs(root / "dictionaries") if (p / "cfg.json").is_file()}
    evals = {p.name: p / "core.json" for p in _visible_dirs(root / "evals") if (p / "core.json").is_file()}
    if not evals:
        raise UnitscopeError(f"run {str(root)!r} has no evaluated dictionary (no evals/ID/core.json); finish it "
                             "with `unitscope run`, or evaluate one with `unitscope eval --out RUN/evals/ID/core.json`")
    rows = []
    for did in _order(root, set(dicts) | set(evals)):
        row: dict[str, Any] = {c: None for c in SCHEMA.names}
        row["dictionary"] = did
        if did in evals:
            row.update(_eval_row(evals[did]))
        if did in dicts and (row["kind"] is None or row["units"] is None or row["site"] is None):
            cfg = _read_json(dicts[did] / "cfg.json")
            row["kind"] = row["kind"] or cfg.get("architecture")
            row["units"] = row["units"] if row["units"] is not None else cfg.get("d_sae")
            row["site"] = row["site"] or (cfg.get("metadata") or {}).get("hook_name")
        row.update(label_scores(root / "explain" / did))
        row.update(llm_label_scores(root / "labels" / did))
        rows.append(row)
    return rows


def format_cell(value: Any, fmt: str) -> str:
    """One figure as the table shows it: `-` when absent, `nan` when computed but undefined."""
    if value is None:
        return "-"
    if isinstance(value, float) and math.isnan(value):
        return "nan"
    return fmt.format(value)


def format_table(rows: list[dict[str, Any]]) -> str:
    """The rows as aligned text: names left-aligned, figures right-aligned, `-` where a figure is absent."""
    cells = [[h for _, h, _ in COLUMNS]] + [[format_cell(r.get(c), f) for c, _, f in COLUMNS] for r in rows]
    widths = [max(len(line[i]) for line in cells) for i in range(len(COLUMNS))]
    left = {"dictionary", "kind"}
    lines = []
    for line in cells:
        parts = [s.ljust(w) if c in left else s.rjust(w) for s, w, (c, _, _) in zip(line, widths, COLUMNS)]
        lines.append("  ".join(parts).rstrip())
    return "\n".join(lines)


def _write_bytes_atomic(path: Path, data: bytes) -> None:
    """Write beside the target, fsync, rename over it: a kill leaves the old file or the new one."""
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    fsync(path.parent)


def plot_png(rows: list[dict[str, Any]], title: str = "") -> bytes | None:
    """FVU against L0, one labelled point per evaluated dictionary, as PNG bytes (None if nothing to draw)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    points = [r for r in rows if r.get("l0") is not None and r.get("fvu") is not None
              and math.isfinite(r["l0"]) and math.isfinite(r["fvu"])]
    if not points:
        return None
    fig = Figure(figsize=(6.4, 4.4), dpi=110)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    kinds = sorted({str(r["kind"]) for r in points})
    colors = {k: f"C{i % 10}" for i, k in enumerate(kinds)}
    seen: set[str] = set()
    for r in points:
        kind = str(r["kind"])
        ax.scatter(r["l0"], r["fvu"], s=42, color=colors[kind], zorder=3, label=None if kind in seen else kind)
        seen.add(kind)
        ax.annotate(str(r["dictionary"]), (r["l0"], r["fvu"]), textcoords="offset points", xytext=(5, 4),
                    fontsize=7.5)
    if all(r["l0"] > 0 for r in points) and max(r["l0"] for r in points) > 4 * min(r["l0"] for r in points):
        from matplotlib.ticker import FuncFormatter, LogLocator, NullFormatter

        ax.set_xscale("log")  # L0 spans k = 4..64 for SAEs up to the site's width for neurons
        ax.xaxis.set_major_locator(LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.xaxis.set_major_formatter(FuncFormatter(lambda v, _: f"{v:g}"))
        ax.xaxis.set_minor_formatter(NullFormatter())
    ax.margins(x=0.12)
    lo, hi = min(0.0, min(r["fvu"] for r in points)), max(r["fvu"] for r in points)
    pad = 0.08 * ((hi - lo) or 1.0)
    ax.set_ylim(lo - pad, hi + pad)
    ax.set_xlabel("L0 (mean active units per token)")
    ax.set_ylabel("FVU (fraction of variance unexplained)")
    ax.grid(True, alpha=0.3, which="both")
    ax.legend(fontsize=8, title="kind", title_fontsize=8, loc="best")
    if title:
        ax.set_title(title, fontsize=9)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
    return buf.getvalue()


def write_compare(root: str | Path, rows: list[dict[str, Any]]) -> tuple[Path, Path | None]:
    """Write `compare.parquet` and `compare.png` into the run (each replaced atomically); returns their paths."""
    root = Path(root)
    table = pa.Table.from_pylist([{c: r.get(c) for c in SCHEMA.names} for r in rows], schema=SCHEMA)
    buf = io.BytesIO()
    pq.write_table(table, buf)
    _write_bytes_atomic(root / TABLE, buf.getvalue())
    sites = sorted({str(r["site"]) for r in rows if r.get("site")})
    png = plot_png(rows, title=f"{root.name} · {', '.join(sites)}")
    if png is None:  # nothing to draw: no older plot may stay beside the new table
        (root / PLOT).unlink(missing_ok=True)
        return root / TABLE, None
    _write_bytes_atomic(root / PLOT, png)
    return root / TABLE, root / PLOT


def read_compare(root: str | Path) -> list[dict[str, Any]] | None:
    """The rows of a run's `compare.parquet`, or None when it has none."""
    path = Path(root) / TABLE
    if not path.is_file():
        return None
    return pq.read_table(path).to_pylist()


def for_report(root: str | Path) -> dict[str, Any]:
    """`write_report` keywords that show the run's comparison: its rows, each dictionary that has explanation
    tables (so a report of its own beside this one) linked, and its plot."""
    root = Path(root)
    rows = read_compare(root)
    if not rows:
        return {}
    linked = [{**r, "report": f"../{r['dictionary']}/index.html"}
              if (root / "explain" / str(r["dictionary"]) / "units.parquet").is_file() else r for r in rows]
    return {"comparison": linked, "comparison_plot": root / PLOT if (root / PLOT).is_file() else None}
