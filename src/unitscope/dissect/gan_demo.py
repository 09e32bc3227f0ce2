"""`unitscope dissect --gan-demo`: GAN dissection on the drawn-scenes world. A generator (latent = scene
parameters + noise) and a segmenter are trained (or reused from OUT), each concept's units at the generator's
8×8 layer of 256 units are scored by IQR and searched by soft ablation, then the top N are ablated on fresh latents and
inserted into a region; before/after images, and the top units' thresholded maps, are written as PNG grids."""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import load_file, save_file

from ..atomic import write_json_atomic
from ..errors import UnitscopeError
from ..worlds.generator import GEN_LAYER, SceneGenerator, Segmenter, sample_latents, train_generator, train_segmenter
from ..worlds.scenes import CONCEPTS
from .gan import concept_fractions, edit_units, iqr_thresholds, layer_maps, mean_where_concept, search_units, segment


def _trained(path: Path, module: torch.nn.Module, train) -> torch.nn.Module:
    if path.is_file():
        try:
            module.load_state_dict(load_file(str(path)))
        except Exception as e:  # noqa: BLE001 - safetensors' own error type, or a state dict of other shapes
            why = (str(e).strip().splitlines() or [type(e).__name__])[0][:160]
            raise UnitscopeError(f"{str(path)!r} is not this demo's {type(module).__name__} weights ({why}); remove "
                                 "it to train again, or give another --out") from None
        return module.eval()
    module = train()
    tmp = path.with_name(path.name + ".tmp")
    save_file(module.state_dict(), str(tmp))
    tmp.replace(path)
    return module


def _grid(images: torch.Tensor, path: Path) -> None:
    from PIL import Image

    rows = (images[:8].clamp(0, 1).permute(0, 2, 3, 1).numpy() * 255).astype(np.uint8)
    tmp = path.with_name(path.name + ".tmp")  # a kill leaves the old image or the new one
    Image.fromarray(np.concatenate(list(rows), 1)).resize((8 * 96, 96), Image.NEAREST).save(tmp, format="PNG")
    tmp.replace(path)


def _overlay(images: torch.Tensor, maps: torch.Tensor, thresholds: torch.Tensor, units: list[int],
             path: Path, n: int = 6) -> None:
    """One row per unit: the n images where the unit peaks highest, with its upsampled map above its threshold
    tinted red."""
    from PIL import Image

    size = tuple(images.shape[2:])
    rows = []
    for u in units:
        pick = maps[:, u].flatten(1).amax(1).argsort(descending=True)[:n].sort().values
        up = torch.nn.functional.interpolate(maps[pick, u:u + 1], size=size, mode="bilinear", align_corners=False)
        on = up[:, 0] > thresholds[u] if torch.isfinite(thresholds[u]) else torch.zeros_like(up[:, 0], dtype=bool)
        img = images[pick].clamp(0, 1).permute(0, 2, 3, 1).clone()
        img[on] = 0.4 * img[on] + 0.6 * torch.tensor([1.0, 0.0, 0.0])
        rows.append(np.concatenate(list((img.numpy() * 255).astype(np.uint8)), 1))
    tmp = path.with_name(path.name + ".tmp")
    grid = np.concatenate(rows, 0)
    Image.fromarray(grid).resize((grid.shape[1] * 3, grid.shape[0] * 3), Image.NEAREST).save(tmp, format="PNG")
    tmp.replace(path)


def _fewest_units(gen: torch.nn.Module, seg: torch.nn.Module, order: torch.Tensor, c: int, z_fit: torch.Tensor,
                  n_units: int, n_classes: int) -> int:
    """The smallest N of (4, 8, 16, 32) whose top-N ablation halves concept c on the search's own latents (never
    the fresh ones the figures are measured on); 32 if none does. Fewer units, fewer side effects."""
    _, clean = layer_maps(gen, GEN_LAYER, z_fit)
    before = concept_fractions(seg, clean, n_classes)[c]
    for n in (4, 8, 16):
        a = torch.zeros(n_units)
        a[order[:n]] = 1
        with edit_units(gen, GEN_LAYER, a):
            _, ablated = layer_maps(gen, GEN_LAYER, z_fit)
        if concept_fractions(seg, ablated, n_classes)[c] <= before / 2:
            return n
    return 32


def _fractions(names: list[str], f: torch.Tensor) -> dict[str, float]:
    return dict(zip(names, f.numpy().round(4).tolist()))


def run_gan_demo(out: str | Path, top_n: int | None = None, concepts: tuple[int, ...] | None = None, seed: int = 0,
                 generator_steps: int = 1500, keep: float = 0.0, random_draws: int = 5,
                 lam: float = 0.003) -> dict[str, Any]:
    """Dissect every concept the generator draws (all five by default); concepts it draws on under 0.2% of the
    pixels of fresh images are listed under `not_drawn` with their fraction instead. `keep`: the search's term for
    the other concepts (`search_units`; 0 is Bau et al.'s objective); `lam`: its penalty per unit of Σα (0.01
    collapsed every α to ~0 for sky on this 256-unit layer: the sky is drawn by many units at once).
    `top_n`: the units kept per concept (None: per concept, the fewest of 4, 8, 16, 32 that halve it on the
    search's latents). Each concept's `passes` tests the bar: its
    units' ablation at least halves it, every other concept changes by under a quarter of its relative change,
    the same number of random units (mean of `random_draws` draws) leave over twice as much of it, and insertion
    raises it in the centre region (to over twice its fraction there plus 0.05)."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UnitscopeError(f"{str(out)!r} is an existing file; give a directory for the GAN dissection demo")
    out.mkdir(parents=True, exist_ok=True)
    cpu0 = time.process_time()
    torch.manual_seed(seed)
    z, images, masks = sample_latents(3000, 32, seed)
    seg = _trained(out / "gan_segmenter.safetensors", Segmenter(), lambda: train_segmenter(images, masks, steps=300))
    gen = _trained(out / f"gan_generator{generator_steps}.safetensors", SceneGenerator(),
                   lambda: train_generator(z, images, steps=generator_steps))
    z_fit, _, _ = sample_latents(400, 32, seed + 2)
    z_new, _, _ = sample_latents(200, 32, seed + 3)
    maps, fit_images = layer_maps(gen, GEN_LAYER, z_fit)
    fit_seg = segment(seg, fit_images)
    new_maps, new_images = layer_maps(gen, GEN_LAYER, z_new)
    n_units, n_classes = maps.shape[1], len(CONCEPTS) + 1
    names = ["unlabelled"] + [CONCEPTS[c] for c in sorted(CONCEPTS)]
    before = concept_fractions(seg, new_images, n_classes)
    h, w = new_maps.shape[2:]
    region = torch.zeros((h, w), dtype=torch.bool)
    region[h // 4:3 * h // 4, w // 4:3 * w // 4] = True  # the centre quarter of the layer: of the image too
    pixel_region = torch.nn.functional.interpolate(region[None, None].float(), size=(32, 32))[0, 0].bool()
    _grid(new_images, out / "fresh.png")
    result: dict[str, Any] = {"layer": GEN_LAYER, "top_n": "4–32" if top_n is None else top_n,
                              "fresh_latents": len(z_new),
                              "generator_steps": generator_steps, "search_keep": keep, "search_lambda": lam,
                              "units_in_layer": n_units, "random_draws": random_draws,
                              "before": _fractions(names, before), "images": {"fresh": "fresh.png"},
                              "concepts": {}, "not_drawn": {}}
    for c in sorted(CONCEPTS) if concepts is None else concepts:
        name = CONCEPTS[c]
        if before[c] < 0.002 or not (fit_seg == c).any():
            result["not_drawn"][name] = round(float(before[c]), 4)
            continue
        thresholds, iqr = iqr_thresholds(maps, fit_seg == c)
        alpha = search_units(gen, seg, GEN_LAYER, c, z_fit, keep=keep, lam=lam)
        order = alpha.argsort(descending=True)
        n_c = top_n if top_n is not None else _fewest_units(gen, seg, order, c, z_fit, n_units, n_classes)
        curve = {}
        for n in sorted({4, n_c, 8, 16, 32}):
            a = torch.zeros(n_units)
            a[order[:n]] = 1
            with edit_units(gen, GEN_LAYER, a):
                _, ablated = layer_maps(gen, GEN_LAYER, z_new)
            curve[n] = (concept_fractions(seg, ablated, n_classes), ablated)
        after, ablated = curve[n_c]
        top = order[:n_c]
        a = torch.zeros(n_units)
        a[top] = 1
        rand_after = []  # the control: as many random units, several draws, same latents
        for d in range(random_draws):
            rand = torch.zeros(n_units)
            pick = torch.randperm(n_units, generator=torch.Generator().manual_seed(1000 * c + d + seed))[:n_c]
            rand[pick] = 1
            with edit_units(gen, GEN_LAYER, rand):
                _, rand_images = layer_maps(gen, GEN_LAYER, z_new)
            rand_after.append(concept_fractions(seg, rand_images, n_classes))
        rand_mean = torch.stack(rand_after).mean(0)
        k = mean_where_concept(maps, fit_seg == c)
        in_before = concept_fractions(seg, new_images, n_classes, pixel_region)[c]
        with edit_units(gen, GEN_LAYER, a, k=k, region=region):
            _, inserted = layer_maps(gen, GEN_LAYER, z_new)
        in_after = concept_fractions(seg, inserted, n_classes, pixel_region)[c]
        out_before = concept_fractions(seg, new_images, n_classes, ~pixel_region)[c]
        out_after = concept_fractions(seg, inserted, n_classes, ~pixel_region)[c]
        _grid(ablated, out / f"ablate_{name}.png")
        _grid(inserted, out / f"insert_{name}.png")
        _overlay(fit_images, maps, thresholds, top[:4].tolist(), out / f"units_{name}.png")
        others = [o for o in range(1, n_classes) if o != c and before[o] > 0]
        ranked_iqr = torch.nan_to_num(iqr, nan=-1.0).argsort(descending=True)
        rel = float(after[c] / before[c] - 1)
        others_rel = {names[o]: float(after[o] / before[o] - 1) for o in others}
        passes = {"ablation_halves": rel <= -0.5,
                  "others_much_less": all(abs(v) < abs(rel) / 4 for v in others_rel.values()),
                  "beats_random_units": float(after[c]) < float(rand_mean[c]) / 2,
                  "insertion_raises_region": float(in_after) > 2 * float(in_before) + 0.05}
        result["concepts"][name] = {
            "units": top.tolist(), "alpha": alpha[top].numpy().round(3).tolist(),
            "n_units": n_c, "iqr_top_units": ranked_iqr[:n_c].tolist(),
            "iqr_of_units": [None if v != v else round(float(v), 4) for v in iqr[top]],
            "threshold_of_units": [None if v != v else round(float(v), 4) for v in thresholds[top]],
            "units_without_threshold": int(torch.isnan(iqr).sum()),
            "before": round(float(before[c]), 4),
            "ablation_after": _fractions(names, after),
            "ablation_relative": round(float(after[c] / before[c]), 4),
            "others_relative_change": {k_: round(v, 4) for k_, v in others_rel.items()},
            "ablation_curve": {str(n): round(float(f[c] / before[c]), 4) for n, (f, _) in curve.items()},
            "random_units_after": _fractions(names, rand_mean),
            "random_units_relative": round(float(rand_mean[c] / before[c]), 4),
            "random_units_others_relative_change": {names[o]: round(float(rand_mean[o] / before[o] - 1), 4)
                                                    for o in others},
            "passes": passes,
            "ablation_ace": round(float(after[c] - before[c]), 4),
            "insertion_region_before": round(float(in_before), 4),
            "insertion_region_after": round(float(in_after), 4),
            "insertion_outside_before": round(float(out_before), 4),
            "insertion_outside_after": round(float(out_after), 4),
            "images": {"ablate": f"ablate_{name}.png", "insert": f"insert_{name}.png",
                       "units": f"units_{name}.png"},
        }
        write_json_atomic(out / "gan_dissection.json", result)  # each concept kept as soon as it is measured
    result["cpu_seconds"] = round(time.process_time() - cpu0, 1)  # this process, training included if it trained
    write_json_atomic(out / "gan_dissection.json", result)
    return result
