"""Static feature browser: index.html (sortable, searchable unit table) and one page per unit.

Reads the Parquet tables of `explain/` and the eval JSON; opens from the file system with no network
(all data inline, no external scripts or fonts).
"""

from __future__ import annotations

import html
import json
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

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
function render(){const q=document.getElementById('q').value.toLowerCase();
const body=document.getElementById('tb');const out=[];
const sorted=rows.filter(r=>!q||r.search.includes(q)).sort((a,b)=>(desc?-1:1)*((a[key]>b[key])-(a[key]<b[key])));
for(const r of sorted.slice(0,2000)){out.push(`<tr><td class=num><a href="units/${r.unit}.html">${r.unit}</a></td>`+
`<td class=num>${(100*r.frequency).toFixed(3)}%</td><td class=num>${r.max_activation.toFixed(2)}</td>`+
`<td class=tok>${r.promoted}</td><td class=tok>${r.example}</td></tr>`)}
body.innerHTML=out.join('');document.getElementById('n').textContent=sorted.length+' units'+
(sorted.length>2000?' (first 2000 shown)':'');}
function sortBy(k){if(key===k)desc=!desc;else{key=k;desc=true}render()}
document.getElementById('q').addEventListener('input',render);render();
"""


def _esc(s: str) -> str:
    return html.escape(s, quote=True)


def _example_html(tokens: list[str], acts: list[float], vmax: float, snippet: bool = True) -> str:
    a = np.asarray(acts, dtype=np.float32)
    lo, hi = 0, len(tokens)
    if snippet and len(tokens):
        peak = int(a.argmax())
        lo, hi = max(0, peak - SNIPPET), min(len(tokens), peak + SNIPPET + 1)
    parts = []
    for t, v in zip(tokens[lo:hi], a[lo:hi]):
        if v > 0:
            alpha = min(1.0, float(v) / vmax) if vmax > 0 else 0
            style = f"background:rgba(255,120,0,{alpha:.2f})"
            parts.append(f'<span class=a style="{style}" title="{v:.3f}">{_esc(t)}</span>')
        else:
            parts.append(_esc(t))
    return ("…" if lo > 0 else "") + "".join(parts) + ("…" if hi < len(tokens) else "")


def _metrics_html(evals: dict[str, Any]) -> str:
    if not evals:
        return ""
    m = evals["eval_result_metrics"]
    rows = [("FVU", m["reconstruction_quality"]["fvu"]), ("L0", m["sparsity"]["l0"]),
            ("CE loss recovered", m["model_performance_preservation"]["ce_loss_score"]),
            ("KL with dictionary", m["model_behavior_preservation"]["kl_div_with_sae"]),
            ("dead units", m["misc"]["frac_dead_units"]), ("dense units (>10%)", m["misc"]["frac_dense_units"])]
    cells = "".join(f"<tr><td>{k}</td><td class=num>{v:.4f}</td></tr>" for k, v in rows)
    return f"<table class=metrics>{cells}</table>"


def write_report(out: str | Path, explain_dir: str | Path, title: str, eval_json: str | Path | None = None,
                 info: dict[str, Any] | None = None) -> Path:
    """Write the static browser into `out`; returns the path of index.html."""
    out, explain_dir = Path(out), Path(explain_dir)
    (out / "units").mkdir(parents=True, exist_ok=True)
    units = pq.read_table(explain_dir / "units.parquet").to_pylist()
    examples = pq.read_table(explain_dir / "examples.parquet").to_pylist()
    evals = json.loads(Path(eval_json).read_text()) if eval_json and Path(eval_json).is_file() else {}
    by_unit: dict[int, list[dict]] = {}
    for ex in examples:
        by_unit.setdefault(ex["unit"], []).append(ex)

    rows = []
    for u in units:
        exs = by_unit.get(u["unit"], [])
        first = exs[0] if exs else None
        example = ""
        if first:
            peak = int(np.argmax(first["acts"]))
            example = "".join(first["tokens"][max(0, peak - 6):peak + 3]).replace("\n", "↵")
        promoted = u.get("promoted_tokens") or []
        words = set(t.strip().lower() for t in promoted)
        for ex in exs[:5]:
            peak = int(np.argmax(ex["acts"]))
            words.add(ex["tokens"][peak].strip().lower())
        rows.append({"unit": u["unit"], "frequency": u["frequency"], "max_activation": u["max_activation"],
                     "promoted": _esc(" ".join(repr(t)[1:-1] for t in promoted[:5])), "example": _esc(example),
                     "search": " ".join(sorted(words))})
        _write_unit_page(out / "units" / f"{u['unit']}.html", u, exs, title)

    info_html = "".join(f"<div class=meta>{_esc(k)}: {_esc(str(v))}</div>" for k, v in (info or {}).items())
    page = f"""<!doctype html><html><head><meta charset=utf-8><title>{_esc(title)}</title><style>{CSS}</style></head>
<body><h1>{_esc(title)}</h1>{info_html}{_metrics_html(evals)}
<h2>Units</h2>
<p><input id=q placeholder="search by token (top examples, promoted tokens)"> <span id=n class=meta></span></p>
<table><thead><tr><th onclick="sortBy('unit')">unit</th><th onclick="sortBy('frequency')">frequency</th>
<th onclick="sortBy('max_activation')">max activation</th><th>logit lens: promoted</th><th>top example</th></tr></thead>
<tbody id=tb></tbody></table>
<script>const DATA={json.dumps({"units": rows})};{INDEX_JS}</script></body></html>"""
    (out / "index.html").write_text(page, encoding="utf-8")
    return out / "index.html"


def _write_unit_page(path: Path, u: dict[str, Any], exs: list[dict[str, Any]], title: str) -> None:
    vmax = float(u["max_activation"] or 0)
    hist = u.get("hist_counts") or []
    top = max(hist) if hist and max(hist) > 0 else 1
    bars = "".join(f'<div style="height:{60 * c / top:.0f}px" title="{c}"></div>' for c in hist)

    def pills(key: str, cls: str = "") -> str:
        toks = u.get(f"{key}_tokens") or []
        logits = u.get(f"{key}_logits") or []
        return "".join(f'<span class="pill {cls}" title="{lg:.2f}">{_esc(repr(t)[1:-1])}</span>'
                       for t, lg in zip(toks, logits))

    ex_html = "".join(
        f'<div class=ex><span class=meta>#{e["rank"] + 1} max {e["max_activation"]:.2f}</span> '
        f'{_example_html(e["tokens"], e["acts"], vmax)}</div>' for e in exs)
    unit = u["unit"]
    page = f"""<!doctype html><html><head><meta charset=utf-8><title>unit {unit} · {_esc(title)}</title>
<style>{CSS}</style></head><body><p><a href="../index.html">← all units</a>
{f'<a href="{unit - 1}.html">‹ prev</a>' if unit > 0 else ''} <a href="{unit + 1}.html">next ›</a></p>
<h1>Unit {unit}</h1>
<table class=metrics><tr><td>frequency</td><td class=num>{100 * u["frequency"]:.4f}%</td></tr>
<tr><td>max activation</td><td class=num>{vmax:.3f}</td></tr>
<tr><td>mean when active</td><td class=num>{u["mean_activation"]:.3f}</td></tr>
<tr><td>median / q90 / q99</td><td class=num>{u["q50"]:.3f} / {u["q90"]:.3f} / {u["q99"]:.3f}</td></tr></table>
<h2>Activation histogram (when active, 0 to max)</h2><div class=bars>{bars}</div>
<h2>Logit lens</h2><p>promoted: {pills("promoted") or '<span class=meta>n/a</span>'}</p>
<p>suppressed: {pills("suppressed", "sup") or '<span class=meta>n/a</span>'}</p>
<h2>Top activating examples</h2>{ex_html or '<p class=meta>This unit never fired on the recorded tokens.</p>'}
</body></html>"""
    path.write_text(page, encoding="utf-8")
