"""run.json holds every option, each beside the stage it belongs to, and never calls work done that was not."""

import json

import pytest

from unitscope import UnitscopeError
from unitscope.cli import build_parser
from unitscope.commands.options import train_configs
from unitscope.commands.run import run_config
from unitscope.runs import STAGE_OPTIONS, STAGES, Run

NOT_OPTIONS = {"help", "quiet", "name", "runs_dir", "out", "overwrite", "func", "command"}  # where, not how


def _config(**changes):
    flags = [x for k, v in changes.items() for x in (f"--{k}", *(map(str, v) if isinstance(v, list) else [str(v)]))]
    args = build_parser().parse_args(["run", *flags])
    return run_config(args, train_configs(args), args.site or ["blocks.6.resid_post"])


def test_every_option_of_run_is_recorded_and_owned_by_a_stage():
    """Introspects the parser: a new option that run.json forgets fails here."""
    parser = build_parser()
    run_parser = parser._subparsers._group_actions[0].choices["run"]
    dests = {a.dest for a in run_parser._actions} - NOT_OPTIONS
    config = _config()
    missing = {d for d in dests if d not in config}
    assert not missing, f"options missing from run.json: {missing}"
    owned = {k for opts in STAGE_OPTIONS.values() for k in opts}
    assert set(config) <= owned
    for flag, value in (("top", 7), ("shard-tokens", 999), ("record-batch-size", 3), ("checkpoint-every", 9),
                        ("resample-every", 4), ("eval-batch-size", 5), ("train-device", "cpu")):
        assert _config(**{flag: value})[flag.replace("-", "_")] == value


def _stages(run, calls, fail_at=None, fresh=None):
    for name in STAGES:
        def fn(name=name):
            if fresh is not None:
                fresh[name] = run.fresh
            if name == fail_at:
                raise KeyboardInterrupt  # a kill in the middle of this stage
            calls.append(name)
        run.stage(name, fn, log=lambda _m: None)


def test_changing_an_option_of_a_finished_stage_is_refused_unless_that_stage_is_redone(tmp_path):
    calls = []
    _stages(Run(tmp_path, _config(), []), calls)
    before = (tmp_path / "run.json").read_text()
    # --top belongs to explain: redoing only the report would leave explain made with the old value
    with pytest.raises(UnitscopeError, match=r"--top was 20, now 30 \(explain stage\).*--overwrite explain"):
        Run(tmp_path, _config(top=30), ["report"])
    # --tokens belongs to record: --overwrite eval does not redo it
    with pytest.raises(UnitscopeError, match=r"--tokens was 200000, now 1000 \(record stage\).*--overwrite record"):
        Run(tmp_path, _config(tokens=1000), ["eval"])
    with pytest.raises(UnitscopeError, match="--shard-tokens"):
        Run(tmp_path, _config(**{"shard-tokens": 1024}), [])
    assert (tmp_path / "run.json").read_text() == before  # a refusal writes nothing
    calls.clear()
    _stages(Run(tmp_path, _config(top=30), ["explain"]), calls)
    assert calls == ["explain", "compare", "report"]
    state = json.loads((tmp_path / "run.json").read_text())
    assert state["config"]["top"] == 30 and state["stages"]["explain"]["options"] == {"top": 30}
    assert state["stages"]["record"]["options"]["tokens"] == 200000


def test_a_stage_killed_while_redone_leaves_the_later_ones_stale_not_done(tmp_path):
    calls = []
    _stages(Run(tmp_path, _config(), []), calls)
    fresh = {}
    with pytest.raises(KeyboardInterrupt):
        _stages(Run(tmp_path, _config(units=256), ["train"]), [], fail_at="train", fresh=fresh)
    assert fresh == {"train": True}  # a redone stage starts from nothing
    state = json.loads((tmp_path / "run.json").read_text())
    assert state["stages"]["train"]["status"] == "running"
    assert {state["stages"][s]["status"] for s in ("eval", "explain", "compare", "report")} == {"stale"}
    # rerun without --overwrite: train resumes and every stage after it is redone, none skipped as "done"
    calls.clear()
    _stages(Run(tmp_path, _config(units=256), []), calls, fresh=fresh)
    assert calls == ["train", "eval", "explain", "compare", "report"]
    # the interrupted train resumes (its checkpoint); the stale stages after it start from nothing
    assert fresh == {"train": False, "eval": True, "explain": True, "compare": True, "report": True}
    state = json.loads((tmp_path / "run.json").read_text())
    assert all(state["stages"][s]["status"] == "done" for s in STAGES)
    assert state["stages"]["train"]["options"]["units"] == 256


def test_unknown_stage_and_corrupt_run_json(tmp_path):
    with pytest.raises(UnitscopeError, match="unknown stage 'trian'"):
        Run(tmp_path, _config(), ["trian"])
    (tmp_path / "run.json").write_text('{"config": ')
    with pytest.raises(UnitscopeError, match="is corrupt"):
        Run(tmp_path, _config(), [])


def _items_stage(run, keys, done, fail_after=None):
    """An eval-like stage over several dictionaries: each key is one item; a kill may follow any item."""
    def fn():
        for i, key in enumerate(keys):
            run.item(key, lambda key=key: done.append(key) or {"key": key})
            if fail_after is not None and i == fail_after:
                raise KeyboardInterrupt
    return fn


def test_a_stage_of_several_items_resumes_after_the_last_finished_one(tmp_path):
    keys = ["topk-64-k4", "pca-32", "neurons-64"]
    run = Run(tmp_path, _config(), [])
    for name in STAGES[:2]:
        run.stage(name, lambda: None, log=lambda _m: None)
    done = []
    with pytest.raises(KeyboardInterrupt):  # killed after the second dictionary's evaluation
        run.stage("eval", _items_stage(run, keys, done, fail_after=1), log=lambda _m: None)
    assert done == keys[:2]
    # rerun: the two finished items are skipped, the third is done, and run.json lists all three
    done.clear()
    run = Run(tmp_path, _config(), [])
    assert run.stage("eval", _items_stage(run, keys, done), log=lambda _m: None)
    assert done == keys[2:]
    state = json.loads((tmp_path / "run.json").read_text())
    assert state["stages"]["eval"]["status"] == "done" and list(state["stages"]["eval"]["items"]) == keys
    # an interrupted attempt with other options keeps nothing: its items were made with the old values
    with pytest.raises(KeyboardInterrupt):
        run = Run(tmp_path, _config(**{"eval-tokens": 512}), ["eval"])
        run.stage("eval", _items_stage(run, keys, [], fail_after=1), log=lambda _m: None)
    done.clear()
    run = Run(tmp_path, _config(**{"eval-tokens": 1024}), [])
    run.stage("eval", _items_stage(run, keys, done), log=lambda _m: None)
    assert done == keys
    # --overwrite redoes every item, even those of a finished stage
    done.clear()
    run = Run(tmp_path, _config(**{"eval-tokens": 1024}), ["eval"])
    run.stage("eval", _items_stage(run, keys, done), log=lambda _m: None)
    assert done == keys


def test_run_records_several_kinds_and_refuses_a_changed_list(tmp_path):
    several = _config(architecture=["topk", "pca"])
    assert several["architecture"] == ["topk", "pca"] and _config()["architecture"] == "topk"
    Run(tmp_path, several, []).stage("record", lambda: None, log=lambda _m: None)
    run = Run(tmp_path, several, [])
    run.stage("train", lambda: None, log=lambda _m: None)
    with pytest.raises(UnitscopeError, match=r"--architecture was \['topk', 'pca'\], now \['topk', 'snmf'\]"):
        Run(tmp_path, _config(architecture=["topk", "snmf"]), [])


def test_the_dictionaries_a_run_makes_from_several_kinds():
    from unitscope.commands.run import dictionary_plan, run_configs

    def plan(*argv, width=64):
        args = build_parser().parse_args(["run", *argv])
        return [did for _, did in dictionary_plan(run_configs(args), width)]

    # neurons: one unit per coordinate of the site; PCA: at most that many; KIND:UNITS overrides --units
    assert plan("--architecture", "topk", "pca", "neurons", "snmf:16", "--units", "128", "--k", "4") == \
        ["topk-128-k4", "pca-64", "neurons-64", "snmf-16"]
    assert plan("--architecture", "pca", "neurons", "--units", "16", "32") == ["pca-16", "pca-32", "neurons-64"]
    assert plan("--architecture", "topk:64", "batchtopk", "--units", "256", "--k", "8", "16") == \
        ["topk-64-k8", "topk-64-k16", "batchtopk-256-k8", "batchtopk-256-k16"]
    # kinds whose sparsity is a target L0 also sweep k and name it, so a sweep never writes twice into one folder
    assert plan("--architecture", "standard", "jumprelu", "pca", "--units", "128", "--k", "4", "8") == \
        ["standard-128-k4", "standard-128-k8", "jumprelu-128-k4", "jumprelu-128-k8", "pca-64"]
    with pytest.raises(UnitscopeError, match="'snmf:0'.*positive whole number"):
        plan("--architecture", "snmf:0")
    with pytest.raises(UnitscopeError, match="k=32 is not valid for 16 units"):
        plan("--architecture", "topk:16")
    with pytest.raises(UnitscopeError, match="unknown architecture 'nmf'"):
        plan("--architecture", "nmf:16")


def test_run_gives_each_kind_its_own_options_and_refuses_one_no_kind_of_the_run_takes():
    from unitscope.commands.run import run_configs

    def configs(*argv):
        args = build_parser().parse_args(["run", *argv])
        return {c.architecture: c for c in run_configs(args)}, run_config(args, list(run_configs(args)),
                                                                            ["blocks.6.resid_post"])

    cfgs, recorded = configs("--architecture", "topk", "jumprelu", "snmf:16", "--units", "64", "--k", "4",
                             "--jumprelu-bandwidth", "0.1", "--aux-k", "7", "--snmf-wta", "0")
    assert cfgs["jumprelu"].extra["bandwidth"] == 0.1 and "bandwidth" not in cfgs["topk"].extra
    assert cfgs["topk"].extra["aux_k"] == 7
    assert recorded["jumprelu_bandwidth"] == 0.1 and recorded["aux_k"] == 7 and recorded["snmf_wta"] == 0
    with pytest.raises(UnitscopeError, match="--jumprelu-bandwidth applies to jumprelu, not to pca, topk"):
        configs("--architecture", "topk", "pca", "--jumprelu-bandwidth", "0.1")
    with pytest.raises(UnitscopeError, match="--snmf-wta applies to snmf, not to topk"):
        configs("--architecture", "topk", "--snmf-wta", "0.5")
