"""`unitscope record`: activations at named sites into a store (resumable), and `unitscope verify STORE`."""

from __future__ import annotations

import argparse

from . import options


def add_parser(sub) -> None:
    p = sub.add_parser("record", help="record activations at sites into a store")
    options.add_model(p)
    options.add_record(p, defaults=False)
    p.add_argument("--out", required=True, help="store directory")
    p.add_argument("--overwrite", action="store_true", help="replace a store recorded with other options")
    p.set_defaults(func=run)

    p = sub.add_parser("verify", help="check every shard of a store against its SHA-256 in the manifest")
    p.add_argument("store", help="store directory")
    p.set_defaults(func=verify)


def run(args: argparse.Namespace) -> int:
    from ..corpus import Corpus
    from ..distributed import local_device
    from ..fs import is_url
    from ..record import record
    from ..subject import load_subject

    out = args.out if is_url(args.out) else options.output_dir(args.out)  # s3://... stays a URL
    subject = load_subject(args.model, dtype=args.dtype, device=local_device(args.device))
    sites = args.site or [options.DEFAULT_SITE]
    for site in sites:
        subject.site(site)  # an unknown site fails before the corpus is read
    corpus = Corpus(args.corpus, field=args.field)
    corpus.documents()
    store = record(subject, corpus, sites, args.tokens, out, ctx_len=args.ctx_len, batch_size=args.record_batch_size,
                   shard_tokens=args.shard_tokens, overwrite=args.overwrite, progress=not args.quiet)
    print(f"store {out}: {store.n_tokens} tokens in {store.n_shards} shards, sites {', '.join(store.sites)}")
    return 0


def verify(args: argparse.Namespace) -> int:
    from ..store import Store

    store = Store.open(args.store)
    checked = store.verify(progress=not args.quiet)
    state = "complete" if store.manifest.get("complete") else "incomplete (rerun `unitscope record` to finish it)"
    print(f"store {args.store}: {store.n_shards} shards, {store.n_tokens} tokens, {checked / 1e6:.1f} MB: every "
          f"checksum matches; the recording is {state}")
    return 0
