"""One-command rerun of the steering comparison on the default model (SmolLM2-135M, blocks.6.mlp_hidden).

Needs a run with neurons, SNMF-256 and TopK dictionaries at that site, made by
`unitscope run --name atoms --site blocks.6.mlp_hidden --architecture topk pca snmf:256 neurons`.
Usage: python benchmarks/steer_compare.py RUN_DIR OUT_DIR [RESULTS_TXT]
It runs `unitscope steer-compare` and writes its printed table, the command, the commit and the wall time to
RESULTS_TXT (default benchmarks/results-steer-compare-cpu.txt).
"""

from __future__ import annotations

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
    if len(argv) not in (2, 3):
        print(__doc__)
        return 2
    run, out = Path(argv[0]), Path(argv[1])
    results = Path(argv[2]) if len(argv) == 3 else HERE / "results-steer-compare-cpu.txt"
    cmd = ["unitscope", "steer-compare", "--concepts", str(HERE / "steer_concepts.json"), "--dictionary",
           *[str(run / "dictionaries" / d) for d in DICTIONARIES], "--site", SITE, "--kl", *KL,
           *[a for p in PROMPTS for a in ("--prompt", p)], "--n", str(N), "--max-new-tokens", str(TOKENS),
           "--seed", "0", "--out", str(out)]
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=HERE, capture_output=True,
                            text=True).stdout.strip()
    t0 = time.perf_counter()
    done = subprocess.run(cmd, capture_output=True, text=True)
    wall = time.perf_counter() - t0
    if done.returncode:
        print(done.stdout, done.stderr, sep="\n")
        return done.returncode
    header = [f"# unitscope steer-compare on SmolLM2-135M {SITE} (2-core CPU shared with other jobs; "
              f"{datetime.now(timezone.utc):%Y-%m-%d}, commit {commit})",
              f"# command: {shlex.join(cmd)}",
              f"# 5 concepts x 8 example texts; {N} generations of {TOKENS} tokens from each of {len(PROMPTS)} "
              f"prompts per (kind, concept, KL); alpha matched on 'I think that'"]
    results.write_text("\n".join(header) + "\n" + done.stdout + f"{wall:.0f} s wall\n")
    print(done.stdout)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
