"""`unitscope report RUN`: the static feature browser of a run directory."""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from ..errors import UnitscopeError


def add_parser(sub) -> None:
    p = sub.add_parser("report", help="write the static feature browser of a run")
    p.add_argument("run", help="run directory (runs/NAME)")
    p.set_defaults(func=run)


def run(args: argparse.Namespace) -> int:
    from ..compare import for_report
    from ..report import write_report

    root = Path(args.run)
    state_path = root / "run.json"
    if not state_path.is_file():
        raise UnitscopeError(f"{str(root)!r} is not a run directory: it has no run.json")
    # one report per dictionary; hidden folders are a writer's temporary or previous copies
    explain = sorted(p.parent for p in (root / "explain").glob("*/units.parquet") if not p.parent.name.startswith("."))
    if not explain:
        raise UnitscopeError(f"run {str(root)!r} has no explanation tables yet; run `unitscope explain` first")
    try:
        state = json.loads(state_path.read_text())
        cfg, stages = state["config"], state["stages"]
    except (json.JSONDecodeError, KeyError, TypeError):
        raise UnitscopeError(f"{str(state_path)!r} is corrupt; rerun `unitscope run` with --overwrite all") from None
    for stage in ("eval", "explain"):
        status = stages.get(stage, {}).get("status")
        if status in ("stale", "running"):
            raise UnitscopeError(f"the {stage} stage of run {str(root)!r} is {status} (an earlier stage was redone or "
                                 "it was interrupted); finish the run with `unitscope run` first")
    model = cfg.get("model")
    if (root / "store" / "store.json").is_file():
        model = json.loads((root / "store" / "store.json").read_text()).get("model", model)
    index, comparison = None, for_report(root)  # the run's comparison table and plot, on every dictionary's page
    for e in explain:
        index = write_report(root / "report" / e.name, e, report_title(e.name, model, cfg.get("site")),
                             eval_json=root / "evals" / e.name / "core.json",
                             info={"model": model, "site": cfg.get("site"), "run": str(root)}, **comparison)
    print(f"report: {index}")
    return 0


def report_title(dictionary_id: str, model: str | None, site: str | None) -> str:
    return f"{dictionary_id} · {model or ''} · {site or ''}"
