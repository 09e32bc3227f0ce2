"""What `unitscope eval` costs, in plain Hugging Face forwards of the same windows.

    python benchmarks/eval_cost.py [--blocks 3,15] [--reps 3] [--tokens 4096] [--geometry]

An eval runs four forwards per batch: clean, spliced (the reconstruction in place of the site), zero-ablated at
the evaluated positions and zero-ablated everywhere. Run whole, that is four plain forwards. unitscope records
the blocks below the site once, in the clean forward, and replays them for the other three, so the cost is one
forward plus three times the part above the site. Timed here, interleaved, on the same windows and model:
  - unitscope: `evaluate_fidelity` as `unitscope eval` runs it (shared lower blocks);
  - unshared: the same function with every forward run whole (`share_lower=False`), the naive schedule;
  - hf-forward: one plain forward of the model (the peer; no hooks, no dictionary).
The dictionary is a TopK SAE (4608 units, k 32) at blocks.N.resid_post with untrained weights: the cost does not
depend on what it learned. Geometry (coherence, uniqueness, TwoNN) is left out unless --geometry.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path

import numpy as np
import torch

from unitscope import Corpus, load_subject
from unitscope.dictionaries.train import TrainConfig, build_dictionary
from unitscope.evaluate.fidelity import evaluate_fidelity

WIKITEXT = Path(__file__).resolve().parents[1].parent / "shared" / "data" / "wikitext-2" / "valid.txt"


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--model", default="default")
    ap.add_argument("--blocks", default="3,15")
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--tokens", type=int, default=4096, help="evaluated tokens per repetition")
    ap.add_argument("--batch", type=int, default=8, help="windows per forward (unitscope eval's default)")
    ap.add_argument("--ctx-len", type=int, default=128)
    ap.add_argument("--geometry", action="store_true", help="include the geometry section in unitscope's time")
    args = ap.parse_args()
    torch.set_grad_enabled(False)

    subject = load_subject(args.model)
    corpus = Corpus(str(WIKITEXT) if WIKITEXT.is_file() else "default")
    corpus.documents()
    n_windows = -(-args.tokens // args.ctx_len)
    ids = torch.from_numpy(np.stack([w.tokens for _, w in zip(range(n_windows),
                                                             corpus.windows(subject.tokenizer, args.ctx_len))]))
    ids = ids.long()
    n_layers = len(subject.model.model.layers)
    print(f"model {subject.name}  corpus {corpus.spec}  {n_windows} windows of {args.ctx_len} tokens per repetition  "
          f"batch {args.batch}  torch threads {torch.get_num_threads()}  layers {n_layers}")

    for block in (int(b) for b in args.blocks.split(",")):
        site = f"blocks.{block}.resid_post"
        cfg = TrainConfig(architecture="topk", n_units=4608, k=32)
        sae = build_dictionary(cfg, subject.width(site), {"hook_name": site, "model_name": subject.name})
        sae.eval()

        def ours(share: bool, sae=sae) -> None:
            evaluate_fidelity(subject, sae, corpus, args.ctx_len, 0, n_tokens=n_windows * args.ctx_len,
                              batch_size=args.batch, progress=False, share_lower=share,
                              geometry_rows=16384 if args.geometry else 0)

        def hf_forward() -> None:
            for b in range(0, n_windows, args.batch):
                subject.model(input_ids=ids[b:b + args.batch], use_cache=False)

        methods = {"unitscope": lambda: ours(True), "unshared": lambda: ours(False), "hf-forward": hf_forward}
        times: dict[str, list[float]] = {m: [] for m in methods}
        for fn in methods.values():  # warm-up
            fn()
        for _ in range(args.reps):
            for name, fn in methods.items():
                t0 = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - t0)
        med = {m: statistics.median(t) for m, t in times.items()}
        ideal = 1 + 3 * (n_layers - block - 1) / n_layers
        print(f"\nsite {site}")
        for m, t in med.items():
            print(f"  {m:<11} {n_windows * args.ctx_len / t:8.0f} tokens/s  {t / med['hf-forward']:5.2f} forwards  "
                  f"(median of {args.reps}; runs {[round(x, 2) for x in times[m]]} s)")
        print(f"  schedule floor: 1 + 3 x (blocks above the site / all blocks) = {ideal:.2f} forwards")
        print(f"ratio unitscope/unshared (time): {med['unitscope'] / med['unshared']:.2f}")


if __name__ == "__main__":
    main()
