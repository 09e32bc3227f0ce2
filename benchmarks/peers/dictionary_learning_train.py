from common import Timer, batches, finish, setup
from dictionary_learning.trainers.top_k import TopKTrainer

work, x, n, k, batch, steps, lr = setup()
trainer = TopKTrainer(steps=steps, activation_dim=x.shape[1], dict_size=n, k=k, layer=6, lm_name="smollm2",
                      lr=lr, device="cpu", seed=0, warmup_steps=1, threshold_start_step=steps)
timer = Timer()
for step, xb in enumerate(batches(x, batch, steps)):
    trainer.update(step, xb)
    timer.step()
ae = trainer.ae
finish(work, "dictionary_learning", timer.seconds(), (steps - timer.warm) * batch,
       {"W_enc": ae.encoder.weight.t(), "b_enc": ae.encoder.bias, "W_dec": ae.decoder.weight.t(), "b_dec": ae.b_dec})
