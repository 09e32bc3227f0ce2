"""Throughput and peak resident memory of `unitscope explain`'s one streaming pass, for 4k and 16k units.

A synthetic bfloat16 store (Gaussian activations of SmolLM2-135M's width, 576, with token ids drawn from
its vocabulary size; `--ctx` tokens a window) is written once and reused; for each width a fresh child
process builds a random TopK SAE (k = 32), then runs `explain.write_tables` over the whole store (all
units: statistics, histograms, top / quantile / random examples with per-token codes, concept
dictionaries). What is measured in the child:

- tokens_per_s: store tokens / wall time of `write_tables` (the pass and the writing of the three tables);
- peak_rss_mb_beyond_model: the peak resident set during `write_tables` minus the resident set just before
  it, with the dictionary (the "model" of this pass) and the interpreter already loaded; the peak is reset
  first (`/proc/self/clear_refs` = 5, Linux), so nothing before the call counts.

The issue's bar: 16k units over >= 1M tokens under 2 GB beyond the model. Random activations make every
unit fire at about k / units of the tokens, which is what a trained SAE averages; the token strings come
from a stub tokenizer (no model download), and the logit lens, which needs the language model, is left out.

    python benchmarks/explain_throughput.py               # 4096 and 16384 units over 2**20 tokens
    python benchmarks/explain_throughput.py --quick       # a smoke run: 512 and 2048 units over 32k tokens
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def _rss_kb(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1])
    raise RuntimeError(f"no {field} in /proc/self/status")


def make_store(root: Path, tokens: int, ctx: int, d: int, vocab: int, shard_tokens: int) -> Path:
    """A store of `tokens` Gaussian rows (bfloat16), written shard by shard; reused when already complete."""
    import torch

    from unitscope import Store

    if (root / "store.json").is_file() and Store.open(root).n_tokens == tokens:
        return root
    identity = {"model": "synthetic", "sites": {"s": {"width": d}}, "dtype": "bfloat16", "ctx_len": ctx,
                "corpus": {"spec": "synthetic", "field": "text", "seed": 0}}
    st = Store.create(root, identity, overwrite=True)
    rng = np.random.default_rng(0)
    gen = torch.Generator().manual_seed(0)
    shard_tokens = max(ctx, shard_tokens // ctx * ctx)
    for lo in range(0, tokens, shard_tokens):
        n = min(shard_tokens, tokens - lo)
        toks = np.minimum(rng.zipf(1.3, n), vocab) - 1  # a few frequent tokens, a long tail
        acts = torch.randn(n, d, generator=gen).to(torch.bfloat16)
        st.append_shard(toks, np.zeros(n), np.arange(lo, lo + n) % ctx, {"s": acts}, windows=-(-n // ctx))
    st.finish(specials=[], complete=True)
    return root


class StubTokenizer:
    def decode(self, ids: list[int]) -> str:
        return f"<{int(ids[0])}>"


def child(store: Path, units: int, k: int, threads: int, out: Path) -> dict:
    import torch

    from unitscope import Store
    from unitscope.dictionaries.sae import TopKSAE
    from unitscope.explain import write_tables

    torch.set_num_threads(threads)
    st = Store.open(store)
    d = st.width("s")
    torch.manual_seed(0)
    sae = TopKSAE(d, units, k=k, metadata={"hook_name": "s"})
    with torch.no_grad():  # unit-norm random directions, encoder = decoder transpose (a typical init)
        sae.W_dec.copy_(torch.nn.functional.normalize(torch.randn(units, d), dim=1))
        sae.W_enc.copy_(sae.W_dec.t())
    try:
        Path("/proc/self/clear_refs").write_text("5")  # reset the peak resident set (VmHWM)
        reset = True
    except OSError:  # a kernel without it: the peak then covers the child's whole life (an over-estimate)
        reset = False
    before = _rss_kb("VmRSS")
    t0 = time.perf_counter()
    write_tables(out, sae, st, "s", StubTokenizer(), progress=False)
    wall = time.perf_counter() - t0
    peak = _rss_kb("VmHWM")
    return {"units": units, "tokens": st.n_tokens, "wall_s": round(wall, 2),
            "tokens_per_s": round(st.n_tokens / wall, 1), "rss_before_mb": round(before / 1024, 1),
            "peak_rss_mb_beyond_model": round((peak - before) / 1024, 1),
            "examples_mb": round((out / "examples.parquet").stat().st_size / 2 ** 20, 1), "threads": threads,
            "peak_reset": reset}


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--units", type=int, nargs="+", default=None)
    p.add_argument("--tokens", type=int, default=None)
    p.add_argument("--ctx", type=int, default=128)
    p.add_argument("--k", type=int, default=32)
    p.add_argument("--threads", type=int, default=os.cpu_count())
    p.add_argument("--work", default=None, help="folder for the synthetic store and outputs (default: a temp dir)")
    p.add_argument("--quick", action="store_true")
    p.add_argument("--child", nargs=2, metavar=("STORE", "UNITS"), help=argparse.SUPPRESS)
    p.add_argument("--out", default=None, help=argparse.SUPPRESS)
    a = p.parse_args()
    if a.child:
        print(json.dumps(child(Path(a.child[0]), int(a.child[1]), a.k, a.threads, Path(a.out))))
        return 0
    units = a.units or ([512, 2048] if a.quick else [4096, 16384])
    tokens = a.tokens or (1 << 15 if a.quick else 1 << 20)
    work = Path(a.work) if a.work else Path(tempfile.mkdtemp(prefix="explain-bench-"))
    t0 = time.perf_counter()
    store = make_store(work / f"store-{tokens}-{a.ctx}", tokens, a.ctx, 576, 49152, 1 << 16)
    print(f"store: {tokens} tokens, ctx {a.ctx}, width 576, bfloat16 ({time.perf_counter() - t0:.0f} s to make)",
          flush=True)
    import torch
    print(f"torch {torch.__version__}, {a.threads} threads, {os.cpu_count()} cpus", flush=True)
    for u in units:
        out = work / f"explain-{u}"
        r = subprocess.run([sys.executable, __file__, "--child", str(store), str(u), "--k", str(a.k), "--threads",
                            str(a.threads), "--out", str(out)], capture_output=True, text=True)
        if r.returncode:
            print(r.stderr, file=sys.stderr)
            return r.returncode
        res = json.loads(r.stdout.strip().splitlines()[-1])
        print(f"units: {u}  tokens: {res['tokens']}  wall_s: {res['wall_s']}  tokens_per_s: {res['tokens_per_s']}  "
              f"examples_mb: {res['examples_mb']}", flush=True)
        print(f"peak_rss_mb_beyond_model: {res['peak_rss_mb_beyond_model']}  (units {u}, rss before "
              f"{res['rss_before_mb']} MB{'' if res['peak_reset'] else '; peak not reset: whole child'})", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
