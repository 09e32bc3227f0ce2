"""unitscope's own trainer (`Trainer`: begin, train_step, finish) with its defaults (TrainConfig: lr 1e-3 x
sqrt(4608 / units), 5% warm-up, last 20% linear decay, AuxK, b_dec at the geometric median, tied init), on the
harness's batches. spec["compute_dtype"]: "auto" (the default: bfloat16 where the CPU has fast bf16) or "float32".
"""

from common import batches, main

from unitscope import load_dictionary
from unitscope.dictionaries.train import TrainConfig, Trainer


class ArraySource:
    """A training source over the harness's rows, in the harness's batch order (what Trainer reads for its init)."""

    def __init__(self, x, spec):
        self.x, self.spec = x, spec

    def widths(self):
        return self.x.shape[1], None

    def metadata(self):
        return {"model_name": "benchmark", "dataset_path": "benchmark"}

    def batches(self, start):
        for xb in batches(self.x, self.spec["batch"], self.spec["steps"], self.spec["seed"], start):
            yield xb, xb


def build(x, spec):
    cfg = TrainConfig(n_units=spec["units"], k=spec["k"], batch_size=spec["batch"],
                      train_tokens=spec["batch"] * spec["steps"], compute_dtype=spec.get("compute_dtype", "auto"),
                      checkpoint_every=10**9, device=spec.get("device", "cpu"))
    trainer = Trainer(ArraySource(x, spec), spec.get("site", "site"), cfg, spec["out"], progress=False)
    trainer.begin()

    def step(i, xb):
        trainer.train_step(xb, xb)

    def save(out):
        trainer.finish()  # folds its own activation scale and writes the SAELens layout at spec["out"]

    def reconstruct(xb):
        return load_dictionary(spec["out"]).reconstruct(xb)[1]

    return step, save, reconstruct


if __name__ == "__main__":
    main(build)
