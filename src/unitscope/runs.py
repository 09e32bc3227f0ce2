"""Run directory: stages with provenance in run.json, skip-if-done, overwrite a stage and what follows.

Layout: runs/NAME/run.json, store/, dictionaries/ID/, evals/ID/core.json, explain/ID/*.parquet, report/.
"""

from __future__ import annotations

import json
import shutil
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .errors import UnitscopeError
from .store import write_json_atomic
from .versions import versions

STAGES = ("record", "train", "eval", "explain", "report")


class Run:
    """A run directory whose stages each write their own folder and are recorded in run.json."""

    def __init__(self, root: str | Path, config: dict[str, Any], overwrite: list[str] | None = None):
        self.root = Path(root)
        self.path = self.root / "run.json"
        overwrite = list(overwrite or [])
        for s in overwrite:
            if s not in (*STAGES, "all"):
                raise UnitscopeError(f"unknown stage {s!r} for --overwrite; valid stages are {', '.join(STAGES)}, all")
        first = min((STAGES.index(s) for s in overwrite if s in STAGES), default=None)
        if "all" in overwrite:
            first = 0
        self.redo = set(STAGES[first:]) if first is not None else set()
        if self.path.is_file():
            try:
                self.state = json.loads(self.path.read_text())
            except json.JSONDecodeError:
                raise UnitscopeError(f"{str(self.path)!r} is corrupt; remove it or choose another run name") from None
            old = self.state.get("config", {})
            changed = sorted(k for k in set(old) | set(config) if old.get(k) != config.get(k))
            if changed and first is None:
                raise UnitscopeError(
                    f"run {str(self.root)!r} was made with other options ({', '.join(changed)} differ); choose "
                    "another --name, or pass --overwrite all (or the first stage to redo)"
                )
            self.state["config"] = config
        else:
            self.state = {"config": config, "versions": versions(), "stages": {}}
        self.root.mkdir(parents=True, exist_ok=True)
        self.save()

    def save(self) -> None:
        write_json_atomic(self.path, self.state)

    def done(self, stage: str) -> bool:
        return self.state["stages"].get(stage, {}).get("status") == "done" and stage not in self.redo

    def stage(self, name: str, fn: Callable[[], dict[str, Any] | None], clear: list[Path] | None = None,
              log: Callable[[str], None] = print) -> bool:
        """Run `fn` unless the stage is already done; returns whether it ran."""
        if self.done(name):
            log(f"[{name}] already done, skipping (use --overwrite {name} to redo)")
            return False
        if name in self.redo:
            for p in clear or []:
                shutil.rmtree(p, ignore_errors=True)
        log(f"[{name}] running")
        self.state["stages"][name] = {"status": "running", "started": time.time()}
        self.save()
        t0 = time.perf_counter()
        outputs = fn() or {}
        self.state["stages"][name] = {"status": "done", "seconds": round(time.perf_counter() - t0, 2),
                                      "finished": time.time(), **outputs}
        self.redo.discard(name)
        self.save()
        return True
