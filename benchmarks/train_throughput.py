"""Training throughput of a TopK SAE (576 -> 9216, k = 32, batch 4096, fp32) on SmolLM2 residual activations:
unitscope vs SAELens vs sparsify vs dictionary_learning, each with its own training step and Adam, peers
in their own virtual environments, repetitions interleaved. Prints tokens/s medians, peak memory, held-out
FVU after the same token budget, and `ratio unitscope/<peer>: X.XX` lines.

    python benchmarks/train_throughput.py [--steps 12] [--reps 3] [--envs /opt]

Peers are found as /opt/venv-saelens, /opt/venv-sparsify, /opt/venv-dictionary_learning (python -m venv,
`pip install torch==2.13.0` then `sae-lens`, `eai-sparsify`, `dictionary-learning`); a missing one is
reported and left out. All trainers see the same activations, pre-scaled to E||x||² = d_in, in the same
order for the peers (unitscope reads its own shuffled store of the same rows), and the same learning rate.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from unitscope import Corpus, Store, load_subject, record
from unitscope.corpus import training_mask

HERE = Path(__file__).resolve().parent
WIKITEXT = HERE.parents[1] / "shared" / "data" / "wikitext-2" / "valid.txt"
SITE = "blocks.6.resid_post"


def prepare(work: Path, tokens: int, heldout: int) -> None:
    if (work / "train.safetensors").is_file():
        return
    subject = load_subject("default")
    corpus = Corpus(str(WIKITEXT) if WIKITEXT.is_file() else "default")
    raw = record(subject, corpus, [SITE], tokens + heldout, work / "raw", ctx_len=128, progress=True)
    mask = training_mask(raw.column("tokens"), raw.column("pos"), np.asarray(raw.manifest["specials"]))
    x = torch.cat([raw.acts(SITE, i) for i in range(raw.n_shards)])[torch.from_numpy(mask)].float()
    scale = (x.shape[1] / x.pow(2).sum(1).mean()).sqrt()
    x = x * scale
    n_train = len(x) - heldout
    save_file({"x": x[:n_train].contiguous()}, str(work / "train.safetensors"))
    save_file({"x": x[n_train:].contiguous()}, str(work / "heldout.safetensors"))
    # the same rows as a unitscope store (one shard per 16384 rows), for unitscope's own trainer
    st = Store.create(work / "store", {"model": "prepared", "sites": {SITE: {"width": x.shape[1]}},
                                       "dtype": "float32", "ctx_len": 128, "corpus": {"spec": "prepared"}})
    for lo in range(0, n_train, 16384):
        part = x[lo:min(n_train, lo + 16384)]
        n = len(part)
        st.append_shard(np.ones(n, np.int32), np.zeros(n, np.int32), np.arange(1, n + 1, dtype=np.int32),
                        {SITE: part}, windows=0)
    st.finish(specials=[])


def heldout_fvu(work: Path, name: str, k: int) -> float:
    w = load_file(str(work / f"{name}.safetensors"))
    x = load_file(str(work / "heldout.safetensors"))["x"]
    pre = (x - w["b_dec"]) @ w["W_enc"] + w["b_enc"]
    vals, idx = pre.topk(k, dim=-1)
    codes = torch.zeros_like(pre).scatter_(-1, idx, vals.relu())
    recon = codes @ w["W_dec"] + w["b_dec"]
    return float((x - recon).pow(2).sum() / (x - x.mean(0)).pow(2).sum())


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--work", default="/tmp/unitscope-train-bench")
    ap.add_argument("--tokens", type=int, default=131072, help="training rows recorded")
    ap.add_argument("--units", type=int, default=9216)
    ap.add_argument("--k", type=int, default=32)
    ap.add_argument("--batch", type=int, default=4096)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--lr", type=float, default=7e-4)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--envs", default="/opt")
    args = ap.parse_args()
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    prepare(work, args.tokens, 8192)

    trainers = {"unitscope": [sys.executable, str(HERE / "peers" / "unitscope_train.py")],
                "unitscope-bfloat16": [sys.executable, str(HERE / "peers" / "unitscope_train.py")]}
    for peer in ("sparsify", "saelens", "dictionary_learning"):
        py = Path(args.envs) / f"venv-{peer}" / "bin" / "python"
        if py.is_file():
            trainers[peer] = [str(py), str(HERE / "peers" / f"{peer}_train.py")]
        else:
            print(f"peer {peer}: no environment at {py.parent.parent}; left out")
    common = [str(work), str(args.units), str(args.k), str(args.batch), str(args.steps), str(args.lr)]
    results: dict[str, list[dict]] = {t: [] for t in trainers}
    print(f"TopK SAE {576}->{args.units}, k={args.k}, batch {args.batch}, {args.steps} steps "
          f"({args.steps * args.batch} tokens), fp32 unless named, torch threads {torch.get_num_threads()}")
    for rep in range(args.reps):
        for name, cmd in trainers.items():
            extra = ["bfloat16"] if name == "unitscope-bfloat16" else []
            p = subprocess.run([*cmd, *common, *extra], capture_output=True, text=True, cwd=HERE / "peers",
                               env={"PYTHONPATH": str(HERE / "peers"), "PATH": "/usr/bin:/bin"})
            if p.returncode != 0:
                print(f"{name} failed (rep {rep}):\n{p.stderr[-2000:]}")
                continue
            r = json.loads((work / f"{name}.json").read_text())
            r["fvu"] = heldout_fvu(work, name, args.k)
            results[name].append(r)
            print(f"  rep {rep} {name:<20} {r['tokens_per_s']:8.0f} tokens/s  fvu {r['fvu']:.4f}", flush=True)
    med = {}
    print("\nmedians")
    for name, rs in results.items():
        if not rs:
            continue
        med[name] = statistics.median(r["tokens_per_s"] for r in rs)
        print(f"  {name:<20} {med[name]:8.0f} tokens/s  peak RSS {max(r['peak_rss_mb'] for r in rs):7.0f} MB  "
              f"held-out FVU {statistics.median(r['fvu'] for r in rs):.4f}")
    for peer in ("sparsify", "saelens", "dictionary_learning"):
        if peer in med and "unitscope" in med:
            print(f"ratio unitscope/{peer}: {med['unitscope'] / med[peer]:.2f}")
            if "unitscope-bfloat16" in med:
                print(f"ratio unitscope-bfloat16/{peer}: {med['unitscope-bfloat16'] / med[peer]:.2f}")


if __name__ == "__main__":
    main()
