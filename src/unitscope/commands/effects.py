"""`unitscope effects`: per unit, the change in next-token log-probabilities and the KL when it is ablated or
clamped on the windows where it fires, written as effects.parquet beside the explanation tables."""

from __future__ import annotations

import argparse

from . import inputs, options


def add_parser(sub) -> None:
    p = sub.add_parser("effects", help="per-unit ablation and clamp effects on the next-token distribution "
                                       "(effects.parquet)")
    p.add_argument("--dictionary", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--explanations", help="output directory of `unitscope explain` (its top example windows)")
    src.add_argument("--store", help="a store: explain the units first (top windows only) into --out")
    p.add_argument("--out", required=True, help="directory for effects.parquet (the explanation directory itself "
                                                "puts it beside units.parquet for the report)")
    p.add_argument("--units", type=options.non_negative_int, nargs="+", default=None, metavar="U",
                   help="these units only (default: every explained unit with top examples)")
    p.add_argument("--windows", type=options.positive_int, default=5, help="top windows per unit")
    p.add_argument("--clamp-factor", type=options.non_negative_float, default=2.0,
                   help="clamp each unit to this multiple of its largest activation")
    p.add_argument("--top", type=options.positive_int, default=10, help="boosted and suppressed tokens kept")
    p.add_argument("--site", default=None, help="site for a dictionary whose files name none (with --store)")
    options.add_model(p, default=None, what="the dictionary's model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..causal.effects import unit_effects, write_effects
    from ..dictionaries import load_dictionary
    from ..explain.examples import check_units

    out = options.output_dir(args.out)
    d = load_dictionary(args.dictionary)
    check_units(d, args.units)
    explanations = args.explanations
    if args.store is not None:
        from ..explain import logit_lens, write_tables
        from ..store import Store

        store = Store.open(args.store)
        inputs.check_dictionary_matches_store(d, store)
        site = inputs.site_in_store(d, store, args.site)
        subject = inputs.subject_for_store(args, store)
        write_tables(out, d, store, site, subject.tokenizer, lens=logit_lens(subject, d, units=args.units),
                     top_n=args.windows, quantile_n=0, random_n=0, units=args.units, progress=not args.quiet)
        explanations = out
    else:
        subject = inputs.subject_for_dictionary(args, d)
    table = unit_effects(subject, d, explanations, units=args.units, windows=args.windows,
                         clamp_factor=args.clamp_factor, top=args.top, progress=not args.quiet)
    path = write_effects(out, table)
    print(f"wrote {path} ({table.num_rows} units)")
    for row in table.slice(0, 5).to_pylist():
        print(f"  unit {row['unit']}: KL ablate {row['kl_ablate']:.4f}, clamp {row['kl_clamp']:.4f}; boosts "
              f"{', '.join(repr(t) for t in row['boosted_tokens'][:3])}")
    return 0
