"""Fitting benchmark: semi-NMF and k-means on 100k+ rows, now against before, and k-means against scikit-learn.

    python benchmarks/fit_throughput.py                          # d = 128, 100k and 200k rows, 1024 units
    python benchmarks/fit_throughput.py --dims 576 --rows 100000 # the default model's residual width
    python benchmarks/fit_throughput.py --before REV             # compare with the implementation at git REV

Data: the synthetic world of `unitscope synthetic` (512 true features in 128 dimensions, or 4 d features at
another width, about 4 active per row, 1% noise), so every fit is also scored by recovery (fraction of true
features with a unit above cosine 0.9). Each fit runs in its own timer on the same rows, one after another, with
2 torch threads (and scikit-learn limited to 2 BLAS/OpenMP threads through threadpoolctl).

- semi-NMF: `fit_snmf` with its defaults, and the implementation at `--before` (default 8fb305f, the last before
  the subsample + polish and one-thread changes), read with `git show` into a temporary module. The old fit
  takes tens of minutes at 200k rows, so it runs only `--before-passes` passes (default 3) after its k-means
  initialisation: the table gives its seconds per pass beside the new fit's whole time; a full old fit takes
  up to 50 passes (it stops when a pass lowers the objective by < 0.1%).
- k-means: `KMeans.fit` now and before, scikit-learn's `KMeans` (k-means++, one init, Lloyd) and
  `MiniBatchKMeans` (batch 4096) with their defaults otherwise. scikit-learn is installed into this environment on
  first use (`SKLEARN` below; it depends on numpy and scipy, never on torch).
"""

from __future__ import annotations

import argparse
import importlib.util
import platform
import subprocess
import sys
import tempfile
import time
from datetime import datetime, timezone
from pathlib import Path

import torch

from unitscope.dictionaries.kmeans import KMeans
from unitscope.dictionaries.snmf import fit_snmf
from unitscope.synthetic import SyntheticSpec, generator, recovery, sample_rows, truth_directions

ROOT = Path(__file__).resolve().parents[1]
BEFORE = "8fb305f"


def load_before(rev: str, tmp: Path):
    """The old kmeans.py and snmf.py from git `rev`, as modules of the unitscope.dictionaries package (so their
    relative imports resolve), the old semi-NMF initialised by the old k-means, neither registered as a kind."""
    mods = {}
    for name in ("kmeans", "snmf"):
        src = subprocess.run(["git", "show", f"{rev}:src/unitscope/dictionaries/{name}.py"], cwd=ROOT, check=True,
                             capture_output=True, text=True).stdout
        src = src.replace(f'@register("{name}")\n', "").replace("from .kmeans import", "from .kmeans_before import")
        path = tmp / f"{name}_before.py"
        path.write_text(src)
        spec = importlib.util.spec_from_file_location(f"unitscope.dictionaries.{name}_before", path)
        mod = importlib.util.module_from_spec(spec)
        sys.modules[spec.name] = mod
        spec.loader.exec_module(mod)
        mods[name] = mod
    return mods


def timed(fn):
    t0, c0 = time.perf_counter(), time.process_time()
    out = fn()
    return out, time.perf_counter() - t0, time.process_time() - c0


def inertia(x: torch.Tensor, cents: torch.Tensor) -> float:
    from unitscope.dictionaries.kmeans import nearest

    return float(nearest(x, cents.float())[1].double().sum())


def line(label: str, wall: float, cpu: float, extra: str) -> str:
    return f"  {label:34s} {wall:8.1f} s wall {cpu:8.1f} CPU-s   {extra}"


def bench_rows(n: int, args: argparse.Namespace, feats: int, before) -> None:
    spec = SyntheticSpec(n_features=feats, d=args.dims, rows=n)
    x = sample_rows(spec, n, generator(spec, 1)).float()
    truth = truth_directions(spec)

    def rec(dirs: torch.Tensor) -> str:
        r = recovery(dirs.float(), truth)
        return f"recovered {r['frac_recovered']:.3f}  mean max cos {r['mean_max_cos']:.3f}"

    print(f"\n== {n} rows x {args.dims}", flush=True)
    if "kmeans" not in args.skip:
        d, wall, cpu = timed(lambda: KMeans.fit(x, args.units, {}))
        print(line("k-means now (KMeans.fit)", wall, cpu,
                   f"inertia {inertia(x, d.W_dec.detach()):.5g}  {rec(d.W_dec.detach())}"), flush=True)
        if before is not None:
            d, wall, cpu = timed(lambda: before["kmeans"].KMeans.fit(x, args.units, {}))
            print(line(f"k-means {args.before}", wall, cpu,
                       f"inertia {inertia(x, d.W_dec.detach()):.5g}  {rec(d.W_dec.detach())}"), flush=True)
        if "sklearn" not in args.skip:
            ensure_sklearn()
            from sklearn.cluster import KMeans as SKKMeans
            from sklearn.cluster import MiniBatchKMeans
            from threadpoolctl import threadpool_limits

            xn = x.numpy()
            for label, est in (("scikit-learn KMeans", SKKMeans(args.units, n_init=1, random_state=0)),
                               ("scikit-learn MiniBatchKMeans",
                                MiniBatchKMeans(args.units, batch_size=4096, n_init=1, random_state=0))):
                with threadpool_limits(args.threads):
                    est, wall, cpu = timed(lambda est=est, xn=xn: est.fit(xn))
                c = torch.from_numpy(est.cluster_centers_)
                print(line(label, wall, cpu, f"inertia {inertia(x, c):.5g}  {rec(c)}"), flush=True)

    if "snmf" not in args.skip:
        losses: list[float] = []
        (F, _), wall, cpu = timed(lambda: fit_snmf(x, args.units, callback=lambda i, v: losses.append(v)))
        print(line("semi-NMF now (fit_snmf defaults)", wall, cpu, f"{len(losses)} passes  {rec(F.t())}"),
              flush=True)
        if before is not None:
            stamps: list[float] = []
            t0 = time.perf_counter()
            (F, _), wall, cpu = timed(lambda: before["snmf"].fit_snmf(
                x, args.units, iters=args.before_passes, patience=10 ** 6,
                callback=lambda i, v: stamps.append(time.perf_counter() - t0)))
            per = (stamps[-1] - stamps[0]) / max(1, len(stamps) - 1)
            print(line(f"semi-NMF {args.before} ({args.before_passes} passes)", wall, cpu,
                       f"init + first pass {stamps[0]:.1f} s, then {per:.1f} s per pass; "
                       f"{args.before_passes} passes: {rec(F.t())}"), flush=True)


SKLEARN = "scikit-learn==1.9.1"


def ensure_sklearn() -> None:
    """The peer sets itself up: scikit-learn (pinned) into this interpreter's environment when it is missing."""
    if importlib.util.find_spec("sklearn") is None:
        print(f"installing the peer {SKLEARN} into this environment", flush=True)
        subprocess.run([sys.executable, "-m", "pip", "install", "-q", "--disable-pip-version-check", SKLEARN],
                       check=True)
        importlib.invalidate_caches()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, nargs="+", default=[100_000, 200_000])
    ap.add_argument("--dims", type=int, default=128)
    ap.add_argument("--units", type=int, default=1024)
    ap.add_argument("--before", default=BEFORE, help="git revision of the implementation to compare with")
    ap.add_argument("--before-passes", type=int, default=3, help="passes of the old semi-NMF to time")
    ap.add_argument("--skip", nargs="*", default=[], choices=["snmf", "kmeans", "before", "sklearn"])
    ap.add_argument("--threads", type=int, default=2)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    feats = 512 if args.dims == 128 else 4 * args.dims
    print(f"command: python benchmarks/fit_throughput.py {' '.join(sys.argv[1:])}")
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {platform.processor() or platform.machine()}, torch {torch.__version__} with "
          f"{args.threads} threads, Python {platform.python_version()}")
    print(f"data: synthetic, {feats} true features in {args.dims} dimensions; {args.units} units")
    tmp = Path(tempfile.mkdtemp(prefix="fit-bench-"))
    before = None if "before" in args.skip else load_before(args.before, tmp)
    for n in args.rows:
        bench_rows(n, args, feats, before)

if __name__ == "__main__":
    main()
