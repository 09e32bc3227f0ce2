"""`unitscope train`: train (SAE kinds, resumable) or fit (neurons, PCA, k-means, semi-NMF, supervised) dictionaries."""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from .. import distributed
from ..errors import UnitscopeError
from ..fs import filesystem, is_url, read_saved_json
from . import inputs, options


def add_parser(sub) -> None:
    p = sub.add_parser("train", help="train or fit a dictionary from a store (or labelled text)")
    p.add_argument("--store", default=None, help="activation store (every kind but diffmean and probe)")
    p.add_argument("--labels", default=None, help="JSONL of {text, label} rows, for diffmean and probe")
    p.add_argument("--live", action="store_true", help="train from live forward passes (no store; needs --site)")
    p.add_argument("--corpus", default="default", help="corpus for --live")
    p.add_argument("--ctx-len", type=options.context_length, default=128, help="window length for --live")
    options.add_model(p, default=None, what="the store's model; 'default' for --labels and --live; 'none' to fit "
                                            "neurons/snmf without it")
    p.add_argument("--site", default=None, help="store site to train on (default: the store's first)")
    p.add_argument("--out", required=True, help="dictionary directory")
    p.add_argument("--overwrite", action="store_true", help="discard a checkpoint and start again")
    options.add_train(p)
    add_kind_options(p)
    p.set_defaults(func=run)


def add_kind_options(p: argparse.ArgumentParser) -> None:
    """The options of particular kinds, shared by `train` and `run` (each refused for a kind it does not apply to)."""
    kinds = p.add_argument_group("options of particular kinds (each refused for a kind it does not apply to)")
    kinds.add_argument("--l1-coefficient", type=options.non_negative_float, default=None,
                       help="standard and ReLU transcoders: a fixed L1 coefficient instead of adapting it so that "
                            "the mean L0 settles at --k")
    kinds.add_argument("--l0-coefficient", type=options.non_negative_float, default=None,
                       help="jumprelu: a fixed L0 coefficient instead of adapting it so that the mean L0 settles "
                            "at --k")
    kinds.add_argument("--jumprelu-bandwidth", type=options.positive_float, default=None,
                       help="jumprelu: width of the straight-through estimator's rectangle kernel (default 0.05, "
                            "in units of the scaled activations)")
    kinds.add_argument("--matryoshka-prefixes", type=options.positive_int, nargs="+", default=None,
                       help="matryoshka_topk: the nested dictionary sizes trained to reconstruct on their own "
                            "(each below --units; the whole dictionary is always one)")
    kinds.add_argument("--aux-k", type=options.positive_int, default=None,
                       help="TopK kinds: dead latents used by the AuxK loss (default d_in / 2)")
    kinds.add_argument("--aux-coefficient", type=options.non_negative_float, default=None,
                       help="TopK kinds: weight of the AuxK loss (default 1/32)")
    kinds.add_argument("--dead-tokens", type=options.positive_int, default=None,
                       help="tokens without firing after which a latent counts as dead (AuxK, resampling)")
    kinds.add_argument("--snmf-wta", type=options.non_negative_float, default=None,
                       help="snmf: winner-take-all fraction of each feature's coordinates kept (0: off; default "
                            "0.01 at an mlp_hidden site, as in the semi-NMF paper, and off elsewhere)")
    kinds.add_argument("--snmf-code-units", type=options.positive_int, default=None,
                       help="snmf: units in each token's code (default d / 4, at most 64)")


# command-line option -> the constructor argument of the kinds it applies to
KIND_OPTIONS = {"l1_coefficient": "l1_coefficient", "l0_coefficient": "l0_coefficient",
                "jumprelu_bandwidth": "bandwidth", "matryoshka_prefixes": "prefixes", "aux_k": "aux_k",
                "aux_coefficient": "aux_coef"}
# every option of add_kind_options, as run.json records them (the train stage owns them)
KIND_OPTION_NAMES = (*KIND_OPTIONS, "dead_tokens", "snmf_wta", "snmf_code_units")



def apply_kind_options(args: argparse.Namespace, cfgs: list) -> None:
    """Put each kind's options into the configs of the kinds that take them; refuse one that no kind takes."""
    from ..dictionaries.base import ARCHITECTURES
    from ..dictionaries.train import _accepts

    for option, param in KIND_OPTIONS.items():
        value = getattr(args, option, None)
        if value is None:
            continue
        takers = [c for c in cfgs if _accepts(ARCHITECTURES[c.architecture], param)]
        flag = "--" + option.replace("_", "-")
        if not takers:
            kinds = sorted(a for a, cls in ARCHITECTURES.items() if _accepts(cls, param))
            raise UnitscopeError(f"{flag} applies to {', '.join(kinds)}, not to "
                                 f"{', '.join(sorted({c.architecture for c in cfgs}))}")
        for c in takers:
            if param == "prefixes" and not all(p < c.n_units for p in value):
                raise UnitscopeError(f"{flag} must each be below --units ({c.n_units}), not {value}")
            c.extra[param] = list(value) if isinstance(value, list) else value
    if getattr(args, "dead_tokens", None) is not None:
        for c in cfgs:
            c.dead_tokens = args.dead_tokens


def _plain_subject(args: argparse.Namespace):
    from ..subject import load_subject

    return load_subject(args.model or "default", dtype=args.dtype or "float32", device=args.device)


def run(args: argparse.Namespace) -> int:
    from ..dictionaries import fit
    from ..dictionaries.train import Trainer, checkpoint_dir, is_transcoder, train, train_together
    from ..store import Store

    if is_url(args.out):  # any fsspec file system: its backend is checked before any training
        filesystem(args.out)
    out = args.out if is_url(args.out) else options.output_dir(args.out)
    cfgs = options.train_configs(args)
    apply_kind_options(args, cfgs)
    for c in cfgs:  # the fitted kinds' options (--snmf-*) are refused for every other kind, SAEs included
        if c.architecture != "snmf":
            fit.fit_options(args, c.architecture)
    fitted = [c for c in cfgs if c.architecture in fit.FROM_LABELS + fit.FROM_STORE]
    if fitted and len(cfgs) > 1:
        raise UnitscopeError("only gradient-trained kinds can be swept together; fit one kind at a time")
    if fitted and not distributed.for_command("fit"):  # under torchrun a fit runs once, on rank 0 as one process
        return 0
    if fitted:
        arch = cfgs[0].architecture
        if arch in fit.FROM_LABELS:
            if not args.labels or not args.site:
                raise UnitscopeError(f"{arch} needs --labels FILE.jsonl and --site (it runs the model)")
            d = fit.fit_from_labels(_plain_subject(args), args.site, arch, args.labels)
        else:
            if not args.store:
                raise UnitscopeError("give --store DIR (an activation store recorded with `unitscope record`)")
            store = Store.open(args.store)
            site = args.site or store.sites[0]
            store.width(site)
            options_ = fit.fit_options(args, arch)
            wants_model = arch in ("neurons", "snmf") and (args.model or store.manifest.get("model_spec")) != "none"
            subject = inputs.subject_for_store(args, store) if wants_model else None
            d = fit.fit_from_store(store, site, arch, cfgs[0].n_units, subject=subject, seed=args.seed,
                                   options=options_)
        d.save(out)
        print(f"dictionary {out}: {d.architecture}, {d.n_units} units")
        return 0
    if args.live:
        from ..corpus import Corpus
        from ..dictionaries.sources import LiveSource

        if not args.site:
            raise UnitscopeError("--live needs --site (the site to read from the running model)")
        if len(cfgs) > 1 or is_transcoder(cfgs[0].architecture):
            raise UnitscopeError("--live trains one SAE kind at a time")
        source = LiveSource(_plain_subject(args), Corpus(args.corpus), args.site, None, cfgs[0].batch_size,
                            ctx_len=args.ctx_len)
        if args.overwrite:
            shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
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
        store.width(site)
        outs = [f"{out.rstrip('/')}/{options.dictionary_id(c)}" if is_url(out) else out / options.dictionary_id(c)
                for c in cfgs]
        if args.overwrite:
            for o in outs:
                shutil.rmtree(checkpoint_dir(o), ignore_errors=True)
        train_together([Trainer(store, site, c, o, progress=False) for c, o in zip(cfgs, outs)],
                       progress=not args.quiet)
    for o in outs if distributed.is_main() else []:  # one line per dictionary, not one per rank
        summary = read_saved_json(o, "train.json") if is_url(o) else \
            json.loads((Path(o) / "train.json").read_text())
        print(f"dictionary {o}: {summary['config']['architecture']}, {summary['config']['n_units']} units; "
              f"{summary['tokens']} tokens in {summary['seconds']} s ({summary['tokens_per_s']} tokens/s)")
    return 0
