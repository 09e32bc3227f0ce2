"""`unitscope steer`: baseline and steered generations with a unit's direction added at alpha, or at the alpha that
hits a target next-token KL on a neutral prompt; everything needed to reproduce it goes into one JSON file."""

from __future__ import annotations

import argparse
import json
import math
from pathlib import Path

from ..errors import UnitscopeError
from . import inputs, options


def finite_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not math.isfinite(value):
        raise argparse.ArgumentTypeError(f"{text!r} is not a finite number")
    return value


def add_parser(sub) -> None:
    p = sub.add_parser("steer", help="generate with a unit (or direction) added at alpha, or at a target KL")
    p.add_argument("--dictionary", default=None, help="dictionary directory (its metadata names model and site)")
    p.add_argument("--unit", type=options.non_negative_int, default=None, help="unit index to steer with")
    p.add_argument("--direction", default=None,
                   help="steer with this direction instead of a unit: a .json list of numbers or a .safetensors file "
                        "with one tensor (added at the dictionary's output site, or at --site)")
    p.add_argument("--site", default=None, help="site to add --direction at, when no dictionary names it")
    how = p.add_mutually_exclusive_group(required=True)
    how.add_argument("--alpha", type=finite_float, help="strength: alpha times the unit-norm direction is added")
    how.add_argument("--kl", type=options.positive_float,
                     help="find alpha so that the next-token KL on the neutral prompt is this (e.g. 0.025 ... 0.5)")
    p.add_argument("--sign", choices=("positive", "negative"), default="positive", help="sign of alpha with --kl")
    p.add_argument("--prompt", required=True, help="text to continue")
    p.add_argument("--neutral-prompt", default=None, help="prompt on which --kl is measured (default 'I think that')")
    p.add_argument("--positions", default="all",
                   help="tokens to steer: all, prompt, generated, or comma-separated token indices")
    p.add_argument("--n", type=options.positive_int, default=4, help="generations, baseline and steered each")
    p.add_argument("--max-new-tokens", type=options.positive_int, default=40)
    p.add_argument("--temperature", type=options.positive_float, default=1.0)
    p.add_argument("--seed", type=options.non_negative_int, default=0)
    p.add_argument("--out", required=True, help="JSON file to write")
    options.add_model(p, default=None, what="the dictionary's model")
    p.set_defaults(func=run)


def parse_positions(text: str):
    from ..causal.interventions import KINDS, Positions

    if text in KINDS and text != "indices":
        return Positions(text)
    try:
        return Positions("indices", tuple(int(t) for t in text.split(",")))
    except ValueError:
        raise UnitscopeError(f"--positions {text!r} is not all, prompt, generated or comma-separated token "
                             "indices such as 0,3,4") from None


def read_direction(path: str):
    """A direction vector from a .json list of numbers or a one-tensor .safetensors file."""
    p = Path(path)
    if not p.is_file():
        raise UnitscopeError(f"direction file {path!r} does not exist")
    if p.suffix == ".safetensors":
        from safetensors.torch import load_file

        try:
            tensors = load_file(str(p))
        except Exception as e:  # noqa: BLE001 - safetensors raises its own error type
            raise UnitscopeError(f"{path!r} is not a readable safetensors file ({e})") from None
        if len(tensors) != 1:
            raise UnitscopeError(f"{path!r} holds {len(tensors)} tensors ({', '.join(tensors)}); a direction file "
                                 "holds exactly one")
        return next(iter(tensors.values())).reshape(-1)
    try:
        return json.loads(p.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError):
        raise UnitscopeError(f"direction file {path!r} is neither .safetensors nor a JSON list of numbers") from None


def run(args: argparse.Namespace) -> int:
    from ..atomic import write_json_atomic
    from ..causal.steer import NEUTRAL_PROMPT, steer
    from ..dictionaries import load_dictionary
    from ..subject import load_subject

    out = options.output_file(args.out)
    positions = parse_positions(args.positions)
    if args.direction is None and (args.dictionary is None or args.unit is None):
        raise UnitscopeError("give --dictionary and --unit, or --direction (with --dictionary or --site)")
    if args.direction is not None and args.unit is not None:
        raise UnitscopeError("give --unit or --direction, not both")
    direction = read_direction(args.direction) if args.direction is not None else None
    d = load_dictionary(args.dictionary) if args.dictionary is not None else None
    if d is not None and args.unit is not None and args.unit >= d.n_units:
        raise UnitscopeError(f"unit {args.unit} is out of range: this {d.architecture} dictionary has {d.n_units} "
                             f"units (valid units are 0 to {d.n_units - 1})")
    if d is not None:
        subject = inputs.subject_for_dictionary(args, d)
    else:
        if args.site is None:
            raise UnitscopeError("--direction without --dictionary needs --site")
        subject = load_subject(args.model or "default", dtype=args.dtype or "float32", device=args.device)
    result = steer(subject, args.prompt, dictionary=d, unit=args.unit, direction=direction, site=args.site,
                   alpha=args.alpha, kl=args.kl, sign=-1 if args.sign == "negative" else 1, n=args.n,
                   max_new_tokens=args.max_new_tokens, seed=args.seed, temperature=args.temperature,
                   neutral_prompt=args.neutral_prompt or NEUTRAL_PROMPT, positions=positions)
    result["dictionary_path"] = str(Path(args.dictionary).resolve()) if args.dictionary else None
    result["direction_file"] = str(Path(args.direction).resolve()) if args.direction else None
    write_json_atomic(out, result)
    what = f"unit {args.unit}" if args.unit is not None else "the direction"
    print(f"{what} at {result['site']}: alpha {result['alpha']:.4g}, next-token KL {result['kl']:.4g} on "
          f"{result['neutral_prompt']!r}")
    for base, steered in zip(result["baseline"], result["steered"]):
        print(f"  baseline: {base!r}\n  steered:  {steered!r}")
    print(f"wrote {out}")
    return 0
