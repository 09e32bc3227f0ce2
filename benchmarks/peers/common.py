"""One harness for every trainer (unitscope and each peer, each in its own environment), so all do the same work.

A trainer script defines `build(x, spec) -> (step, save, reconstruct)` (x: all training rows): `step(i, xb)` is
one optimiser step of the library's own training loop on batch `xb`, `save(out)` writes the trained weights in the
library's own file layout, and `reconstruct(xb)` is the library's own inference on what it saved (written for a
few probe rows, so the benchmark can check its conversion to unitscope against the library itself).

The harness feeds every trainer the same batches in the same order (a fixed permutation per epoch of one activation
file), fetches each batch *outside* the timer, times only the `step` calls, and leaves the first `warm` steps out
of the timing for every trainer alike. It records wall time and the process's CPU time (all its threads), which
other processes on a shared machine disturb less.

    python <library>_train.py SPEC.json      # spec: data, out, result, units, k, batch, steps, warm, seed, ...
"""

import json
import os
import resource
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch
from safetensors.torch import save_file


def batches(x, batch, steps, seed=0, start=0):
    """`steps` batches of rows of x: a fresh seeded permutation each epoch, identical for every trainer."""
    per_epoch = len(x) // batch
    perm, epoch = None, -1
    for s in range(start, steps):
        if s // per_epoch != epoch:
            epoch = s // per_epoch
            perm = torch.randperm(len(x), generator=torch.Generator().manual_seed(seed * 1_000_003 + epoch))
        i = s % per_epoch
        yield x[perm[i * batch:(i + 1) * batch]]


def load_rows(path):
    """The `x` tensor of a safetensors file, memory-mapped: concurrent trainers share one page-cached copy."""
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        info = json.loads(f.read(n))["x"]
    if info["dtype"] != "F32":
        raise SystemExit(f"{path}: expected float32 rows, found {info['dtype']}")
    rows = np.memmap(path, dtype=np.float32, mode="r", offset=8 + n + info["data_offsets"][0],
                     shape=tuple(info["shape"]))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # read-only memory: every use below copies (gathers) rows first
        return torch.from_numpy(rows)


def peak_rss_mb():
    """This process's own memory high-water mark (VmHWM; ru_maxrss can carry a parent's over a spawn)."""
    try:
        with open("/proc/self/status") as f:
            return int(next(line for line in f if line.startswith("VmHWM")).split()[1]) / 1024
    except (OSError, StopIteration):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def main(build):
    spec = json.loads(Path(sys.argv[1]).read_text())
    torch.manual_seed(spec["seed"])
    device = spec.get("device", "cpu")
    x = load_rows(spec["data"])
    if device != "cpu":  # the whole data set on the device up front: no host-to-device copy inside a timer
        x = x.to(device)
    # CUDA runs asynchronously: wait for the batch gather before a timer starts and for the step before it stops
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    step, save, reconstruct = build(x, spec)
    warm, timed, cpu = spec["warm"], 0.0, 0.0
    for i, xb in enumerate(batches(x, spec["batch"], spec["steps"], spec["seed"])):
        sync()
        t0, c0 = time.perf_counter(), time.process_time()
        step(i, xb)
        sync()
        dt, dc = time.perf_counter() - t0, time.process_time() - c0
        if i >= warm:
            timed += dt
            cpu += dc
    save(Path(spec["out"]))
    probe = x[:256].cpu()  # every library's own inference on what it saved, on the CPU
    with torch.no_grad():
        save_file({"x": probe.contiguous(), "recon": reconstruct(probe).float().contiguous()},
                  str(Path(spec["out"]) / "probe.safetensors"))
    n_timed = spec["steps"] - warm
    result = {"seconds": timed, "timed_steps": n_timed, "tokens": n_timed * spec["batch"],
              "tokens_per_s": n_timed * spec["batch"] / max(timed, 1e-9), "cpu_seconds": cpu,
              "tokens_per_cpu_s": n_timed * spec["batch"] / max(cpu, 1e-9), "peak_rss_mb": peak_rss_mb(),
              "torch": torch.__version__, "threads": torch.get_num_threads(), "device": device,
              **({"peak_gpu_mb": torch.cuda.max_memory_allocated() / 2**20} if device.startswith("cuda") else {})}
    tmp = spec["result"] + ".tmp"
    Path(tmp).write_text(json.dumps(result))
    os.replace(tmp, spec["result"])
