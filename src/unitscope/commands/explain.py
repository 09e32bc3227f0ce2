"""`unitscope explain`: per-unit statistics, example windows, concept dictionaries and logit lens as Parquet."""

from __future__ import annotations

import argparse

from . import inputs, options


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="unit statistics, examples, concept labels and logit lens as Parquet tables")
    p.add_argument("--dictionary", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--top", type=options.positive_int, default=20, help="top examples per unit")
    p.add_argument("--quantile-examples", type=options.non_negative_int, default=2,
                   help="examples sampled from each of the 10 activation bins per unit")
    p.add_argument("--random-examples", type=options.non_negative_int, default=5,
                   help="random windows where the unit does not fire, per unit")
    p.add_argument("--units", type=options.non_negative_int, nargs="+", default=None, metavar="U",
                   help="explain only these unit indices (default: all)")
    p.add_argument("--seed", type=options.non_negative_int, default=0, help="seed of the example sampling")
    p.add_argument("--site", default=None, help="site for a dictionary whose files name none (e.g. sparsify)")
    options.add_model(p, default=None, what="the store's model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..dictionaries import load_dictionary
    from ..explain import logit_lens, write_tables
    from ..explain.examples import check_units
    from ..store import Store

    out = options.output_dir(args.out)
    store = Store.open(args.store)
    d = load_dictionary(args.dictionary)
    check_units(d, args.units)  # before loading the model: a unit the dictionary lacks is refused at once
    inputs.check_dictionary_matches_store(d, store)
    site = inputs.site_in_store(d, store, args.site)
    subject = inputs.subject_for_store(args, store)
    paths = write_tables(out, d, store, site, subject.tokenizer, lens=logit_lens(subject, d, units=args.units),
                         top_n=args.top, quantile_n=args.quantile_examples, random_n=args.random_examples,
                         units=args.units, seed=args.seed, progress=not args.quiet)
    print(f"wrote {paths['units']}, {paths['examples']} and {paths['concepts']}")
    return 0
