"""sparsify's training step, as `sparsify.Trainer.fit()` runs it for one hookpoint with loss_fn="fvu", with its
defaults (TrainConfig): the signum optimiser (SignSGD in a schedule-free wrapper, momentum 0.95, lr 5e-3 /
sqrt(latents / 2^14)), b_dec set to the first batch's mean, decoder rows renormalised before every step and their
parallel gradient removed, auxk_alpha 0. Its Trainer itself needs a live Hugging Face model, so the loop body is
called here on the harness's batches. Saved with save_to_disk (sparsify's layout, read by load_dictionary) after
the schedule-free wrapper's eval() swap to the averaged weights, as sparsify does before saving.
"""

import torch
from common import main
from schedulefree import ScheduleFreeWrapper
from sparsify import SparseCoder, SparseCoderConfig
from sparsify.config import TrainConfig
from sparsify.sign_sgd import SignSGD


def build(x, spec):
    tcfg = TrainConfig(SparseCoderConfig(num_latents=spec["units"], k=spec["k"]))
    torch.manual_seed(spec["seed"])
    device = spec.get("device", "cpu")
    sae = SparseCoder(x.shape[1], tcfg.sae, device, dtype=torch.float32)
    if (tcfg.optimizer, tcfg.lr, tcfg.auxk_alpha) != ("signum", None, 0.0):
        raise SystemExit(f"sparsify's training defaults changed ({tcfg}); update this script to follow them")
    opt = ScheduleFreeWrapper(SignSGD([dict(params=sae.parameters(), lr=5e-3 / (sae.num_latents / 2**14) ** 0.5)]),
                              momentum=0.95)
    opt.train()
    since_fired = torch.zeros(sae.num_latents, dtype=torch.long, device=device)

    def step(i, xb):
        if i == 0:
            sae.b_dec.data = xb.mean(0)
        sae.set_decoder_norm_to_unit_norm()
        total_variance = (xb - xb.mean(0)).pow(2).sum()
        out = sae(x=xb, y=xb, dead_mask=None, total_variance=total_variance)
        did_fire = torch.zeros(sae.num_latents, dtype=torch.bool, device=device)
        did_fire[out.latent_indices.flatten()] = True
        out.fvu.backward()
        sae.remove_gradient_parallel_to_decoder_directions()
        opt.step()
        opt.zero_grad()
        since_fired.add_(xb.shape[0])
        since_fired[did_fire] = 0

    def save(out):
        opt.eval()
        sae.save_to_disk(out)

    def reconstruct(xb):
        return SparseCoder.load_from_disk(spec["out"], device="cpu")(xb).sae_out

    return step, save, reconstruct


if __name__ == "__main__":
    main(build)
