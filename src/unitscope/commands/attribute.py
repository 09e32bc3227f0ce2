"""`unitscope attribute`: attribute an output metric on one prompt to the units of one or more dictionaries,
written as a feature graph (circuit-tracer's JSON layout, see `causal.graph`)."""

from __future__ import annotations

import argparse

from . import inputs, options


def add_parser(sub) -> None:
    p = sub.add_parser("attribute", help="gradient x activation attribution of a logit, logit difference or the loss "
                                         "to units, as a feature graph (JSON)")
    p.add_argument("--dictionary", action="append", required=True, metavar="D",
                   help="dictionary directory (repeat for several sites; all of one model)")
    p.add_argument("--prompt", required=True, help="the prompt text")
    p.add_argument("--metric", required=True,
                   help="logit:TOKEN (the next token's logit), logitdiff:A,B (logit A - logit B) or loss; a token is "
                        "one token of the tokenizer (e.g. ' Paris') or #ID")
    p.add_argument("--out", required=True, help="JSON file to write")
    p.add_argument("--nodes", type=options.positive_int, default=40, help="nodes kept in the graph")
    p.add_argument("--links", type=options.positive_int, default=200, help="unit-to-unit links kept in the graph")
    options.add_model(p, default=None, what="the dictionaries' model")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..atomic import write_json_atomic
    from ..causal.attribution import Metric
    from ..causal.graph import feature_graph
    from ..dictionaries import load_dictionary
    from ..errors import UnitscopeError

    out = options.output_file(args.out)
    ds = [load_dictionary(p) for p in args.dictionary]
    subject = inputs.subject_for_dictionary(args, ds[0])
    for path, d in zip(args.dictionary[1:], ds[1:]):
        inputs.check_same_model(subject, d.metadata.get("model_fingerprint"), d.metadata.get("model_name"),
                                f"the dictionary at {path!r}")
    metric = Metric.parse(args.metric, subject.tokenizer)
    ids = subject.tokenizer(args.prompt, return_tensors="pt")["input_ids"]
    if ids.shape[1] == 0:
        raise UnitscopeError("the prompt is empty; give some text")
    graph = feature_graph(subject, ds, ids, metric, names=args.dictionary, max_nodes=args.nodes,
                          max_links=args.links)
    write_json_atomic(out, graph)
    print(f"{metric.spec} = {graph['metadata']['metric_value']:.4g}; {len(graph['nodes']) - 1} nodes and "
          f"{len(graph['links'])} links written to {out}")
    for site in graph["units"]:
        top = ", ".join(f"{u['unit']} ({u['attribution']:+.3g})" for u in site["top"][:5])
        print(f"  {site['dictionary']} at {site['site']}: {top}")
    return 0
