"""`unitscope steer-compare`: each dictionary's best unit per concept, steered at matched KL beside the concept's
difference-in-means direction; presence and perplexity as a table (Parquet), a plot, and a printed summary."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UnitscopeError
from . import inputs, options


def add_parser(sub) -> None:
    p = sub.add_parser("steer-compare", help="compare unit kinds at steering concepts at matched next-token KL")
    p.add_argument("--concepts", required=True, help='JSON file: {"concept name": ["example text", ...], ...}')
    p.add_argument("--dictionary", nargs="+", default=[], help="dictionary directories (one model)")
    p.add_argument("--site", required=True, help="site of the concepts' difference-in-means detector and direction")
    p.add_argument("--kl", type=options.positive_float, nargs="+", default=[0.025, 0.05, 0.1, 0.25, 0.5],
                   help="target next-token KLs (default: the semi-NMF paper's 0.025 0.05 0.1 0.25 0.5)")
    p.add_argument("--prompt", action="append", default=None, help="prompt to continue (repeatable; default "
                                                                    "'I think that')")
    p.add_argument("--negatives", default=None, help="JSON list of contrast texts besides the other concepts'")
    p.add_argument("--no-diffmean", action="store_true", help="leave the difference-in-means direction out")
    p.add_argument("--n", type=options.positive_int, default=4, help="generations per prompt")
    p.add_argument("--max-new-tokens", type=options.positive_int, default=30)
    p.add_argument("--seed", type=options.non_negative_int, default=0)
    p.add_argument("--judge-endpoint", default=None, metavar="URL",
                   help="OpenAI-compatible endpoint of an LLM that rates each generation 0-2 for the concept "
                        "(needs the llm extra); its prompt and answers go into the table")
    p.add_argument("--judge-model", default=None, help="model name to ask the judge endpoint for (default: the "
                                                       "first it lists)")
    p.add_argument("--out", required=True, help="directory for steer_compare.parquet and steer_compare.png")
    options.add_model(p, default=None, what="the dictionaries' model, or 'default' without dictionaries")
    p.set_defaults(func=run)


def _read_json(path: str, what: str):
    p = Path(path)
    if not p.is_file():
        raise UnitscopeError(f"{what} file {path!r} does not exist")
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UnitscopeError(f"{what} file {path!r} is not valid JSON") from None


def read_concepts(path: str) -> dict[str, list[str]]:
    obj = _read_json(path, "concepts")
    if not isinstance(obj, dict) or not obj or not all(
            isinstance(v, list) and v and all(isinstance(t, str) and t.strip() for t in v) for v in obj.values()):
        raise UnitscopeError(f"concepts file {path!r} must hold an object mapping each concept name to a non-empty "
                             "list of example texts")
    return obj


def run(args: argparse.Namespace) -> int:
    from ..causal.steer import NEUTRAL_PROMPT
    from ..causal.steer_compare import steer_compare, write_steer_compare

    out = options.output_dir(args.out)
    concepts = read_concepts(args.concepts)
    negatives = _read_json(args.negatives, "negatives") if args.negatives else []
    if not isinstance(negatives, list) or not all(isinstance(t, str) and t.strip() for t in negatives):
        raise UnitscopeError(f"negatives file {args.negatives!r} must hold a JSON list of texts")
    judge = None  # checked before the model loads: a bad endpoint is refused at once
    if args.judge_endpoint:
        from ..causal.steer_judge import ConceptJudge
        from ..label import OpenAIEndpoint

        judge = ConceptJudge(OpenAIEndpoint(args.judge_endpoint, model=args.judge_model))
    dictionaries = inputs.load_dictionaries(args.dictionary)
    subject = inputs.subject_for_dictionaries(args, dictionaries)
    try:
        rows = steer_compare(subject, concepts, dictionaries, args.site, kl_targets=args.kl,
                             prompts=args.prompt or [NEUTRAL_PROMPT], negatives=negatives, n=args.n,
                             max_new_tokens=args.max_new_tokens, seed=args.seed, with_diffmean=not args.no_diffmean,
                             judge=judge)
    finally:
        if judge is not None:
            judge.backend.close()
    paths = write_steer_compare(out, rows)
    print_summary(rows)
    print(f"wrote {paths['table']} and {paths['plot']}")
    return 0


def print_summary(rows) -> None:
    """The kinds x KL table (mean +- standard error over concepts x generations) and the paired differences."""
    from ..causal.steer_compare import paired_differences, summary

    summ = summary(rows)
    judged = any(s["judge"] == s["judge"] for s in summ)  # not NaN
    head = (f"{'kind':<10} {'dictionary':<16} {'KL':>5} {'presence':>15} {'lift':>15} {'(se concepts)':>13} "
            f"{'perplexity':>15}" + (f" {'judge 0-2':>13}" if judged else "") + f" {'reached':>8}")
    print(head)
    for s in summ:
        line = (f"{s['kind']:<10} {s['dictionary'][:16]:<16} {s['target_kl']:>5g} "
                f"{s['presence']:>7.3f} ± {s['presence_se']:<5.3f} {s['lift']:>7.3f} ± {s['lift_se']:<5.3f} "
                f"{s['lift_se_concepts']:>13.3f} {s['perplexity']:>7.1f} ± {s['perplexity_se']:<5.1f}")
        if judged:
            line += f" {s['judge']:>5.2f} ± {s['judge_se']:<5.2f} ({s['judge_n']}/{s['generations']} rated)"
        print(line + f" {s['reached']:>4}/{s['concepts']:<3}")
    print("presence: the concept's difference-in-means detector on the generated tokens (contrast texts 0, concept "
          "texts 1); lift: presence minus the unsteered model's on the same prompt and seed; ± one standard error "
          "over concepts x generations; (se concepts): the lift's standard error over the per-concept means; "
          "perplexity of the generated tokens under the unsteered model"
          + ("; judge: the LLM judge's concept rating (0 absent, 2 fully present)" if judged else "")
          + "; reached: concepts whose target KL the direction reached")
    print("best (picked on these draws) against the others, same concepts, prompts and seeds (presence difference "
          "± standard error over draws; ± over per-concept means, the one to trust when concepts differ):")
    for d in paired_differences(rows):
        print(f"  KL {d['target_kl']:g}: {d['best']} - {d['other']} = {d['diff']:+.3f} ± {d['se']:.3f} "
              f"({d['pairs']} pairs); ± {d['se_concepts']:.3f} over {d['concepts']} concepts")
