"""`unitscope export RUN --format neuronpedia|saedashboard --out DIR`: a run's explanations for other viewers."""

from __future__ import annotations

import argparse

from ..report.export import FORMATS


def add_parser(sub) -> None:
    p = sub.add_parser("export", help="export a run's units for Neuronpedia's bulk upload or as SAEDashboard JSON")
    p.add_argument("run", help="run directory (runs/NAME) with explanation tables")
    p.add_argument("--format", required=True, choices=FORMATS, help="neuronpedia (batch-N.json + run_settings.json "
                   "per dictionary) or saedashboard (features/U.json per dictionary)")
    p.add_argument("--out", required=True, help="output directory (replaced whole)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report.export import export_run

    for folder in export_run(args.run, args.format, args.out):
        print(f"export: {folder.resolve()}")
    return 0
