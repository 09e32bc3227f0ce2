"""Network dissection against brute force (numpy), on the drawn scenes, and its one-sentence refusals."""

from __future__ import annotations

import json
import math
import subprocess
import sys

import numpy as np
import pytest
import torch
from safetensors.torch import save_file
from torch import nn

from unitscope.dissect.network import dissect, top_quantile_thresholds, write_dissection
from unitscope.errors import UnitscopeError
from unitscope.vision.images import open_dataset
from unitscope.vision.rows import spatial_rows, train_on_rows
from unitscope.worlds.scenes import CONCEPTS, make_scenes, write_dataset


def bilinear_numpy(a: np.ndarray, out: int) -> np.ndarray:
    """Half-pixel-centre bilinear upsampling of (..., h, w) square maps, written out by hand."""
    n = a.shape[-1]
    src = np.maximum((np.arange(out) + 0.5) * n / out - 0.5, 0)
    i0 = np.floor(src).astype(int)
    i1 = np.minimum(i0 + 1, n - 1)
    w = src - i0
    rows = a[..., i0, :] * (1 - w)[:, None] + a[..., i1, :] * w[:, None]
    return rows[..., i0] * (1 - w) + rows[..., i1] * w


def brute_force(maps: np.ndarray, masks: np.ndarray, concepts: list[int], q: float) -> tuple[np.ndarray, np.ndarray]:
    """(thresholds, IoU units x concepts) from every activation held at once."""
    n_units = maps.shape[1]
    vals = maps.transpose(1, 0, 2, 3).reshape(n_units, -1)
    m = math.ceil(q * vals.shape[1])
    th = -np.sort(-vals, axis=1)[:, m - 1]
    up = bilinear_numpy(maps.astype(np.float64), masks.shape[-1])
    iou = np.zeros((n_units, len(concepts)))
    for u in range(n_units):
        on = up[:, u] > th[u]
        for j, c in enumerate(concepts):
            inter = (on & (masks == c)).sum()
            iou[u, j] = inter / (on.sum() + (masks == c).sum() - inter)
    return th, iou


def random_dataset(tmp_path, n=12, size=16, seed=0):
    rng = np.random.default_rng(seed)
    images = rng.integers(0, 256, (n, size, size, 3), dtype=np.uint8)
    masks = np.zeros((n, size, size), np.uint8)
    for i in range(n):  # blocky concepts, so units correlate with them a little
        masks[i] = np.kron(rng.integers(0, 4, (4, 4)), np.ones((size // 4, size // 4), int))
    write_dataset(tmp_path / "ds", images, masks, {1: "a", 2: "b", 3: "c"})
    return images, masks


def iou_of(table, n_units, concepts):
    got = np.zeros((n_units, len(concepts)))
    for r in table.to_pylist():
        got[r["unit"], concepts.index(r["concept_index"])] = r["iou"]
    return got


@pytest.mark.parametrize("stride", [1, 2])
def test_iou_and_thresholds_equal_brute_force(tmp_path, stride):
    """Same resolution (stride 1) and a map upsampled 2x (stride 2) against the numpy computation."""
    images, masks = random_dataset(tmp_path)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 6, 3, stride=stride, padding=1), nn.ReLU())
    ds = open_dataset(tmp_path / "ds")
    q = 0.05
    result = dissect(model, "0:output", ds, quantile=q, batch_size=5)
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        maps = model[0](x).numpy()
    th, iou = brute_force(maps, masks, [1, 2, 3], q)
    table = result.table.to_pylist()
    got_th = np.array([next(r["threshold"] for r in table if r["unit"] == u) for u in range(6)])
    np.testing.assert_allclose(got_th, th, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(iou_of(result.table, 6, [1, 2, 3]), iou, rtol=1e-6, atol=1e-9)
    assert (iou > 0.005).sum() >= 6  # not a comparison of zeros
    for u in range(6):  # ranked within each unit, detector flag from the best IoU
        rows = [r for r in table if r["unit"] == u]
        assert [r["rank"] for r in rows] == [1, 2, 3]
        assert [r["iou"] for r in rows] == sorted((r["iou"] for r in rows), reverse=True)
        assert rows[0]["detector"] == (rows[0]["iou"] > 0.04)


def test_top_quantile_streaming_is_exact():
    gen = torch.Generator().manual_seed(1)
    batches = [torch.randn(7, 3, 5, 5, generator=gen) for _ in range(9)]
    th = top_quantile_thresholds(iter(batches), 0.01, total=63 * 25)
    allv = torch.cat(batches).transpose(0, 1).reshape(3, -1)
    m = math.ceil(0.01 * allv.shape[1])
    assert torch.equal(th, allv.sort(dim=1, descending=True).values[:, m - 1])


def test_dictionary_units_equal_brute_force(tmp_path):
    """Units of a TopK SAE trained (by the project's Trainer) on the layer's spatial rows."""
    images, masks = random_dataset(tmp_path, seed=3)
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU())
    x = torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255
    with torch.no_grad():
        acts = model(x)
    sae = train_on_rows(spatial_rows(acts), str(tmp_path / "sae"), n_units=16, k=3, steps=40, batch_size=256)
    result = dissect(model, "1:output", open_dataset(tmp_path / "ds"), dictionary=sae, quantile=0.05)
    with torch.no_grad():
        codes = sae.encode(spatial_rows(acts)).reshape(len(images), 16, 16, 16).permute(0, 3, 1, 2).numpy()
    _, iou = brute_force(codes, masks, [1, 2, 3], 0.05)
    np.testing.assert_allclose(iou_of(result.table, 16, [1, 2, 3]), iou, rtol=1e-5, atol=1e-9)
    assert result.summary["units"] == 16 and result.summary["unit_kind"] == "topk"
    # dictionary units drawn like channels: each unit's codes over spatial positions, over its peak images
    from unitscope.dissect.maps import write_unit_maps

    write_dissection(tmp_path / "out", result)
    write_unit_maps(model, "1:output", open_dataset(tmp_path / "ds"), result, tmp_path / "out", dictionary=sae)
    assert_maps_equal(tmp_path / "out", codes, images, [r for r in result.table.to_pylist() if r["rank"] == 1], 16)
    # without maps (map_images=0) the earlier dissection's are removed, not shown as this one's
    again = dissect(model, "1:output", open_dataset(tmp_path / "ds"), dictionary=sae, quantile=0.05, map_images=0)
    assert again.peak_images is None
    assert write_unit_maps(model, "1:output", open_dataset(tmp_path / "ds"), again, tmp_path / "out") is None
    assert not (tmp_path / "out" / "maps").exists() and (tmp_path / "out" / "dissection.parquet").is_file()


def test_classifier_last_conv_has_a_detector_for_every_concept(tmp_path):
    """The demo's world at test size: a seeded classifier, dissected on held-out scenes."""
    from unitscope.worlds.classifier import LAST_CONV, train_classifier

    torch.set_num_threads(1)
    images, masks = make_scenes(400, 64, seed=0)
    model = train_classifier(images, masks, steps=300, seed=0)
    test_images, test_masks = make_scenes(120, 64, seed=1)
    write_dataset(tmp_path / "scenes", test_images, test_masks)
    result = dissect(model, LAST_CONV, open_dataset(tmp_path / "scenes"))
    by_concept = result.summary["detectors_by_concept"]
    assert set(by_concept) == set(CONCEPTS.values()), by_concept
    path = write_dissection(tmp_path / "out", result)
    import pyarrow.parquet as pq

    assert pq.read_table(path).num_rows == 64 * len(CONCEPTS)
    assert json.loads((tmp_path / "out" / "dissection.json").read_text())["unique_concepts"] == 5
    # each unit drawn over the images where it peaks, its map above the threshold: recomputed in numpy
    from unitscope.dissect.maps import write_unit_maps
    from unitscope.vision.rows import layer_output
    from unitscope.worlds.classifier import to_tensor

    write_unit_maps(model, LAST_CONV, open_dataset(tmp_path / "scenes"), result, tmp_path / "out")
    with torch.no_grad():
        maps = layer_output(model, LAST_CONV, to_tensor(test_images)).numpy()
    best = {}
    for r in result.table.to_pylist():
        if r["rank"] == 1 and r["detector"] and r["iou"] > best.get(r["concept"], {"iou": -1})["iou"]:
            best[r["concept"]] = r
    assert_maps_equal(tmp_path / "out", maps, test_images, list(best.values()), n_units=64)


def assert_maps_equal(out, maps, images, rows, n_units):
    """OUT/maps/U.png for each row's unit equals the brute force: the 6 images with the highest map maximum (earlier
    image first on ties), the bilinear map above the unit's threshold tinted red; maps.json names those images."""
    from PIL import Image

    index = json.loads((out / "maps" / "maps.json").read_text())["units"]
    assert sorted(index, key=int) == [str(u) for u in range(min(n_units, 200))]
    size = images.shape[1]
    lit = 0
    for r in rows:
        u = r["unit"]
        pick = np.argsort(-maps[:, u].reshape(len(maps), -1).max(1), kind="stable")[:6]
        assert index[str(u)]["images"] == [f"{i:05d}" for i in pick] and index[str(u)]["threshold"] == r["threshold"]
        on = bilinear_numpy(maps[pick, u].astype(np.float64), size) > r["threshold"]
        want = images[pick].astype(np.float64) / 255
        want[on] = 0.4 * want[on] + 0.6 * np.array([1.0, 0.0, 0.0])
        want = (want * 255).astype(np.uint8)
        got = np.asarray(Image.open(out / "maps" / f"{u}.png"))
        tiles = got.reshape(size, 6, size, 3).transpose(1, 0, 2, 3)
        assert np.abs(tiles.astype(int) - want).max() <= 1, u
        lit += on.any()
    assert lit >= len(rows) // 2 > 0  # not a comparison of untinted images


def test_bad_inputs_one_sentence_each(tmp_path):
    from PIL import Image

    images, masks = random_dataset(tmp_path)
    model = nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.Flatten())
    ds = open_dataset(tmp_path / "ds")
    with pytest.raises(UnitscopeError, match="no spatial dimensions"):
        dissect(model, "1:output", ds)
    Image.fromarray(np.zeros((8, 16), np.uint8)).save(tmp_path / "ds" / "masks" / "00003.png")
    with pytest.raises(UnitscopeError, match="images and masks must have the same size"):
        open_dataset(tmp_path / "ds")
    write_dataset(tmp_path / "ds2", images, masks, {1: "a", 2: "b", 3: "c", 7: "ghost"})
    with pytest.raises(UnitscopeError, match="concept 7 .'ghost'. has no pixels"):
        open_dataset(tmp_path / "ds2")


def test_cli_refusals_and_a_model_file(tmp_path):
    random_dataset(tmp_path)
    (tmp_path / "m.py").write_text(
        "import torch\nfrom torch import nn\n\ndef model():\n    torch.manual_seed(0)\n"
        "    return nn.Sequential(nn.Conv2d(3, 4, 3, padding=1), nn.ReLU())\n\ndef bad():\n    return 'a model'\n")

    def cli(*args):
        return subprocess.run([sys.executable, "-m", "unitscope", "dissect", *args], capture_output=True, text=True)

    base = ["--layer", "1:output", "--data", str(tmp_path / "ds"), "--out", str(tmp_path / "out")]
    r = cli("--model", f"{tmp_path / 'm.py'}:bad", *base)
    assert r.returncode == 2 and "returned a str, not a torch.nn.Module" in r.stderr and "Traceback" not in r.stderr
    r = cli("--model", f"{tmp_path / 'm.py'}:model", *base)
    assert r.returncode == 0, r.stderr
    assert (tmp_path / "out" / "dissection.parquet").is_file()
    # the page (written by dissect, rewritten by `unitscope report OUT`) shows each unit's best concept and IoU
    (tmp_path / "out" / "report" / "index.html").unlink()
    r = subprocess.run([sys.executable, "-m", "unitscope", "report", str(tmp_path / "out")], capture_output=True,
                       text=True)
    assert r.returncode == 0, r.stderr
    html = (tmp_path / "out" / "report" / "index.html").read_text()
    import pyarrow.parquet as pq

    for row in pq.read_table(tmp_path / "out" / "dissection.parquet").to_pylist():
        if row["rank"] == 1:
            iou = f"<td title=\"{row['iou']!r}\">{row['iou']:.4g}</td>"
            assert f"<td>{row['unit']}</td><td>{row['concept']}</td>{iou}" in html


# ---- GAN dissection -------------------------------------------------------------------------------------------


def test_gan_edit_is_the_formula():
    from unitscope.dissect.gan import edit_units, layer_maps

    torch.manual_seed(0)
    gen = nn.Sequential(nn.Linear(4, 3 * 4 * 4), nn.Unflatten(1, (3, 4, 4)), nn.ReLU(), nn.Conv2d(3, 3, 1))
    z = torch.randn(5, 4)
    r, _ = layer_maps(gen, "2:output", z)
    alpha, k = torch.tensor([1.0, 0.5, 0.0]), torch.tensor([0.0, 2.0, 7.0])
    region = torch.zeros(4, 4, dtype=torch.bool)
    region[1:3, :2] = True
    with edit_units(gen, "2:output", alpha, k=k, region=region):
        out = gen(z)
    p = region.float()
    edited = torch.stack([(1 - alpha[c] * p) * r[:, c] + alpha[c] * p * k[c] for c in range(3)], 1)
    assert torch.allclose(out, gen[3](edited), atol=1e-6)


def test_dissect_intervention_region_is_the_formula():
    """The `dissect` intervention with an explicit H x W region equals r' = (1 - a*p) r + a*p k per channel."""
    from unitscope.causal.interventions import Dissect

    x = torch.randn(2, 3, 4, 4, generator=torch.Generator().manual_seed(2))
    region = torch.zeros(4, 4)
    region[1:3, :2] = 1
    alpha, k = [1.0, 0.5, 0.0], [0.0, 2.0, 7.0]
    d = Dissect(site="s", alpha=alpha, k=k, region=region.tolist())
    want = torch.stack([(1 - alpha[c] * region) * x[:, c] + alpha[c] * region * k[c] for c in range(3)], 1)
    assert torch.allclose(d.edit(x), want, atol=1e-6) and not torch.allclose(want, x)
    with pytest.raises(UnitscopeError, match=r"needs \(batch, channels, H, W\) maps"):
        d.edit(torch.randn(2, 3, 5, 5))
    with pytest.raises(UnitscopeError, match="has 4 channels"):
        d.edit(torch.randn(2, 4, 4, 4))
    with pytest.raises(UnitscopeError, match="mask of 0s and 1s"):
        Dissect(site="s", region=[[0, 2]])


def brute_iqr(v: np.ndarray, s: np.ndarray, quantiles: np.ndarray) -> tuple[float, float]:
    """(threshold, IQR) by trying every candidate: I(M;S)/H(M,S) of the 2x2 joint, thresholds on > half skipped."""
    best, best_t = -np.inf, math.nan
    for t in np.quantile(v, quantiles):
        m = v > t
        if m.mean() > 0.5:
            continue
        joint = np.array([[np.mean(m & s), np.mean(m & ~s)], [np.mean(~m & s), np.mean(~m & ~s)]])
        pm, ps = joint.sum(1, keepdims=True), joint.sum(0, keepdims=True)
        nz = joint > 0
        mi = (joint[nz] * np.log(joint[nz] / (pm @ ps)[nz])).sum()
        r = mi / -(joint[nz] * np.log(joint[nz])).sum()
        if r > best:
            best, best_t = r, t
    return best_t, best


def test_gan_iqr_upsamples_and_equals_brute_force():
    """4x4 maps upsampled to 16x16 masks (numpy bilinear by hand): the chosen threshold and the IQR equal a search
    over every candidate; a unit with no usable threshold is NaN, not index 0 with score -1."""
    from unitscope.dissect.gan import iqr_thresholds

    g = torch.Generator().manual_seed(1)
    maps = torch.rand(6, 3, 4, 4, generator=g)
    seg = torch.zeros(6, 16, 16, dtype=torch.bool)
    seg[:, :8, :8] = True
    maps[:, 0, :2, :2] += 0.7  # unit 0 follows the concept
    maps[:, 2, 2:, 2:] += 0.5  # unit 2 follows its complement
    q = torch.linspace(0.5, 0.95, 10)
    th, score = iqr_thresholds(maps, seg, q)
    up = bilinear_numpy(maps.numpy().astype(np.float64), 16)
    s = seg.numpy().reshape(-1)
    for u in range(3):
        t, r = brute_iqr(up[:, u].reshape(-1), s, q.numpy())
        assert abs(float(th[u]) - t) < 1e-5 and abs(float(score[u]) - r) < 1e-5, (u, th[u], t, score[u], r)
    assert score[0] > 0.3 and score[0] > 3 * score[1]  # the planted unit stands out
    th, score = iqr_thresholds(maps, seg, torch.tensor([0.1, 0.3]))  # every candidate leaves units on > half
    assert torch.isnan(th).all() and torch.isnan(score).all()


class _Paint(nn.Module):
    """A 'generator' whose layer `act` has 6 channels; the image's channel 1 is bright where channels 0 + 1 are."""

    def __init__(self):
        super().__init__()
        self.fc = nn.Linear(4, 6 * 4 * 4)
        self.act = nn.ReLU()
        self.out = nn.Conv2d(6, 3, 1)
        with torch.no_grad():
            self.out.weight.zero_()
            self.out.bias.copy_(torch.tensor([0.0, -2.0, 0.0]))
            self.out.weight[1, :2] = 4.0
            self.out.weight[2, 2:] = 1.0

    def forward(self, z):
        return self.out(self.act(self.fc(z).reshape(len(z), 6, 4, 4)))


@pytest.mark.parametrize("keep", [0.0, 1.0])
def test_gan_search_finds_planted_units_and_restores_the_models(keep):
    """Concept 1 is drawn by channels 0 and 1 only: the soft-α search ranks them first; the caller's train modes
    and requires_grad flags come back as they were, and no gradient is left on their parameters."""
    from unitscope.dissect.gan import concept_fractions, edit_units, search_units

    torch.manual_seed(0)
    gen, seg = _Paint(), nn.Identity()
    gen.train()
    gen.out.weight.requires_grad_(False)
    z = torch.randn(64, 4)
    alpha = search_units(gen, seg, "act:output", 1, z, steps=60, batch_size=16, keep=keep)
    assert set(alpha.argsort(descending=True)[:2].tolist()) == {0, 1}, alpha
    assert gen.training and gen.act.training and gen.fc.weight.requires_grad and not gen.out.weight.requires_grad
    assert all(p.grad is None for p in gen.parameters())
    before = concept_fractions(seg, gen(z).detach(), 3)[1]
    a = torch.zeros(6)
    a[alpha.argsort(descending=True)[:2]] = 1
    with edit_units(gen, "act:output", a), torch.no_grad():
        after = concept_fractions(seg, gen(z), 3)[1]
    assert before > 0.1 and after == 0


def test_dissection_page_renders_gan_figures_escaped(tmp_path):
    """The page lists each concept's figures and images (copied beside it); names from the file are escaped."""
    from PIL import Image

    from unitscope.report.dissection import is_dissection_dir, write_dissection_page

    for name in ("fresh.png", "ablate_sky.png", "insert_sky.png", "units_sky.png"):
        Image.fromarray(np.zeros((4, 4, 3), np.uint8)).save(tmp_path / name)
    concept = {"units": [7, 3], "alpha": [0.99, 0.5], "iqr_of_units": [0.61, None],
               "threshold_of_units": [1.25, None], "before": 0.0316, "ablation_after": {"sky": 0.0012},
               "ablation_relative": 0.038, "others_relative_change": {"<b>grass</b>": -0.12},
               "random_units_after": {"sky": 0.0322}, "insertion_region_before": 0.0,
               "insertion_region_after": 0.474, "insertion_outside_before": 0.0421, "insertion_outside_after": 0.0409,
               "images": {"ablate": "ablate_sky.png", "insert": "insert_sky.png", "units": "units_sky.png"},
               "passes": {"ablation_halves": True, "others_much_less": False}}
    (tmp_path / "gan_dissection.json").write_text(json.dumps(
        {"layer": "blocks.relu2:output", "top_n": 2, "fresh_latents": 200, "before": {"sky": 0.0316},
         "images": {"fresh": "fresh.png"}, "concepts": {"sky": concept}, "not_drawn": {"water": 0.0003}}))
    assert is_dissection_dir(tmp_path)
    page = write_dissection_page(tmp_path)
    html = page.read_text()
    for text in ("0.0316", "0.0012", "0.474", "0.0409", "&lt;b&gt;grass&lt;/b&gt; -12%", "water 0.0003",
                 'src="ablate_sky.png"', 'src="insert_sky.png"', 'src="units_sky.png"', 'src="fresh.png"',
                 "none (on for over half", "misses others_much_less"):
        assert text in html, text
    assert "<b>grass" not in html
    assert sorted(p.name for p in page.parent.iterdir()) == ["ablate_sky.png", "fresh.png", "index.html",
                                                             "insert_sky.png", "units_sky.png"]
    with pytest.raises(UnitscopeError, match="holds no dissection output"):
        write_dissection_page(tmp_path / "report")


def test_gan_demo_refuses_weights_that_are_not_its_own(tmp_path):
    """A junk or mismatched file where the demo keeps its trained weights: one sentence naming it, never reused."""
    from unitscope.dissect.gan_demo import _trained
    from unitscope.worlds.generator import Segmenter

    junk = tmp_path / "segmenter.safetensors"
    junk.write_bytes(b"junk")
    with pytest.raises(UnitscopeError, match="is not this demo's Segmenter weights"):
        _trained(junk, Segmenter(), lambda: pytest.fail("must not train over the user's file"))
    other = tmp_path / "other.safetensors"
    save_file({"weight": torch.zeros(3)}, str(other))
    with pytest.raises(UnitscopeError, match="is not this demo's Segmenter weights"):
        _trained(other, Segmenter(), lambda: pytest.fail("must not train over the user's file"))
    assert junk.read_bytes() == b"junk"


def test_gan_bar_clauses_by_hand_and_the_summary_names_what_a_concept_misses():
    from unitscope.dissect.gan_demo import _bar, summary_table

    before = torch.tensor([0.5, 0.20, 0.10, 0.04])  # unlabelled, the concept (1), two others
    after = torch.tensor([0.6, 0.08, 0.11, 0.03])  # concept to 0.4 of itself (-60%); others +10% and -25%
    region_before, region_after = torch.tensor([0.9, 0.05, 0.0, 0.0]), torch.tensor([0.7, 0.16, 0.0, 0.0])
    got = _bar(1, before, after, region_before, region_after)
    # -25% is not under a quarter of -60% (15%); 0.16 > 2 * 0.05 + 0.05 = 0.15
    assert got == {"ablation_halves": True, "others_much_less": False, "insertion_raises_region": True}
    assert _bar(1, before, after, region_before, region_after, keeps=0.3)["ablation_halves"] is False
    after_ok = torch.tensor([0.6, 0.08, 0.11, 0.039])
    assert _bar(1, before, after_ok, region_before, torch.tensor([0.7, 0.149, 0.0, 0.0])) == {
        "ablation_halves": True, "others_much_less": True, "insertion_raises_region": False}
    concept = {"n_units": 6, "ablation_relative": 0.4, "others_relative_change": {"water": 0.1, "tree": -0.25},
               "random_units_relative": 0.98, "insertion_region_before": 0.05, "insertion_region_after": 0.16,
               "passes": {**got, "beats_random_units": True}}
    table = summary_table({"concepts": {"sky": concept, "grass": {**concept, "passes": {"a": True}}}})
    sky, grass = table.splitlines()[1:]
    assert sky.split()[:4] == ["sky", "6", "0.400", "tree"] and "-25%" in sky
    assert sky.endswith("misses others_much_less") and grass.endswith("passes")
