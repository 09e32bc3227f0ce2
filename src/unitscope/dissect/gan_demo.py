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
from ..worlds import generator as world
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


GRID = (2, 3, 4, 5, 6, 8, 10, 12, 16, 20, 24, 32)  # the sizes of unit set tried, fewest first
SELECTION_KEEPS = 0.4  # the ablation N is chosen by: at most this much of the concept left on the search's latents


def _ablated(gen: torch.nn.Module, seg: torch.nn.Module, units: torch.Tensor, z: torch.Tensor, n_units: int,
             n_classes: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(concept fractions, images) with `units` of the layer ablated everywhere."""
    a = torch.zeros(n_units)
    a[units] = 1
    with edit_units(gen, world.GEN_LAYER, a):
        _, images = layer_maps(gen, world.GEN_LAYER, z)
    return concept_fractions(seg, images, n_classes), images


def _ablate_and_insert(gen: torch.nn.Module, seg: torch.nn.Module, units: torch.Tensor, z: torch.Tensor,
                       k: torch.Tensor, region: torch.Tensor, pixel_region: torch.Tensor, n_classes: int
                       ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(fractions after ablating `units` everywhere, those images, fractions inside `pixel_region` after setting
    them to k over `region`, those images)."""
    after, ablated = _ablated(gen, seg, units, z, len(k), n_classes)
    a = torch.zeros(len(k))
    a[units] = 1
    with edit_units(gen, world.GEN_LAYER, a, k=k, region=region):
        _, inserted = layer_maps(gen, world.GEN_LAYER, z)
    return after, ablated, concept_fractions(seg, inserted, n_classes, pixel_region), inserted


def _bar(c: int, before: torch.Tensor, after: torch.Tensor, in_before: torch.Tensor, in_after: torch.Tensor,
         keeps: float = 0.5) -> dict[str, bool]:
    """The clauses of the bar that need no control: the concept left at most `keeps` of itself (half), every other
    drawn concept's relative change under a quarter of the concept's, insertion to over twice its fraction in the
    region + 0.05."""
    rel = float(after[c] / before[c] - 1)
    others = [float(after[o] / before[o] - 1) for o in range(1, len(before)) if o != c and before[o] > 0]
    return {"ablation_halves": rel <= keeps - 1, "others_much_less": all(abs(v) < abs(rel) / 4 for v in others),
            "insertion_raises_region": float(in_after[c]) > 2 * float(in_before[c]) + 0.05}


def _choose_n(gen: torch.nn.Module, seg: torch.nn.Module, order: torch.Tensor, c: int, z_fit: torch.Tensor,
              clean: torch.Tensor, k: torch.Tensor, region: torch.Tensor, pixel_region: torch.Tensor, n_classes: int
              ) -> tuple[int, list[dict[str, Any]]]:
    """The fewest top-α units (of GRID) that pass the bar's clauses on the search's own latents (never the fresh
    ones the figures are measured on), ablation with a margin (to 0.4 of the concept, not 0.5: the curve is steep,
    and a set that just halves it on these latents can miss on others); else the fewest that do that ablation;
    else the largest. Fewer units, fewer side effects; a validation set chooses N as it would any setting.
    `clean`: the unedited images of `z_fit`."""
    before = concept_fractions(seg, clean, n_classes)
    in_before = concept_fractions(seg, clean, n_classes, pixel_region)
    tried = []
    for n in GRID:
        after, _, in_after, _ = _ablate_and_insert(gen, seg, order[:n], z_fit, k, region, pixel_region, n_classes)
        tried.append({"n": n, "ablation_relative": round(float(after[c] / before[c]), 4),
                      "insertion_region_after": round(float(in_after[c]), 4),
                      "passes": _bar(c, before, after, in_before, in_after, keeps=SELECTION_KEEPS)})
        if all(tried[-1]["passes"].values()):
            return n, tried
    halving = [t["n"] for t in tried if t["passes"]["ablation_halves"]]
    return (halving[0] if halving else GRID[-1]), tried


def _fractions(names: list[str], f: torch.Tensor) -> dict[str, float]:
    return dict(zip(names, f.numpy().round(4).tolist()))


def run_gan_demo(out: str | Path, top_n: int | None = None, concepts: tuple[int, ...] | None = None, seed: int = 0,
                 generator_steps: int = 1500, keep: float = 0.0, random_draws: int = 5,
                 lam: float = 0.003, progress: bool = False) -> dict[str, Any]:
    """Dissect every concept the generator draws (all five by default); concepts it draws on under 0.2% of the
    pixels of fresh images are listed under `not_drawn` with their fraction instead. `keep`: the search's term for
    the other concepts (`search_units`; 0 is Bau et al.'s objective); `lam`: its penalty per unit of Σα (0.01
    collapsed every α to ~0 for sky on this 256-unit layer: the sky is drawn by many units at once).
    `top_n`: the units kept per concept (None: per concept, `_choose_n` on the search's latents). Each concept's
    `passes` tests the bar on the fresh latents: `_bar`'s clauses, and as many random units (mean of
    `random_draws` draws) leave over twice as much of the concept."""
    out = Path(out)
    if out.exists() and not out.is_dir():
        raise UnitscopeError(f"{str(out)!r} is an existing file; give a directory for the GAN dissection demo")
    out.mkdir(parents=True, exist_ok=True)
    cpu0 = time.process_time()
    torch.manual_seed(seed)
    z, images, masks = world.sample_latents(3000, 32, seed)
    # the world's version in the names: weights trained on another world's scenes load without error but are wrong
    seg = _trained(out / f"gan_segmenter_{world.WORLD}.safetensors", world.Segmenter(),
                   lambda: world.train_segmenter(images, masks, steps=300))
    gen = _trained(out / f"gan_generator_{world.WORLD}_{generator_steps}.safetensors", world.SceneGenerator(),
                   lambda: world.train_generator(z, images, steps=generator_steps, progress=progress))
    z_fit, _, _ = world.sample_latents(400, 32, seed + 2)
    z_new, _, _ = world.sample_latents(200, 32, seed + 3)
    maps, fit_images = layer_maps(gen, world.GEN_LAYER, z_fit)
    fit_seg = segment(seg, fit_images)
    new_maps, new_images = layer_maps(gen, world.GEN_LAYER, z_new)
    n_units, n_classes = maps.shape[1], len(CONCEPTS) + 1
    names = ["unlabelled"] + [CONCEPTS[c] for c in sorted(CONCEPTS)]
    before = concept_fractions(seg, new_images, n_classes)
    h, w = new_maps.shape[2:]
    region = torch.zeros((h, w), dtype=torch.bool)
    region[h // 4:3 * h // 4, w // 4:3 * w // 4] = True  # the centre quarter of the layer: of the image too
    pixel_region = torch.nn.functional.interpolate(region[None, None].float(), size=(32, 32))[0, 0].bool()
    _grid(new_images, out / "fresh.png")
    result: dict[str, Any] = {"layer": world.GEN_LAYER, "top_n": "chosen per concept" if top_n is None else top_n,
                              "fresh_latents": len(z_new),
                              "generator_steps": generator_steps, "search_keep": keep, "search_lambda": lam,
                              "units_in_layer": n_units, "random_draws": random_draws,
                              "before": _fractions(names, before), "images": {"fresh": "fresh.png"},
                              "concepts": {}, "not_drawn": {}}
    from tqdm.auto import tqdm

    for c in tqdm(sorted(CONCEPTS) if concepts is None else concepts, desc="dissect concepts", unit="concept",
                  disable=not progress):
        name = CONCEPTS[c]
        if before[c] < 0.002 or not (fit_seg == c).any():
            result["not_drawn"][name] = round(float(before[c]), 4)
            continue
        thresholds, iqr = iqr_thresholds(maps, fit_seg == c)
        alpha = search_units(gen, seg, world.GEN_LAYER, c, z_fit, keep=keep, lam=lam)
        order = alpha.argsort(descending=True)
        k = mean_where_concept(maps, fit_seg == c)
        selection: list[dict[str, Any]] = []
        if top_n is None:
            n_c, selection = _choose_n(gen, seg, order, c, z_fit, fit_images, k, region, pixel_region, n_classes)
        else:
            n_c = top_n
        top = order[:n_c]
        after, ablated, in_after_all, inserted = _ablate_and_insert(gen, seg, top, z_new, k, region, pixel_region,
                                                                    n_classes)
        curve = {n_c: after}
        for n in {4, 8, 16, 32} - {n_c}:
            curve[n] = _ablated(gen, seg, order[:n], z_new, n_units, n_classes)[0]
        rand_after = []  # the control: as many random units, several draws, same latents
        for d in range(random_draws):
            pick = torch.randperm(n_units, generator=torch.Generator().manual_seed(1000 * c + d + seed))[:n_c]
            rand_after.append(_ablated(gen, seg, pick, z_new, n_units, n_classes)[0])
        rand_mean = torch.stack(rand_after).mean(0)
        in_before_all = concept_fractions(seg, new_images, n_classes, pixel_region)
        in_before, in_after = in_before_all[c], in_after_all[c]
        out_before = concept_fractions(seg, new_images, n_classes, ~pixel_region)[c]
        out_after = concept_fractions(seg, inserted, n_classes, ~pixel_region)[c]
        _grid(ablated, out / f"ablate_{name}.png")
        _grid(inserted, out / f"insert_{name}.png")
        _overlay(fit_images, maps, thresholds, top[:4].tolist(), out / f"units_{name}.png")
        others = [o for o in range(1, n_classes) if o != c and before[o] > 0]
        ranked_iqr = torch.nan_to_num(iqr, nan=-1.0).argsort(descending=True)
        others_rel = {names[o]: float(after[o] / before[o] - 1) for o in others}
        passes = {**_bar(c, before, after, in_before_all, in_after_all),
                  "beats_random_units": float(after[c]) < float(rand_mean[c]) / 2}
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
            "ablation_curve": {str(n): round(float(f[c] / before[c]), 4) for n, f in sorted(curve.items())},
            "selection_on_search_latents": selection,
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


def summary_table(result: dict[str, Any]) -> str:
    """One line per concept: N units, what their ablation leaves of it and the largest change of another concept,
    what as many random units leave, insertion in the region, and the clauses of the bar it misses."""
    rows = [f"{'concept':<8} {'N':>3} {'after/before':>12} {'largest other change':>22} {'random N':>9} "
            f"{'inserted: region before -> after':>33}  bar"]
    for name, c in result["concepts"].items():
        other, change = max(c["others_relative_change"].items(), key=lambda kv: abs(kv[1]))
        missed = [k for k, ok in c["passes"].items() if not ok]
        rows.append(f"{name:<8} {c['n_units']:>3} {c['ablation_relative']:>12.3f} {other + f' {change:+.0%}':>22} "
                    f"{c['random_units_relative']:>9.3f} "
                    f"{c['insertion_region_before']:>22.3f} -> {c['insertion_region_after']:<6.3f}  "
                    + ("passes" if not missed else "misses " + ", ".join(missed)))
    return "\n".join(rows)
