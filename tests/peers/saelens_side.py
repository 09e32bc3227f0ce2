"""Runs inside an environment with sae-lens: trains TopK and JumpReLU SAEs with SAELens' own training step,
saves them in inference form (save_inference_model), writes their encodings, decodings of those codes and full
forwards, the weights of SAELens' own fold_W_dec_norm of the rescaled TopK SAE, and encodes and decodes
unitscope-saved SAEs with SAELens. Usage: python saelens_side.py WORKDIR"""

import copy
import sys
from pathlib import Path

import torch
from sae_lens import SAE
from sae_lens.saes.jumprelu_sae import JumpReLUSAE, JumpReLUSAEConfig, JumpReLUTrainingSAE, JumpReLUTrainingSAEConfig
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKSAE, TopKSAEConfig, TopKTrainingSAE, TopKTrainingSAEConfig
from safetensors.torch import load_file, save_file

work = Path(sys.argv[1])
x = load_file(str(work / "inputs.safetensors"))["x"]
torch.manual_seed(0)
out = {}
for name, sae in (("topk", TopKSAE(TopKSAEConfig(d_in=x.shape[1], d_sae=96, k=7))),
                  ("topk_rescaled", TopKSAE(TopKSAEConfig(d_in=x.shape[1], d_sae=96, k=7,
                                                          rescale_acts_by_decoder_norm=True))),
                  ("jumprelu", JumpReLUSAE(JumpReLUSAEConfig(d_in=x.shape[1], d_sae=96)))):
    with torch.no_grad():
        for p in sae.parameters():
            p.copy_(torch.randn_like(p) * 0.3)
        if name == "jumprelu":
            sae.threshold.copy_(torch.rand_like(sae.threshold) * 0.5)
    sae.save_model(str(work / f"saelens_{name}"))
    with torch.no_grad():
        out[name] = sae.encode(x)
        out[f"{name}.decode"] = sae.decode(out[name])
        out[f"{name}.forward"] = sae(x)
    if getattr(sae.cfg, "rescale_acts_by_decoder_norm", False):
        folded = copy.deepcopy(sae)
        folded.fold_W_dec_norm()
        for key in ("W_enc", "b_enc", "W_dec", "b_dec"):
            out[f"{name}.folded.{key}"] = getattr(folded, key).detach().clone()

# trained by SAELens' own training step (Adam, 30 steps on the inputs), saved in inference form
d = x.shape[1]
for name, sae in (("trained_topk", TopKTrainingSAE(TopKTrainingSAEConfig(d_in=d, d_sae=96, k=7))),
                  ("trained_jumprelu", JumpReLUTrainingSAE(JumpReLUTrainingSAEConfig(d_in=d, d_sae=96)))):
    opt = torch.optim.Adam(sae.parameters(), lr=1e-3)
    for step in range(30):
        coef = {"l0": 1e-3} if "jumprelu" in name else {"auxiliary_reconstruction_loss": 1 / 32}
        o = sae.training_forward_pass(TrainStepInput(sae_in=x, coefficients=coef, dead_neuron_mask=None,
                                                     n_training_steps=step, is_logging_step=False))
        opt.zero_grad()
        o.loss.backward()
        opt.step()
    sae.save_inference_model(str(work / f"saelens_{name}"))
    loaded = SAE.load_from_disk(str(work / f"saelens_{name}"), device="cpu")
    with torch.no_grad():
        out[name] = loaded.encode(x)
        out[f"{name}.decode"] = loaded.decode(out[name])
        out[f"{name}.forward"] = loaded(x)
save_file(out, str(work / "saelens_codes.safetensors"))

ours = {}
for d in sorted(work.glob("unitscope_*")):
    sae = SAE.load_from_disk(str(d), device="cpu")
    with torch.no_grad():
        ours[d.name] = sae.encode(x)
        ours[d.name + ".recon"] = sae.decode(ours[d.name])
        ours[d.name + ".forward"] = sae(x)
save_file(ours, str(work / "unitscope_codes_by_saelens.safetensors"))
print("ok", sorted(out), sorted(ours))
