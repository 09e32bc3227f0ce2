"""`unitscope explain`: per-unit statistics, top examples and logit-lens tokens as Parquet tables."""

from __future__ import annotations

import argparse

from . import inputs, options


def add_parser(sub) -> None:
    p = sub.add_parser("explain", help="unit statistics, top examples and logit lens as Parquet tables")
    p.add_argument("--dictionary", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--top", type=options.positive_int, default=20, help="top examples per unit")
    p.add_argument("--site", default=None, help="site for a dictionary whose files name none (e.g. sparsify)")
    options.add_model(p, default=None, what="the store's model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..dictionaries import load_dictionary
    from ..explain import logit_lens, write_tables
    from ..store import Store

    out = options.output_dir(args.out)
    store = Store.open(args.store)
    d = load_dictionary(args.dictionary)
    inputs.check_dictionary_matches_store(d, store)
    site = inputs.site_in_store(d, store, args.site)
    subject = inputs.subject_for_store(args, store)
    paths = write_tables(out, d, store, site, subject.tokenizer, lens=logit_lens(subject, d), top_n=args.top,
                         progress=not args.quiet)
    print(f"wrote {paths['units']} and {paths['examples']}")
    return 0
