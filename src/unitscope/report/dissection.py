"""A static page for the output of `unitscope dissect` (network dissection tables, GAN dissection figures).

Dissection outputs are not runs of language-model units (no explanation tables, no token examples), so they get
their own page, `OUT/report/index.html`, beside the feature browser rather than inside it:

- per layer (each `dissection.parquet` under OUT): detectors by concept, and per unit its best concept, IoU and
  threshold (detectors first);
- for the generator (`gan_dissection.json`): per concept the units found, the pixel fraction before and after
  ablating them on fresh latents, the other concepts' change, insertion in a region, and the before/after images
  and the top units' thresholded maps over sample images.

Every value from the files is escaped; images are copied into the page's folder so it opens from the file system.
"""

from __future__ import annotations

import json
import shutil
from html import escape
from pathlib import Path
from typing import Any

from ..atomic import replace_dir
from ..errors import UnitscopeError

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}"
         "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f4f4f4}"
         "img{image-rendering:pixelated;max-width:100%;display:block;margin:.3em 0}.no{color:#a00}")


def is_dissection_dir(path: str | Path) -> bool:
    """True when `path` holds what `unitscope dissect` writes (and is not a run)."""
    p = Path(path)
    return p.is_dir() and not (p / "run.json").exists() and bool(_tables(p) or (p / "gan_dissection.json").is_file())


def _tables(root: Path) -> list[Path]:
    return sorted(t for t in root.rglob("dissection.parquet") if "report" not in t.relative_to(root).parts)


def _cell(v: Any) -> str:
    if v is None:
        return "—"
    if isinstance(v, float):
        return f"{v:.4g}"
    return escape(str(v))


def _table(header: list[str], rows: list[list[Any]]) -> str:
    head = "".join(f"<th>{escape(h)}</th>" for h in header)
    body = "".join("<tr>" + "".join(f"<td>{_cell(v)}</td>" for v in r) + "</tr>" for r in rows)
    return f"<table><tr>{head}</tr>{body}</table>"


def _maps_name(root: Path, table: Path) -> str:
    return "_".join(table.parent.relative_to(root).parts + ("unit_maps.png",))


def _layer_section(root: Path, table: Path, max_units: int = 200) -> str:
    import pyarrow.parquet as pq

    rows = pq.read_table(table, columns=["unit", "concept", "iou", "threshold", "rank", "detector"]).to_pylist()
    best = sorted((r for r in rows if r["rank"] == 1), key=lambda r: (not r["detector"], -r["iou"], r["unit"]))
    summary_path = table.with_name("dissection.json")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    by_concept = summary.get("detectors_by_concept") or {}
    if not by_concept:
        for r in best:
            if r["detector"]:
                by_concept[r["concept"]] = by_concept.get(r["concept"], 0) + 1
    name = str(table.parent.relative_to(root)) if table.parent != root else "."
    parts = [f"<h2>Layer {escape(str(summary.get('layer', '')))} — {escape(name)}</h2>",
             f"<p>{len(best)} units, {sum(1 for r in best if r['detector'])} detectors "
             f"(best IoU &gt; {_cell(summary.get('detector_iou'))}), {len(by_concept)} unique concepts.</p>",
             "<h3>Detectors by concept</h3>", _table(["concept", "detectors"], sorted(by_concept.items())),
             "<h3>Units: best concept</h3>",
             _table(["unit", "best concept", "IoU", "threshold", "detector"],
                    [[r["unit"], r["concept"], r["iou"], r["threshold"], "yes" if r["detector"] else "no"]
                     for r in best[:max_units]])]
    maps_json = table.with_name("unit_maps.json")
    if maps_json.is_file() and table.with_name("unit_maps.png").is_file():
        chosen = json.loads(maps_json.read_text())
        parts += ["<h3>Each concept's best detector over sample images (map above the threshold in red)</h3>",
                  _table(["row", "unit", "concept", "IoU", "threshold"],
                         [[i + 1, c.get("unit"), c.get("concept"), c.get("iou"), c.get("threshold")]
                          for i, c in enumerate(chosen)]),
                  f'<img src="{escape(_maps_name(root, table))}" alt="unit maps">']
    if len(best) > max_units:
        parts.append(f"<p>{len(best) - max_units} more units in {escape(str(table))}.</p>")
    return "\n".join(parts)


def _gan_section(g: dict[str, Any], images: set[str]) -> str:
    def img(name: str | None, alt: str) -> str:
        return f'<img src="{escape(name)}" alt="{escape(alt)}">' if name in images else ""

    parts = [f"<h2>Generator: layer {escape(str(g.get('layer')))}, top {_cell(g.get('top_n'))} units per concept, "
             f"{_cell(g.get('fresh_latents'))} fresh latents</h2>",
             "<p>Segmented pixel fraction of fresh images before any edit:</p>",
             _table(list(g.get("before", {})), [list(g.get("before", {}).values())]),
             "<p>Fresh images (before):</p>", img((g.get("images") or {}).get("fresh"), "fresh images")]
    rows = []
    for name, c in (g.get("concepts") or {}).items():
        others = ", ".join(f"{k} {v:+.0%}" for k, v in (c.get("others_relative_change") or {}).items())
        rows.append([name, c.get("before"), (c.get("ablation_after") or {}).get(name), c.get("ablation_relative"),
                     others, (c.get("random_units_after") or {}).get(name), c.get("insertion_region_before"),
                     c.get("insertion_region_after"), c.get("insertion_outside_before"),
                     c.get("insertion_outside_after")])
    parts.append(_table(["concept", "fraction before", "after ablation", "after / before", "other concepts' change",
                         "random units ablated", "region before", "region after insertion", "outside before",
                         "outside after insertion"], rows))
    if g.get("not_drawn"):
        parts.append("<p class=no>Not dissected (the generator draws them on too few pixels): "
                     + ", ".join(f"{escape(k)} {_cell(v)}" for k, v in g["not_drawn"].items()) + "</p>")
    for name, c in (g.get("concepts") or {}).items():
        ims = c.get("images") or {}
        thr = ["none (on for over half the pixels at every candidate)" if t is None else t
               for t in c.get("threshold_of_units") or []]
        parts += [f"<h3>{escape(name)}</h3>",
                  _table(["unit", "search α", "IQR", "threshold"],
                         [[u, a, q, t] for u, a, q, t in zip(c.get("units", []), c.get("alpha", []),
                                                              c.get("iqr_of_units", []), thr)]),
                  "<p>Ablated (same latents as the fresh images):</p>", img(ims.get("ablate"), f"{name} ablated"),
                  "<p>Inserted in the centre region:</p>", img(ims.get("insert"), f"{name} inserted"),
                  "<p>Top units' maps above their IQR threshold (red) over sample images, one row per unit:</p>",
                  img(ims.get("units"), f"{name} unit maps")]
    return "\n".join(parts)


def write_dissection_page(root: str | Path) -> Path:
    """Write ROOT/report/index.html (replaced whole) from the dissection outputs in ROOT; returns its path."""
    root = Path(root)
    tables = _tables(root) if root.is_dir() else []
    gan_path = root / "gan_dissection.json"
    if not tables and not gan_path.is_file():
        raise UnitscopeError(f"{str(root)!r} holds no dissection output (dissection.parquet or gan_dissection.json); "
                             "run `unitscope dissect --out` there first")
    sections = [_layer_section(root, t) for t in tables]
    maps = {_maps_name(root, t): t.with_name("unit_maps.png") for t in tables if t.with_name("unit_maps.png").is_file()}
    copy: list[str] = []
    if gan_path.is_file():
        try:
            g = json.loads(gan_path.read_text())
        except json.JSONDecodeError:
            raise UnitscopeError(f"{str(gan_path)!r} is not JSON; rerun `unitscope dissect --gan-demo`") from None
        copy = sorted(p.name for p in root.glob("*.png"))
        sections.append(_gan_section(g, set(copy)))
    html = (f"<!doctype html><meta charset=utf-8><title>unitscope dissection</title><style>{STYLE}</style>"
            f"<h1>Dissection: {escape(root.name)}</h1>\n" + "\n".join(sections) + "\n")
    old = {p.name for p in (root / "report").glob("*.png")}  # this page's own images of an earlier dissection
    with replace_dir(root / "report", allowed={"index.html", *copy, *maps, *old}) as tmp:
        (tmp / "index.html").write_text(html, encoding="utf-8")
        for name in copy:
            shutil.copyfile(root / name, tmp / name)
        for name, src in maps.items():
            shutil.copyfile(src, tmp / name)
    return root / "report" / "index.html"
