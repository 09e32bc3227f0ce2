"""`unitscope label`: LLM-written labels for the units of an explanation, scored by detection and fuzzing."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from ..errors import UnitscopeError
from . import options


def _units(text: str) -> list[int]:
    """A unit index or an inclusive range `a-b`."""
    try:
        if "-" in text[1:]:
            a, b = (int(x) for x in text.split("-", 1))
            if b < a:
                raise ValueError
            return list(range(a, b + 1))
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a unit index or a range such as 0-15") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"unit indices are 0 or more, not {value}")
    return [value]


def add_parser(sub) -> None:
    p = sub.add_parser("label", help="LLM labels for units, scored by detection and fuzzing on held-out windows")
    p.add_argument("--explanations", required=True,
                   help="an explanation directory (from `unitscope explain`), or a run directory: all its explain/ID")
    src = p.add_mutually_exclusive_group(required=True)
    src.add_argument("--endpoint", help="an OpenAI-compatible server, e.g. http://127.0.0.1:8000/v1 (vLLM, Ollama, "
                                        "llama.cpp's server, OpenAI); the key, if any, from $OPENAI_API_KEY")
    src.add_argument("--hf-model", help="a local Hugging Face chat model: 'default' (SmolLM2-135M-Instruct), a "
                                        "directory, a .gguf file or a hub id")
    p.add_argument("--model", default=None, help="model name sent to the endpoint (default: the first it lists)")
    p.add_argument("--out", default=None, help="output directory (default for a run: RUN/labels/ID)")
    p.add_argument("--units", type=_units, nargs="+", default=None, help="unit indices or ranges (default: all)")
    p.add_argument("--concurrency", type=options.positive_int, default=4, help="requests in flight at once")
    p.add_argument("--max-retries", type=options.non_negative_int, default=4, help="retries of a failed request")
    p.add_argument("--timeout", type=options.positive_float, default=60.0, help="seconds to wait for one answer")
    p.add_argument("--rate-limit", type=options.positive_float, default=None, help="most requests started per second")
    p.add_argument("--temperature", type=options.non_negative_float, default=0.0)
    p.add_argument("--seed", type=options.non_negative_int, default=0,
                   help="seeds the split, the excerpts, the fuzzing marks and the model's sampling")
    p.add_argument("--examples", type=options.positive_int, default=10, help="excerpts the explainer sees")
    p.add_argument("--held-out", type=options.positive_int, default=10,
                   help="held-out firing excerpts (and as many non-firing) per scorer and unit")
    p.add_argument("--excerpt-tokens", type=options.positive_int, default=32, help="tokens per excerpt shown")
    p.add_argument("--batch-units", type=options.positive_int, default=16, help="units per atomic write")
    p.add_argument("--device", type=options.device, default="cpu", help="device for --hf-model")
    p.set_defaults(func=run)


def _targets(explanations: Path, out: str | None) -> list[tuple[Path, Path]]:
    """(explanation dir, output dir) pairs: one for an explanation directory, one per explain/ID of a run."""
    if (explanations / "examples.parquet").is_file():
        if out is None:
            raise UnitscopeError("give --out DIR for the labels of an explanation directory")
        return [(explanations, options.output_dir(out))]
    ids = sorted(d for d in (explanations / "explain").glob("*") if (d / "examples.parquet").is_file())
    if not ids:
        raise UnitscopeError(f"{str(explanations)!r} is neither an explanation directory (no examples.parquet) nor a "
                             "run with explanations (no explain/ID/examples.parquet)")
    root = Path(out) if out else explanations / "labels"
    return [(d, options.output_dir(root / d.name)) for d in ids]


def run(args: argparse.Namespace) -> int:
    from tqdm.auto import tqdm

    from ..label import HFChat, LabelSettings, OpenAIEndpoint, label_units

    explanations = Path(args.explanations)
    if not explanations.is_dir():
        raise UnitscopeError(f"{str(explanations)!r} is not a directory; give an explanation or run directory")
    targets = _targets(explanations, args.out)
    units = sorted({u for group in args.units for u in group}) if args.units else None
    settings = LabelSettings(n_explain=args.examples, n_score=args.held_out, excerpt_tokens=args.excerpt_tokens,
                             temperature=args.temperature, seed=args.seed)
    if args.endpoint:
        backend = OpenAIEndpoint(args.endpoint, model=args.model, temperature=args.temperature, seed=args.seed,
                                 timeout=args.timeout, max_retries=args.max_retries, rate_limit=args.rate_limit)
    else:
        backend = HFChat(args.hf_model, temperature=args.temperature, seed=args.seed, device=args.device)
    status = 0
    try:
        for src, out in targets:
            bar = tqdm(total=len(units) if units else None, unit="unit", desc=f"label {src.name}",
                       disable=args.quiet)
            summary = label_units(src, out, backend, settings, units=units, concurrency=args.concurrency,
                                  max_retries=args.max_retries, batch_units=args.batch_units, progress=bar.update)
            bar.close()
            print(f"labelled {summary['labelled']} unit(s) with {summary['model']} into {out / 'labels.parquet'}"
                  + (f" ({summary['skipped']} already done)" if summary["skipped"] else ""))
            if summary["failed"]:
                unit, why = next(iter(summary["failed"].items()))
                print(f"unitscope: {len(summary['failed'])} unit(s) failed and are recorded with their error "
                      f"(unit {unit}: {why}); run the same command again to retry them", file=sys.stderr)
                status = 1
    finally:
        backend.close()
    return status
