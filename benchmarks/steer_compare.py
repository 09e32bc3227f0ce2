"""One-command rerun of the steering comparison on the default model (SmolLM2-135M, blocks.6.mlp_hidden).

Needs a run with neurons, SNMF-256 and TopK dictionaries at that site, made by
`unitscope run --name atoms --site blocks.6.mlp_hidden --architecture topk pca snmf:256 neurons`.
Usage: python benchmarks/steer_compare.py RUN_DIR OUT_DIR [RESULTS_TXT] [--seeds 0 1 ...]
It runs `unitscope steer-compare` once per seed into OUT_DIR/seed-S (a seed whose table is already there is
reused, so a longer run can be built up in pieces), then prints the table of all seeds' rows pooled (each seed's
steered generations are paired with its own unsteered ones) and writes it, the commands and the wall times to
RESULTS_TXT (default benchmarks/results-steer-compare-cpu.txt).
"""

from __future__ import annotations

import argparse
import contextlib
import io
import shlex
import subprocess
import sys
import time
from datetime import datetime, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
SITE = "blocks.6.mlp_hidden"
DICTIONARIES = ("neurons-1536", "snmf-256", "topk-4608-k32")
PROMPTS = ("I think that", "Today, I")
KL = ("0.25", "0.5")
N, TOKENS = 6, 30


def main(argv: list[str]) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("run", type=Path)
    ap.add_argument("out", type=Path)
    ap.add_argument("results", type=Path, nargs="?", default=HERE / "results-steer-compare-cpu.txt")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0])
    args = ap.parse_args(argv)
    import pyarrow.parquet as pq

    from unitscope.commands.steer_compare import print_summary

    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                            text=True).stdout.strip()
    lines, rows = [], []
    for seed in args.seeds:
        out = args.out / f"seed-{seed}"
        cmd = ["unitscope", "steer-compare", "--concepts", str(HERE / "steer_concepts.json"), "--dictionary",
               *[str(args.run / "dictionaries" / d) for d in DICTIONARIES], "--site", SITE, "--kl", *KL,
               *[a for p in PROMPTS for a in ("--prompt", p)], "--n", str(N), "--max-new-tokens", str(TOKENS),
               "--seed", str(seed), "--out", str(out)]
        if (out / "steer_compare.parquet").is_file():
            lines.append(f"# seed {seed}: table already in {out}, reused; command: {shlex.join(cmd)}")
        else:
            t0 = time.perf_counter()
            done = subprocess.run(cmd, capture_output=True, text=True)
            if done.returncode:
                print(done.stdout, done.stderr, sep="\n")
                return done.returncode
            lines.append(f"# seed {seed}: {time.perf_counter() - t0:.0f} s wall (commit {commit}); command: "
                         f"{shlex.join(cmd)}")
        rows += pq.read_table(out / "steer_compare.parquet").to_pylist()
    buf = io.StringIO()
    with contextlib.redirect_stdout(buf):
        print_summary(rows)
    header = [f"# unitscope steer-compare on SmolLM2-135M {SITE} (2-core CPU shared with other jobs; "
              f"{datetime.now(timezone.utc):%Y-%m-%d}, pooled at commit {commit})", *lines,
              f"# 5 concepts x 8 example texts; per seed {N} generations of {TOKENS} tokens from each of "
              f"{len(PROMPTS)} prompts per (kind, concept, KL); alpha matched on 'I think that'; seeds "
              f"{' '.join(map(str, args.seeds))} pooled; no LLM judge (none but SmolLM2-135M is at hand offline)"]
    args.results.write_text("\n".join(header) + "\n" + buf.getvalue())
    print(buf.getvalue())
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
