"""`unitscope sites MODEL`: every canonical site with its activation shape, from a dry run."""

from __future__ import annotations

import argparse

from . import options


def add_parser(sub) -> None:
    p = sub.add_parser("sites", help="print every site of a model with its activation shape")
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--dtype", type=options.dtype, default="float32")
    p.add_argument("--device", type=options.device, default="cpu")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..subject import load_subject

    subject = load_subject(args.model, dtype=args.dtype, device=args.device)
    shapes = subject.site_shapes()
    if not shapes:
        print("no canonical sites for this model; address modules by raw path, e.g. 'features.3:output':")
        for name, mod in subject.model.named_modules():
            if name:
                print(f"  {name}  ({type(mod).__name__})")
        return 0
    width = max(len(s) for s in shapes)
    for name, shape in shapes.items():
        print(f"{name:<{width}}  {list(shape)}")
    return 0
