"""`unitscope report RUN`: the static feature browser of a run directory (RUN/report/index.html)."""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UnitscopeError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write the static feature browser of a run")
    p.add_argument("run", help="run directory (runs/NAME)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..report import report_run
    from ..report.site import read_state

    root = Path(args.run)
    from ..report.dissection import is_dissection_dir, write_dissection_page

    if is_dissection_dir(root):  # the output of `unitscope dissect --out`: its own page
        print(f"report: {write_dissection_page(root).resolve()}")
        return 0
    stages = read_state(root)["stages"]
    for stage in ("eval", "explain"):
        status = stages.get(stage, {}).get("status")
        if status in ("stale", "running"):
            raise UnitscopeError(f"the {stage} stage of run {str(root)!r} is {status} (an earlier stage was redone or "
                                 "it was interrupted); finish the run with `unitscope run` first")
    print(f"report: {report_run(root).resolve()}")
    return 0

