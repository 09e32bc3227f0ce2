"""Recording throughput: unitscope `record` vs a bare Hugging Face forward truncated at the same block vs a
full forward. Same model, batch, dtype and windows; repetitions interleaved; medians printed with ratios.

    python benchmarks/record_throughput.py [--dtype float32|bfloat16] [--reps 5] [--batches 16] [--full]

unitscope's figure is end to end: tokenizing, the early-stopped forward, and writing checksummed shards.
The bare peer is handed pre-tokenized ids and keeps nothing. Each repetition records several shards
(`--shard-tokens`), so the figure is the steady state of a long recording, where shard writes overlap the
next shard's forwards, plus the once-per-call costs (store creation, manifest, site check) a real recording
pays only once. `--full` adds the untruncated forward (slow on a CPU). Text: WikiText-2 validation from
../shared/data when present, else the default corpus.
"""

from __future__ import annotations

import argparse
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from unitscope import Corpus, load_subject, record

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--dtype", default="float32")
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--batch", type=int, default=16, help="windows per forward")
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--batches", type=int, default=16, help="forwards per repetition")
    ap.add_argument("--shard-tokens", type=int, default=8192, help="tokens per shard (several shards per rep)")
    ap.add_argument("--full", action="store_true", help="also time the full (untruncated) forward")
    ap.add_argument("--blocks", default="3,15", help="early and middle block")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    subject = load_subject(args.model, dtype=args.dtype)
    model = subject.model
    corpus = Corpus(str(WIKITEXT) if WIKITEXT.is_file() else "default")
    corpus.documents()
    n_windows = args.batch * args.batches
    tokens = n_windows * args.ctx_len
    windows = [w.tokens for _, w in zip(range(n_windows), corpus.windows(subject.tokenizer, args.ctx_len))]
    ids = torch.from_numpy(np.stack(windows)).long()
    layers = model.model.layers
    print(f"model {subject.name}  dtype {args.dtype}  corpus {corpus.spec}  batch {args.batch}x{args.ctx_len}  "
          f"{tokens} tokens per repetition in shards of {args.shard_tokens}  torch threads {torch.get_num_threads()}")

    def bare_truncated(block: int) -> None:
        model.model.layers = layers[:block + 1]  # what a user does by hand: drop the later blocks
        try:
            for b in range(args.batches):
                model.model(input_ids=ids[b * args.batch:(b + 1) * args.batch], use_cache=False)
        finally:
            model.model.layers = layers

    def full_forward(_block: int) -> None:
        for b in range(args.batches):
            model(input_ids=ids[b * args.batch:(b + 1) * args.batch], use_cache=False)

    def unitscope_record(block: int) -> None:
        with tempfile.TemporaryDirectory() as d:
            record(subject, corpus, [f"blocks.{block}.resid_post"], tokens, Path(d) / "store", ctx_len=args.ctx_len,
                   batch_size=args.batch, shard_tokens=args.shard_tokens, progress=False)

    methods = {"unitscope": unitscope_record, "bare-truncated": bare_truncated,
               **({"full-forward": full_forward} if args.full else {})}
    for block in (int(b) for b in args.blocks.split(",")):
        times: dict[str, list[float]] = {m: [] for m in methods}
        for fn in methods.values():  # warm-up
            fn(block)
        for _ in range(args.reps):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                fn(block)
                times[name].append(time.perf_counter() - t0)
        rate = {m: tokens / statistics.median(t) for m, t in times.items()}
        print(f"\nsite blocks.{block}.resid_post")
        for m, r in rate.items():
            print(f"  {m:<15} {r:9.0f} tokens/s  (median of {args.reps}; runs {[round(t, 2) for t in times[m]]} s)")
        print(f"ratio unitscope/bare-truncated: {rate['unitscope'] / rate['bare-truncated']:.2f}")
        if args.full:
            print(f"ratio unitscope/full-forward: {rate['unitscope'] / rate['full-forward']:.2f}")


if __name__ == "__main__":
    main()
