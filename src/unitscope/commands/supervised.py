"""`unitscope supervised`: sufficiency, necessity and sparse control of each dictionary against a supervised
baseline on a task with known attributes (IOI), one table printed and written as Parquet and JSON."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UnitscopeError
from . import inputs, options


def add_parser(sub) -> None:
    p = sub.add_parser("supervised", help="supervised checks (sufficiency, necessity, sparse control) of "
                                          "dictionaries against a supervised baseline on the IOI task")
    p.add_argument("--dictionary", nargs="+", default=[], help="dictionary directories (one model, one site)")
    p.add_argument("--site", default=None, help="the site to edit (default: the dictionaries' own site)")
    p.add_argument("--task", default="ioi", help="the task with known attributes (ioi)")
    p.add_argument("--names", nargs="+", default=None, metavar="NAME",
                   help="the task's names, each one token with its leading space (default: eight common names)")
    p.add_argument("--n-prompts", type=options.positive_int, default=64,
                   help="prompts (the first half fits the supervised dictionary and the mean codes, the rest tests)")
    p.add_argument("--seed", type=options.non_negative_int, default=0)
    p.add_argument("--out", required=True, help="directory for supervised.parquet and supervised.json")
    options.add_model(p, default=None, what="the dictionaries' model, or 'default' without dictionaries")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..causal.supervised import build_task, check_dictionary, format_table, supervised_checks, write_supervised

    out = options.output_dir(args.out)
    dictionaries = inputs.load_dictionaries(args.dictionary)
    own = sorted({d.input_site for d in dictionaries.values() if d.input_site})
    if len(own) > 1:
        raise UnitscopeError(f"the dictionaries were trained on different sites ({', '.join(own)}); give dictionaries "
                             "of one site")
    site = args.site or (own[0] if own else None)
    if site is None:
        raise UnitscopeError("give --site: no dictionary names the site to edit")
    subject = inputs.subject_for_dictionaries(args, dictionaries)
    width = subject.width(site)  # an unknown site is one sentence, before any work
    for name, d in dictionaries.items():
        check_dictionary(name, d, site, width)
    data = build_task(args.task, subject.tokenizer, n=args.n_prompts, seed=args.seed, names=args.names)
    rows = supervised_checks(subject, site, data, dictionaries)
    settings = {"task": args.task, "site": site, "model": subject.spec or subject.name, "n_prompts": args.n_prompts,
                "seed": args.seed, "names": list(args.names) if args.names else None,
                "dictionaries": {name: str(Path(p).resolve()) for name, p in zip(dictionaries, args.dictionary)}}
    paths = write_supervised(out, rows, settings)
    print(f"{args.task} at {site}, {rows[0]['n_test']} held-out prompts, clean logit difference "
          f"{rows[0]['clean_logit_diff']:.3f}")
    print(format_table(rows))
    print("sufficiency: logit difference with x replaced by the reconstruction / clean (1 is sufficient); necessity: "
          "with the dictionary's part mean-ablated / clean (0 is necessary); control: fraction of prompts whose IO "
          "name flips to the counterfactual name by setting the k units (mean k shown) to their counterfactual codes")
    print(f"wrote {paths['table']} and {paths['json']}")
    return 0
