"""Runs inside an environment with sparsify: saves a TopK SAE and skip transcoders with random weights and
writes their dense codes and outputs. sparsify 1.3.3 builds transcoders with d_out = d_in only; the narrow one
(d_out = 20 < d_in) gets [n, d_out] decoder weights swapped in, and its outputs still come from sparsify's own
encode/decode. Usage: python sparsify_side.py WORKDIR"""

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
                          None),
                         ("narrow_transcoder",
                          SparseCoderConfig(num_latents=80, k=6, transcode=True, skip_connection=True), 20)):
    coder = SparseCoder(x.shape[1], cfg)
    if d_out is not None:
        coder.W_dec = torch.nn.Parameter(torch.zeros(80, d_out))
        coder.b_dec = torch.nn.Parameter(torch.zeros(d_out))
        coder.W_skip = torch.nn.Parameter(torch.zeros(d_out, x.shape[1]))
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
    assert y.shape[1] == (d_out or x.shape[1])
    out[name], out[f"{name}.out"] = dense, y
save_file(out, str(work / "sparsify_codes.safetensors"))
print("ok")
