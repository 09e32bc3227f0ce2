"""The feature browser at 65,536 units: bytes per unit against the per-unit-HTML report of 99a9862, and the time
headless Chromium takes to render the first page of the unit list.

Synthetic tables of the shape `unitscope explain` writes with its defaults (20 top windows, 2 per each of 10
quantile bins, 5 random windows, 64-token windows, 20 histogram bins, 10 logit-lens tokens each way, a concept
label per unit). units.parquet holds all 65,536 units; examples are made for a sample of SAMPLE units (a full
65k x 45 x 64-token example table is ~190M tokens), and both reports' per-unit files are measured on that sample
and scaled: new = assets + run.js + list.js (all units) + unit shards(sample) x 65536 / SAMPLE; old = the old
report of the sample (index.html + units/*.html) x 65536 / SAMPLE. No dictionary weights, so no decoder-cosine
neighbours (they add ~20 bytes per unit).

    python benchmarks/report_scale.py [--units 65536] [--sample 512]
"""

from __future__ import annotations

import argparse
import importlib.util
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from unitscope.explain.examples import EXAMPLES_SCHEMA
from unitscope.report import write_report

OLD_COMMIT = "99a9862"
CTX, TOP, QBINS, QN, RANDOM, LENS = 64, 20, 10, 2, 5, 10


def vocabulary(rng: np.random.Generator, n: int = 49152) -> np.ndarray:
    """Token strings of a BPE-like vocabulary: words with and without a leading space, pieces, punctuation."""
    from pydoc_data.topics import topics

    words = sorted({w for t in topics.values() for w in t.split() if w.isalpha()})
    pieces = [w[:k] for w in words for k in (2, 3, 4) if len(w) > k]
    pool = list(dict.fromkeys([" " + w for w in words] + words + pieces + list(".,;:()[]{}'\"\n-_=+*/")))
    while len(pool) < n:
        pool.append("".join(rng.choice(list("abcdefghijklmnopqrstuvwxyz"), rng.integers(2, 8))))
    return np.asarray(pool[:n], dtype=object)


def build(out: Path, n_units: int, sample: int, seed: int = 0) -> None:
    rng = np.random.default_rng(seed)
    vocab = vocabulary(rng)
    freq = np.minimum(0.3, 10 ** rng.uniform(-5.5, -0.8, n_units))
    freq[rng.random(n_units) < 0.02] = 0.0  # a few dead units
    vmax = np.where(freq > 0, rng.gamma(4.0, 2.0, n_units), 0.0)
    hist = (rng.dirichlet(np.ones(20), n_units) * (freq * 1e7)[:, None]).astype(np.int64)
    edges = [list(np.linspace(0, v, QBINS + 1)) for v in vmax]
    lens_ids = rng.integers(0, len(vocab), (n_units, 2, LENS))
    lens_vals = np.sort(rng.normal(0, 1, (n_units, 2, LENS)), axis=2)
    concept = [f"tokens: {', '.join(repr(t) for t in vocab[rng.integers(0, len(vocab), 4)])} (+{k} more)"
               for k in rng.integers(0, 20, n_units)]
    units = pa.table({
        "unit": np.arange(n_units, dtype=np.int32), "frequency": freq, "max_activation": vmax.astype(np.float32),
        "min_activation": np.zeros(n_units, np.float32), "mean_activation": vmax / 3, "q50": vmax / 3,
        "q90": vmax / 2, "q99": vmax * 0.8, "hist_counts": hist.tolist(), "hist_min": np.zeros(n_units),
        "hist_max": vmax * 1.05, "quantile_edges": pa.array(edges, pa.list_(pa.float64())),
        "promoted_tokens": vocab[lens_ids[:, 0]].tolist(), "promoted_logits": lens_vals[:, 0, ::-1].tolist(),
        "suppressed_tokens": vocab[lens_ids[:, 1]].tolist(), "suppressed_logits": lens_vals[:, 1].tolist(),
        "label": concept, "label_source": ["concept-dictionary"] * n_units,
        "score_detection": pa.nulls(n_units, pa.float64()), "score_fuzzing": pa.nulls(n_units, pa.float64())})
    out.mkdir(parents=True, exist_ok=True)
    pq.write_table(units, out / "units.parquet")
    pq.write_table(pa.table({"unit": np.arange(n_units, dtype=np.int32), "label": concept,
                             "source": ["concept-dictionary"] * n_units, "precision": rng.random(n_units),
                             "recall": rng.random(n_units), "f1": rng.random(n_units)}), out / "concepts.parquet")
    with pq.ParquetWriter(out / "examples.parquet", EXAMPLES_SCHEMA) as w:
        for u in range(sample):
            rows = {k: [] for k in EXAMPLES_SCHEMA.names}
            kinds = [("top", r, None) for r in range(TOP)] + \
                    [("quantile", r, q) for q in range(QBINS) for r in range(QN)] + [("random", r, None)
                                                                                   for r in range(RANDOM)]
            for kind, rank, q in kinds if freq[u] > 0 else []:
                ids = rng.zipf(1.3, CTX) % len(vocab)
                acts = np.where(rng.random(CTX) < (0.0 if kind == "random" else 0.15),
                                rng.gamma(2.0, vmax[u] / 6, CTX), 0.0).astype(np.float32)
                acts = np.round(np.minimum(acts, vmax[u]), 4)
                rows["unit"].append(u), rows["kind"].append(kind), rows["rank"].append(rank)
                rows["quantile"].append(q), rows["window"].append(int(rng.integers(0, 10 ** 6)))
                rows["max_activation"].append(float(acts.max())), rows["token_ids"].append(ids.astype(np.int32))
                rows["tokens"].append(list(vocab[ids])), rows["acts"].append(acts)
            if rows["unit"]:
                w.write_table(pa.table(rows, schema=EXAMPLES_SCHEMA))


def old_static():
    """report/static.py as it was at 99a9862 (one HTML file per unit), loaded as a module of the package."""
    src = subprocess.run(["git", "show", f"{OLD_COMMIT}:src/unitscope/report/static.py"], capture_output=True,
                         text=True, check=True, cwd=Path(__file__).resolve().parents[1]).stdout
    path = Path(tempfile.mkdtemp()) / "old_static.py"
    path.write_text(src)
    spec = importlib.util.spec_from_file_location("unitscope.report._old_static", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def first_page_ms(index: Path, name: str, runs: int = 5) -> list[float]:
    """Milliseconds from navigation start to the unit list's first page in the DOM (app.js marks it)."""
    from selenium import webdriver
    from selenium.webdriver.chrome.service import Service
    from selenium.webdriver.support.ui import WebDriverWait

    profile = tempfile.mkdtemp()
    opts = webdriver.ChromeOptions()
    opts.binary_location = "/usr/bin/chromium"
    for a in ("--headless=new", "--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage",
              f"--user-data-dir={profile}"):
        opts.add_argument(a)
    driver = webdriver.Chrome(service=Service("/usr/bin/chromedriver"), options=opts)
    times = []
    try:
        for _ in range(runs):
            driver.get("about:blank")
            driver.get(index.as_uri() + f"#/{name}")
            WebDriverWait(driver, 60).until(lambda d: d.execute_script("return window.__listRendered"))
            assert driver.execute_script("return document.querySelectorAll('#list tbody tr').length") == 100
            times.append(driver.execute_script("return window.__listRendered"))
    finally:
        driver.quit()
        shutil.rmtree(profile, ignore_errors=True)
    return times


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--units", type=int, default=65536)
    ap.add_argument("--sample", type=int, default=512)
    args = ap.parse_args()
    n, s = args.units, args.sample
    work = Path(tempfile.mkdtemp(prefix="report-scale-"))
    try:
        t = time.perf_counter()
        build(work / "explain" / "big", n, s)
        print(f"tables: {n} units, examples for {s} ({time.perf_counter() - t:.1f} s)")
        t = time.perf_counter()
        index = write_report(work / "new", work / "explain" / "big", "report_scale", name="big")
        print(f"new report written in {time.perf_counter() - t:.1f} s")
        shards = sorted((work / "new" / "data" / "big" / "u").glob("*.js"), key=lambda p: int(p.stem))
        per_shard = 64
        sampled = sum(p.stat().st_size for p in shards[:s // per_shard])
        fixed = size(work / "new") - sum(p.stat().st_size for p in shards)
        new_total = fixed + sampled * n / s
        list_bytes = (work / "new" / "data" / "big" / "list.js").stat().st_size

        sub = work / "explain" / "sample"  # the old report on the sample, scaled
        sub.mkdir()
        pq.write_table(pq.read_table(work / "explain" / "big" / "units.parquet").slice(0, s), sub / "units.parquet")
        shutil.copyfile(work / "explain" / "big" / "examples.parquet", sub / "examples.parquet")
        t = time.perf_counter()
        old_static().write_report(work / "old", sub, "report_scale")
        print(f"old report (sample) written in {time.perf_counter() - t:.1f} s")
        old_total = size(work / "old") * n / s

        print(f"old (per-unit HTML, {OLD_COMMIT}): {old_total / n:,.0f} bytes/unit, {old_total / 2**20:,.1f} MiB "
              f"for {n} units (scaled from {s})")
        print(f"new (packed shards): {new_total / n:,.0f} bytes/unit, {new_total / 2**20:,.1f} MiB for {n} units "
              f"(unit list {list_bytes / n:.0f} bytes/unit; shards {sampled / s:,.0f} bytes/unit)")
        print(f"ratio new/old: {new_total / old_total:.3f}")
        times = first_page_ms(index, "big")
        print(f"first page of the {n}-unit list in headless Chromium: median {statistics.median(times):.0f} ms "
              f"(runs: {', '.join(f'{x:.0f}' for x in times)})")
    finally:
        shutil.rmtree(work, ignore_errors=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
