"""SAELens' own trainer (`SAETrainer.step`, as its `fit()` loop calls it) with its defaults: TopKTrainingSAEConfig
(decoder init norm 0.1, rescale_acts_by_decoder_norm, AuxK coefficient 1.0, no activation normalisation) and
SAETrainerConfig (Adam lr 3e-4, constant schedule, no warm-up, dead-feature window 1000 steps, grad clipping 1.0).
Saved with save_inference_model (SAELens' layout, which unitscope's load_dictionary reads as it is).
"""

from common import main
from sae_lens import SAE
from sae_lens.config import SAETrainerConfig
from sae_lens.saes.topk_sae import TopKTrainingSAE, TopKTrainingSAEConfig
from sae_lens.training.sae_trainer import SAETrainer


def build(x, spec):
    sae = TopKTrainingSAE(TopKTrainingSAEConfig(d_in=x.shape[1], d_sae=spec["units"], k=spec["k"]))
    cfg = SAETrainerConfig(total_training_samples=spec["steps"] * spec["batch"],
                           train_batch_size_samples=spec["batch"], device="cpu")
    cfg.lr_end = cfg.lr / 10  # as LanguageModelSAERunnerConfig's post-init sets it (used by cosine schedules only)
    trainer = SAETrainer(cfg, sae, data_provider=iter(()))

    def step(i, xb):  # the body of SAETrainer.fit()'s loop, without its logging, checkpoints and progress bar
        trainer.maybe_reset_sparsity()
        trainer.step(xb)
        trainer.n_training_steps += 1

    def save(out):
        trainer.set_final_sae_metadata()
        sae.save_inference_model(str(out))

    def reconstruct(xb):
        saved = SAE.load_from_disk(spec["out"], device="cpu")
        return saved.decode(saved.encode(xb))

    return step, save, reconstruct


if __name__ == "__main__":
    main(build)
