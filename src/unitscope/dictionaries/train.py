"""Training loop for every trainable dictionary kind: one loop, kinds plug in via `training_forward`.

Activations are scaled so that E||x||² = d_in while training (learning rates then transfer across sites and
models) and the scale is folded into the weights on save. Warm-up, constant, then linear decay of the
learning rate; decoder rows kept at unit norm (the gradient component along each row removed first);
dead latents tracked in tokens since they last fired, fed to AuxK. Checkpoints every N steps hold the
weights, Adam state and counters in safetensors plus a JSON, so a killed run resumes to identical weights.

Under torchrun the ranks train data-parallel: each steps on its slice of the same global batch, with the FVU's
batch statistics taken over the global batch (distributed.data_parallel), so the summed gradients are the
single-process gradient and every rank keeps the same weights; rank 0 alone writes checkpoints and the result.
"""

from __future__ import annotations

import inspect
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file
from tqdm.auto import tqdm

from .. import distributed
from ..atomic import fsync, write_json_atomic
from ..errors import UnitscopeError
from ..fs import is_url, mirror_dir
from ..store import Store, part_bounds
from .base import ARCHITECTURES, Dictionary
from .kernels import release_scratch
from .sae import SparseAutoencoder
from .sources import LiveSource, StoreSource

CKPT = "checkpoint"
# kinds whose loss is a sum over rows once the FVU's statistics and the penalties' means are global (sae.fvu,
# distributed.row_mean), and BatchTopK, whose selection is made over the global batch (distributed.kth_largest):
# exact data-parallel steps. Resampling chooses on rank 0 from the gathered global batch (resample_dead).
DATA_PARALLEL_KINDS = ("topk", "batchtopk", "matryoshka_topk", "topk_transcoder", "topk_skip_transcoder", "standard",
                       "jumprelu", "transcoder", "skip_transcoder")


def checkpoint_dir(out: str | Path) -> Path:
    """Where the checkpoints of the dictionary that will be saved at `out` live (beside it, hidden; for a URL,
    s3://..., in unitscope's local cache: a kill resumes on this machine, and only the finished dictionary is
    uploaded)."""
    if is_url(out):
        mirror = mirror_dir(str(out))
        return mirror.with_name(f"{mirror.name}.{CKPT}")
    out = Path(out)
    return out.with_name(f".{out.name}.{CKPT}")


@dataclass
class TrainConfig:
    architecture: str = "topk"
    n_units: int = 4608
    k: int = 32
    lr: float | None = None  # default 1e-3 * sqrt(4608 / n_units) * sqrt(576 / d_in): see learning_rate_for
    batch_size: int = 2048
    train_tokens: int = 2_000_000
    warmup_frac: float = 0.05
    decay_frac: float = 0.2
    dead_tokens: int = 250_000
    checkpoint_every: int = 100
    seed: int = 0
    compute_dtype: str = "auto"  # encoder product dtype: auto = bfloat16 where the hardware has fast bf16
    device: str = "cpu"
    resample_every: int = 0  # steps between resampling dead latents (0: off; AuxK handles TopK kinds)
    log_to: str | None = None  # "wandb" or "trackio", when installed
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise UnitscopeError(
                f"unknown architecture {self.architecture!r}; known ones are {', '.join(sorted(ARCHITECTURES))}")
        if self.n_units <= 0:
            raise UnitscopeError(f"--units must be positive, not {self.n_units}")
        if _accepts(ARCHITECTURES[self.architecture], "k") and not 0 < self.k <= self.n_units:
            raise UnitscopeError(f"k={self.k} is not valid for {self.n_units} units; use 1 <= k <= {self.n_units}")
        if self.lr is not None and not self.lr > 0:
            raise UnitscopeError(f"the learning rate must be positive, not {self.lr}")
        if self.batch_size <= 0 or self.train_tokens < self.batch_size:
            raise UnitscopeError(
                f"--train-tokens ({self.train_tokens}) must be at least one batch ({self.batch_size} tokens)")
        if self.device.startswith("auto"):
            raise UnitscopeError(f"device {self.device!r} is a device map, for a model; training runs on one device: "
                                 "cpu, cuda, cuda:N or mps")
        from ..subject import check_device  # here: the subject module is above this one in the pipeline

        check_device(self.device)

    def learning_rate_for(self, d_in: int) -> float:
        """`lr`, else 1e-3 * sqrt(4608 / n_units) * sqrt(576 / d_in): tuned on SmolLM2 block 6 (576 -> 4608). The
        d_in factor: a unit-norm row has entries of size ~1/sqrt(d_in) and Adam moves each entry by ~lr, so the
        same relative step needs lr ∝ 1/sqrt(d_in); without it BatchTopK at d_in = 128 recovered 77% of planted
        features and with lr x2 98% (synthetic set, 512 features in 128 dimensions)."""
        if self.lr is not None:
            return self.lr
        return 1e-3 * math.sqrt(4608 / self.n_units) * math.sqrt(576 / d_in)

    @property
    def steps(self) -> int:
        return self.train_tokens // self.batch_size


def _accepts(cls: type, name: str) -> bool:
    return any(name in inspect.signature(c.__init__).parameters for c in cls.__mro__ if "__init__" in c.__dict__)


def is_transcoder(architecture: str) -> bool:
    return "transcoder" in architecture


def build_dictionary(cfg: TrainConfig, d_in: int, metadata: dict[str, Any], d_out: int | None = None
                     ) -> SparseAutoencoder:
    cls = ARCHITECTURES[cfg.architecture]
    kwargs: dict[str, Any] = dict(cfg.extra)
    if _accepts(cls, "k"):
        kwargs["k"] = cfg.k
    gen = torch.Generator().manual_seed(cfg.seed)
    sae = cls(d_in, cfg.n_units, metadata=metadata, d_out=d_out, **kwargs)
    sae.reset_parameters(gen)
    return sae


def resolve_compute_dtype(name: str, device: str) -> torch.dtype | None:
    """None for float32. `auto` picks bfloat16 on CUDA and on CPUs with AVX512-BF16 or AMX, where the encoder
    product runs ~2x faster and held-out FVU is unchanged (benchmarks/train_throughput.py); float32 elsewhere."""
    if name == "float32":
        return None
    if name == "bfloat16":
        return torch.bfloat16
    if name != "auto":
        raise UnitscopeError(f"unknown compute dtype {name!r}; use auto, float32 or bfloat16")
    if device.startswith("cuda"):
        return torch.bfloat16
    fast = getattr(torch.cpu, "_is_avx512_bf16_supported", lambda: False)() or getattr(
        torch.cpu, "_is_amx_tile_supported", lambda: False)()
    return torch.bfloat16 if fast else None


def fused_adam_available(device: torch.device) -> bool:
    """Fused Adam runs on CUDA, and on CPU from torch 2.4 (the supported range starts at 2.2)."""
    if device.type == "cuda":
        return True
    major, minor = (int(v) for v in torch.__version__.split(".")[:2])
    return device.type == "cpu" and (major, minor) >= (2, 4)


def lr_at(step: int, cfg: TrainConfig, d_in: int) -> float:
    warm = max(1, int(cfg.steps * cfg.warmup_frac))
    decay_start = int(cfg.steps * (1 - cfg.decay_frac))
    base = cfg.learning_rate_for(d_in)
    if step < warm:
        return base * (step + 1) / warm
    if step >= decay_start and cfg.decay_frac > 0:
        return base * max(0.0, (cfg.steps - step) / max(1, cfg.steps - decay_start))
    return base


def geometric_median(x: torch.Tensor, iters: int = 30) -> torch.Tensor:
    """Weiszfeld's algorithm: a robust centre for initialising b_dec."""
    m = x.mean(0)
    for _ in range(iters):
        w = 1 / (x - m).norm(dim=1).clamp_min(1e-6)
        m = (w[:, None] * x).sum(0) / w.sum()
    return m


class Trainer:
    """Trains one dictionary from a store site; `run()` resumes from `out/checkpoint` when present."""

    def __init__(self, store: Store | StoreSource | LiveSource, site: str, cfg: TrainConfig, out: str | Path,
                 progress: bool = True, target_site: str | None = None):
        cfg.validate()
        distributed.init(cfg.device)
        if distributed.active() and cfg.architecture not in DATA_PARALLEL_KINDS:
            raise UnitscopeError(f"data-parallel training (torchrun) takes {', '.join(DATA_PARALLEL_KINDS)}, not "
                                 f"{cfg.architecture!r}; run it as one process")
        self.site, self.cfg, self.progress = site, cfg, progress
        self.out = out if is_url(out) else Path(out)
        self.target_site = target_site
        self.device = distributed.local_device(cfg.device)
        self.source = (StoreSource(store, site, target_site, cfg.batch_size, cfg.seed) if isinstance(store, Store)
                       else store)
        d_in, d_out = self.source.widths()
        metadata = {
            **self.source.metadata(), "hook_name": site, **({"hook_name_out": target_site} if target_site else {}),
            "prepend_bos": False, "exclude_first_position": True,
        }
        self.sae = build_dictionary(cfg, d_in, metadata, d_out).to(self.device)
        # fused: one kernel per parameter instead of ~10 passes over each (CPU and CUDA); the state stays Adam's
        self.opt = torch.optim.Adam(self.sae.parameters(), lr=cfg.learning_rate_for(d_in), betas=(0.9, 0.999), eps=1e-8,
                                    fused=fused_adam_available(torch.device(self.device)))
        self.step = 0
        self.scale = 1.0
        self.out_scale = 1.0
        self.since_fired = torch.zeros(cfg.n_units, dtype=torch.long, device=self.device)
        self.logger = _logger(cfg, out) if distributed.is_main() else None
        self.log: list[dict[str, float]] = []
        self.seconds = 0.0
        self.resampled = 0  # latents restarted by resample_dead

    # ---- checkpoints ----------------------------------------------------------------------------
    # `.NAME.checkpoint/` holds the two newest checkpoints as STEP.safetensors + STEP.json (and state.json, a
    # copy of the newest JSON). The tensors are fsynced before the JSON that names the step, the JSON before
    # older checkpoints are removed, so a kill at any moment leaves the previous checkpoint or the new one;
    # a sweep resumes every member from the newest step that all of them have.
    def _ckpt_dir(self) -> Path:
        return checkpoint_dir(self.out)

    def checkpoint_steps(self) -> list[int]:
        """Steps of the complete checkpoints on disk, oldest first (a step's JSON is written last)."""
        d = self._ckpt_dir()
        if not d.is_dir():
            return []
        steps = sorted(int(p.stem) for p in d.glob("*.json") if p.stem.isdigit())
        if not steps and (d / "state.json").is_file() and (d / "state.safetensors").is_file():
            steps = [_read_state(d / "state.json")["step"]]  # written by unitscope 0.1's single-slot layout
        return steps

    def _ckpt_files(self, step: int) -> tuple[Path, Path]:
        d = self._ckpt_dir()
        if not (d / f"{step:09d}.json").is_file() and (d / "state.safetensors").is_file():
            return d / "state.json", d / "state.safetensors"
        return d / f"{step:09d}.json", d / f"{step:09d}.safetensors"

    def save_checkpoint(self, keep: int = 2) -> None:
        """Rank 0 writes (every rank holds the same state); the others wait until the step is on disk."""
        if distributed.is_main():
            self._write_checkpoint(keep)
        distributed.barrier()

    def _write_checkpoint(self, keep: int) -> None:
        d = self._ckpt_dir()
        d.mkdir(parents=True, exist_ok=True)
        tensors = {f"param.{k}": v.detach().cpu().clone(memory_format=torch.contiguous_format)
                   for k, v in self.sae.state_dict().items()}
        names = [n for n, _ in self.sae.named_parameters()]
        for i, name in enumerate(names):
            st = self.opt.state.get(self.opt.param_groups[0]["params"][i], {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    tensors[f"adam.{name}.{key}"] = st[key].cpu().clone(memory_format=torch.contiguous_format)
            if "step" in st:
                tensors[f"adam.{name}.step"] = torch.as_tensor(st["step"]).reshape(1).float()
        tensors["since_fired"] = self.since_fired.cpu().clone()
        state = {"step": self.step, "scale": self.scale, "out_scale": self.out_scale, "config": asdict(self.cfg),
                 "site": self.site, "log": self.log, "seconds": self.seconds, "data": self._data_identity(),
                 "resampled": self.resampled}
        js, st_path = d / f"{self.step:09d}.json", d / f"{self.step:09d}.safetensors"
        tmp = st_path.with_name(st_path.name + ".tmp")
        save_file(tensors, str(tmp))
        fsync(tmp)
        os.replace(tmp, st_path)
        fsync(d)
        write_json_atomic(js, state)  # the step is complete from here on
        write_json_atomic(d / "state.json", state)
        fsync(d)
        for old in self.checkpoint_steps()[:-keep]:
            self._remove_checkpoint(old)
        (d / "state.safetensors").unlink(missing_ok=True)  # the former single-slot layout, now superseded

    def _remove_checkpoint(self, step: int) -> None:
        js, st_path = self._ckpt_files(step)
        js.unlink(missing_ok=True)  # the JSON first: a step without it is not complete
        st_path.unlink(missing_ok=True)

    def load_checkpoint(self, step: int | None = None) -> bool:
        """Load the checkpoint at `step` (default: the newest complete one); False when there is none."""
        steps = self.checkpoint_steps()
        if step is None:
            step = steps[-1] if steps else 0
        if step == 0:
            return False
        if step not in steps:
            raise UnitscopeError(f"no checkpoint of step {step} in {str(self._ckpt_dir())!r}")
        js, st_path = self._ckpt_files(step)
        state = _read_state(js)
        self._check_checkpoint(state)
        tensors = load_file(str(st_path), device=self.device)
        self.sae.load_state_dict({k[6:]: v for k, v in tensors.items() if k.startswith("param.")})
        fused = bool(self.opt.param_groups[0].get("fused"))
        for i, (name, _) in enumerate(self.sae.named_parameters()):
            p = self.opt.param_groups[0]["params"][i]
            if f"adam.{name}.exp_avg" in tensors:
                step = tensors[f"adam.{name}.step"].reshape(())
                self.opt.state[p] = {  # the moments in the parameter's own layout (W_enc is a transposed view)
                    "step": step.to(p.device, torch.float32) if fused else step.cpu(),
                    "exp_avg": torch.empty_like(p).copy_(tensors[f"adam.{name}.exp_avg"]),
                    "exp_avg_sq": torch.empty_like(p).copy_(tensors[f"adam.{name}.exp_avg_sq"]),
                }
        self.since_fired = tensors["since_fired"].clone()
        self.step, self.scale, self.log = state["step"], state["scale"], state["log"]
        self.out_scale = state.get("out_scale", self.scale)
        self.seconds = state.get("seconds", 0.0)
        self.resampled = state.get("resampled", 0)
        return True

    def _data_identity(self) -> dict[str, Any]:
        meta = self.source.metadata()
        return {k: meta.get(k) for k in ("model_fingerprint", "corpus_fingerprint", "trained_windows",
                                          "trained_tokens")}

    def _check_checkpoint(self, state: dict[str, Any]) -> None:
        if state["config"] != asdict(self.cfg) or state["site"] != self.site:
            raise UnitscopeError(
                f"a checkpoint at {str(self._ckpt_dir())!r} was made with other training options; rerun with the "
                "same options or pass --overwrite to start again"
            )
        if "data" in state and state["data"] != self._data_identity():
            raise UnitscopeError(
                f"a checkpoint at {str(self._ckpt_dir())!r} was made from other data (the store was re-recorded or "
                "extended since); pass --overwrite to start again on this data")

    def remove_checkpoints(self) -> None:
        if distributed.is_main():
            shutil.rmtree(self._ckpt_dir(), ignore_errors=True)

    # ---- training ---------------------------------------------------------------------------------
    def _batches(self, start: int, whole: bool = False):
        """Yields (input, target) batches on the training device; the target is the input except for transcoders.
        Under torchrun, this rank's slice of each global batch (`whole`: the global batch itself)."""
        dev = self.device
        part = None if whole or not distributed.active() else (distributed.rank(), distributed.world())
        if part and isinstance(self.source, StoreSource):
            batches = self.source.batches(start, part=part)
        else:
            batches = self.source.batches(start)
            if part:  # a live source: the slice is taken after the forward
                batches = ((x[slice(*part_bounds(len(x), *part))], y[slice(*part_bounds(len(y), *part))])
                           for x, y in batches)
        for x, y in batches:
            yield x.to(dev), y.to(dev)

    def _initialise(self) -> None:
        it = self._batches(0, whole=True)  # every rank starts from the same global batches
        xs, ys = zip(*[next(it) for _ in range(min(4, self.cfg.steps))])
        x, y = torch.cat(xs), torch.cat(ys)

        def scale_of(t: torch.Tensor) -> float:
            return float(math.sqrt(t.shape[1] / t.pow(2).sum(1).mean().clamp_min(1e-12)))

        self.scale = scale_of(x)
        self.out_scale = scale_of(y) if self.target_site else self.scale
        with torch.no_grad():
            self.sae.b_dec.copy_(geometric_median(y[:4096] * self.out_scale))
        self.sae.initialise(x * self.scale)

    def begin(self, step: int | None = None) -> None:
        """Resume from the checkpoint at `step` (default: the newest; 0: none), or initialise scales and b_dec
        from the first batches. Checkpoints after `step` are dropped: the run will write them again."""
        steps = self.checkpoint_steps()
        if steps:
            self._check_checkpoint(_read_state(self._ckpt_files(steps[-1])[0]))
        if not self.load_checkpoint(step):
            self._initialise()
        distributed.barrier()  # every rank has read the checkpoints before rank 0 drops any
        if distributed.is_main():
            for later in [s for s in steps if s > self.step]:
                self._remove_checkpoint(later)
        self._compute = resolve_compute_dtype(self.cfg.compute_dtype, self.cfg.device) if self.sae.sparse_kernels \
            else None
        self._ema_fvu: float | None = None
        self._last = None

    @property
    def dead_tokens(self) -> int:
        """Tokens without firing after which a latent counts as dead: `dead_tokens`, or an eighth of the run when
        that is shorter (the default 250k is an eighth of the default 2M; a short run then still revives latents)."""
        return max(self.cfg.batch_size, min(self.cfg.dead_tokens, self.cfg.steps * self.cfg.batch_size // 8))

    def train_step(self, x: torch.Tensor, y: torch.Tensor) -> None:
        """One optimiser step on a raw (unscaled) batch; the time it takes counts towards tokens/s."""
        cfg, t0 = self.cfg, time.perf_counter()
        x = x * self.scale
        y = y * self.out_scale if self.target_site else x
        dead = self.since_fired >= self.dead_tokens
        for g in self.opt.param_groups:
            g["lr"] = lr_at(self.step, cfg, self.sae.d_in)
        with distributed.data_parallel():
            out = self.sae.training_forward(x, dead=dead, target=y, compute_dtype=self._compute)
        self.opt.zero_grad(set_to_none=True)
        out.loss.backward()
        n, l0, f, loss = x.shape[0], out.l0, None, None
        if distributed.active():  # the ranks' shares summed: global gradient, FVU, loss, L0 and fired latents
            distributed.all_reduce_grads(list(self.sae.parameters()))
            fired = torch.zeros(cfg.n_units + 4, dtype=torch.float64, device=x.device)
            fired[out.fired] = 1
            fired[-4:] = torch.tensor([x.shape[0], out.l0 * x.shape[0], float(out.fvu), float(out.loss.detach())])
            distributed.all_reduce_(fired)
            n, f, loss = int(fired[-4]), float(fired[-2]), float(fired[-1])
            l0 = float(fired[-3]) / n
            out.fired = fired[:-4].nonzero().flatten()
        self._constrain_decoder_grad()
        self.opt.step()
        self._normalise_decoder()
        self.sae.adapt_sparsity(l0)
        self.since_fired += n
        self.since_fired[out.fired.unique()] = 0
        self.step += 1
        f = float(out.fvu) if f is None else f
        self._ema_fvu = f if self._ema_fvu is None else 0.95 * self._ema_fvu + 0.05 * f
        self.seconds += time.perf_counter() - t0
        if self.step % 10 == 0 or self.step == cfg.steps:
            # fvu: the whole dictionary's on this batch; loss: what is minimised (penalties, AuxK, prefix means)
            loss = float(out.loss.detach()) if loss is None else loss
            self.log.append({"step": self.step, "fvu": round(f, 5), "loss": round(loss, 5),
                             "l0": round(l0, 2),
                             "dead_frac": round(float(dead.float().mean()), 4),
                             **({"sparsity_coefficient": round(out.extra["sparsity_coefficient"], 6)}
                                if "sparsity_coefficient" in out.extra else {}),
                             "tokens_per_s": round(self.step * cfg.batch_size / max(self.seconds, 1e-9))})
            self._last = self.log[-1]
            if self.logger:
                self.logger(self.log[-1])
        if cfg.resample_every and self.step % cfg.resample_every == 0 and self.step < cfg.steps * 0.8:
            self.resample_dead(x)
        if self.step % cfg.checkpoint_every == 0 and self.step < cfg.steps:
            self.save_checkpoint()

    @torch.no_grad()
    def resample_dead(self, x: torch.Tensor) -> int:
        """Anthropic-style resampling: dead latents restart at batch inputs that are reconstructed worst.

        The decoder row becomes the (unit-norm) residual of a high-loss input, the encoder row that direction
        scaled to 0.2 x the mean alive encoder norm, the bias 0; their Adam moments are reset.
        """
        dead = (self.since_fired >= self.dead_tokens).nonzero().flatten()  # the same on every rank
        if not len(dead):
            return 0
        sae = self.sae
        x = distributed.gather_rows(x)  # under torchrun the global batch, the rows one process would choose from
        # rank 0 chooses the rows and the new weights, every rank takes its choice: [decoder rows | encoder columns]
        new = x.new_zeros(len(dead), sae.d_out + sae.d_in)
        if distributed.is_main():
            codes, recon = sae.reconstruct(x)
            err = (x - recon).pow(2).sum(1) if sae.d_out == sae.d_in else (x - x.mean(0)).pow(2).sum(1)
            gen = torch.Generator(device=x.device).manual_seed(self.cfg.seed + self.step)
            pick = torch.multinomial(err / err.sum(), len(dead), replacement=len(dead) > len(err), generator=gen)
            target = (x - recon)[pick] if sae.d_out == sae.d_in else x[pick]
            new[:, :sae.d_out] = target / target.norm(dim=1, keepdim=True).clamp_min(1e-8)
            alive = torch.ones(sae.n_units, dtype=torch.bool, device=x.device)
            alive[dead] = False
            enc_norm = sae.W_enc[:, alive].norm(dim=0).mean() if alive.any() else torch.tensor(1.0)
            new[:, sae.d_out:] = x[pick] / x[pick].norm(dim=1, keepdim=True).clamp_min(1e-8) * 0.2 * enc_norm
        distributed.broadcast_(new)
        if sae.d_out == sae.d_in:
            sae.W_dec[dead] = new[:, :sae.d_out]
        sae.W_enc[:, dead] = new[:, sae.d_out:].t()
        sae.b_enc[dead] = 0
        for p, rows in ((sae.W_dec, dead), (sae.b_enc, dead)):
            st = self.opt.state.get(p, {})
            for key in ("exp_avg", "exp_avg_sq"):
                if key in st:
                    st[key][rows] = 0
        st = self.opt.state.get(sae.W_enc, {})
        for key in ("exp_avg", "exp_avg_sq"):
            if key in st:
                st[key][:, dead] = 0
        self.since_fired[dead] = 0
        self.resampled += len(dead)
        return len(dead)

    def postfix(self) -> dict[str, str]:
        if self._last is None:
            return {}
        return {"fvu": f"{self._ema_fvu:.3f}", "l0": f"{self._last['l0']:.1f}",
                "dead": f"{self._last['dead_frac']:.2f}", "tok_s": str(self._last["tokens_per_s"])}

    def run(self) -> Dictionary:
        return train_together([self], progress=self.progress)[0]

    @torch.no_grad()
    def _constrain_decoder_grad(self) -> None:
        """Remove the gradient's component along each (unit-norm) decoder row. Under no_grad: recorded by autograd,
        this edit chained every step's graph onto the last and held ~B x n floats per step (a leak of GBs)."""
        w, g = self.sae.W_dec, self.sae.W_dec.grad
        enc = self.sae.W_enc
        # fused Adam silently misapplies a gradient whose layout differs from its parameter's (W_enc is a view)
        assert enc.grad is None or enc.grad.stride() == enc.stride(), "W_enc's gradient lost the parameter's layout"
        if g is not None:
            g.sub_((g * w).sum(1, keepdim=True) * w)

    @torch.no_grad()
    def _normalise_decoder(self) -> None:
        self.sae.W_dec.div_(self.sae.W_dec.norm(dim=1, keepdim=True).clamp_min(1e-8))

    def compute_dtype_used(self) -> str:
        """The encoder product's dtype as it ran: only the sparse-kernel kinds use `compute_dtype`."""
        used = resolve_compute_dtype(self.cfg.compute_dtype, self.cfg.device) if self.sae.sparse_kernels else None
        return str(used or torch.float32).removeprefix("torch.")

    def finish(self, remove_checkpoints: bool = True) -> Dictionary:
        """Save the dictionary with its train.json (one atomic replacement), then drop the checkpoints."""
        release_scratch()  # the step's reusable buffers are not needed once training ends
        final = self.sae
        final.fold_scaling(self.scale, self.out_scale)
        final.metadata["activation_scale_folded"] = self.scale
        summary = {"config": asdict(self.cfg), "site": self.site, "steps": self.step,
                   "compute_dtype": self.compute_dtype_used(),
                   "tokens": self.step * self.cfg.batch_size, "seconds": round(self.seconds, 2),
                   "tokens_per_s": round(self.step * self.cfg.batch_size / max(self.seconds, 1e-9), 1),
                   **({"resampled": self.resampled} if self.cfg.resample_every else {}), "log": self.log}
        if distributed.is_main():
            final.save(self.out, extra={"train.json": summary})
        distributed.barrier()
        if remove_checkpoints:
            self.remove_checkpoints()
        return final.eval()


def train(store: Store | str | Path, site: str | None, cfg: TrainConfig, out: str | Path,
          progress: bool = True, overwrite: bool = False, target_site: str | None = None) -> Dictionary:
    """Train a dictionary on `site` of a store and save it at `out` (resuming a killed run).

    Transcoders read `site` and reconstruct `target_site` (default: `blocks.{i}.mlp_in` -> `mlp_out`).
    """
    store = store if isinstance(store, Store) else Store.open(store)
    cfg.validate()
    if not issubclass(ARCHITECTURES[cfg.architecture], SparseAutoencoder):
        raise UnitscopeError(f"{cfg.architecture!r} is fitted, not trained by gradient descent; use "
                             "unitscope.dictionaries.fit (the CLI's `train` does this for you)")
    if is_transcoder(cfg.architecture):
        site = site or next((s for s in store.sites if s.endswith("mlp_in")), None)
        if site is None:
            raise UnitscopeError(f"a transcoder needs a store with an mlp_in site; it holds {', '.join(store.sites)}")
        target_site = target_site or site.replace("mlp_in", "mlp_out")
        store.width(target_site)
    site = site or store.sites[0]
    store.width(site)
    out = out if is_url(out) else Path(out)
    distributed.init(cfg.device)
    if overwrite and distributed.is_main():
        shutil.rmtree(checkpoint_dir(out), ignore_errors=True)
    distributed.barrier()
    return Trainer(store, site, cfg, out, progress=progress, target_site=target_site).run()


def _read_state(path: Path) -> dict[str, Any]:
    return json.loads(path.read_text())


def _logger(cfg: TrainConfig, out: Path):
    """A log function for wandb or trackio when asked for and installed; None otherwise."""
    if not cfg.log_to:
        return None
    if cfg.log_to not in ("wandb", "trackio"):
        raise UnitscopeError(f"unknown logger {cfg.log_to!r}; use wandb or trackio")
    try:
        mod = __import__(cfg.log_to)
    except ImportError:
        raise UnitscopeError(f"--log-to {cfg.log_to} needs the package: pip install {cfg.log_to}") from None
    mod.init(project="unitscope", name=str(out).rstrip("/").rsplit("/", 1)[-1], config=asdict(cfg))
    return lambda rec: mod.log(rec)


def train_together(trainers: list[Trainer], progress: bool = True) -> list[Dictionary]:
    """Train several dictionaries from one read of the data: every batch steps every trainer.

    The trainers must share the store, site, batch size, seed, token budget and checkpoint interval, so
    that they stay in lockstep (a sweep of widths, k or kinds costs one pass over the store).
    """
    lead = trainers[0]
    keys = ("batch_size", "seed", "train_tokens", "checkpoint_every")  # the lockstep contract
    for t in trainers[1:]:
        if (t.site, t.target_site) != (lead.site, lead.target_site) or any(
                getattr(t.cfg, k) != getattr(lead.cfg, k) for k in keys):
            raise UnitscopeError(f"dictionaries trained together must share the site and {', '.join(keys)}")
    # a kill between the members' checkpoint writes leaves some one checkpoint ahead: all resume from the newest
    # step that every member has (each keeps its previous checkpoint for this)
    common = set.intersection(*(set(t.checkpoint_steps()) for t in trainers))
    for t in trainers:
        t.begin(max(common, default=0))
    steps = {t.step for t in trainers}
    if len(steps) > 1:
        raise UnitscopeError("the checkpoints of this sweep stopped at different steps; pass --overwrite")
    names = ", ".join(sorted({t.cfg.architecture for t in trainers}))
    bar = tqdm(total=lead.cfg.steps, initial=lead.step, unit="step", disable=not progress,
               desc=f"train {names}" + (f" x{len(trainers)}" if len(trainers) > 1 else ""))
    try:
        batches = lead._batches(lead.step)
        while lead.step < lead.cfg.steps:
            x, y = next(batches)
            for t in trainers:
                t.train_step(x, y)
            bar.set_postfix(**lead.postfix())
            bar.update(1)
    finally:
        bar.close()
    # every dictionary is saved before any checkpoint goes, so a kill in between resumes the whole sweep
    done = [t.finish(remove_checkpoints=False) for t in trainers]
    for t in trainers:
        t.remove_checkpoints()
    return done