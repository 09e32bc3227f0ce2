"""`unitscope recommender --demo --out OUT`: RecSAE on the synthetic catalogue (SAE latents and raw neurons scored
by precision and recall against item attributes)."""

from __future__ import annotations

import argparse
import json
import os

from ..errors import UnitscopeError
from . import options


def add_parser(sub) -> None:
    p = sub.add_parser("recommender", help="RecSAE demo: a sequential recommender on a synthetic catalogue, an SAE on "
                       "its hidden states, each latent's precision/recall against item attributes")
    p.add_argument("--demo", action="store_true", help="run the offline demo (the only mode for now)")
    p.add_argument("--units", type=options.positive_int, default=8, help="SAE latents (8: see docs/vision.md)")
    p.add_argument("--k", type=options.positive_int, default=2, help="TopK k")
    p.add_argument("--seed", type=options.non_negative_int, default=0)
    p.add_argument("--out", required=True, help="output directory (recommender.safetensors, sae/ and recsae.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    if not args.demo:
        raise UnitscopeError("recommender runs the offline demo only for now; pass --demo")
    if os.path.exists(args.out) and not os.path.isdir(args.out):
        raise UnitscopeError(f"--out {args.out} is a file; give a directory (it is created if missing)")
    if args.k > args.units:
        raise UnitscopeError(f"--k {args.k} is larger than --units {args.units}; use k <= units")
    import torch

    from ..atomic import write_json_atomic
    from ..worlds.recsae import run_recommender_demo

    torch.set_num_threads(1)  # tiny tensors: one thread is as fast (17 CPU-s vs 124 with 4 on 2 busy cores)
    result = run_recommender_demo(args.out, sae_units=args.units, sae_k=args.k, seed=args.seed)
    write_json_atomic(f"{args.out}/recsae.json", result)
    print(json.dumps(result, indent=1))
    print(f"written: {args.out}/recsae.json")
    return 0
