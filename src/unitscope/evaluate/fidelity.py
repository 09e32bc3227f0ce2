"""Fidelity of a dictionary on held-out windows, spliced into the live model. SAEBench-shaped JSON.

Formulas (sums run over evaluated positions p; positions excluded from training, i.e. the first of each
window and special tokens, are neither spliced nor counted):
  FVU            = sum_p ||y_p - ŷ_p||² / sum_p ||y_p - mean(y)||²      (1 - explained variance)
  L0             = mean_p #{i : code_{p,i} != 0}
  frac_dead      = fraction of units that never fire on the evaluated tokens
  frac_dense     = fraction of units that fire on more than 10% of evaluated tokens
  KL             = mean_p KL(p_clean || p_spliced) of the next-token distributions
  CE loss recovered, two ways, named apart because they differ (by ~0.01-0.03 on SmolLM2):
    ce_loss_score                       = (CE_zero_all - CE_spliced) / (CE_zero_all - CE_clean)
        CE_zero_all: the site's activation zeroed at EVERY position, the excluded ones included, as SAELens'
        and SAEBench's zero ablation does; this is the figure to compare with theirs.
    ce_loss_score_zero_evaluated_positions = (CE_zero_eval - CE_spliced) / (CE_zero_eval - CE_clean)
        CE_zero_eval: zeroed only at the evaluated positions (the excluded ones pass through, exactly as in the
        spliced forward), so numerator and denominator ablate the same positions.
where y is the activation at the dictionary's output site and ŷ its reconstruction from the input site, and
every CE is the mean next-token loss over predictions made at evaluated positions.

The four forwards of a batch share the computation below the site: the clean forward keeps the output of every
block below the site's block, and the spliced and ablated forwards replay those outputs instead of recomputing
them (the embedding lookup still runs), so they pay only for the site's block and the ones above it. Models
outside the known families (sites.py) run every forward whole.
"""

from __future__ import annotations

import copy
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from typing import Any

import numpy as np
import torch
from tqdm.auto import tqdm

from ..corpus import Corpus, special_ids, training_mask
from ..dictionaries import Dictionary
from ..errors import UnitscopeError
from ..hooks import _primary, _with_primary
from ..sites import family_of
from ..subject import Subject
from ..versions import versions
from .geometry import geometry


@torch.inference_mode()
def evaluate_fidelity(subject: Subject, dictionary: Dictionary, corpus: Corpus, ctx_len: int,
                      start_window: int, n_tokens: int = 16384, batch_size: int = 8,
                      progress: bool = True, share_lower: bool = True,
                      geometry_rows: int = 16384) -> dict[str, Any]:
    """Evaluate reconstruction, sparsity and downstream loss on windows `start_window`, ... of `corpus`.

    The `geometry` section (geometry.py) uses the first `geometry_rows` evaluated positions (0: no section).
    `share_lower=False` runs all four forwards whole (the reference the shared path is tested against).
    """
    for name, value in (("--eval-tokens", n_tokens), ("--eval-batch-size", batch_size)):
        if value < 1:
            raise UnitscopeError(f"{name} must be a positive number, not {value}")
    in_site = dictionary.input_site
    out_site = dictionary.output_site
    if not in_site:
        raise UnitscopeError("the dictionary's cfg.json names no hook_name (its site); it cannot be spliced")
    width = subject.width(in_site)
    if width != dictionary.d_in:
        raise UnitscopeError(
            f"the dictionary expects width {dictionary.d_in} but site {in_site!r} of {subject.name} has width {width}")
    n_windows = max(1, -(-n_tokens // ctx_len))
    specials = special_ids(subject.tokenizer)
    param = next(dictionary.parameters(), None)
    ddtype = param.dtype if param is not None else torch.float32
    n = 0
    sq_err = 0.0
    sum_y = None
    sum_y2 = 0.0
    l0_sum = 0.0
    fired = torch.zeros(dictionary.n_units, dtype=torch.long)
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0, "zero_all": 0.0}
    kl_sum = {"spliced": 0.0, "zero": 0.0, "zero_all": 0.0}
    n_pred = 0
    kept_x: list[torch.Tensor] = []
    kept_y: list[torch.Tensor] = []
    n_kept = 0
    below = _BlocksBelow(subject, out_site if share_lower else None)
    windows = corpus.windows(subject.tokenizer, ctx_len, start=start_window)
    bar = tqdm(total=n_windows * ctx_len, unit="tok", desc="eval", disable=not progress)
    done = 0
    while done < n_windows:
        batch = [w for _, w in zip(range(min(batch_size, n_windows - done)), windows)]
        if not batch:
            break
        done += len(batch)
        ids = torch.from_numpy(np.stack([w.tokens for w in batch])).long()
        mask = torch.from_numpy(training_mask(ids.numpy(), np.stack([w.pos for w in batch]), specials))
        m = mask.to(subject.device)

        with subject.capture([in_site, out_site]) as acts, below.recording():
            clean_logits = subject.logits(ids)
        x, y = acts[in_site], acts[out_site]
        codes, recon = dictionary.reconstruct(x.to(ddtype))
        recon = recon.to(y.dtype)
        ym, rm = y[m].float(), recon[m].float()
        sq_err += float((ym - rm).pow(2).sum())
        sum_y = ym.sum(0) if sum_y is None else sum_y + ym.sum(0)
        sum_y2 += float(ym.pow(2).sum())
        cm = codes[m]
        l0_sum += float((cm != 0).sum())
        fired += (cm != 0).sum(0).cpu()
        n += int(m.sum())
        if n_kept < geometry_rows:
            kept_x.append(x[m][:geometry_rows - n_kept].float().cpu())
            kept_y.append(ym[:geometry_rows - n_kept].cpu())
            n_kept += len(kept_x[-1])

        spliced = torch.where(m[..., None], recon, y)
        zero = torch.where(m[..., None], torch.zeros_like(y), y)
        with below.replaying():
            with subject.intervene([subject.intervention(out_site, lambda _y, s=spliced: s)]):
                spliced_logits = subject.logits(ids)
            with subject.intervene([subject.intervention(out_site, lambda _y, z=zero: z)]):
                zero_logits = subject.logits(ids)
            with subject.intervene([subject.intervention(out_site, torch.zeros_like)]):
                zero_all_logits = subject.logits(ids)

        # next-token prediction at evaluated positions (the last position has no target)
        pm = m[:, :-1]
        for name, value in next_token_sums(clean_logits, {"spliced": spliced_logits, "zero": zero_logits,
                                                          "zero_all": zero_all_logits},
                                           ids[:, 1:].to(subject.device), pm).items():
            if name.startswith("kl:"):
                kl_sum[name[3:]] += value
            else:
                ce[name] += value
        n_pred += int(pm.sum())
        bar.update(len(batch) * ctx_len)
    bar.close()
    if n == 0 or n_pred == 0:
        raise UnitscopeError(f"no positions were evaluated: corpus {corpus.spec!r} has no window of {ctx_len} tokens "
                             f"from window {start_window} on" + (" (the windows before it are the recorded ones)"
                                                                 if start_window else ""))

    total_var = sum_y2 - float(sum_y.pow(2).sum()) / n
    fvu = sq_err / max(total_var, 1e-12)
    if not np.isfinite(fvu) or not np.isfinite(ce["spliced"]):
        raise UnitscopeError("the dictionary's reconstruction is not finite (NaN or inf) on the evaluated text; "
                             "its weights or the activations hold NaN/inf values")
    ce_clean, ce_spliced, ce_zero, ce_zero_all = (ce[k] / n_pred for k in ("clean", "spliced", "zero", "zero_all"))
    kl_spliced, kl_zero, kl_zero_all = (kl_sum[k] / n_pred for k in ("spliced", "zero", "zero_all"))
    freq = (fired.float() / n).numpy()
    metrics = {
        "reconstruction_quality": {"fvu": fvu, "explained_variance": 1 - fvu, "mse": sq_err / (n * dictionary.d_out)},
        "sparsity": {"l0": l0_sum / n},
        "model_behavior_preservation": {
            "kl_div_with_sae": kl_spliced, "kl_div_with_ablation": kl_zero_all,
            "kl_div_with_ablation_evaluated_positions": kl_zero,
            "kl_div_score": (kl_zero_all - kl_spliced) / kl_zero_all if kl_zero_all > 0 else float("nan"),
        },
        "model_performance_preservation": {
            "ce_loss_score": _recovered(ce_zero_all, ce_spliced, ce_clean),
            "ce_loss_score_zero_evaluated_positions": _recovered(ce_zero, ce_spliced, ce_clean),
            "ce_loss_with_ablation": ce_zero_all, "ce_loss_with_ablation_evaluated_positions": ce_zero,
            "ce_loss_with_sae": ce_spliced, "ce_loss_without_sae": ce_clean,
        },
        "misc": {"frac_dead_units": float((freq == 0).mean()), "frac_dense_units": float((freq > 0.1).mean()),
                 "n_tokens": n, "n_units": dictionary.n_units},
    }
    return {
        "eval_type_id": "core",
        "eval_config": {"model_name": subject.name, "input_site": in_site, "output_site": out_site,
                        "context_size": ctx_len, "corpus": corpus.provenance(),
                        "corpus_fingerprint": corpus.fingerprint(), "start_window": start_window,
                        "n_windows": done, "n_windows_requested": n_windows, "batch_size": batch_size,
                        "excluded_positions": "first position of each window and special tokens",
                        "ce_loss_score": "zero ablation at every position (SAELens/SAEBench)",
                        "ce_loss_score_zero_evaluated_positions": "zero ablation at evaluated positions only"},
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": [{"unit": i, "frequency": float(f)} for i, f in enumerate(freq)],
        "eval_result_unstructured": None,
        "dictionary": {"architecture": dictionary.architecture, "d_in": dictionary.d_in,
                       "n_units": dictionary.n_units},
        "geometry": _geometry(dictionary, kept_x, kept_y),
        "versions": versions(),
    }


def next_token_sums(clean: torch.Tensor, edited: dict[str, torch.Tensor], targets: torch.Tensor,
                    rows: torch.Tensor) -> dict[str, float]:
    """Summed next-token cross-entropy of each run ('clean' and each name of `edited`) and summed KL(clean || run)
    ('kl:' + name) over the positions where `rows` (B, T-1) holds; logits are (B, T, V), targets (B, T-1).

    Written with log-partitions instead of log-prob tensors: CE = logsumexp(l) - l[target] and KL = sum_v p (lc - l)
    + logsumexp(l) - logsumexp(lc), so each run costs one logsumexp, one difference and one row dot product, not
    the log_softmax, gather copy and kl_div intermediates over (positions x vocabulary) that made these sums cost
    about a forward pass per batch (benchmarks/eval_cost.py)."""
    w = rows.double()  # row sums in float64: the CE score divides differences of these sums
    lc = clean[:, :-1].float()
    lse_c = torch.logsumexp(lc, -1)
    p_c = torch.softmax(lc, -1)
    tgt = targets[..., None]

    def ce(logits: torch.Tensor, lse: torch.Tensor) -> float:
        return float(((lse.double() - logits.gather(-1, tgt).squeeze(-1).double()) * w).sum())

    out = {"clean": ce(lc, lse_c)}
    for name, logits in edited.items():
        le = logits[:, :-1].float()
        lse = torch.logsumexp(le, -1)
        out[name] = ce(le, lse)
        kl = torch.einsum("btv,btv->bt", p_c, lc - le).double() + (lse.double() - lse_c.double())
        out["kl:" + name] = float((kl * w).sum())
    return out


def _geometry(dictionary: Dictionary, xs: list[torch.Tensor], ys: list[torch.Tensor]) -> dict[str, Any] | None:
    """The geometry section, or None when geometry is off or the kind has no directions."""
    if not xs:
        return None
    try:
        if dictionary.directions is None:
            return None
    except NotImplementedError:
        return None
    x = torch.cat(xs)
    same = dictionary.output_site == dictionary.input_site
    return geometry(dictionary, x, None if same else torch.cat(ys))


def _recovered(ce_ablated: float, ce_spliced: float, ce_clean: float) -> float:
    return (ce_ablated - ce_spliced) / (ce_ablated - ce_clean) if ce_ablated != ce_clean else float("nan")


class _BlocksBelow:
    """The transformer blocks below a site, skipped in the forwards that follow a clean one of the same batch.

    An intervention at the site cannot change what the blocks before the site's block compute, so the spliced
    and ablated forwards take the last of them's output from the clean forward. Replaying patches each lower
    block's `forward` on the instance (restored on exit) to return that output, so only one block's output is
    kept whatever the depth (the blocks in between pass it along unread); the last one hands back a copy, so
    nothing above can modify the kept tensor in place. `site=None`, a model outside the known families, or a
    site before the first block replays nothing.
    """

    def __init__(self, subject: Subject, site: str | None):
        self.blocks: list[torch.nn.Module] = []
        self.kept: Any = None
        self.seen = 0
        fam = family_of(subject.model)
        if site is None or fam is None:
            return
        path = subject.site(site).module_path
        blocks = subject.model.get_submodule(fam.blocks)
        prefix = fam.blocks + "."
        if path.startswith(prefix):
            first = int(path[len(prefix):].split(".")[0])
        elif path in (fam.final_norm, fam.unembed):
            first = len(blocks)
        else:
            first = 0
        self.blocks = list(blocks)[:first]

    @contextmanager
    def recording(self) -> Iterator[None]:
        self.kept, self.seen = None, 0
        last = len(self.blocks) - 1

        def watch(i: int):
            def hook(_mod, _args, output):
                self.seen += 1
                if i == last:
                    self.kept = output
            return hook

        handles = [b.register_forward_hook(watch(i)) for i, b in enumerate(self.blocks)]
        try:
            yield
        finally:
            for h in handles:
                h.remove()

    @contextmanager
    def replaying(self) -> Iterator[None]:
        if not self.blocks or self.seen != len(self.blocks) or self.kept is None:
            yield  # nothing kept (no blocks below, or a forward that ran some of them twice or not at all)
            return
        saved = [b.__dict__.get("forward") for b in self.blocks]
        last = len(self.blocks) - 1

        def replay(i: int):
            def forward(*_args, **_kwargs):
                if i != last:
                    return self.kept
                out = self.kept if isinstance(self.kept, (torch.Tensor, tuple, list)) else copy.copy(self.kept)
                return _with_primary(out, _primary(out).clone())
            return forward

        try:
            for i, b in enumerate(self.blocks):
                b.forward = replay(i)
            yield
        finally:
            for b, f in zip(self.blocks, saved):
                if f is None:
                    b.__dict__.pop("forward", None)
                else:
                    b.forward = f
