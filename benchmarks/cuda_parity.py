"""CUDA parity: every command runs on the GPU (`--device cuda`, `--train-device cuda`) and gives the CPU's results.

    python benchmarks/cuda_parity.py [--work DIR] [--kinds topk pca ...]     # needs a CUDA device

Self-contained (no model hub, no default model): a small random Llama and a byte-level BPE tokenizer trained on
the Python docs are saved as a local model directory, and the corpus is those docs as a .txt file. Then, as a
user runs them (the CLI, in subprocesses):

1. `record` the same windows on CPU and on CUDA (float32 model): tokens identical, activations within 1e-4 of
   their rms at every site.
2. `train` every kind from the CPU store on CPU and on CUDA with the same seed and float32 compute: after a
   few steps the weights agree within 1e-3 of their rms (the steps are the same arithmetic on another
   device); for `--long-kinds`, after a longer run the final FVU agrees within 5% (TopK selection may flip on
   near ties, so the paths may part, but quality must not). The bf16 default (compute dtype auto) also
   trains on CUDA.
3. `eval` a trained dictionary on CPU and on CUDA: every figure within 1e-3 (relative) of the other.
4. `explain` on CPU and on CUDA: the same unit statistics (within 1e-4) and the same top windows.
5. `run` end to end with `--device cuda --train-device cuda`.

Prints one line per check (PASS/FAIL with the measured gap) and exits 1 if any failed. This is not part of the
test suite (CI has no GPU); run it on a CUDA machine and keep its output under benchmarks/.
"""

from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import torch

FAILED: list[str] = []
DEV = {"cpu": "cpu", "cuda": "cuda"}  # label -> device; --other cpu dry-runs the script on a CPU


def check(name: str, ok: bool, detail: str) -> None:
    print(f"{'PASS' if ok else 'FAIL'}  {name}: {detail}", flush=True)
    if not ok:
        FAILED.append(name)


def cli(*args, ok_codes=(0,)) -> subprocess.CompletedProcess:
    t0 = time.perf_counter()
    p = subprocess.run([sys.executable, "-m", "unitscope", *map(str, args), "--quiet"], capture_output=True,
                       text=True, env={**os.environ, "TOKENIZERS_PARALLELISM": "false"})
    print(f"      unitscope {' '.join(map(str, args))}  ({time.perf_counter() - t0:.1f} s, exit {p.returncode})",
          flush=True)
    if p.returncode not in ok_codes:
        print(p.stdout[-2000:], p.stderr[-4000:], sep="\n", flush=True)
    return p


def make_model(work: Path) -> tuple[Path, Path]:
    """A random Llama (4 layers, d = 128) with a BPE tokenizer trained on the Python docs, and those docs as text."""
    from pydoc_data.topics import topics

    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    model_dir, corpus = work / "model", work / "corpus.txt"
    if (model_dir / "config.json").is_file() and corpus.is_file():
        return model_dir, corpus
    texts = [topics[k] for k in sorted(topics)]
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=2048, special_tokens=["<unk>", "<s>", "</s>"],
                                                       initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    hf_tok = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>")
    torch.manual_seed(0)
    cfg = LlamaConfig(vocab_size=len(hf_tok), hidden_size=128, intermediate_size=384, num_hidden_layers=4,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512)
    LlamaForCausalLM(cfg).save_pretrained(model_dir)
    hf_tok.save_pretrained(model_dir)
    corpus.write_text("\n\n".join(t.strip() for t in texts))
    return model_dir, corpus


def rel_gap(a: torch.Tensor, b: torch.Tensor) -> float:
    a, b = a.double(), b.double()
    return float((a - b).abs().max() / a.pow(2).mean().sqrt().clamp_min(1e-30))


def dict_tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(next(path.glob("*.safetensors"))))


def flat_figures(d, prefix="") -> dict[str, float]:
    out = {}
    for k, v in d.items():
        if isinstance(v, dict):
            out.update(flat_figures(v, f"{prefix}{k}."))
        elif isinstance(v, (int, float)) and not isinstance(v, bool):
            out[prefix + k] = float(v)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--work", default="/tmp/unitscope-cuda-parity")
    ap.add_argument("--kinds", nargs="+", default=["topk", "batchtopk", "jumprelu", "standard", "matryoshka_topk",
                                                   "pca", "kmeans", "snmf", "neurons"])
    ap.add_argument("--long-kinds", nargs="+", default=["topk"], help="kinds also trained 256 steps on both devices")
    ap.add_argument("--tokens", type=int, default=32768)
    ap.add_argument("--other", default="cuda", help="the device compared with the CPU (cpu: a dry run of the script)")
    args = ap.parse_args()
    DEV["cuda"] = args.other
    if args.other.startswith("cuda"):
        if not torch.cuda.is_available():
            raise SystemExit("cuda_parity: no CUDA device on this machine")
        print(f"device: {torch.cuda.get_device_name()}, torch {torch.__version__}, CUDA {torch.version.cuda}",
              flush=True)
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    model, corpus = make_model(work)
    sites = ["blocks.2.resid_post", "blocks.2.mlp_hidden", "blocks.2.mlp_in", "blocks.2.mlp_out"]
    common = ["--model", model, "--corpus", corpus, "--tokens", args.tokens, "--ctx-len", 128, "--dtype", "float32"]
    site_args = [a for s in sites for a in ("--site", s)]

    # 1. record
    from unitscope.store import Store

    stores = {}
    for dev in ("cpu", "cuda"):
        stores[dev] = work / f"store-{dev}"
        if not (stores[dev] / "store.json").is_file():
            cli("record", *common, *site_args, "--device", DEV[dev], "--out", stores[dev])
    a, b = Store.open(stores["cpu"]), Store.open(stores["cuda"])
    check("record: same tokens", np.array_equal(a.column("tokens"), b.column("tokens")),
          f"{len(a.column('tokens'))} tokens")
    for s in sites:
        xa = torch.cat([a.acts(s, i) for i in range(a.n_shards)]).float()
        xb = torch.cat([b.acts(s, i) for i in range(b.n_shards)]).float()
        g = rel_gap(xa, xb)
        check(f"record {s}", g < 1e-4, f"max |cpu - cuda| / rms = {g:.2e}")

    # 2. train, every kind, short (weights) and long (quality)
    site = {"neurons": "blocks.2.mlp_hidden", "snmf": "blocks.2.mlp_hidden"}
    long_fvu: dict[str, dict[str, float]] = {}
    for kind in args.kinds:
        kind_site = site.get(kind, "blocks.2.resid_post")
        base = ["train", "--store", stores["cpu"], "--site", kind_site, "--architecture", kind, "--units", 512,
                "--k", 8, "--batch-size", 1024, "--seed", 0, "--compute-dtype", "float32"]
        outs = {}
        for dev in ("cpu", "cuda"):
            outs[dev] = work / f"d-{kind}-short-{dev}"
            p = cli(*base, "--train-tokens", 4096, "--train-device", DEV[dev], "--out", outs[dev], "--overwrite")
            if p.returncode:
                check(f"train {kind} on {dev}", False, p.stderr.strip().splitlines()[-1] if p.stderr else "failed")
        if all((o / "cfg.json").is_file() for o in outs.values()):
            ta, tb = dict_tensors(outs["cpu"]), dict_tensors(outs["cuda"])
            gaps = {n: rel_gap(ta[n], tb[n]) for n in ta if ta[n].is_floating_point() and ta[n].numel() > 1}
            worst = max(gaps, key=gaps.get) if gaps else None
            check(f"train {kind}: weights after 4 steps", bool(gaps) and gaps[worst] < 1e-3,
                  f"worst {worst} max gap / rms = {gaps[worst]:.2e}" if gaps else "no tensors")
        if kind not in args.long_kinds:
            continue
        for dev in ("cpu", "cuda"):
            out = work / f"d-{kind}-long-{dev}"
            p = cli(*base, "--train-tokens", 262144, "--train-device", DEV[dev], "--out", out, "--overwrite")
            ev = work / f"eval-{kind}-{dev}.json"
            if p.returncode == 0:
                cli("eval", "--dictionary", out, "--store", stores["cpu"], "--device", DEV[dev], "--eval-tokens", 4096,
                    "--out", ev)
            if ev.is_file():
                long_fvu.setdefault(kind, {})[dev] = json.loads(ev.read_text())["eval_result_metrics"][
                    "reconstruction_quality"]["fvu"]
        f = long_fvu.get(kind, {})
        if len(f) == 2:
            gap = abs(f["cpu"] - f["cuda"]) / max(f["cpu"], 1e-12)
            check(f"train {kind}: FVU after 256 steps", gap < 0.05,
                  f"cpu {f['cpu']:.4f} cuda {f['cuda']:.4f} (relative gap {gap:.2%})")
        else:
            check(f"train+eval {kind} (long)", False, f"FVU missing on {sorted(set(['cpu', 'cuda']) - set(f))}")

    # the default compute dtype (bf16 on CUDA) trains too
    out = work / "d-topk-auto-cuda"
    p = cli("train", "--store", stores["cpu"], "--site", "blocks.2.resid_post", "--architecture", "topk", "--units",
            512, "--k", 8, "--batch-size", 1024, "--train-tokens", 262144, "--train-device", DEV["cuda"],
            "--out", out,
            "--overwrite")
    ev = work / "eval-topk-auto-cuda.json"
    if p.returncode == 0:
        cli("eval", "--dictionary", out, "--store", stores["cpu"], "--device", DEV["cuda"], "--eval-tokens", 4096,
            "--out", ev)
    if ev.is_file() and "topk" in long_fvu:
        fvu = json.loads(ev.read_text())["eval_result_metrics"]["reconstruction_quality"]["fvu"]
        ref = long_fvu["topk"]["cpu"]
        check("train topk with compute dtype auto (bf16) on CUDA", fvu < ref * 1.05,
              f"FVU {fvu:.4f} vs float32 on CPU {ref:.4f}")
    else:
        check("train topk with compute dtype auto on CUDA", False, "no result")

    # 3. eval parity on one dictionary
    d = work / "d-topk-long-cpu"
    if d.is_dir():
        evs = {}
        for dev in ("cpu", "cuda"):
            evs[dev] = work / f"eval-parity-{dev}.json"
            cli("eval", "--dictionary", d, "--store", stores["cpu"], "--device", DEV[dev], "--eval-tokens", 4096,
                "--out", evs[dev])
        if all(e.is_file() for e in evs.values()):
            fa = flat_figures(json.loads(evs["cpu"].read_text())["eval_result_metrics"])
            fb = flat_figures(json.loads(evs["cuda"].read_text())["eval_result_metrics"])
            gaps = {k: abs(fa[k] - fb[k]) / max(abs(fa[k]), 1e-6) for k in fa if k in fb}
            worst = max(gaps, key=gaps.get)
            check("eval cpu vs cuda", gaps[worst] < 1e-3, f"{len(gaps)} figures, worst {worst} relative gap "
                  f"{gaps[worst]:.2e} ({fa[worst]:.6g} vs {fb[worst]:.6g})")
        else:
            check("eval cpu vs cuda", False, "an eval failed")

        # 4. explain parity
        import pyarrow.parquet as pq

        exps = {}
        for dev in ("cpu", "cuda"):
            exps[dev] = work / f"explain-{dev}"
            cli("explain", "--dictionary", d, "--store", stores["cpu"], "--device", DEV[dev], "--out", exps[dev])
        if all((e / "units.parquet").is_file() for e in exps.values()):
            ua, ub = (pq.read_table(exps[dev] / "units.parquet").to_pandas() for dev in ("cpu", "cuda"))
            num = [c for c in ua.columns if ua[c].dtype.kind == "f"]
            gap = max(float(np.nanmax(np.abs(ua[c] - ub[c]) / np.maximum(np.abs(ua[c]), 1e-6))) for c in num)
            check("explain unit statistics cpu vs cuda", gap < 1e-3, f"{len(num)} columns, worst relative gap "
                  f"{gap:.2e}")
            ea, eb = (pq.read_table(exps[dev] / "examples.parquet").to_pandas() for dev in ("cpu", "cuda"))
            if "kind" in ea.columns:  # sampled kinds depend on bin edges, which a 1e-6 difference may move
                ea, eb = ea[ea["kind"] == "top"], eb[eb["kind"] == "top"]
            keys = [c for c in ("unit", "window") if c in ea.columns]
            pairs = {tuple(r) for r in ea[keys].itertuples(index=False)}
            shared = len(pairs & {tuple(r) for r in eb[keys].itertuples(index=False)}) / max(len(pairs), 1)
            check("explain top examples cpu vs cuda", shared > 0.99, f"{len(ea)} top (unit, window) pairs, "
                  f"{shared:.2%} shared")
        else:
            check("explain cpu vs cuda", False, "an explain failed")

    # 5. the whole pipeline on CUDA
    p = cli("run", "--name", "cuda-run", "--runs-dir", work / "runs", "--model", model, "--corpus", corpus,
            "--tokens", 16384, "--ctx-len", 128, "--device", DEV["cuda"], "--train-device", DEV["cuda"],
            "--units", 512,
            "--k", 8, "--train-tokens", 65536, "--eval-tokens", 2048, "--site", "blocks.2.resid_post")
    check("run end to end on CUDA", p.returncode == 0, "exit 0" if p.returncode == 0 else p.stderr[-300:])

    print(f"\n{len(FAILED)} check(s) failed" + (f": {', '.join(FAILED)}" if FAILED else ""), flush=True)
    sys.exit(1 if FAILED else 0)


if __name__ == "__main__":
    main()
