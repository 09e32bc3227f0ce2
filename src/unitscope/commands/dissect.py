"""`unitscope dissect`: network dissection of a conv layer over a dataset folder, or `--demo` on the drawn scenes."""

from __future__ import annotations

import argparse
import json

from ..errors import UnitscopeError
from . import options


def add_parser(sub) -> None:
    p = sub.add_parser("dissect", help="network dissection: which units of a conv layer detect which concepts (IoU)")
    p.add_argument("--model", default=None, help="FILE.py:FUNCTION (returns an nn.Module), or torchvision:NAME@WEIGHTS "
                   "/ timm:NAME@WEIGHTS with a local weights file")
    p.add_argument("--layer", default=None, help="raw site 'module.path:output' (or :input) with (B, C, H, W) maps")
    p.add_argument("--data", default=None, help="dataset folder: images/NAME.png, masks/NAME.png, concepts.json")
    p.add_argument("--dictionary", default=None,
                   help="dissect this dictionary's units (trained on the layer's spatial rows) instead of channels")
    p.add_argument("--quantile", type=options.positive_float, default=0.005, help="top quantile of activations")
    p.add_argument("--batch-size", type=options.positive_int, default=16)
    p.add_argument("--maps", type=options.non_negative_int, default=6, help="draw each unit's thresholded map over "
                   "the N images where it peaks (OUT/maps/, shown on the page; 0: none)")
    p.add_argument("--demo", action="store_true", help="draw scenes, train (or reuse) the small classifier, dissect it")
    p.add_argument("--gan-demo", action="store_true", help="GAN dissection on the scenes: a generator and a segmenter "
                   "trained (or reused), units found per concept, ablated and inserted (gan_dissection.json, PNGs)")
    p.add_argument("--keep", type=options.non_negative_float,
                   default=0.0, help="--gan-demo: weight of the search's term keeping the other concepts (0: Bau "
                   "et al.'s objective, which removes concepts that share units with the searched one)")
    p.add_argument("--out", required=True, help="output directory (dissection.parquet, dissection.json)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    import torch

    torch.set_num_threads(max(1, min(torch.get_num_threads(), 4)))
    if args.gan_demo:
        from ..dissect.gan_demo import run_gan_demo, summary_table

        print(summary_table(run_gan_demo(args.out, keep=args.keep, progress=True)))
        print(f"written: {args.out}/gan_dissection.json and before/after PNGs; page: {_page(args.out)}")
        return 0
    if args.demo:
        from ..dissect.demo import run_demo

        summary = run_demo(args.out)
        print(json.dumps(summary, indent=1))
        print(f"written: {args.out}/neurons/dissection.parquet, {args.out}/sae/dissection.parquet, "
              f"{args.out}/summary.json; page: {_page(args.out)}")
        return 0
    missing = [f"--{n}" for n in ("model", "layer", "data") if getattr(args, n) is None]
    if missing:
        raise UnitscopeError(f"dissect needs {', '.join(missing)} (or --demo)")
    from ..dictionaries.base import load_dictionary
    from ..dissect.maps import write_unit_maps
    from ..dissect.network import dissect, write_dissection
    from ..modules import is_module_spec
    from ..subject import load_subject
    from ..vision.images import open_dataset

    if not is_module_spec(args.model):
        raise UnitscopeError(f"dissect takes --model FILE.py:FUNCTION or torchvision:NAME@WEIGHTS / "
                             f"timm:NAME@WEIGHTS, not {args.model!r}")
    dataset = open_dataset(args.data)
    model = load_subject(args.model).model
    dictionary = load_dictionary(args.dictionary) if args.dictionary else None
    result = dissect(model, args.layer, dataset, dictionary=dictionary, quantile=args.quantile,
                     batch_size=args.batch_size, map_images=args.maps)
    path = write_dissection(args.out, result)
    write_unit_maps(model, args.layer, dataset, result, args.out, dictionary=dictionary, batch_size=args.batch_size)
    s = result.summary
    print(f"{s['units']} units at {s['layer']}: {s['detectors']} detectors (best IoU > {s['detector_iou']}), "
          f"{s['unique_concepts']} unique concepts {s['detectors_by_concept']}")
    print(f"table: {path}; page: {_page(args.out)}")
    return 0


def _page(out: str) -> str:
    """OUT/report/index.html, the page `unitscope report OUT` also writes."""
    from ..report.dissection import write_dissection_page

    return str(write_dissection_page(out))
