import torch
from common import Timer, batches, finish, setup
from sparsify import SparseCoder, SparseCoderConfig

work, x, n, k, batch, steps, lr = setup()
sae = SparseCoder(x.shape[1], SparseCoderConfig(num_latents=n, k=k))
opt = torch.optim.Adam(sae.parameters(), lr=lr, betas=(0.9, 0.999))
timer = Timer()
for xb in batches(x, batch, steps):
    out = sae(xb, dead_mask=None)
    loss = out.fvu
    opt.zero_grad()
    loss.backward()
    sae.remove_gradient_parallel_to_decoder_directions()
    opt.step()
    sae.set_decoder_norm_to_unit_norm()
    timer.step()
finish(work, "sparsify", timer.seconds(), (steps - timer.warm) * batch,
       {"W_enc": sae.encoder.weight.t(), "b_enc": sae.encoder.bias, "W_dec": sae.W_dec, "b_dec": sae.b_dec})
