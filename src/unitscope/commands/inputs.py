"""The same model, the same site, the same text: resolve a command's inputs against the store or dictionary
they belong to, and refuse a mismatch in one sentence instead of computing silently wrong figures."""

from __future__ import annotations

import argparse
from typing import Any

from ..errors import UnitscopeError

DEFAULT_MODEL_NAMES = {"SmolLM2-135M-Instruct": "default"}  # display names of built-in models -> their spec


def _load(spec: str, dtype: str, device: str):
    from ..subject import load_subject

    return load_subject(spec, dtype=dtype, device=device)


def subject_for_store(args: argparse.Namespace, store: Any):
    """The model that recorded `store` (or `--model`, which must be that same model)."""
    m = store.manifest
    spec = args.model or m.get("model_spec") or DEFAULT_MODEL_NAMES.get(m.get("model", ""))
    if spec is None:
        raise UnitscopeError(
            f"the store at {str(store.root)!r} does not say how to load its model {m.get('model')!r} (it was recorded "
            "from a model built in Python); give --model")
    subject = _load(spec, args.dtype or m.get("dtype", "float32"), args.device)
    check_same_model(subject, m.get("model_fingerprint"), m.get("model"), f"the store at {str(store.root)!r}")
    return subject


def subject_for_dictionary(args: argparse.Namespace, dictionary: Any):
    """The model a dictionary was trained on (from its metadata), or `--model`, which must be that model."""
    meta = dictionary.metadata
    spec = args.model or meta.get("model_spec") or DEFAULT_MODEL_NAMES.get(meta.get("model_name", ""))
    if spec is None:
        raise UnitscopeError(
            f"the dictionary does not say how to load its model ({meta.get('model_name')!r}); give --model")
    subject = _load(spec, args.dtype or "float32", args.device)
    check_same_model(subject, meta.get("model_fingerprint"), meta.get("model_name"), "the dictionary")
    return subject


def load_dictionaries(paths: list[str]) -> dict[str, Any]:
    """Dictionaries by folder name (the full path where two folders share a name), in the order given."""
    from pathlib import Path

    from ..dictionaries import load_dictionary

    out: dict[str, Any] = {}
    for path in paths:
        name = Path(path).name
        out[name if name not in out else str(path)] = load_dictionary(path)
    return out


def subject_for_dictionaries(args: argparse.Namespace, dictionaries: dict[str, Any]):
    """The one model every dictionary was trained on (see subject_for_dictionary), or `--model` (the default model
    when there are no dictionaries); a dictionary of another model is refused by name."""
    if not dictionaries:
        return _load(args.model or "default", args.dtype or "float32", args.device)
    subject = subject_for_dictionary(args, next(iter(dictionaries.values())))
    for name, d in dictionaries.items():
        check_same_model(subject, d.metadata.get("model_fingerprint"), d.metadata.get("model_name"),
                         f"dictionary {name!r}")
    return subject


def check_same_model(subject: Any, fingerprint: str | None, name: str | None, owner: str) -> None:
    if fingerprint is not None:
        if subject.fingerprint() != fingerprint:
            raise UnitscopeError(
                f"model {subject.spec or subject.name!r} is not the model {name!r} that {owner} belongs to (their "
                "weights differ); leave --model out to use that model, or pass the one it was made with")
    elif name is not None and subject.name != name:
        raise UnitscopeError(
            f"model {subject.spec or subject.name!r} ({subject.name}) is not the model {name!r} that {owner} "
            "belongs to; leave --model out to use that model, or pass the one it was made with")


def check_dictionary_matches_store(dictionary: Any, store: Any) -> None:
    """A dictionary spliced into another model's activations gives figures that mean nothing."""
    meta, m = dictionary.metadata, store.manifest
    mine, theirs = meta.get("model_fingerprint"), m.get("model_fingerprint")
    differ = (mine != theirs) if mine and theirs else (
        meta.get("model_name") is not None and meta.get("model_name") != m.get("model"))
    if differ:
        raise UnitscopeError(
            f"the dictionary was trained on model {meta.get('model_name')!r} but the store at {str(store.root)!r} "
            f"was recorded from {m.get('model')!r}" + (" (same name, other weights)" if meta.get("model_name") ==
                                                       m.get("model") else "")
            + "; use a store recorded from the dictionary's model")


def _covered_windows(dictionary: Any, ctx_len: int) -> int:
    """How many windows of `ctx_len` tokens at the start of its training text the dictionary has seen."""
    meta = dictionary.metadata
    windows, ctx = meta.get("trained_windows"), meta.get("context_size")
    if not windows or not ctx:
        return 0
    return -(-int(windows) * int(ctx) // ctx_len)


def held_out_start(dictionary: Any, store: Any) -> int:
    """The first window after the store's, refused if the dictionary trained on windows past it (same text)."""
    start = store.n_windows
    meta = dictionary.metadata
    if meta.get("corpus_fingerprint") and meta["corpus_fingerprint"] == store.manifest.get("corpus_fingerprint"):
        covered = _covered_windows(dictionary, int(store.manifest["ctx_len"]))
        if start < covered:
            raise UnitscopeError(
                f"the dictionary was trained on the first {covered} windows of this text, but the store at "
                f"{str(store.root)!r} holds only {start}, so the windows after it are training windows; evaluate "
                "with the store it was trained on, or with --corpus")
    return start


def corpus_start(dictionary: Any, corpus: Any, ctx_len: int) -> int:
    """0 for text the dictionary never saw; past its training windows when it is its own training text."""
    meta = dictionary.metadata
    if meta.get("corpus_fingerprint") and meta["corpus_fingerprint"] == corpus.fingerprint():
        return _covered_windows(dictionary, ctx_len)
    return 0


def site_in_store(dictionary: Any, store: Any, site: str | None = None) -> str:
    """The store site a dictionary reads: its own input site, which the store must hold at the same width.

    `site` (from --site) is only for dictionaries that name no site of their own (e.g. sparsify files)."""
    own = dictionary.input_site
    if own and site and site != own:
        raise UnitscopeError(f"the dictionary was trained on site {own!r}, not {site!r}; leave --site out")
    name = own or site
    if name is None:
        raise UnitscopeError(
            f"the dictionary names no site (its cfg.json has no metadata.hook_name); give --site, one of "
            f"{', '.join(store.sites)}")
    if name not in store.sites:
        raise UnitscopeError(
            f"the dictionary reads site {name!r}, which the store does not hold (it holds {', '.join(store.sites)}); "
            "record that site, or use the store it was trained on")
    if own is None:
        dictionary.metadata["hook_name"] = name  # from here on the dictionary knows where it is spliced
    width = store.width(name)
    if width != dictionary.d_in:
        raise UnitscopeError(
            f"the dictionary expects width {dictionary.d_in} but the store's site {name!r} has width {width}")
    out = dictionary.output_site
    if out and out != name and out in store.sites and store.width(out) != dictionary.d_out:
        raise UnitscopeError(f"the dictionary writes width {dictionary.d_out} but the store's output site {out!r} "
                             f"has width {store.width(out)}")
    return name


def store_corpus(store: Any):
    """The corpus a store was recorded from, checked to hold the same text."""
    from ..corpus import Corpus

    corpus = Corpus(**{k: store.manifest["corpus"][k] for k in ("spec", "field", "seed")})
    store.check_corpus(corpus)
    return corpus
