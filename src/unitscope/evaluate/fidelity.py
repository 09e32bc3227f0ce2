"""Fidelity of a dictionary on held-out windows, spliced into the live model. SAEBench-shaped JSON.

Formulas (sums run over evaluated positions p; positions excluded from training, i.e. the first of each
window and special tokens, are neither spliced nor counted):
  FVU            = sum_p ||y_p - ŷ_p||² / sum_p ||y_p - mean(y)||²      (1 - explained variance)
  L0             = mean_p #{i : code_{p,i} != 0}
  frac_dead      = fraction of units that never fire on the evaluated tokens
  frac_dense     = fraction of units that fire on more than 10% of evaluated tokens
  CE loss recovered = (CE_zero_ablation - CE_spliced) / (CE_zero_ablation - CE_clean)
  KL             = mean_p KL(p_clean || p_spliced) of the next-token distributions
where y is the activation at the dictionary's output site and ŷ its reconstruction from the input site.
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm.auto import tqdm

from ..corpus import Corpus, special_ids, training_mask
from ..dictionaries import Dictionary
from ..errors import UnitscopeError
from ..subject import Subject
from ..versions import versions


@torch.inference_mode()
def evaluate_fidelity(subject: Subject, dictionary: Dictionary, corpus: Corpus, ctx_len: int,
                      start_window: int, n_tokens: int = 16384, batch_size: int = 8,
                      progress: bool = True) -> dict[str, Any]:
    """Evaluate reconstruction, sparsity and downstream loss on windows `start_window`, ... of `corpus`."""
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
    ce = {"clean": 0.0, "spliced": 0.0, "zero": 0.0}
    kl_sum = {"spliced": 0.0, "zero": 0.0}
    n_pred = 0
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

        with subject.capture([in_site, out_site]) as acts:
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

        spliced = torch.where(m[..., None], recon, y)
        zero = torch.where(m[..., None], torch.zeros_like(y), y)
        with subject.intervene([subject.intervention(out_site, lambda _y, s=spliced: s)]):
            spliced_logits = subject.logits(ids)
        with subject.intervene([subject.intervention(out_site, lambda _y, z=zero: z)]):
            zero_logits = subject.logits(ids)

        # next-token prediction at evaluated positions (the last position has no target)
        pm = m[:, :-1]
        tgt = ids[:, 1:].to(subject.device)[pm]
        lp_clean = F.log_softmax(clean_logits[:, :-1][pm].float(), -1)
        for name, logits in (("clean", clean_logits), ("spliced", spliced_logits), ("zero", zero_logits)):
            lp = F.log_softmax(logits[:, :-1][pm].float(), -1)
            ce[name] += float(F.nll_loss(lp, tgt, reduction="sum"))
            if name != "clean":
                kl_sum[name] += float(F.kl_div(lp, lp_clean, log_target=True, reduction="sum"))
        n_pred += int(pm.sum())
        bar.update(len(batch) * ctx_len)
    bar.close()
    if n == 0 or n_pred == 0:
        raise UnitscopeError("no held-out positions were evaluated; the corpus has no windows after the recorded ones")

    total_var = sum_y2 - float(sum_y.pow(2).sum()) / n
    fvu = sq_err / max(total_var, 1e-12)
    ce_clean, ce_spliced, ce_zero = (ce[k] / n_pred for k in ("clean", "spliced", "zero"))
    kl_spliced, kl_zero = kl_sum["spliced"] / n_pred, kl_sum["zero"] / n_pred
    freq = (fired.float() / n).numpy()
    metrics = {
        "reconstruction_quality": {"fvu": fvu, "explained_variance": 1 - fvu, "mse": sq_err / (n * dictionary.d_out)},
        "sparsity": {"l0": l0_sum / n},
        "model_behavior_preservation": {
            "kl_div_with_sae": kl_spliced, "kl_div_with_ablation": kl_zero,
            "kl_div_score": (kl_zero - kl_spliced) / kl_zero if kl_zero > 0 else float("nan"),
        },
        "model_performance_preservation": {
            "ce_loss_score": (ce_zero - ce_spliced) / (ce_zero - ce_clean) if ce_zero != ce_clean else float("nan"),
            "ce_loss_with_ablation": ce_zero, "ce_loss_with_sae": ce_spliced, "ce_loss_without_sae": ce_clean,
        },
        "misc": {"frac_dead_units": float((freq == 0).mean()), "frac_dense_units": float((freq > 0.1).mean()),
                 "n_tokens": n, "n_units": dictionary.n_units},
    }
    return {
        "eval_type_id": "core",
        "eval_config": {"model_name": subject.name, "input_site": in_site, "output_site": out_site,
                        "context_size": ctx_len, "corpus": corpus.provenance(), "start_window": start_window,
                        "n_windows": done, "batch_size": batch_size,
                        "excluded_positions": "first position of each window and special tokens"},
        "eval_id": str(uuid.uuid4()),
        "datetime_epoch_millis": int(time.time() * 1000),
        "eval_result_metrics": metrics,
        "eval_result_details": [{"unit": i, "frequency": float(f)} for i, f in enumerate(freq)],
        "eval_result_unstructured": None,
        "dictionary": {"architecture": dictionary.architecture, "d_in": dictionary.d_in,
                       "n_units": dictionary.n_units},
        "versions": versions(),
    }
