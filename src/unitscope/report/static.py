"""Static feature browser: index.html (sortable, searchable unit table) and one page per unit.

Reads the Parquet tables of `explain/` and the eval JSON; opens from the file system with no network
(all data inline, no external scripts or fonts). Text from the corpus, the tokenizer or the run's
configuration reaches the pages only as escaped HTML text (`html.escape`) or, in index.html, inside the
inline data as JSON with `<`, `>`, `&`, U+2028 and U+2029 written as \\u escapes (so no `</script>` can end
the script), which the page inserts with `textContent`, never as markup. The whole output directory is
written beside the target and swapped in at once (`atomic.replace_dir`).
"""

from __future__ import annotations

import html
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from ..atomic import recover, replace_dir

SNIPPET = 16  # tokens shown either side of an example's maximum

CSS = """
body{font:14px/1.45 system-ui,sans-serif;margin:1.5em auto;max-width:1100px;color:#1d1d1f;padding:0 1em}
h1{font-size:1.4em}h2{font-size:1.1em;margin-top:1.6em}
table{border-collapse:collapse;width:100%}th,td{padding:3px 8px;border-bottom:1px solid #e5e5e5;text-align:left;
vertical-align:top}th{cursor:pointer;background:#f5f5f7;position:sticky;top:0}th:hover{background:#e8e8ed}
.num{text-align:right;font-variant-numeric:tabular-nums}.tok{font-family:ui-monospace,monospace;white-space:pre-wrap}
.ex{font-family:ui-monospace,monospace;white-space:pre-wrap;padding:4px 6px;border-bottom:1px solid #eee}
.ex span.a{border-radius:2px}.meta{color:#666}.pill{display:inline-block;background:#eef;border-radius:3px;
padding:0 4px;margin:1px;font-family:ui-monospace,monospace;white-space:pre}.sup{background:#fee}
input{font-size:1em;padding:4px 8px;width:22em}.bars{display:flex;align-items:flex-end;height:60px;gap:1px}
.bars div{background:#4a78c2;width:14px}.metrics{width:auto}.metrics td{border:none;padding:1px 10px}
"""

INDEX_JS = """
const rows=DATA.units;let key='frequency',desc=true;
function cell(tr,text,cls,href){const td=document.createElement('td');if(cls)td.className=cls;
if(href){const a=document.createElement('a');a.href=href;a.textContent=text;td.appendChild(a)}else td.textContent=text;
tr.appendChild(td)}
function render(){const q=document.getElementById('q').value.toLowerCase();
const sorted=rows.filter(r=>!q||r.search.includes(q)).sort((a,b)=>(desc?-1:1)*((a[key]>b[key])-(a[key]<b[key])));
const frag=document.createDocumentFragment();
for(const r of sorted.slice(0,2000)){const tr=document.createElement('tr');
cell(tr,String(r.unit),'num','units/'+Number(r.unit)+'.html');cell(tr,(100*r.frequency).toFixed(3)+'%','num');
cell(tr,r.max_activation.toFixed(2),'num');cell(tr,r.promoted,'tok');cell(tr,r.example,'tok');frag.appendChild(tr)}
document.getElementById('tb').replaceChildren(frag);document.getElementById('n').textContent=sorted.length+' units'+
(sorted.length>2000?' (first 2000 shown)':'');}
function sortBy(k){if(key===k)desc=!desc;else{key=k;desc=true}render()}
document.getElementById('q').addEventListener('input',render);render();
"""

_JSON_ESCAPES = {"<": "\\u003c", ">": "\\u003e", "&": "\\u0026", "\u2028": "\\u2028", "\u2029": "\\u2029"}


def script_json(obj: Any) -> str:
    """JSON that is safe inside an inline <script>: nothing in it can close the element or start markup."""
    text = json.dumps(obj, ensure_ascii=False)
    return text.translate(str.maketrans(_JSON_ESCAPES))


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


def _example_html(tokens: list[str], acts: list[float], vmax: float, vmin: float, kind: str = "top",
                  snippet: bool = True) -> str:
    """Tokens as escaped text; positive codes shaded orange (by v / vmax), negative ones blue (by v / vmin)."""
    a = np.asarray(acts, dtype=np.float32)
    lo, hi = 0, len(tokens)
    if snippet and len(tokens):
        peak = int(a.argmin() if kind == "bottom" else a.argmax())
        lo, hi = max(0, peak - SNIPPET), min(len(tokens), peak + SNIPPET + 1)
    parts = []
    for t, v in zip(tokens[lo:hi], a[lo:hi]):
        if v > 0 and vmax > 0:
            style = f"background:rgba(255,120,0,{min(1.0, float(v) / vmax):.2f})"
        elif v < 0 and vmin < 0:
            style = f"background:rgba(40,110,255,{min(1.0, float(v) / vmin):.2f})"
        else:
            parts.append(_esc(t))
            continue
        parts.append(f'<span class=a style="{style}" title="{float(v):.3f}">{_esc(t)}</span>')
    return ("…" if lo > 0 else "") + "".join(parts) + ("…" if hi < len(tokens) else "")


def _num(v: Any) -> str:
    """A metric from the eval JSON, shown only as a number."""
    return f"{v:.4f}" if isinstance(v, (int, float)) else _esc(str(v))


def _metrics_html(evals: dict[str, Any]) -> str:
    if not evals:
        return ""
    m = evals["eval_result_metrics"]
    rows = [("FVU", m["reconstruction_quality"]["fvu"]), ("L0", m["sparsity"]["l0"]),
            ("CE loss recovered", m["model_performance_preservation"]["ce_loss_score"]),
            ("KL with dictionary", m["model_behavior_preservation"]["kl_div_with_sae"]),
            ("dead units", m["misc"]["frac_dead_units"]), ("dense units (>10%)", m["misc"]["frac_dense_units"])]
    cells = "".join(f"<tr><td>{k}</td><td class=num>{_num(v)}</td></tr>" for k, v in rows)
    return f"<table class=metrics>{cells}</table>"


def _comparison_html(rows: list[dict[str, Any]] | None, current: str, plot: bool) -> str:
    """The run's comparison table (this dictionary's row in bold, the others linked to their reports) and plot."""
    if not rows:
        return ""
    from urllib.parse import quote

    from ..compare import COLUMNS, format_cell

    head = "".join(f"<th>{_esc(h)}</th>" for _, h, _ in COLUMNS)
    body = []
    for r in rows:
        cells = []
        for c, _, f in COLUMNS:
            text = _esc(format_cell(r.get(c), f))
            if c == "dictionary" and r.get("report") and r.get("dictionary") != current:
                text = f'<a href="{_esc(quote(str(r["report"])))}">{text}</a>'
            cells.append(f"<td{'' if c in ('dictionary', 'kind') else ' class=num'}>{text}</td>")
        style = ' style="font-weight:600"' if r.get("dictionary") == current else ""
        body.append(f"<tr{style}>{''.join(cells)}</tr>")
    img = '<p><img src="compare.png" alt="FVU against L0 of every dictionary in the run" width=640></p>' if plot else ""
    return (f"<h2>Every dictionary in this run</h2><table><thead><tr>{head}</tr></thead><tbody>{''.join(body)}"
            f"</tbody></table><p class=meta>CE rec: CE loss recovered (zero ablation at every position); unique / "
            f"unique E: fraction of codes meeting the uniqueness condition, whitened / Euclidean inner product; "
            f"label F1: mean over units.</p>{img}")


def _peak(ex: dict[str, Any]) -> int:
    return int(np.argmin(ex["acts"]) if ex.get("kind") == "bottom" else np.argmax(ex["acts"]))


def write_report(out: str | Path, explain_dir: str | Path, title: str, eval_json: str | Path | None = None,
                 info: dict[str, Any] | None = None, comparison: list[dict[str, Any]] | None = None,
                 comparison_plot: str | Path | None = None) -> Path:
    """Write the static browser into `out` (replaced whole, in one step); returns the path of index.html.

    `comparison`: the run's compare rows (unitscope.compare), shown on the index with this dictionary's row
    (the one named `out.name`) in bold; a row's `report` key, if any, links it. `comparison_plot`: the run's
    compare.png, copied into the report so that the folder stands alone."""
    out, explain_dir = Path(out), recover(explain_dir)
    units = pq.read_table(explain_dir / "units.parquet").to_pylist()
    examples = pq.read_table(explain_dir / "examples.parquet").to_pylist()
    evals = json.loads(Path(eval_json).read_text()) if eval_json and Path(eval_json).is_file() else {}
    by_unit: dict[int, list[dict]] = {}
    for ex in examples:
        by_unit.setdefault(ex["unit"], []).append(ex)

    with replace_dir(out, {"index.html", "units", "compare.png"}) as tmp:
        (tmp / "units").mkdir()
        if comparison and comparison_plot:
            shutil.copyfile(comparison_plot, tmp / "compare.png")
        rows = []
        for u in units:
            exs = by_unit.get(u["unit"], [])
            first = exs[0] if exs else None
            example = ""
            if first:
                peak = _peak(first)
                example = "".join(first["tokens"][max(0, peak - 6):peak + 3]).replace("\n", "↵")
            promoted = u.get("promoted_tokens") or []
            words = set(t.strip().lower() for t in promoted)
            for ex in exs[:5]:
                words.add(ex["tokens"][_peak(ex)].strip().lower())
            rows.append({"unit": u["unit"], "frequency": u["frequency"], "max_activation": u["max_activation"],
                         "promoted": " ".join(repr(t)[1:-1] for t in promoted[:5]), "example": example,
                         "search": " ".join(sorted(words))})
            _write_unit_page(tmp / "units" / f"{u['unit']}.html", u, exs, title, len(units))

        info_html = "".join(f"<div class=meta>{_esc(k)}: {_esc(str(v))}</div>" for k, v in (info or {}).items())
        page = f"""<!doctype html><html><head><meta charset=utf-8><title>{_esc(title)}</title>
<style>{CSS}</style></head><body><h1>{_esc(title)}</h1>{info_html}{_metrics_html(evals)}
{_comparison_html(comparison, out.name, bool(comparison_plot))}
<h2>Units</h2>
<p><input id=q placeholder="search by token (top examples, promoted tokens)"> <span id=n class=meta></span></p>
<table><thead><tr><th onclick="sortBy('unit')">unit</th><th onclick="sortBy('frequency')">frequency</th>
<th onclick="sortBy('max_activation')">max activation</th><th>logit lens: promoted</th><th>top example</th></tr></thead>
<tbody id=tb></tbody></table>
<script>const DATA={script_json({"units": rows})};{INDEX_JS}</script></body></html>"""
        (tmp / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def _write_unit_page(path: Path, u: dict[str, Any], exs: list[dict[str, Any]], title: str, n_units: int) -> None:
    vmax = float(u["max_activation"] or 0)
    vmin = float(u.get("min_activation") or 0)
    hist = u.get("hist_counts") or []
    top = max(hist) if hist and max(hist) > 0 else 1
    bars = "".join(f'<div style="height:{60 * c / top:.0f}px" title="{int(c)}"></div>' for c in hist)
    hist_lo, hist_hi = float(u.get("hist_min") or 0), float(u.get("hist_max") or vmax)

    def pills(key: str, cls: str = "") -> str:
        toks = u.get(f"{key}_tokens") or []
        logits = u.get(f"{key}_logits") or []
        return "".join(f'<span class="pill {cls}" title="{float(lg):.2f}">{_esc(repr(t)[1:-1])}</span>'
                       for t, lg in zip(toks, logits))

    def examples(kind: str) -> str:
        return "".join(
            f'<div class=ex><span class=meta>#{int(e["rank"]) + 1} {"min" if kind == "bottom" else "max"} '
            f'{float(e["max_activation"]):.2f}</span> {_example_html(e["tokens"], e["acts"], vmax, vmin, kind)}</div>'
            for e in exs if e.get("kind", "top") == kind)

    top_html, bottom_html, random_html = examples("top"), examples("bottom"), examples("random")
    edges = u.get("quantile_edges") or []
    bins = sorted({int(e["quantile"]) for e in exs if e.get("kind") == "quantile" and e.get("quantile") is not None},
                  reverse=True)
    quantile_html = "".join(
        f'<h3>bin {b + 1}: activations '
        f'{(f"{float(edges[b]):.3g} to {float(edges[b + 1]):.3g}" if b + 1 < len(edges) else "")}</h3>'
        + "".join(f'<div class=ex><span class=meta>max {float(e["max_activation"]):.2f}</span> '
                  f'{_example_html(e["tokens"], e["acts"], vmax, vmin)}</div>'
                  for e in exs if e.get("kind") == "quantile" and e.get("quantile") == b)
        for b in bins)
    never = "<p class=meta>This unit never had a positive code on the recorded tokens.</p>"
    unit = int(u["unit"])
    prev_link = f'<a href="{unit - 1}.html">‹ prev</a>' if unit > 0 else ""
    next_link = f'<a href="{unit + 1}.html">next ›</a>' if unit + 1 < n_units else ""
    page = f"""<!doctype html><html><head><meta charset=utf-8><title>unit {unit} · {_esc(title)}</title>
<style>{CSS}</style></head><body><p><a href="../index.html">← all units</a>
{prev_link} {next_link}</p>
<h1>Unit {unit}</h1>
<table class=metrics><tr><td>frequency (code ≠ 0)</td><td class=num>{100 * u["frequency"]:.4f}%</td></tr>
<tr><td>max / min activation</td><td class=num>{vmax:.3f} / {vmin:.3f}</td></tr>
<tr><td>mean when firing</td><td class=num>{u["mean_activation"]:.3f}</td></tr>
<tr><td>median / q90 / q99</td><td class=num>{u["q50"]:.3f} / {u["q90"]:.3f} / {u["q99"]:.3f}</td></tr></table>
<h2>Activation histogram (firing tokens, {hist_lo:.3g} to {hist_hi:.3g})</h2><div class=bars>{bars}</div>
<h2>Logit lens</h2><p>promoted: {pills("promoted") or '<span class=meta>n/a</span>'}</p>
<p>suppressed: {pills("suppressed", "sup") or '<span class=meta>n/a</span>'}</p>
<h2>Top activating examples</h2>{top_html or never}
{f'<h2>Most negative examples</h2>{bottom_html}' if bottom_html else ''}
{f'<h2>Examples across the activation range</h2>{quantile_html}' if quantile_html else ''}
{f'<h2>Random windows where it does not fire</h2>{random_html}' if random_html else ''}
</body></html>"""
    path.write_text(page, encoding="utf-8")
