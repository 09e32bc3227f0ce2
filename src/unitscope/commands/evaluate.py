"""`unitscope eval`: fidelity of a dictionary spliced into its model, on the windows after its store's (held out)
or on any text (`--corpus`, no store needed)."""

from __future__ import annotations

import argparse
import sys
from typing import Any

from ..errors import UnitscopeError
from . import inputs, options


def add_parser(sub) -> None:
    p = sub.add_parser("eval", help="evaluate a dictionary on held-out windows or on any text")
    p.add_argument("--dictionary", required=True)
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--store", help="the store it was trained on: evaluates on the windows after the store's")
    src.add_argument("--corpus", help="any text (a .txt/.jsonl/.parquet file or folder, 'default', hf:NAME): "
                                      "evaluates on its first windows")
    p.add_argument("--field", default="text", help="text field of .jsonl/.parquet/hf corpora (with --corpus)")
    p.add_argument("--ctx-len", type=options.context_length, default=None,
                   help="window length with --corpus (default: the dictionary's training context, else 128)")
    p.add_argument("--site", default=None, help="site for a dictionary whose files name none (e.g. sparsify)")
    p.add_argument("--out", required=True, help="output JSON file")
    options.add_model(p, default=None, what="the store's model, or the dictionary's")
    options.add_eval(p)
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..atomic import write_json_atomic
    from ..corpus import Corpus
    from ..dictionaries import load_dictionary
    from ..evaluate import evaluate_fidelity
    from ..store import Store

    out = options.output_file(args.out)
    d = load_dictionary(args.dictionary)
    if args.store:
        for flag, value in (("--ctx-len", args.ctx_len), ("--field", args.field if args.field != "text" else None)):
            if value is not None:
                raise UnitscopeError(f"{flag} applies to --corpus only; with --store the store's own is used")
        store = Store.open(args.store)
        inputs.check_dictionary_matches_store(d, store)
        inputs.site_in_store(d, store, args.site)
        if store.manifest.get("synthetic") is not None:  # ground truth: no model; fresh held-out rows of its spec
            from ..synthetic import evaluate_synthetic, print_synthetic_metrics

            result = evaluate_synthetic(d, store, n_rows=args.eval_tokens, progress=not args.quiet)
            out.parent.mkdir(parents=True, exist_ok=True)
            write_json_atomic(out, result)
            print_synthetic_metrics(result)
            return 0
        corpus = inputs.store_corpus(store)
        start = inputs.held_out_start(d, store)
        subject = inputs.subject_for_store(args, store)
        ctx_len = int(store.manifest["ctx_len"])
    else:
        if d.input_site is None:
            if not args.site:
                raise UnitscopeError("the dictionary names no site (its cfg.json has no metadata.hook_name); give "
                                     "--site")
            d.metadata["hook_name"] = args.site
        elif args.site and args.site != d.input_site:
            raise UnitscopeError(f"the dictionary was trained on site {d.input_site!r}, not {args.site!r}; "
                                 "leave --site out")
        corpus = Corpus(args.corpus, field=args.field)
        corpus.documents()
        subject = inputs.subject_for_dictionary(args, d)
        subject.site(d.input_site)
        ctx_len = args.ctx_len or int(d.metadata.get("context_size") or 128)
        start = inputs.corpus_start(d, corpus, ctx_len)
        if start:
            print(f"this is the dictionary's training text: evaluating from window {start}, after the "
                  f"{start} windows it was trained on", file=sys.stderr)
    result = evaluate_fidelity(subject, d, corpus, ctx_len, start_window=start, n_tokens=args.eval_tokens,
                               batch_size=args.eval_batch_size, progress=not args.quiet)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(out, result)
    print_metrics(result)
    return 0


def print_metrics(result: dict[str, Any]) -> None:
    cfg, m = result["eval_config"], result["eval_result_metrics"]
    if cfg["n_windows"] < cfg["n_windows_requested"]:
        print(f"note: the text ran out: {m['misc']['n_tokens']} positions evaluated in {cfg['n_windows']} windows, "
              f"of the {cfg['n_windows_requested']} windows asked for", file=sys.stderr)
    perf = m["model_performance_preservation"]
    print(f"FVU {m['reconstruction_quality']['fvu']:.4f}  L0 {m['sparsity']['l0']:.1f}  "
          f"CE loss recovered {perf['ce_loss_score_zero_evaluated_positions']:.4f} (zero-ablation at evaluated "
          f"positions; {perf['ce_loss_score']:.4f} with every position zeroed, as SAELens/SAEBench)  "
          f"KL {m['model_behavior_preservation']['kl_div_with_sae']:.4f}  "
          f"dead {m['misc']['frac_dead_units']:.3f}  dense {m['misc']['frac_dense_units']:.3f}")
    g = result.get("geometry")
    if g:
        def both(key: str) -> str:
            e, w = (g[v][key] for v in ("euclidean", "whitened"))
            return f"{e:.3f} (whitened {w:.3f})" if e is not None and w is not None else "n/a"

        dim = g["intrinsic_dimension"]["value"]
        print(f"geometry: coherence {both('mutual_coherence')}  unique codes {both('uniqueness_fraction')}  "
              f"RIP {both('rip_fraction')}  TwoNN dimension {f'{dim:.1f}' if dim is not None else 'n/a'}")
