"use strict";
// unitscope feature browser. Data files are scripts that call US.run / US.list / US.shard with a packed
// payload (base64 of gzip JSON), because browsers refuse fetch() of file:// URLs. Text from the data is only
// ever inserted with textContent (el() below), never as markup.
const US = (() => {
  const pending = {};
  function deferred() { let res, rej; const p = new Promise((a, b) => { res = a; rej = b; }); p.resolve = res; p.reject = rej; return p; }
  function slot(key) { return pending[key] || (pending[key] = deferred()); }
  async function unpack(b64) {
    const bin = atob(b64), bytes = new Uint8Array(bin.length);
    for (let i = 0; i < bin.length; i++) bytes[i] = bin.charCodeAt(i);
    const stream = new Blob([bytes]).stream().pipeThrough(new DecompressionStream("gzip"));
    return JSON.parse(await new Response(stream).text());
  }
  function settle(key, b64) { const p = slot(key); unpack(b64).then(p.resolve, p.reject); }
  function script(src, key) {
    const p = slot(key);
    if (!p.tag) {
      p.tag = document.createElement("script");
      p.tag.src = src;
      p.tag.onerror = () => p.reject(new Error("cannot load " + src));
      document.head.appendChild(p.tag);
    }
    return p;
  }
  const enc = encodeURIComponent;
  return {
    run: (b64) => settle("run", b64),
    list: (d, b64) => settle("list/" + d, b64),
    shard: (d, k, b64) => settle("shard/" + d + "/" + k, b64),
    loadRun: () => slot("run"),
    loadList: (d) => script("data/" + enc(d) + "/list.js", "list/" + d),
    loadShard: (d, k) => script("data/" + enc(d) + "/u/" + k + ".js", "shard/" + d + "/" + k),
  };
})();

let RUN = null, LIVE = null;
const STATE = {};  // per dictionary: the unit list's query, sort and page
const PAGE = 100;
const KINDS = ["top", "bottom", "quantile", "random"];

function el(tag, attrs, ...kids) {
  const e = document.createElement(tag);
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === null || v === undefined || v === false) continue;
    if (k === "on") for (const [ev, fn] of Object.entries(v)) e.addEventListener(ev, fn);
    else if (k === "style") e.style.cssText = v;
    else e.setAttribute(k, v === true ? "" : String(v));
  }
  for (const kid of kids.flat()) {
    if (kid === null || kid === undefined || kid === false) continue;
    e.appendChild(kid instanceof Node ? kid : document.createTextNode(String(kid)));
  }
  return e;
}
const fmt = (v, d = 3) => (v === null || v === undefined) ? "–" : (typeof v === "number" ? Number(v.toPrecision(d)).toString() : String(v));
const pct = (v) => (v === null || v === undefined) ? "–" : (100 * v).toPrecision(3) + "%";
const link = (d, u) => "#/" + encodeURIComponent(d) + (u === undefined ? "" : "/" + u);
const show = (...kids) => { document.getElementById("main").replaceChildren(...kids); };
function crumbs(...kids) { document.getElementById("crumbs").replaceChildren(...kids); }
function dictOf(name) { return RUN.dictionaries.find((d) => d.name === name); }

function route() {
  const parts = location.hash.replace(/^#\/?/, "").split("/").filter((p) => p !== "").map(decodeURIComponent);
  window.scrollTo(0, 0);
  if (!parts.length) return overview();
  const d = dictOf(parts[0]);
  if (!d) return show(el("p", { class: "err" }, "this report has no dictionary named " + parts[0]));
  if (parts.length === 1) return unitList(d);
  return unitPage(d, Number(parts[1]));
}

function overview() {
  crumbs();
  document.title = RUN.title || "unitscope";
  const info = [["model", RUN.model], ["site", Array.isArray(RUN.site) ? RUN.site.join(", ") : RUN.site],
    ["corpus", RUN.corpus], ["recorded tokens", RUN.tokens]].filter((x) => x[1] !== null && x[1] !== undefined);
  const metricCols = [["units", (d) => d.units], ["kind", (d) => d.kind], ["FVU", (d) => fmt(d.metrics.fvu, 4)],
    ["L0", (d) => fmt(d.metrics.l0, 4)], ["CE loss recovered", (d) => fmt(d.metrics.ce_loss_score, 4)],
    ["KL", (d) => fmt(d.metrics.kl_div_with_sae, 4)], ["dead", (d) => pct(d.metrics.frac_dead_units)],
    ["dense", (d) => pct(d.metrics.frac_dense_units)]];
  const dicts = el("table", { id: "dicts" }, el("thead", {}, el("tr", {}, el("th", {}, "dictionary"), metricCols.map((c) => el("th", {}, c[0])))),
    el("tbody", {}, RUN.dictionaries.map((d) => el("tr", {}, el("td", {}, el("a", { href: link(d.name) }, d.name)),
      metricCols.map((c) => el("td", { class: "num" }, c[1](d) ?? "–"))))));
  const kids = [el("h1", {}, RUN.title || "unitscope report"), el("table", { class: "metrics" }, info.map(([k, v]) => el("tr", {}, el("td", {}, k), el("td", {}, String(v))))),
    el("h2", {}, "Dictionaries"), dicts];
  if (RUN.comparison) {
    const cols = Object.keys(RUN.comparison[0]);
    kids.push(el("h2", {}, "Comparison"), el("p", { class: "meta" }, "CE rec: CE loss recovered (zero ablation); unique / unique E: fraction of codes " +
      "meeting the uniqueness condition, whitened / Euclidean; label F1: concept labels; detect / fuzz: LLM labels' balanced accuracy."), el("table", { id: "comparison" },
      el("thead", {}, el("tr", {}, cols.map((c) => el("th", {}, c)))),
      el("tbody", {}, RUN.comparison.map((r) => el("tr", {}, cols.map((c) => el("td", { class: typeof r[c] === "number" ? "num" : null },
        c === "dictionary" && dictOf(r[c]) ? el("a", { href: link(r[c]) }, r[c]) : fmt(r[c], 4))))))));
  }
  if (RUN.plot) kids.push(el("p", {}, el("img", { src: "compare.png", alt: "FVU against L0 of every dictionary", width: 640 })));
  show(...kids);
}

async function unitList(d) {
  crumbs(" › ", el("a", { href: link(d.name) }, d.name));
  document.title = d.name + " · units";
  show(el("p", { class: "meta" }, "loading the unit list…"));
  const L = await US.loadList(d.name);
  if (!L.search) L.search = L.unit.map((u, i) => (L.label[i] + "\u0000" + L.tokens[i]).toLowerCase());
  const st = STATE[d.name] || (STATE[d.name] = { q: "", sort: "freq", desc: true, hideDead: false, page: 0 });
  const q = el("input", { type: "search", id: "q", placeholder: "search label, token or unit number", value: st.q });
  const sort = el("select", { id: "sort" }, [["freq", "frequency"], ["max", "max activation"], ["score", "label score"],
    ["effect", "effect"], ["unit", "unit"]].map(([v, t]) => el("option", { value: v, selected: v === st.sort }, t)));
  const dead = el("input", { type: "checkbox", id: "hide-dead", checked: st.hideDead });
  const count = el("span", { class: "meta", id: "count" });
  const body = el("tbody");
  const pager = el("div", { class: "controls" });
  const table = el("table", { id: "list" }, el("thead", {}, el("tr", {}, ["unit", "frequency", "max act", "label", "score", "top tokens", "effect"].map((h) => el("th", {}, h)))), body);
  function render() {
    const needle = st.q.trim().toLowerCase();
    const asUnit = /^\d+$/.test(needle) ? Number(needle) : null;
    let idx = [];
    for (let i = 0; i < L.unit.length; i++) {
      if (st.hideDead && !L.freq[i]) continue;
      if (needle && L.unit[i] !== asUnit && !L.search[i].includes(needle)) continue;
      idx.push(i);
    }
    const col = L[st.sort], sign = st.desc ? -1 : 1;
    idx.sort((a, b) => {  // missing values last whichever the direction
      const x = col[a], y = col[b];
      if (x === null || x === undefined) return (y === null || y === undefined) ? a - b : 1;
      if (y === null || y === undefined) return -1;
      return x === y ? a - b : (x < y ? -sign : sign);
    });
    const pages = Math.max(1, Math.ceil(idx.length / PAGE));
    st.page = Math.min(st.page, pages - 1);
    const rows = idx.slice(st.page * PAGE, (st.page + 1) * PAGE).map((i) => el("tr", { class: L.freq[i] ? null : "dead" },
      el("td", { class: "num" }, el("a", { href: link(d.name, L.unit[i]) }, L.unit[i])), el("td", { class: "num" }, pct(L.freq[i])),
      el("td", { class: "num" }, fmt(L.max[i])), el("td", {}, L.label[i]), el("td", { class: "num", title: L.lsrc[i] }, fmt(L.score[i])),
      el("td", {}, L.tokens[i]), el("td", { class: "num" }, fmt(L.effect[i]))));
    body.replaceChildren(...rows);
    count.textContent = idx.length + " of " + L.unit.length + " units";
    pager.replaceChildren(el("button", { id: "prev", disabled: st.page === 0, on: { click: () => { st.page--; render(); } } }, "‹ prev"),
      el("span", { class: "meta" }, "page " + (st.page + 1) + " of " + pages),
      el("button", { id: "next", disabled: st.page + 1 >= pages, on: { click: () => { st.page++; render(); } } }, "next ›"));
  }
  q.addEventListener("input", () => { st.q = q.value; st.page = 0; render(); });
  sort.addEventListener("change", () => { st.sort = sort.value; st.desc = sort.value !== "unit"; st.page = 0; render(); });
  dead.addEventListener("change", () => { st.hideDead = dead.checked; st.page = 0; render(); });
  render();
  show(el("h1", {}, d.name), el("p", { class: "meta" }, d.units + " units, " + d.dead + " never fired" + (d.effect ? "; effect: " + d.effect : "")),
    el("div", { class: "controls" }, q, el("label", {}, "sort by ", sort), el("label", {}, dead, " hide dead units"), count), table, pager);
  window.__listRendered = performance.now();
}

function tokens(strings, ex, vmax, vmin) {
  const acts = new Map();
  for (let i = 0; i < ex[7].length; i += 2) acts.set(ex[7][i], ex[7][i + 1]);
  return ex[6].map((ref, p) => {
    const v = acts.get(p) || 0;
    let bg = null;
    if (v > 0 && vmax > 0) bg = "background:rgba(255,120,0," + Math.min(1, v / vmax).toFixed(2) + ")";
    else if (v < 0 && vmin < 0) bg = "background:rgba(40,110,255," + Math.min(1, v / vmin).toFixed(2) + ")";
    return el("span", { class: "t", style: bg, title: v ? v.toString() : null }, strings[ref]);
  });
}

function exampleBlock(strings, exs, rec) {
  const out = [];
  const names = { 0: "Top activating examples", 1: "Most negative examples", 2: "Examples across the activation range", 3: "Random windows where it does not fire" };
  for (let kind = 0; kind < 4; kind++) {
    const group = exs.filter((e) => e[0] === kind);
    if (!group.length) continue;
    out.push(el("h2", {}, names[kind]));
    let bin = null;
    for (const e of group) {
      if (kind === 2 && e[2] !== bin) {
        bin = e[2];
        const lo = rec.edges[bin], hi = rec.edges[bin + 1];
        out.push(el("h3", {}, "bin " + (bin + 1) + (hi !== undefined ? ": activations " + fmt(lo) + " to " + fmt(hi) : "")));
      }
      out.push(el("div", { class: "ex", "data-kind": KINDS[kind] }, el("span", { class: "meta" }, (kind === 0 || kind === 1 ? "#" + (e[1] + 1) + " " : "") +
        (kind === 1 ? "min " : "max ") + fmt(e[4]) + " · window " + e[3] + " "), e[5] > 0 ? "…" : "", tokens(strings, e, rec.max || 0, rec.min || 0)));
    }
  }
  return out;
}

function pills(pairs, cls) {
  if (!pairs || !pairs.length) return el("span", { class: "meta" }, "n/a");
  return pairs.map(([t, v]) => el("span", { class: "pill " + (cls || ""), title: fmt(v) }, t));
}

async function unitPage(d, u) {
  crumbs(" › ", el("a", { href: link(d.name) }, d.name), " › unit " + u);
  document.title = d.name + " · unit " + u;
  show(el("p", { class: "meta" }, "loading unit " + u + "…"));
  const shard = await US.loadShard(d.name, Math.floor(u / d.shard)).catch(() => null);
  const rec = shard && shard.units.find((r) => r.u === u);
  if (!rec) return show(el("p", { class: "err" }, d.name + " has no unit " + u + " in this report"));
  const nav = el("p", {}, u > 0 ? el("a", { href: link(d.name, u - 1), id: "prev-unit" }, "‹ unit " + (u - 1)) : "", " ",
    u + 1 < d.units ? el("a", { href: link(d.name, u + 1), id: "next-unit" }, "unit " + (u + 1) + " ›") : "");
  const hist = rec.hist || [], top = Math.max(1, ...hist);
  const kids = [nav, el("h1", {}, d.name + " · unit " + u),
    el("table", { class: "metrics", id: "stats" },
      el("tr", {}, el("td", {}, "frequency (code ≠ 0)"), el("td", { class: "num" }, pct(rec.freq))),
      el("tr", {}, el("td", {}, "max / min activation"), el("td", { class: "num" }, fmt(rec.max) + " / " + fmt(rec.min))),
      el("tr", {}, el("td", {}, "mean when firing"), el("td", { class: "num" }, fmt(rec.mean))),
      el("tr", {}, el("td", {}, "median / q90 / q99"), el("td", { class: "num" }, rec.q.map((x) => fmt(x)).join(" / "))))];
  const labels = rec.labels || [];
  kids.push(el("h2", {}, "Labels"), labels.length ? el("table", { id: "labels" }, el("tr", {}, ["label", "source", "scores"].map((h) => el("th", {}, h))),
    labels.map((l) => el("tr", {}, el("td", {}, l.label), el("td", {}, l.source + (l.model ? " (" + l.model + ")" : "")),
      el("td", {}, ["detection", "fuzzing", "precision", "recall", "f1", "iou"].filter((k) => l[k] !== undefined && l[k] !== null).map((k) => k + " " + fmt(l[k])).join(", ")))))
    : el("p", { class: "meta" }, "no label"));
  kids.push(el("h2", {}, "Activation histogram (firing tokens, " + fmt(rec.hmin) + " to " + fmt(rec.hmax) + ")"),
    el("div", { class: "bars", id: "hist" }, hist.map((c) => el("div", { style: "height:" + (80 * c / top).toFixed(1) + "px", title: String(c) }))));
  const side = [el("div", {}, el("h2", {}, "Logit lens"), el("p", {}, "promoted: ", pills(rec.promoted)), el("p", {}, "suppressed: ", pills(rec.suppressed, "sup")))];
  if (rec.effects) {
    const e = rec.effects, names = { kl_ablate: "KL when ablated", kl_clamp: "KL when clamped high", dlogp_next_ablate: "Δ log p(next) ablated",
      dlogp_next_clamp: "Δ log p(next) clamped", clamp_value: "clamp value", n_windows: "windows", n_positions: "positions" };
    side.push(el("div", { id: "effects" }, el("h2", {}, "Intervention effects"),
      el("table", { class: "metrics" }, Object.keys(names).filter((k) => e[k] !== undefined && e[k] !== null).map((k) => el("tr", {}, el("td", {}, names[k]), el("td", { class: "num" }, fmt(e[k], 4))))),
      el("p", {}, "boosts: ", pills(e.boosted)), el("p", {}, "suppresses: ", pills(e.suppressed, "sup"))));
  }
  const neigh = (title, id, rows, what) => el("div", { id }, el("h2", {}, title), rows && rows.length
    ? el("p", {}, rows.map(([v, s]) => el("span", { class: "pill" }, el("a", { href: link(d.name, v) }, String(v)), " " + what(s))))
    : el("p", { class: "meta" }, "none"));
  side.push(neigh("Nearest units (decoder cosine)", "near", rec.near, (s) => fmt(s, 3)));
  side.push(neigh("Co-firing units (shared example windows)", "cofire", rec.cofire, (s) => "×" + s));
  kids.push(el("div", { class: "grid" }, side));
  if (rec.img) kids.push(el("h2", {}, "Dissection"), el("img", { src: rec.img, alt: "dissection of unit " + u, style: "max-width:100%" }));
  if (LIVE) kids.push(livePanel(d, u));
  kids.push(...(rec.ex.length ? exampleBlock(shard.strings, rec.ex, rec) : [el("p", { class: "meta" }, "This unit never had a non-zero code on the recorded tokens.")]));
  show(...kids);
}

// ---- live server only: try text, ablate, steer (POST /api/...) -------------------------------------------
async function api(path, body) {
  const r = await fetch(path, { method: "POST", headers: { "content-type": "application/json" }, body: JSON.stringify(body) });
  const j = await r.json().catch(() => ({ error: "the server answered " + r.status }));
  if (!r.ok) throw new Error(j.error || ("the server answered " + r.status));
  return j;
}

function livePanel(d, u) {
  const text = el("textarea", { id: "try-text", rows: 3, placeholder: "type a text to run through the model" });
  const out = el("div", { id: "try-out" });
  const go = el("button", { id: "try-go", on: { click: async () => {
    out.replaceChildren(el("span", { class: "meta" }, "running…"));
    try {
      const r = await api("api/activations", { text: text.value, dictionary: d.name, units: [u] });
      const acts = r.activations[String(u)], vmax = Math.max(1e-9, ...acts);
      out.replaceChildren(el("div", { class: "ex", id: "try-tokens" }, r.tokens.map((t, i) => el("span", { class: "t", title: acts[i].toString(),
        style: acts[i] > 0 ? "background:rgba(255,120,0," + Math.min(1, acts[i] / vmax).toFixed(2) + ")" : null }, t))),
      el("table", { id: "try-top" }, el("tr", {}, el("th", {}, "token"), el("th", {}, "top units")), r.tokens.map((t, i) => el("tr", {}, el("td", {}, t),
        el("td", {}, r.top[i].map(([v, a]) => el("span", { class: "pill" }, el("a", { href: link(d.name, v) }, String(v)), " " + fmt(a))))))));
    } catch (e) { out.replaceChildren(el("p", { class: "err" }, e.message)); }
  } } }, "show activations");
  const ab = el("div", { id: "ablate-out" });
  const ablate = el("button", { id: "ablate-go", on: { click: async () => {
    ab.replaceChildren(el("span", { class: "meta" }, "running…"));
    try {
      const r = await api("api/ablate", { text: text.value, dictionary: d.name, units: [u] });
      ab.replaceChildren(el("table", {}, el("tr", {}, ["next token", "p clean", "p ablated", "change"].map((h) => el("th", {}, h))),
        r.changes.map((c) => el("tr", {}, el("td", {}, c.token), el("td", { class: "num" }, fmt(c.p_clean)), el("td", { class: "num" }, fmt(c.p_ablated)),
          el("td", { class: "num" }, fmt(c.change))))), el("p", { class: "meta" }, "KL(clean ‖ ablated) = " + fmt(r.kl, 4)));
    } catch (e) { ab.replaceChildren(el("p", { class: "err" }, e.message)); }
  } } }, "ablate this unit");
  const strength = el("input", { type: "text", id: "steer-value", value: "0.5", size: 6 });
  const mode = el("select", { id: "steer-mode" }, el("option", { value: "kl" }, "target KL"), el("option", { value: "alpha" }, "strength"));
  const sout = el("div", { id: "steer-out" });
  const steer = el("button", { id: "steer-go", on: { click: async () => {
    sout.replaceChildren(el("span", { class: "meta" }, "generating…"));
    try {
      const body = { prompt: text.value, dictionary: d.name, unit: u, max_new_tokens: Math.min(20, LIVE.limits.new_tokens) };
      body[mode.value] = Number(strength.value);
      const r = await api("api/steer", body);
      sout.replaceChildren(el("p", { class: "meta" }, "alpha " + fmt(r.alpha, 4) + (r.kl !== undefined && r.kl !== null ? ", KL " + fmt(r.kl, 3) : "")),
        el("h3", {}, "baseline"), ...r.baseline.map((g) => el("div", { class: "gen" }, g)), el("h3", {}, "steered"), ...r.steered.map((g) => el("div", { class: "gen steered" }, g)));
    } catch (e) { sout.replaceChildren(el("p", { class: "err" }, e.message)); }
  } } }, "steer");
  return el("div", { id: "live" }, el("h2", {}, "Try it (live server)"), text, el("p", {}, go, " ", ablate), out, ab,
    el("p", {}, "steer with this unit at ", mode, " ", strength, " ", steer), sout);
}

window.addEventListener("hashchange", route);
US.loadRun().then(async (run) => {
  RUN = run;
  if (location.protocol.startsWith("http")) {
    LIVE = await fetch("api/info").then((r) => r.ok ? r.json() : null).catch(() => null);
  }
  route();
}, (e) => show(el("p", { class: "err" }, "cannot read the report's data: " + e.message)));
