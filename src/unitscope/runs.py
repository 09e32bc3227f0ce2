"""Run directory: stages with provenance in run.json, skip-if-done, overwrite a stage and what follows.

Layout: runs/NAME/run.json, store/, dictionaries/ID/, evals/ID/core.json, explain/ID/*.parquet, compare.parquet,
compare.png, report/ID/ (one ID per dictionary; a run may make several).

Every option belongs to the earliest stage whose result it can change (STAGE_OPTIONS). A finished stage records
the options it ran with; rerunning with a different value for an option of a finished stage is refused unless
`--overwrite` redoes that stage (and, as always, every stage after it). Starting a stage marks the stages after
it stale, so run.json never calls a result done that was computed from inputs that have since changed.
A stage that works through several items (one per dictionary) records each finished item (`Run.item`): rerun
after a kill, it skips those and does the rest, unless the stage is redone, stale, or its options changed.
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

STAGES = ("record", "train", "eval", "explain", "compare", "report")
STAGE_OPTIONS: dict[str, tuple[str, ...]] = {
    "record": ("model", "dtype", "device", "site", "sites", "corpus", "field", "tokens", "ctx_len", "shard_tokens",
               "record_batch_size"),
    "train": ("architecture", "units", "k", "lr", "batch_size", "train_tokens", "seed", "compute_dtype",
              "train_device", "checkpoint_every", "resample_every", "log_to", "l1_coefficient", "l0_coefficient",
              "jumprelu_bandwidth", "matryoshka_prefixes", "aux_k", "aux_coefficient", "dead_tokens", "snmf_wta",
              "snmf_code_units"),
    "eval": ("eval_tokens", "eval_batch_size"),
    "explain": ("top",),
    "compare": (),
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
        self._current: str | None = None  # the stage now running, for item()
        self._log: Callable[[str], None] = print
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
        options = {k: self.state["config"].get(k) for k in STAGE_OPTIONS[name]}
        previous = self.state["stages"].get(name, {})
        # items an interrupted attempt finished are kept only if it ran with these same options
        kept = (previous.get("items") or {}) if (not self.fresh and previous.get("status") == "running"
                                                 and previous.get("options") == options) else {}
        self.state["stages"][name] = {"status": "running", "started": time.time(), "options": options,
                                      "items": kept}
        self._current, self._log = name, log
        for later in STAGES[STAGES.index(name) + 1:]:
            if later in self.state["stages"]:
                self.state["stages"][later] = {"status": "stale", "reason": f"{name} is being redone"}
        self.save()
        t0 = time.perf_counter()
        try:
            outputs = fn() or {}
        finally:
            self._current = None
        items = self.state["stages"][name].get("items") or {}
        self.state["stages"][name] = {"status": "done", "seconds": round(time.perf_counter() - t0, 2),
                                      "finished": time.time(), "options": options, **outputs,
                                      **({"items": items} if items else {})}
        self.redo.discard(name)
        self.save()
        return True

    def item(self, key: str, fn: Callable[[], dict[str, Any] | None]) -> dict[str, Any]:
        """Inside a running stage: run `fn` for one item (e.g. one dictionary) unless this attempt of the stage,
        or an interrupted one with the same options, already finished it; its outputs are saved in run.json."""
        name = self._current
        if name is None:
            raise RuntimeError("Run.item is called only from inside Run.stage")
        items = self.state["stages"][name]["items"]
        if key in items:
            self._log(f"[{name}] {key} already done, skipping")
            return items[key]
        out = fn() or {}
        items[key] = out
        self.save()
        return out
