"""Run directory: stages with provenance in run.json, skip-if-done, overwrite a stage and what follows.

Layout: runs/NAME/run.json, store/, dictionaries/ID/, evals/ID/core.json, explain/ID/*.parquet, report/.

Every option belongs to the earliest stage whose result it can change (STAGE_OPTIONS). A finished stage records
the options it ran with; rerunning with a different value for an option of a finished stage is refused unless
`--overwrite` redoes that stage (and, as always, every stage after it). Starting a stage marks the stages after
it stale, so run.json never calls a result done that was computed from inputs that have since changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

from .atomic import write_json_atomic
from .errors import UnitscopeError
from .versions import versions

STAGES = ("record", "train", "eval", "explain", "report")
STAGE_OPTIONS: dict[str, tuple[str, ...]] = {
    "record": ("model", "dtype", "device", "site", "sites", "corpus", "field", "tokens", "ctx_len", "shard_tokens",
               "record_batch_size"),
    "train": ("architecture", "units", "k", "lr", "batch_size", "train_tokens", "seed", "compute_dtype",
              "train_device", "checkpoint_every", "resample_every", "log_to"),
    "eval": ("eval_tokens", "eval_batch_size"),
    "explain": ("top",),
    "report": (),
}


def stage_of(option: str) -> str:
    for stage, opts in STAGE_OPTIONS.items():
        if option in opts:
            return stage
    raise ValueError(f"option {option!r} belongs to no stage; add it to STAGE_OPTIONS")


def _flag(option: str) -> str:
    return "--" + option.replace("_", "-")


class Run:
    """A run directory whose stages each write their own folder and are recorded in run.json."""

    def __init__(self, root: str | Path, config: dict[str, Any], overwrite: list[str] | None = None):
        self.root = Path(root)
        self.path = self.root / "run.json"
        for key in config:
            stage_of(key)  # every option is owned by a stage
        overwrite = list(overwrite or [])
        for s in overwrite:
            if s not in (*STAGES, "all"):
                raise UnitscopeError(f"unknown stage {s!r} for --overwrite; valid stages are {', '.join(STAGES)}, all")
        first = min((STAGES.index(s) for s in overwrite if s in STAGES), default=None)
        if "all" in overwrite:
            first = 0
        self.redo = set(STAGES[first:]) if first is not None else set()
        self.fresh = False
        if self.root.exists() and not self.root.is_dir():
            raise UnitscopeError(f"run directory {str(self.root)!r} is an existing file; choose another --name")
        if self.path.is_file():
            try:
                self.state = json.loads(self.path.read_text())
                self.state["stages"], self.state["config"]  # noqa: B018 - the fields every run.json has
            except (json.JSONDecodeError, KeyError, TypeError):
                raise UnitscopeError(f"{str(self.path)!r} is corrupt; remove it or choose another run name") from None
            self._refuse_changes_to_finished_stages(config)
            self.state["config"] = config
            self.state["versions"] = versions()
        else:
            self.state = {"config": config, "versions": versions(), "stages": {}}
        self.root.mkdir(parents=True, exist_ok=True)
        self.save()

    def _refuse_changes_to_finished_stages(self, config: dict[str, Any]) -> None:
        old = self.state.get("config", {})
        changed = []
        for stage in STAGES:
            entry = self.state["stages"].get(stage, {})
            if entry.get("status") != "done" or stage in self.redo:
                continue
            ran_with = entry.get("options") or {k: old.get(k) for k in STAGE_OPTIONS[stage]}
            changed += [(stage, k, ran_with.get(k), config.get(k)) for k in STAGE_OPTIONS[stage]
                        if ran_with.get(k) != config.get(k)]
        if changed:
            first = min(changed, key=lambda c: STAGES.index(c[0]))[0]
            what = "; ".join(f"{_flag(k)} was {a!r}, now {b!r} ({s} stage)" for s, k, a, b in changed)
            raise UnitscopeError(
                f"run {str(self.root)!r} was made with other options for stages that are done ({what}); pass "
                f"--overwrite {first} to redo from there, or choose another --name")

    def save(self) -> None:
        write_json_atomic(self.path, self.state)

    def status(self, stage: str) -> str | None:
        return self.state["stages"].get(stage, {}).get("status")

    def done(self, stage: str) -> bool:
        return self.status(stage) == "done" and stage not in self.redo

    def stage(self, name: str, fn: Callable[[], dict[str, Any] | None], log: Callable[[str], None] = print) -> bool:
        """Run `fn` unless the stage is already done; returns whether it ran.

        While `fn` runs, `self.fresh` says whether the stage must start from nothing (it is redone, or stale)
        rather than resume an interrupted attempt. Nothing is deleted beforehand: every stage's writer replaces
        its output whole, so the old copy stays valid until the new one is complete."""
        if self.done(name):
            log(f"[{name}] already done, skipping (use --overwrite {name} to redo)")
            return False
        self.fresh = name in self.redo or self.status(name) == "stale"
        log(f"[{name}] running")
        self.state["stages"][name] = {"status": "running", "started": time.time()}
        for later in STAGES[STAGES.index(name) + 1:]:
            if later in self.state["stages"]:
                self.state["stages"][later] = {"status": "stale", "reason": f"{name} is being redone"}
        self.save()
        t0 = time.perf_counter()
        outputs = fn() or {}
        options = {k: self.state["config"].get(k) for k in STAGE_OPTIONS[name]}
        self.state["stages"][name] = {"status": "done", "seconds": round(time.perf_counter() - t0, 2),
                                      "finished": time.time(), "options": options, **outputs}
        self.redo.discard(name)
        self.save()
        return True
