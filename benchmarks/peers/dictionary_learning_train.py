"""dictionary_learning's own trainer (`TopKTrainer.update`, as its `trainSAE` loop calls it) with its defaults:
lr 2e-4 / sqrt(dict_size / 2^14), AuxK 1/32, no decay, b_dec at the geometric median of the first batch, grad
clipping 1.0, and trainSAE's normalize_activations (scale to unit mean squared norm by get_norm_factor, biases
rescaled on save). One default is capped: its 1000-step warm-up, meant for runs of ~100k steps, would span the
whole of a 2M-token run, so it is min(1000, 5% of the steps). Saved as safetensors of the AutoEncoderTopK state
(its own format is a torch pickle, which unitscope never loads).
"""

from common import batches, main
from dictionary_learning.trainers.top_k import TopKTrainer
from dictionary_learning.training import get_norm_factor
from safetensors.torch import save_file


def build(x, spec):
    steps = spec["steps"]
    trainer = TopKTrainer(steps=steps, activation_dim=x.shape[1], dict_size=spec["units"], k=spec["k"], layer=6,
                          lm_name="SmolLM2-135M-Instruct", device="cpu", seed=spec["seed"],
                          warmup_steps=min(1000, max(1, steps // 20)))
    norm_factor = get_norm_factor(batches(x, spec["batch"], min(100, steps), spec["seed"]), steps=min(100, steps))

    def step(i, xb):
        trainer.update(i, xb / norm_factor)

    def save(out):
        ae = trainer.ae
        ae.scale_biases(norm_factor)  # trainSAE's fold: the saved weights act on un-normalised activations
        out.mkdir(parents=True, exist_ok=True)
        save_file({"W_enc": ae.encoder.weight.t().contiguous(), "b_enc": ae.encoder.bias.contiguous(),
                   "W_dec": ae.decoder.weight.t().contiguous(), "b_dec": ae.b_dec.contiguous(),
                   "k": ae.k.reshape(1)}, str(out / "weights.safetensors"))

    def reconstruct(xb):
        return trainer.ae(xb)  # after save's scale_biases: acts on the un-normalised rows

    return step, save, reconstruct


if __name__ == "__main__":
    main(build)
