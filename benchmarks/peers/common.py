"""Shared by the peer trainers: load the activation file, time a loop, write results as JSON + safetensors.

Each peer script trains a TopK SAE (d_in -> n, k) with its own library's training step and Adam, on the
same pre-normalised activations, in the same batch order, and saves encoder/decoder weights so that the
driver scores every trainer's held-out FVU with one formula.
"""

import json
import resource
import sys
import time
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file


def setup():
    work, n_units, k, batch, steps, lr = sys.argv[1], *map(int, sys.argv[2:6]), float(sys.argv[6])
    torch.manual_seed(0)
    x = load_file(str(Path(work) / "train.safetensors"))["x"]
    return Path(work), x, n_units, k, batch, steps, lr


def batches(x, batch, steps):
    g = torch.Generator().manual_seed(0)
    for s in range(steps):
        if s % (len(x) // batch) == 0:
            perm = torch.randperm(len(x), generator=g)
        i = s % (len(x) // batch)
        yield x[perm[i * batch:(i + 1) * batch]]


def finish(work: Path, name: str, seconds: float, tokens: int, weights: dict, warm_steps: int = 0):
    save_file({k: v.detach().float().contiguous() for k, v in weights.items()}, str(work / f"{name}.safetensors"))
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    try:  # VmHWM is this process's own high-water mark (ru_maxrss can carry the parent's over a spawn)
        hwm = [line for line in open("/proc/self/status") if line.startswith("VmHWM")][0]
        peak = int(hwm.split()[1]) / 1024
    except (OSError, IndexError):
        pass
    (work / f"{name}.json").write_text(json.dumps({"seconds": seconds, "tokens": tokens,
                                                   "tokens_per_s": tokens / seconds, "peak_rss_mb": peak}))


class Timer:
    """Times steps after the first `warm` ones (allocation and first-call costs are not throughput)."""

    def __init__(self, warm=2):
        self.warm, self.n, self.t0 = warm, 0, None

    def step(self):
        self.n += 1
        if self.n == self.warm:
            self.t0 = time.perf_counter()

    def seconds(self):
        return time.perf_counter() - self.t0
