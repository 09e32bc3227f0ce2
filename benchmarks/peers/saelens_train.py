import torch
from common import Timer, batches, finish, setup
from sae_lens.saes.sae import TrainStepInput
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig

work, x, n, k, batch, steps, lr = setup()
sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=n, k=k))
opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
timer = Timer()
for step, xb in enumerate(batches(x, batch, steps)):
    out = sae.training_forward_pass(TrainStepInput(sae_in=xb, coefficients={"auxiliary_reconstruction_loss": 1 / 32},
                                                   dead_neuron_mask=None, n_training_steps=step, is_logging_step=False))
    opt.zero_grad()
    out.loss.backward()
    opt.step()
    timer.step()
if sae.cfg.rescale_acts_by_decoder_norm:
    sae.fold_W_dec_norm()  # inference form: plain TopK on (x - b_dec) @ W_enc + b_enc
with torch.no_grad():
    codes = sae.encode(x[:8])
assert codes.shape[-1] == n
finish(work, "saelens", timer.seconds(), (steps - timer.warm) * batch,
       {"W_enc": sae.W_enc, "b_enc": sae.b_enc, "W_dec": sae.W_dec, "b_dec": sae.b_dec})
