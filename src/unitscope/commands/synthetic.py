"""`unitscope synthetic`: a store of known features in superposition (ground truth for `train` and `eval`)."""

from __future__ import annotations

import argparse

from . import options


def add_parser(sub) -> None:
    p = sub.add_parser("synthetic", help="write a store of known sparse features in superposition (ground truth)")
    p.add_argument("--out", required=True, help="store directory to write")
    p.add_argument("--features", type=options.positive_int, default=512, help="number of true features")
    p.add_argument("--dims", type=options.positive_int, default=128, help="dimension of the rows")
    p.add_argument("--rows", type=options.positive_int, default=200_000, help="rows (tokens) in the store")
    p.add_argument("--active", type=options.positive_float, default=4.0, help="mean active features per row")
    p.add_argument("--power-law", type=options.non_negative_float, default=1.0,
                   help="feature of rank r fires with probability ∝ r^-power_law")
    p.add_argument("--correlated-pairs", type=options.non_negative_int, default=16,
                   help="disjoint pairs of features that tend to fire together")
    p.add_argument("--noise", type=options.non_negative_float, default=0.01,
                   help="Gaussian noise std relative to the signal's rms")
    p.add_argument("--seed", type=options.non_negative_int, default=0)
    p.add_argument("--shard-rows", type=options.positive_int, default=32768, help="rows per store shard")
    p.add_argument("--overwrite", action="store_true", help="replace an existing store at --out")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..synthetic import SyntheticSpec, write_synthetic_store

    spec = SyntheticSpec(n_features=args.features, d=args.dims, rows=args.rows, active=args.active,
                         power_law=args.power_law, correlated_pairs=args.correlated_pairs, noise=args.noise,
                         seed=args.seed)
    spec.validate()
    out = options.output_dir(args.out)
    store = write_synthetic_store(spec, out, shard_rows=args.shard_rows, overwrite=args.overwrite,
                                  progress=not args.quiet)
    print(f"synthetic store {out}: {spec.n_features} features in {spec.d} dimensions, {store.n_tokens} rows "
          f"(site 'synthetic'; true directions in {out / 'truth.safetensors'})")
    return 0
