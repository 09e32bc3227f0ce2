"""A static page for the output of `unitscope dissect` (network dissection tables, GAN dissection figures).

Dissection outputs are not runs of language-model units (no explanation tables, no token examples), so they get
their own page, `OUT/report/index.html`, beside the feature browser rather than inside it:

- per layer (each `dissection.parquet` under OUT): detectors by concept (with each concept's best unit), and per
  unit its best concept, IoU, threshold and its map above the threshold drawn in red over the images where it peaks
  (`dissect.maps`, OUT/.../maps/), for neurons and dictionary units alike (detectors first);
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
from urllib.parse import quote

from ..atomic import replace_dir
from ..errors import UnitscopeError

STYLE = ("body{font-family:sans-serif;margin:2em;max-width:1100px}table{border-collapse:collapse;margin:.5em 0}"
         "td,th{border:1px solid #ccc;padding:2px 6px;text-align:right}th{background:#f4f4f4}"
         "img{image-rendering:pixelated;max-width:100%;display:block;margin:.3em 0}.no{color:#a00}"
         "img.maps{height:96px;max-width:none;margin:0}td.img{text-align:left}")


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


def _maps_dir(root: Path, table: Path) -> str:
    """The page's folder of one layer's unit maps: report/maps/NAME/, NAME from the table's folder under ROOT, one
    name per folder (parts joined by '~' after escaping '%' and '~', so 'a_b' and 'a/b' stay apart); '~' for ROOT."""
    parts = table.parent.relative_to(root).parts
    return "~".join(p.replace("%", "%25").replace("~", "%7E") for p in parts) or "~"


def _read_maps(table: Path) -> dict[str, Any]:
    path = table.with_name("maps") / "maps.json"
    if not path.is_file():
        return {}
    try:
        units = json.loads(path.read_text()).get("units") or {}
        if not isinstance(units, dict) or not all(_map_entry(v) for v in units.values()):
            raise AttributeError
        return units
    except (json.JSONDecodeError, AttributeError):
        raise UnitscopeError(f"{str(path)!r} is not the maps index `unitscope dissect` writes; rerun it") from None


def _map_entry(v: Any) -> bool:
    """One unit's entry as `dissect` writes it: its images (names), their peaks and its threshold (numbers)."""
    def number(x: Any) -> bool:
        return isinstance(x, (int, float)) and not isinstance(x, bool)

    return (isinstance(v, dict) and isinstance(v.get("images"), list) and all(isinstance(i, str) for i in v["images"])
            and isinstance(v.get("peaks"), list) and all(number(x) for x in v["peaks"])
            and (v.get("threshold") is None or number(v.get("threshold"))))


def _same_number(a: Any, b: Any) -> bool:
    return a == b or (isinstance(a, float) and isinstance(b, float) and a != a and b != b)  # NaN == NaN here


def _num(v: Any) -> str:
    """A number shown to 4 significant digits, the full value in its tooltip."""
    return f'<td title="{escape(repr(v))}">{_cell(v)}</td>' if isinstance(v, float) else f"<td>{_cell(v)}</td>"


def _layer_section(root: Path, table: Path, max_units: int = 200) -> str:
    import pyarrow.parquet as pq

    from ..dissect.network import ranked_units

    best = ranked_units(pq.read_table(table, columns=["unit", "concept", "iou", "threshold", "rank", "detector"]))
    summary_path = table.with_name("dissection.json")
    summary = json.loads(summary_path.read_text()) if summary_path.is_file() else {}
    by_concept = summary.get("detectors_by_concept") or {}
    if not by_concept:
        for r in best:
            if r["detector"]:
                by_concept[r["concept"]] = by_concept.get(r["concept"], 0) + 1
    name = str(table.parent.relative_to(root)) if table.parent != root else "."
    slug = _maps_dir(root, table)
    maps = _read_maps(table)
    top = {}  # concept -> its best detector (best is sorted by IoU)
    for r in best:
        if r["detector"]:
            top.setdefault(r["concept"], r)
    concept_rows = "".join(
        f"<tr><td>{escape(c)}</td><td>{n}</td>" + (
            f'<td><a href="#{escape(slug)}-u{top[c]["unit"]}">{top[c]["unit"]}</a></td>{_num(top[c]["iou"])}'
            if c in top else "<td>—</td><td>—</td>") + "</tr>" for c, n in sorted(by_concept.items()))
    unit_rows = []
    for r in best[:max_units]:
        u = r["unit"]
        m = maps.get(str(u))
        if m and not _same_number(m.get("threshold"), r["threshold"]):
            m = None  # maps of another dissection (one killed between its table and its maps): not this unit's
        img = (f'<img class=maps src="maps/{escape(quote(slug))}/{u}.png" alt="unit {u} over images '
               f'{escape(", ".join(map(str, m.get("images", []))))}" title="peaks: '
               f'{escape(", ".join(f"{v:.3g}" for v in m.get("peaks", [])))}">') if m else "—"
        unit_rows.append(f'<tr id="{escape(slug)}-u{u}"><td>{u}</td><td>{escape(str(r["concept"]))}</td>'
                         f'{_num(r["iou"])}{_num(r["threshold"])}<td>{"yes" if r["detector"] else "no"}</td>'
                         f"<td class=img>{img}</td></tr>")
    parts = [f"<h2>Layer {escape(str(summary.get('layer', '')))} — {escape(name)} "
             f"({escape(str(summary.get('unit_kind', 'units')))})</h2>",
             f"<p>{len(best)} units, {sum(1 for r in best if r['detector'])} detectors "
             f"(best IoU &gt; {_cell(summary.get('detector_iou'))}), {len(by_concept)} unique concepts.</p>",
             "<h3>Detectors by concept</h3>",
             f"<table class=concepts data-layer=\"{escape(slug)}\"><tr><th>concept</th><th>detectors</th>"
             f"<th>best unit</th><th>its IoU</th></tr>{concept_rows}</table>",
             "<h3>Units: best concept, and the map above the threshold (red) over the images where the unit peaks "
             "(highest first)</h3>",
             f"<table class=units data-layer=\"{escape(slug)}\"><tr><th>unit</th><th>best concept</th><th>IoU</th>"
             f"<th>threshold</th><th>detector</th><th>maps</th></tr>{''.join(unit_rows)}</table>"]
    if len(best) > max_units:
        parts.append(f"<p>{len(best) - max_units} more units in {escape(str(table))}.</p>")
    return "\n".join(parts)


def _gan_section(g: dict[str, Any], images: set[str]) -> str:
    def img(name: str | None, alt: str) -> str:
        return f'<img src="{escape(name)}" alt="{escape(alt)}">' if isinstance(name, str) and name in images else ""

    parts = [f"<h2>Generator: layer {escape(str(g.get('layer')))}, units per concept: {_cell(g.get('top_n'))}, "
             f"{_cell(g.get('fresh_latents'))} fresh latents</h2>",
             "<p>Segmented pixel fraction of fresh images before any edit:</p>",
             _table(list(g.get("before", {})), [list(g.get("before", {}).values())]),
             "<p>Fresh images (before):</p>", img((g.get("images") or {}).get("fresh"), "fresh images")]
    parts += [f"<p>{escape(str(k))}:</p>" + img(v, str(k)) for k, v in (g.get("images") or {}).items()
              if k != "fresh" and isinstance(v, str) and v in images]  # any further images the generator demo names
    rows = []
    for name, c in (g.get("concepts") or {}).items():
        others = ", ".join(f"{k} {v:+.0%}" for k, v in (c.get("others_relative_change") or {}).items())
        missed = [k for k, ok in (c.get("passes") or {}).items() if not ok]
        bar = ("" if not c.get("passes") else "passes" if not missed else "misses " + ", ".join(missed))
        rows.append([name, c.get("n_units", len(c.get("units") or [])), c.get("before"),
                     (c.get("ablation_after") or {}).get(name), c.get("ablation_relative"),
                     others, (c.get("random_units_after") or {}).get(name), c.get("insertion_region_before"),
                     c.get("insertion_region_after"), c.get("insertion_outside_before"),
                     c.get("insertion_outside_after"), bar])
    parts.append(_table(["concept", "units", "fraction before", "after ablation", "after / before",
                         "other concepts' change", "random units ablated", "region before", "region after insertion",
                         "outside before", "outside after insertion", "bar"], rows))
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
        parts += [f"<p>{escape(str(k))}:</p>" + img(v, f"{name} {k}") for k, v in ims.items()
                  if k not in ("ablate", "insert", "units") and isinstance(v, str) and v in images]
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
    maps = {_maps_dir(root, t): t.with_name("maps") for t in tables if (t.with_name("maps") / "maps.json").is_file()}
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
    with replace_dir(root / "report", allowed={"index.html", "maps", *copy, *old}) as tmp:
        (tmp / "index.html").write_text(html, encoding="utf-8")
        for name in copy:
            shutil.copyfile(root / name, tmp / name)
        for name, src in maps.items():
            shutil.copytree(src, tmp / "maps" / name)
    return root / "report" / "index.html"
