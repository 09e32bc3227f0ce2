"""Training benchmark: unitscope vs SAELens vs sparsify vs dictionary_learning, reproducible with one command.

    python benchmarks/train_throughput.py            # the real run (estimated ~40 min on an idle 2-core machine)
    python benchmarks/train_throughput.py --quick    # tiny budgets, a couple of minutes: for development
    python benchmarks/train_throughput.py --device cuda --skip quality --peers sparsify \
        --rows ROWS.safetensors --peer-env current      # a GPU machine with the peers installed beside unitscope

1. Environments: each peer gets its own virtual environment, made on first use and cached under unitscope's cache
   directory (benchmarks/peers/envs.py: torch==2.13.0 CPU first, then the pinned peer).
2. Data: SmolLM2-135M-Instruct activations at blocks.6.resid_post over the default corpus (positions the trainers
   use: not the first of a window, no special tokens), scaled to E||x||² = d_in, the same rows for every library.
3. Throughput: a TopK SAE 576 -> 9216, k = 32, batch 4096, every library's own training step with its own
   defaults, on identical batches. Every timer holds only the step calls (batches are fetched outside all of
   them) and leaves out the same number of warm-up steps. Repetitions are interleaved (the order rotates each
   repetition) and ratios come from the medians. Two unitscope paths: the default (compute dtype auto: bfloat16
   where the CPU has fast bf16) and float32; every peer trains in float32, its default on CPU.
4. Quality at an equal budget: every library trains a TopK SAE 576 -> 4608 (the default run's width), k = 32,
   batch 2048, for the same tokens (>= 2M, epochs over the recorded rows) with its own recommended defaults (its
   own lr, schedule, optimiser, initialisation, auxiliary loss, normalisation; see each peers/*_train.py). Each
   result becomes a unitscope TopKSAE (load_dictionary on the SAELens and sparsify files; dictionary_learning's
   weights loaded into TopKSAE), the input scaling is folded, and unitscope's evaluator splices it into the model
   on held-out text: WikiText-2 validation (../shared/data/wikitext-2/valid.txt), or, if that file is absent, the
   default corpus windows after the recorded ones.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from datetime import datetime, timezone
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE / "peers"))

from envs import PEERS, peer_python  # noqa: E402

from unitscope import Corpus, load_dictionary, load_subject, record  # noqa: E402
from unitscope.corpus import training_mask  # noqa: E402
from unitscope.dictionaries.sae import TopKSAE  # noqa: E402
from unitscope.dictionaries.train import resolve_compute_dtype  # noqa: E402
from unitscope.evaluate.fidelity import evaluate_fidelity  # noqa: E402

WIKITEXT = HERE.parents[1] / "shared" / "data" / "wikitext-2" / "valid.txt"
SITE = "blocks.6.resid_post"
CTX = 128


def machine() -> str:
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")),
               platform.processor())
    gpu = f", GPU {torch.cuda.get_device_name()} (CUDA {torch.version.cuda})" if torch.cuda.is_available() else ""
    return (f"{cpu}, {os.cpu_count()} logical CPUs{gpu}, torch {torch.__version__} with {torch.get_num_threads()} "
            f"threads, Python {platform.python_version()}, {platform.system()} {platform.release()}")


def prepare(work: Path, tokens: int, rows: str | None = None) -> dict:
    """Record the activations once (cached in `work`) and write the scaled training rows as safetensors; or take
    already scaled rows from `rows` (e.g. on a GPU machine that cannot load the default model)."""
    meta_path = work / "data.json"
    if meta_path.is_file():
        return json.loads(meta_path.read_text())
    if rows:
        x = load_file(rows)["x"].float().contiguous()
        save_file({"x": x}, str(work / "train.safetensors"))
        meta = {"scale": None, "rows": len(x), "windows": None, "recorded_tokens": None, "from": rows}
        meta_path.write_text(json.dumps(meta))
        return meta
    subject = load_subject("default")
    store = record(subject, Corpus("default"), [SITE], tokens, work / "store", ctx_len=CTX, progress=True)
    mask = training_mask(store.column("tokens"), store.column("pos"), np.asarray(store.manifest["specials"]))
    x = torch.cat([store.acts(SITE, i) for i in range(store.n_shards)])[torch.from_numpy(mask)].float()
    scale = float((x.shape[1] / x.pow(2).sum(1).mean()).sqrt())
    x = (x * scale).contiguous()
    save_file({"x": x}, str(work / "train.safetensors"))
    meta = {"scale": scale, "rows": len(x), "windows": store.n_windows, "recorded_tokens": tokens}
    meta_path.write_text(json.dumps(meta))
    return meta


PEER_ENV = "venvs"  # or "current": the peers are installed in this interpreter's environment (--peer-env)


def trainer_command(lib: str) -> list[str]:
    py = sys.executable if lib.startswith("unitscope") or PEER_ENV == "current" else str(peer_python(lib))
    script = "unitscope_train.py" if lib.startswith("unitscope") else f"{lib}_train.py"
    return [py, str(HERE / "peers" / script)]


def run_trainer(lib: str, spec: dict, work: Path, threads: int = 0) -> dict | None:
    """One training run in its own process (its own environment); None (and the error) if it failed."""
    spec_path = work / f"spec-{lib}.json"
    spec_path.write_text(json.dumps(spec))
    path = os.pathsep.join(p for p in (str(HERE / "peers"), os.environ.get("PYTHONPATH", "")) if p)
    env = {**os.environ, "PYTHONPATH": path, **({"OMP_NUM_THREADS": str(threads)} if threads else {})}
    p = subprocess.run([*trainer_command(lib), str(spec_path)], capture_output=True, text=True, env=env,
                       cwd=HERE / "peers")
    if p.returncode != 0:
        print(f"  {lib} failed:\n{p.stderr[-3000:]}", flush=True)
        return None
    return json.loads(Path(spec["result"]).read_text())


def throughput(args, work: Path) -> None:
    auto = resolve_compute_dtype("auto", args.device)
    runs = {"unitscope": "auto", "unitscope-float32": "float32", **{p: None for p in args.peers}}
    print(f"\n== throughput: TopK SAE 576 -> {args.units}, k = {args.k}, batch {args.batch}, {args.steps} steps, "
          f"the first {args.warm} left out of every timer; unitscope's default compute dtype auto = "
          f"{auto or torch.float32}; peers with their own defaults (float32 on CPU; sparsify autocasts its forward to "
          f"bfloat16 on CUDA); device {args.device}; {args.reps} interleaved repetitions; "
          f"{args.threads or torch.get_num_threads()} threads per trainer", flush=True)
    data = work / f"throughput-{args.batch * args.steps}.safetensors"
    if not data.is_file():  # only the rows the runs use, so peak memory is the trainer's, not the data set's
        x = load_file(str(work / "train.safetensors"))["x"][:args.batch * args.steps]
        save_file({"x": x.contiguous()}, str(data))
    results: dict[str, list[dict]] = {name: [] for name in runs}
    names = list(runs)
    for rep in range(args.reps):
        order = names[rep % len(names):] + names[:rep % len(names)]
        for name in order:
            spec = {"data": str(data), "out": str(work / "tp" / name),
                    "result": str(work / "tp" / f"{name}.json"), "units": args.units, "k": args.k,
                    "batch": args.batch, "steps": args.steps, "warm": args.warm, "seed": 0, "site": SITE,
                    "device": args.device}
            if runs[name]:
                spec["compute_dtype"] = runs[name]
            (work / "tp").mkdir(exist_ok=True)
            r = run_trainer(name.split("-")[0], spec, work, args.threads)
            if r:
                results[name].append(r)
                cpu = r.get("tokens_per_cpu_s", float("nan"))
                gpu = f"  peak GPU {r['peak_gpu_mb']:6.0f} MB" if "peak_gpu_mb" in r else ""
                print(f"  rep {rep} {name:<20} {r['tokens_per_s']:8.0f} tokens/s {cpu:8.0f} tokens/CPU-s  "
                      f"peak RSS {r['peak_rss_mb']:6.0f} MB{gpu}", flush=True)
    for key, unit, label in (("tokens_per_s", "tokens/s", ""), ("tokens_per_cpu_s", "tokens/CPU-s", " (CPU time)")):
        med = {n: statistics.median(r[key] for r in rs) for n, rs in results.items() if rs and key in rs[0]}
        print(f"medians of {unit}" + (": wall clock" if not label else
                                      ": per CPU-second of the trainer's own threads, which other processes on "
                                      "a shared machine disturb less than wall time"))
        for n in names:
            if n in med:
                reps = ", ".join(f"{r[key]:.0f}" for r in results[n])
                print(f"  {n:<20} {med[n]:8.0f} {unit}  peak RSS {max(r['peak_rss_mb'] for r in results[n]):6.0f} MB"
                      f"  (reps: {reps})")
        for ours, what in (("unitscope", f"default path (unitscope compute dtype auto = {auto or torch.float32})"),
                           ("unitscope-float32", "float32 path (unitscope compute dtype float32)")):
            print(f"{what} vs peers (their defaults){label}:")
            for peer in args.peers:
                value = f"{med[ours] / med[peer]:.2f}" if ours in med and peer in med else "n/a (a run failed)"
                print(f"ratio{label} {ours}/{peer}: {value}")


def as_unitscope(lib: str, out: Path, k: int, scale: float):
    """The trained SAE as a unitscope TopKSAE acting on raw activations at SITE (the data scaling folded in)."""
    if lib == "dictionary_learning":
        w = load_file(str(out / "weights.safetensors"))
        sae = TopKSAE(w["W_enc"].shape[0], w["W_enc"].shape[1], k=int(w["k"].item()))
        sae.load_state_dict({n: w[n] for n in ("W_enc", "b_enc", "W_dec", "b_dec")})
    else:
        sae = load_dictionary(out)  # unitscope's and SAELens' layout, or sparsify's
    if not isinstance(sae, TopKSAE) or sae.k != k:
        raise SystemExit(f"{lib} produced {type(sae).__name__} k={getattr(sae, 'k', None)}, not a TopK SAE with k={k}")
    sae.fold_scaling(scale)
    sae.metadata.update({"hook_name": SITE, "model_name": "SmolLM2-135M-Instruct", "source": lib})
    return sae.eval()


def quality(args, work: Path, meta: dict) -> None:
    steps = args.quality_tokens // args.quality_batch
    tokens = steps * args.quality_batch
    if WIKITEXT.is_file():
        corpus, start, where = Corpus(str(WIKITEXT)), 0, f"WikiText-2 validation ({WIKITEXT})"
    else:
        corpus, start = Corpus("default"), meta["windows"]
        where = f"the default corpus windows after the {start} recorded ones (WikiText-2 not found at {WIKITEXT})"
    print(f"\n== quality at an equal budget: TopK SAE 576 -> {args.quality_units}, k = {args.k}, batch "
          f"{args.quality_batch}, {tokens} tokens ({steps} steps, {tokens / meta['rows']:.1f} epochs over "
          f"{meta['rows']} recorded rows), each library's own defaults; evaluated by "
          f"unitscope.evaluate.evaluate_fidelity on {args.eval_tokens} held-out tokens of {where}", flush=True)
    subject = load_subject("default")
    rows = []
    libs = ["unitscope", *args.peers]
    (work / "quality").mkdir(exist_ok=True)

    def train(lib: str) -> tuple[dict | None, float]:
        spec = {"data": str(work / "train.safetensors"), "out": str(work / "quality" / lib),
                "result": str(work / "quality" / f"{lib}.json"), "units": args.quality_units, "k": args.k,
                "batch": args.quality_batch, "steps": steps, "warm": 0, "seed": 0, "site": SITE}
        t0 = time.perf_counter()
        return run_trainer(lib, spec, work, args.quality_threads), time.perf_counter() - t0

    # --quality-jobs > 1 trains several libraries at once (their seconds are then not comparable; the quality is)
    with ThreadPoolExecutor(max_workers=args.quality_jobs) as pool:
        futures = {lib: pool.submit(train, lib) for lib in libs}
        for lib in libs:
            r, wall = futures[lib].result()
            if r is None:
                continue
            out = work / "quality" / lib
            sae = as_unitscope(lib, out, args.k, meta["scale"])
            probe = load_file(str(out / "probe.safetensors"))  # the library's own reconstruction of a few rows
            with torch.no_grad():
                ours = sae.reconstruct(probe["x"] / meta["scale"])[1] * meta["scale"]
            gap = float((ours - probe["recon"]).abs().max() / probe["recon"].pow(2).mean().sqrt())
            ev = evaluate_fidelity(subject, sae, corpus, CTX, start_window=start, n_tokens=args.eval_tokens,
                                   progress=False)["eval_result_metrics"]
            row = {"lib": lib, "fvu": ev["reconstruction_quality"]["fvu"],
                   "ce": ev["model_performance_preservation"]["ce_loss_score"],
                   "kl": ev["model_behavior_preservation"]["kl_div_with_sae"], "l0": ev["sparsity"]["l0"],
                   "dead": ev["misc"]["frac_dead_units"], "train_s": r["seconds"], "wall_s": wall,
                   "rss": r["peak_rss_mb"], "gap": gap}
            rows.append(row)
            print(f"  {lib:<20} trained in {r['seconds']:.0f} s (steps only; {wall:.0f} s with start-up)  "
                  f"FVU {row['fvu']:.4f}  CE loss recovered {row['ce']:.4f}  (as a unitscope TopKSAE it reconstructs "
                  f"as {lib} itself does to {gap:.1e} of the rms{'' if gap < 1e-3 else ': CONVERSION MISMATCH'})",
                  flush=True)
    if args.quality_jobs > 1 or args.quality_threads:
        print(f"({args.quality_jobs} libraries trained at once, {args.quality_threads or 'default'} threads each: "
              "the seconds below are not a speed comparison)")
    print(f"\n{'library':<20} {'FVU':>7} {'CE loss rec.':>12} {'KL':>7} {'L0':>6} {'dead':>6} {'train s':>8} "
          f"{'peak RSS MB':>11}")
    for row in rows:
        print(f"{row['lib']:<20} {row['fvu']:7.4f} {row['ce']:12.4f} {row['kl']:7.4f} {row['l0']:6.1f} "
              f"{row['dead']:6.3f} {row['train_s']:8.0f} {row['rss']:11.0f}")


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--quick", action="store_true", help="tiny budgets, for development (not a measurement)")
    ap.add_argument("--work", default=None, help="cache of recorded data and results (default /tmp/...)")
    ap.add_argument("--record-tokens", type=int, default=262144, help="tokens recorded for training")
    ap.add_argument("--units", type=int, default=9216, help="throughput: SAE width")
    ap.add_argument("--batch", type=int, default=4096, help="throughput: batch size")
    ap.add_argument("--steps", type=int, default=10, help="throughput: steps per run, warm-up included")
    ap.add_argument("--warm", type=int, default=2, help="throughput: warm-up steps left out of every timer")
    ap.add_argument("--reps", type=int, default=3, help="throughput: interleaved repetitions")
    ap.add_argument("--threads", type=int, default=0, help="throughput: torch threads per trainer (default: torch's)")
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--quality-units", type=int, default=4608, help="quality: SAE width (the default run's)")
    ap.add_argument("--quality-batch", type=int, default=2048, help="quality: batch size (unitscope's default)")
    ap.add_argument("--quality-tokens", type=int, default=2_097_152, help="quality: training tokens per library")
    ap.add_argument("--eval-tokens", type=int, default=8192, help="quality: held-out tokens evaluated")
    ap.add_argument("--quality-jobs", type=int, default=1, help="quality: libraries trained at once (default 1)")
    ap.add_argument("--quality-threads", type=int, default=0,
                    help="quality: torch threads per trainer (default: torch's); 1 is fastest on a busy machine")
    ap.add_argument("--skip", action="append", default=[], choices=["throughput", "quality"])
    ap.add_argument("--peers", default=",".join(PEERS), help="comma-separated peers to compare (default: all)")
    ap.add_argument("--device", default="cpu", help="training device for every trainer: cpu (default) or cuda")
    ap.add_argument("--rows", default=None, help="already scaled float rows (safetensors, tensor 'x') to train on "
                    "instead of recording the default model (throughput only)")
    ap.add_argument("--peer-env", choices=["venvs", "current"], default="venvs",
                    help="venvs: each peer in its own cached venv (default); current: peers installed here")
    args = ap.parse_args()
    global PEER_ENV
    PEER_ENV = args.peer_env
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        ap.error(f"--device {args.device}: CUDA is not available on this machine")
    if args.rows and "quality" not in args.skip:
        ap.error("--rows trains on given rows without the model; the quality section needs the model: add "
                 "--skip quality")
    args.peers = [p for p in args.peers.split(",") if p]
    unknown = set(args.peers) - set(PEERS)
    if unknown:
        ap.error(f"unknown peers {sorted(unknown)}; known: {', '.join(PEERS)}")
    if args.quick:
        args.record_tokens, args.units, args.batch, args.steps, args.warm, args.reps = 16384, 1024, 512, 4, 1, 1
        args.quality_units, args.quality_batch, args.quality_tokens, args.eval_tokens = 512, 512, 4096, 512
    data_key = f"rows-{Path(args.rows).stem}" if args.rows else f"r{args.record_tokens}"
    work = Path(args.work or f"/tmp/unitscope-train-bench{'-quick' if args.quick else ''}") / data_key
    work.mkdir(parents=True, exist_ok=True)
    print(f"command: python benchmarks/train_throughput.py {' '.join(sys.argv[1:])}".rstrip())
    print(f"date: {datetime.now(timezone.utc):%Y-%m-%d %H:%M} UTC")
    print(f"machine: {machine()}", flush=True)
    t0 = time.perf_counter()
    for peer in args.peers:
        where = "this environment" if PEER_ENV == "current" else peer_python(peer).parent.parent
        print(f"peer {peer}: {' '.join(PEERS[peer])} in {where}", flush=True)
    print(f"peer environments ready in {time.perf_counter() - t0:.0f} s", flush=True)
    t0 = time.perf_counter()
    meta = prepare(work, args.record_tokens, args.rows)
    source = f"given in {args.rows}" if args.rows else f"from {meta['windows']} windows of the default corpus"
    print(f"data: {meta['rows']} training rows of {SITE} {source} (ready in {time.perf_counter() - t0:.0f} s; "
          f"cached in {work})", flush=True)
    if "throughput" not in args.skip:
        throughput(args, work)
    if "quality" not in args.skip:
        quality(args, work, meta)


if __name__ == "__main__":
    main()
