"""Runs inside an environment with sparsify: saves a TopK SAE and a skip transcoder with random weights
and writes their dense codes and outputs. Usage: python sparsify_side.py WORKDIR"""

import sys
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file
from sparsify import SparseCoder, SparseCoderConfig

work = Path(sys.argv[1])
x = load_file(str(work / "inputs.safetensors"))["x"]
torch.manual_seed(0)
out = {}
for name, cfg, d_out in (("sae", SparseCoderConfig(num_latents=80, k=6), None),
                         ("transcoder", SparseCoderConfig(num_latents=80, k=6, transcode=True, skip_connection=True),
                          20)):
    coder = SparseCoder(x.shape[1], cfg) if d_out is None else SparseCoder(x.shape[1], cfg)
    with torch.no_grad():
        for p in coder.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
    coder.save_to_disk(work / f"sparsify_{name}")
    with torch.no_grad():
        enc = coder.encode(x)
        dense = torch.zeros(x.shape[0], 80).scatter_(1, enc.top_indices, enc.top_acts)
        y = coder.decode(enc.top_acts, enc.top_indices)
        if coder.W_skip is not None:
            y = y + x @ coder.W_skip.mT
    out[name], out[f"{name}.out"] = dense, y
save_file(out, str(work / "sparsify_codes.safetensors"))
print("ok")
