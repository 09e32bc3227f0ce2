"""`unitscope run`: every stage, record -> train -> eval -> explain -> report, in one run directory.

Stages already done are skipped; `--overwrite STAGE` redoes it and the stages after it. Every option is written
to run.json beside the stage it belongs to (see runs.py).
"""

from __future__ import annotations

import argparse
from pathlib import Path

from ..errors import UnitscopeError
from . import inputs, options
from .evaluate import print_metrics
from .report import report_title


def add_parser(sub) -> None:
    p = sub.add_parser("run", help="the whole pipeline in one run directory (defaults work offline)")
    p.add_argument("--name", default="default", help="run name (a folder under --runs-dir)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--overwrite", action="append", default=[], help="redo this stage and the ones after it (or 'all')")
    options.add_model(p)
    options.add_record(p, defaults=True)
    options.add_train(p)
    options.add_eval(p)
    p.add_argument("--top", type=options.positive_int, default=20, help="top examples per unit")
    p.set_defaults(func=run)


def run_config(args: argparse.Namespace, cfg, sites: list[str]) -> dict:
    """Every option of the run, as run.json records it."""
    return {"model": args.model, "dtype": args.dtype, "device": args.device, "site": sites[0], "sites": sites,
            "corpus": args.corpus, "field": args.field, "tokens": args.tokens, "ctx_len": args.ctx_len,
            "shard_tokens": args.shard_tokens, "record_batch_size": args.record_batch_size,
            "architecture": cfg.architecture, "units": cfg.n_units, "k": cfg.k, "lr": cfg.lr,
            "batch_size": cfg.batch_size, "train_tokens": cfg.train_tokens, "seed": cfg.seed,
            "compute_dtype": cfg.compute_dtype, "train_device": cfg.device, "checkpoint_every": cfg.checkpoint_every,
            "resample_every": cfg.resample_every, "log_to": cfg.log_to,
            "eval_tokens": args.eval_tokens, "eval_batch_size": args.eval_batch_size, "top": args.top}


def run(args: argparse.Namespace) -> int:
    from ..atomic import write_json_atomic
    from ..corpus import Corpus
    from ..dictionaries import fit, load_dictionary
    from ..dictionaries.train import train
    from ..evaluate import evaluate_fidelity
    from ..explain import logit_lens, write_tables
    from ..record import record
    from ..report import write_report
    from ..runs import Run
    from ..store import Store
    from ..subject import load_subject

    sites = args.site or [options.DEFAULT_SITE]
    cfgs = options.train_configs(args)
    if len(cfgs) > 1:
        raise UnitscopeError("`unitscope run` makes one dictionary; sweep several with `unitscope train`")
    cfg = cfgs[0]
    if cfg.architecture in fit.FROM_LABELS:
        raise UnitscopeError(f"{cfg.architecture} needs labelled text; use `unitscope train --labels`")
    root = options.output_dir(Path(args.runs_dir) / args.name)
    run = Run(root, run_config(args, cfg, sites), overwrite=args.overwrite)
    corpus = Corpus(args.corpus, field=args.field)
    corpus.documents()
    subject = load_subject(args.model, dtype=args.dtype, device=args.device)
    for s in sites:
        subject.site(s)
    did = options.dictionary_id(cfg)
    store_dir, dict_dir = root / "store", root / "dictionaries" / did
    if "record" not in run.redo and (store_dir / "store.json").is_file():  # the run's store is kept: same model?
        manifest = Store.open(store_dir).manifest
        inputs.check_same_model(subject, manifest.get("model_fingerprint"), manifest.get("model"),
                                f"the run's store at {str(store_dir)!r}")
    eval_path, explain_dir, report_dir = root / "evals" / did / "core.json", root / "explain" / did, root / "report"
    progress = not args.quiet

    def do_record():
        st = record(subject, corpus, sites, args.tokens, store_dir, ctx_len=args.ctx_len,
                    batch_size=args.record_batch_size, shard_tokens=args.shard_tokens, progress=progress,
                    overwrite=run.fresh)
        return {"tokens": st.n_tokens, "shards": st.n_shards}

    def do_train():
        if cfg.architecture in fit.FROM_STORE:
            fit.fit_from_store(Store.open(store_dir), sites[0], cfg.architecture, cfg.n_units, subject=subject,
                               seed=cfg.seed).save(dict_dir)
        else:
            train(store_dir, sites[0] if "transcoder" not in cfg.architecture else None, cfg, dict_dir,
                  progress=progress, overwrite=run.fresh)
        return {"dictionary": str(dict_dir.relative_to(root))}

    def do_eval():
        st = Store.open(store_dir)
        st.check_corpus(corpus)  # held-out windows must follow the recorded ones in the same text
        result = evaluate_fidelity(subject, load_dictionary(dict_dir), corpus, args.ctx_len,
                                   start_window=st.n_windows, n_tokens=args.eval_tokens,
                                   batch_size=args.eval_batch_size, progress=progress)
        eval_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(eval_path, result)
        print_metrics(result)
        return {"metrics": {k: v for m in result["eval_result_metrics"].values() for k, v in m.items()}}

    def do_explain():
        d = load_dictionary(dict_dir)
        write_tables(explain_dir, d, Store.open(store_dir), d.input_site or sites[0], subject.tokenizer,
                     lens=logit_lens(subject, d), top_n=args.top, progress=progress)

    def do_report():
        index = write_report(report_dir / did, explain_dir, report_title(did, subject.name, sites[0]),
                             eval_json=eval_path, info={"model": subject.name, "site": sites[0], "run": str(root)})
        return {"index": str(index)}

    for name, fn in (("record", do_record), ("train", do_train), ("eval", do_eval), ("explain", do_explain),
                     ("report", do_report)):
        run.stage(name, fn)
    print(f"report: {(report_dir / did / 'index.html').resolve()}")
    return 0
