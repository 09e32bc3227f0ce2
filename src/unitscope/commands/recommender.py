"""`unitscope recommender --demo --out OUT`: RecSAE on the synthetic catalogue (SAE latents and raw neurons scored
by precision and recall against item attributes)."""

from __future__ import annotations

import argparse
import os

from ..errors import UnitscopeError
from . import options


def add_parser(sub) -> None:
    p = sub.add_parser("recommender", help="RecSAE demo: a sequential recommender on a synthetic catalogue, an SAE on "
                       "its hidden states, each latent's precision/recall against item attributes")
    p.add_argument("--demo", action="store_true", help="run the offline demo (the only mode for now)")
    p.add_argument("--architecture", default="jumprelu", help="SAE kind (any trainable SAE kind; default jumprelu)")
    p.add_argument("--units", type=options.positive_int, default=12, help="SAE latents (12: see docs/vision.md)")
    p.add_argument("--k", type=options.positive_float, default=None,
                   help="the target mean L0 for jumprelu and standard (default 3.4), k for TopK kinds (default 4)")
    p.add_argument("--train-decoder-bias", action="store_true",
                   help="train b_dec instead of holding it at the rows' geometric median (it then takes a price band)")
    p.add_argument("--seed", type=options.non_negative_int, default=0)
    p.add_argument("--out", required=True, help="output directory (recommender.safetensors, sae/ and recsae.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.demo:
        raise UnitscopeError("recommender runs the offline demo only for now; pass --demo")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UnitscopeError(f"--out {args.out} is a file; give a directory (it is created if missing)")
    import torch

    from ..dictionaries import ARCHITECTURES
    from ..dictionaries.sae import SparseAutoencoder
    from ..dictionaries.train import is_transcoder
    from ..worlds.recsae import format_table, k_is_a_count, run_recommender_demo

    kinds = sorted(a for a, c in ARCHITECTURES.items() if issubclass(c, SparseAutoencoder) and not is_transcoder(a))
    if args.architecture not in kinds:
        raise UnitscopeError(f"--architecture {args.architecture!r} is not an SAE kind trained on one site; use one of "
                             f"{', '.join(kinds)}")
    fractional = not k_is_a_count(args.architecture)
    k = args.k if args.k is not None else 3.4 if fractional else 4
    if not fractional and k != int(k):
        raise UnitscopeError(f"--k {k:g} is not a whole number; {args.architecture} keeps k latents per row")
    if k > args.units:
        raise UnitscopeError(f"--k {k:g} is larger than --units {args.units}; use k <= units")

    from ..atomic import write_json_atomic

    torch.set_num_threads(1)  # tiny tensors: one thread is as fast (17 CPU-s vs 124 with 4 on 2 busy cores)
    result = run_recommender_demo(args.out, architecture=args.architecture, sae_units=args.units, sae_k=k,
                                  seed=args.seed, fixed_decoder_bias=not args.train_decoder_bias)
    write_json_atomic(f"{args.out}/recsae.json", result)
    sae = result["sae"]
    print(f"recommender hit@10 {result['hit_rate_at_10']} (best possible {result['best_hit_rate_at_10']}, chance "
          f"{result['chance_hit_rate_at_10']}); SAE {sae['architecture']} {sae['units']} latents, L0 {sae['l0']}, "
          f"held-out FVU {sae['held_out_fvu']}")
    print(format_table(result))
    print(f"written: {args.out}/recsae.json (every figure, RecSAE's own concepts per latent, latent mixes)")
    return 0
