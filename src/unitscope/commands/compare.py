"""`unitscope compare RUN`: one table of every dictionary in a run, printed, saved as Parquet and plotted."""

from __future__ import annotations

import argparse
from pathlib import Path


def add_parser(sub) -> None:
    p = sub.add_parser("compare", help="compare every dictionary of a run: a table and a plot of FVU against L0")
    p.add_argument("run", help="run directory (runs/NAME)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    print_compare(Path(args.run))
    return 0


def print_compare(root: Path) -> dict[str, str]:
    """Read, write and print the run's comparison; returns what was written (relative to the run)."""
    from ..compare import compare_run, format_table, write_compare

    rows = compare_run(root)
    table, plot = write_compare(root, rows)
    sites = sorted({str(r["site"]) for r in rows if r.get("site")})
    print(f"{len(rows)} dictionar{'y' if len(rows) == 1 else 'ies'} in {root} (site {', '.join(sites) or '-'})")
    print(format_table(rows))
    print("CE rec: CE loss recovered against zero ablation at every position (SAELens/SAEBench). unique / unique E: "
          "fraction of codes whose active directions meet the uniqueness condition mu < 1/(2K-1), whitened (the "
          "Atoms paper's inner product) / Euclidean. label F1: mean over units of their concept labels' F1.")
    print(f"table: {table}" + (f"\nplot: {plot}" if plot else ""))
    return {"table": table.name, **({"plot": plot.name} if plot else {})}
