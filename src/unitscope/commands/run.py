"""`unitscope run`: every stage, record -> train -> eval -> explain -> compare -> report, in one run directory.

Stages already done are skipped; `--overwrite STAGE` redoes it and the stages after it. Every option is written
to run.json beside the stage it belongs to (see runs.py). Several --architecture (and --units, --k) values make
several dictionaries from the one store: SAE kinds train together on one read of it, fitted kinds (neurons, PCA,
k-means, semi-NMF) are fitted after, and each later stage covers every dictionary, one item each in run.json.
"""

from __future__ import annotations

import argparse
import shutil
from dataclasses import replace
from pathlib import Path
from typing import Any

from ..errors import UnitscopeError
from . import inputs, options
from .evaluate import print_metrics
from .train import KIND_OPTION_NAMES, add_kind_options, apply_kind_options


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline in one run directory (defaults work offline)")
    p.add_argument("--name", default="default", help="run name (a folder under --runs-dir)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--out", default=None, metavar="URL",
                   help="keep the run on an object store (s3://bucket/run, any fsspec URL) instead of RUNS_DIR/NAME: "
                        "the store is recorded there, the rest is made in a local scratch folder and uploaded after "
                        "each stage (docs/scale.md)")
    p.add_argument("--overwrite", action="append", default=[], help="redo this stage and the ones after it (or 'all')")
    options.add_model(p)
    options.add_record(p, defaults=True)
    options.add_train(p)
    add_kind_options(p)
    p._option_string_actions["--architecture"].help += "; KIND:UNITS gives one kind its own units (e.g. snmf:256)"
    options.add_eval(p)
    p.add_argument("--top", type=options.positive_int, default=20, help="top examples per unit")
    p.set_defaults(func=run)


def _one_or_all(values: list) -> Any:
    """A single value as itself (so a one-kind run.json reads as it always has), several as a list."""
    return values[0] if len(values) == 1 else list(values)


def run_config(args: argparse.Namespace, cfgs: list, sites: list[str]) -> dict:
    """Every option of the run, as run.json records it."""
    cfg = cfgs[0]
    return {"model": args.model, "dtype": args.dtype, "device": args.device, "site": sites[0], "sites": sites,
            "corpus": args.corpus, "field": args.field, "tokens": args.tokens, "ctx_len": args.ctx_len,
            "shard_tokens": args.shard_tokens, "record_batch_size": args.record_batch_size,
            "architecture": _one_or_all(args.architecture), "units": _one_or_all(args.units),
            "k": _one_or_all(args.k), "lr": cfg.lr,
            "batch_size": cfg.batch_size, "train_tokens": cfg.train_tokens, "seed": cfg.seed,
            "compute_dtype": cfg.compute_dtype, "train_device": cfg.device, "checkpoint_every": cfg.checkpoint_every,
            "resample_every": cfg.resample_every, "log_to": cfg.log_to,
            **{name: getattr(args, name, None) for name in KIND_OPTION_NAMES},
            "eval_tokens": args.eval_tokens, "eval_batch_size": args.eval_batch_size, "top": args.top}


def run_configs(args: argparse.Namespace) -> list:
    """options.train_configs, where an --architecture value may name its own units as KIND:UNITS, with each
    kind's own options (--aux-k, --snmf-wta, ...) put into the configs of the kinds that take them.

    One --units rarely suits every kind: `--architecture topk snmf:256 neurons --units 4608` trains a 4608-unit
    TopK SAE and fits a 256-unit semi-NMF (whose cost grows with its units far faster than an SAE's)."""
    kinds, own = [], {}
    for value in args.architecture:
        kind, sep, units = value.partition(":")
        if sep:
            try:
                own.setdefault(kind, []).append(options.positive_int(units))
            except argparse.ArgumentTypeError as e:
                raise UnitscopeError(f"--architecture {value!r}: the units after ':' {e}") from None
        kinds.append(kind)
    cfgs = []
    for cfg in options.train_configs(argparse.Namespace(**{**vars(args), "architecture": list(dict.fromkeys(kinds))})):
        for n in own.get(cfg.architecture, [cfg.n_units]):
            cfg = replace(cfg, n_units=n)
            cfg.validate()
            cfgs.append(cfg)
    apply_kind_options(args, cfgs)
    if not any(c.architecture == "snmf" for c in cfgs):
        from ..dictionaries.fit import fit_options

        fit_options(args, cfgs[0].architecture)  # refuses --snmf-* when the run fits no semi-NMF
    return cfgs


def dictionary_plan(cfgs: list, width: int) -> list[tuple[Any, str]]:
    """Each dictionary the run makes, as (TrainConfig, ID), in the order given.

    Neurons have one unit per coordinate of the site, whatever --units says, and PCA at most that many (a site
    of width d has d principal components), so `--architecture topk pca neurons` works with one --units."""
    plan, seen = [], set()
    for cfg in cfgs:
        if cfg.architecture == "neurons" or (cfg.architecture == "pca" and cfg.n_units > width):
            cfg = replace(cfg, n_units=width)
        did = options.dictionary_id(cfg)
        if did not in seen:
            plan.append((cfg, did))
            seen.add(did)
    return plan


def run(args: argparse.Namespace) -> int:
    from ..atomic import write_json_atomic
    from ..corpus import Corpus
    from ..dictionaries import fit, load_dictionary
    from ..dictionaries.train import Trainer, checkpoint_dir, is_transcoder, train, train_together
    from ..evaluate import evaluate_fidelity
    from ..explain import logit_lens, write_tables
    from ..record import record
    from ..report import report_run
    from ..runs import Run
    from ..store import Store
    from ..subject import load_subject
    from .compare import print_compare

    sites = args.site or [options.DEFAULT_SITE]
    cfgs = run_configs(args)
    for c in cfgs:
        if c.architecture in fit.FROM_LABELS:
            raise UnitscopeError(f"{c.architecture} needs labelled text; use `unitscope train --labels`")
    snmf_options = fit.fit_options(args, "snmf")
    remote = _remote(args)
    root = remote.scratch if remote else options.output_dir(Path(args.runs_dir) / args.name)
    run = Run(root, run_config(args, cfgs, sites), overwrite=args.overwrite)
    corpus = Corpus(args.corpus, field=args.field)
    corpus.documents()
    subject = load_subject(args.model, dtype=args.dtype, device=args.device)
    for s in sites:
        subject.site(s)
    plan = dictionary_plan(cfgs, subject.width(sites[0]))
    store_dir = remote.store_url if remote else root / "store"
    if "record" not in run.redo and _has_store(store_dir):  # the run's store is kept: same model?
        manifest = Store.open(store_dir).manifest
        inputs.check_same_model(subject, manifest.get("model_fingerprint"), manifest.get("model"),
                                f"the run's store at {str(store_dir)!r}")
    report_dir = root / "report"
    progress = not args.quiet

    def dict_dir(did: str) -> Path:
        return root / "dictionaries" / did

    def do_record():
        st = record(subject, corpus, sites, args.tokens, store_dir, ctx_len=args.ctx_len,
                    batch_size=args.record_batch_size, shard_tokens=args.shard_tokens, progress=progress,
                    overwrite=run.fresh)
        return {"tokens": st.n_tokens, "shards": st.n_shards}

    def saved(did: str) -> dict:
        d = load_dictionary(dict_dir(did))
        return {"path": str(dict_dir(did).relative_to(root)), "architecture": d.architecture, "units": d.n_units}

    def train_one(c, did: str) -> dict:
        """One SAE or transcoder: resumes from its checkpoint unless the stage starts afresh."""
        train(store_dir, None if is_transcoder(c.architecture) else sites[0], c, dict_dir(did), progress=progress,
              overwrite=run.fresh)
        return saved(did)

    def fit_one(c, did: str) -> dict:
        print(f"[train] fitting {did}")
        fit.fit_from_store(Store.open(store_dir), sites[0], c.architecture, c.n_units, subject=subject,
                           seed=c.seed, options=snmf_options if c.architecture == "snmf" else None,
                           ).save(dict_dir(did))
        return saved(did)

    def do_train():
        trained = [(c, did) for c, did in plan if c.architecture not in fit.FROM_STORE]
        done = run.state["stages"]["train"]["items"]
        together = [(c, did) for c, did in trained if not is_transcoder(c.architecture) and did not in done]
        if len(together) > 1:  # one read of the store steps every SAE kind
            if run.fresh:
                for _, did in together:
                    shutil.rmtree(checkpoint_dir(dict_dir(did)), ignore_errors=True)
            train_together([Trainer(Store.open(store_dir), sites[0], c, dict_dir(did), progress=False)
                            for c, did in together], progress=progress)
            for _, did in together:
                run.item(did, lambda did=did: saved(did))
        else:
            together = []
        for c, did in plan:
            if did in {d for _, d in together}:
                continue
            if c.architecture in fit.FROM_STORE:
                run.item(did, lambda c=c, did=did: fit_one(c, did))
            else:  # transcoders and a lone SAE kind
                run.item(did, lambda c=c, did=did: train_one(c, did))
        return {"dictionaries": [did for _, did in plan]}

    def do_eval():
        st = Store.open(store_dir)
        st.check_corpus(corpus)  # held-out windows must follow the recorded ones in the same text
        for _, did in plan:
            def eval_one(did=did):
                result = evaluate_fidelity(subject, load_dictionary(dict_dir(did)), corpus, args.ctx_len,
                                           start_window=st.n_windows, n_tokens=args.eval_tokens,
                                           batch_size=args.eval_batch_size, progress=progress)
                path = root / "evals" / did / "core.json"
                path.parent.mkdir(parents=True, exist_ok=True)
                write_json_atomic(path, result)
                print(f"[eval] {did}: ", end="")
                print_metrics(result)
                return {"metrics": {k: v for m in result["eval_result_metrics"].values() for k, v in m.items()}}
            run.item(did, eval_one)

    def do_explain():
        for _, did in plan:
            def explain_one(did=did):
                d = load_dictionary(dict_dir(did))
                write_tables(root / "explain" / did, d, Store.open(store_dir), d.input_site or sites[0],
                             subject.tokenizer, lens=logit_lens(subject, d), top_n=args.top, progress=progress)
            run.item(did, explain_one)

    def do_compare():
        return print_compare(root)

    def do_report():  # one site for the whole run; report/D/index.html links into it at #/D
        index = report_run(root)
        return {"index": str(index), "indexes": {did: str(report_dir / did / "index.html") for _, did in plan}}

    if remote:
        remote.push()  # what a killed attempt made but had not uploaded
    for name, fn in (("record", do_record), ("train", do_train), ("eval", do_eval), ("explain", do_explain),
                     ("compare", do_compare), ("report", do_report)):
        run.stage(name, fn)
        if remote:
            remote.push()
    for _, did in plan:
        print(f"report: {(report_dir / did / 'index.html').resolve()}")
        if remote:
            print(f"  uploaded to {remote.url}/report/{did}/index.html")
    return 0


def _remote(args: argparse.Namespace):
    """The RemoteRun for `--out URL` (its scratch folder pulled from the URL when this machine lacks it), or None
    for a local run; a URL given to --runs-dir, or a local path to --out, is refused rather than written locally."""
    from ..fs import filesystem, is_url

    if is_url(args.runs_dir):
        raise UnitscopeError(f"--runs-dir takes a local folder, not {args.runs_dir!r}; keep a run on an object store "
                             "with --out URL (e.g. --out s3://bucket/runs/NAME)")
    if args.out is None:
        return None
    if not is_url(args.out):
        raise UnitscopeError(f"--out takes an object store URL (s3://bucket/run, any fsspec URL), not "
                             f"{args.out!r}; a local run goes in --runs-dir/--name")
    from ..run_sync import RemoteRun

    filesystem(args.out)  # a missing backend is named before any work
    remote = RemoteRun(args.out)
    if remote.pull():
        print(f"[run] downloaded the run at {remote.url} (all but its store) into {remote.scratch}")
    print(f"[run] the store is recorded at {remote.store_url}; dictionaries, evals, explanations and the report are "
          f"made in {remote.scratch} and uploaded to {remote.url} after each stage")
    return remote


def _has_store(location) -> bool:
    from ..fs import filesystem, is_url

    if is_url(location):
        fs, path = filesystem(str(location))
        return fs.exists(f"{path}/store.json")
    return (Path(location) / "store.json").is_file()
