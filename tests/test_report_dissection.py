"""The dissection page (`report/dissection.py`) in headless Chromium (Debian's /usr/bin/chromium through Selenium),
from the file system: a small dissection made by the command line, of a conv layer's channels and of a TopK SAE's
units over its spatial positions; every unit row shows the parquet's best concept, IoU and threshold, the
detectors-by-concept table counts the parquet's detectors, each unit's maps load, and the console stays clean."""

from __future__ import annotations

import json
import shutil

import pyarrow.parquet as pq
import pytest
from selenium.webdriver.common.by import By
from test_report import wait_for

from unitscope.cli import main
from unitscope.dissect.network import ranked_units

LAYER = "features.relu3:output"
MODEL = ("import torch\nfrom unitscope.worlds.classifier import SceneClassifier\n\n\ndef model():\n"
         "    torch.manual_seed(0)\n    return SceneClassifier(width=16)\n")
SIZE, IMAGES = 32, 40


@pytest.fixture(scope="module")
def dissection(tmp_path_factory):
    """OUT/neurons (16 channels) and OUT/sae (a 24-unit TopK SAE on the layer's 8x8 rows), each written by
    `unitscope dissect`, and OUT/report/index.html by `unitscope report OUT`."""
    import torch

    from unitscope.modules import load_module
    from unitscope.vision.rows import layer_output, spatial_rows, train_on_rows
    from unitscope.worlds.classifier import to_tensor
    from unitscope.worlds.scenes import make_scenes, write_dataset

    root = tmp_path_factory.mktemp("dissect")
    images, masks = make_scenes(IMAGES, SIZE, seed=1)
    write_dataset(root / "ds", images, masks)
    (root / "m.py").write_text(MODEL)
    spec = f"{root / 'm.py'}:model"
    torch.manual_seed(0)
    rows = spatial_rows(layer_output(load_module(spec), LAYER, to_tensor(images)))
    train_on_rows(rows, str(root / "sae_dict"), n_units=24, k=3, steps=100, batch_size=128, site=LAYER)
    out = root / "out"
    base = ["dissect", "--model", spec, "--layer", LAYER, "--data", str(root / "ds")]
    assert main([*base, "--out", str(out / "neurons")]) == 0
    assert main([*base, "--dictionary", str(root / "sae_dict"), "--out", str(out / "sae")]) == 0
    assert main(["report", str(out)]) == 0
    return out


UNITS = """return [...document.querySelectorAll('table.units[data-layer="' + arguments[0] + '"] tr[id]')].map(r => ({
  id: r.id, cells: [...r.cells].map(c => c.textContent), iou: r.cells[2].title, threshold: r.cells[3].title,
  img: r.querySelector('img') && {src: r.querySelector('img').getAttribute('src'), alt: r.querySelector('img').alt,
    done: r.querySelector('img').complete, w: r.querySelector('img').naturalWidth,
    h: r.querySelector('img').naturalHeight}}))"""


def errors(driver) -> list[str]:
    return [e["message"] for e in driver.get_log("browser") if e["level"] == "SEVERE"]


def test_the_page_shows_each_layers_units_and_their_maps_as_the_tables_say(dissection, browser):
    index = dissection / "report" / "index.html"
    browser.get(index.as_uri())
    wait_for(browser, "return [...document.images].length > 0 && [...document.images].every(i => i.complete)")
    assert errors(browser) == []
    for layer, n_units in (("neurons", 16), ("sae", 24)):
        table = pq.read_table(dissection / layer / "dissection.parquet")
        best = ranked_units(table)
        maps = json.loads((dissection / layer / "maps" / "maps.json").read_text())["units"]
        shown = browser.execute_script(UNITS, layer)
        assert [int(r["cells"][0]) for r in shown] == [r["unit"] for r in best] and len(best) == n_units
        for row, want in zip(shown, best):  # every unit: best concept, IoU and threshold exactly the parquet's
            assert row["cells"][1] == want["concept"] and row["cells"][4] == ("yes" if want["detector"] else "no")
            assert float(row["iou"]) == want["iou"] and row["cells"][2] == f"{want['iou']:.4g}"
            assert float(row["threshold"]) == want["threshold"]
            img = row["img"]  # its maps: 6 tiles of the image size, over the images maps.json names
            assert img["src"] == f"maps/{layer}/{want['unit']}.png" and img["done"]
            assert (img["w"], img["h"]) == (6 * SIZE, SIZE)
            assert img["alt"] == f"unit {want['unit']} over images " + ", ".join(maps[str(want["unit"])]["images"])
        detectors: dict[str, int] = {}
        for r in best:
            detectors[r["concept"]] = detectors.get(r["concept"], 0) + r["detector"]
        got = browser.execute_script(
            f"return [...document.querySelectorAll('table.concepts[data-layer=\"{layer}\"] tr')].slice(1)"
            ".map(r => [r.cells[0].textContent, +r.cells[1].textContent])")
        assert dict(got) == {c: n for c, n in detectors.items() if n} and got  # a random conv still has detectors

    # a concept's best unit: its link leads to that unit's row, whose maps are on screen
    first = browser.find_element(By.CSS_SELECTOR, 'table.concepts[data-layer="neurons"] a')
    concept = browser.execute_script("return arguments[0].closest('tr').cells[0].textContent", first)
    want = max((r for r in ranked_units(pq.read_table(dissection / "neurons" / "dissection.parquet"))
                if r["detector"] and r["concept"] == concept), key=lambda r: r["iou"])
    first.click()
    assert browser.current_url.endswith(f"#neurons-u{want['unit']}")
    img = browser.find_element(By.CSS_SELECTOR, f"#neurons-u{want['unit']} img")
    assert img.is_displayed() and browser.execute_script(
        "const r = arguments[0].getBoundingClientRect(); return r.width > 0 && r.top >= 0 && r.top < innerHeight", img)
    assert errors(browser) == []


def test_a_missing_map_is_a_console_error(dissection, browser, tmp_path):
    """The console check above can fail: the same page with one map image gone reports it."""
    page = tmp_path / "report"
    shutil.copytree(dissection / "report", page)
    gone = next((page / "maps" / "sae").glob("*.png"))
    gone.unlink()
    browser.get((page / "index.html").as_uri())
    wait_for(browser, "return [...document.images].every(i => i.complete)")
    assert any(gone.name in m for m in errors(browser))


def _layer(folder, thresholds, maps_thresholds=None, maps_entry=None):
    """A hand-made dissection table (one concept per unit) and, optionally, its maps index and images."""
    import json

    import pyarrow as pa
    import pyarrow.parquet as pq
    from PIL import Image

    folder.mkdir(parents=True)
    n = len(thresholds)
    pq.write_table(pa.table({"unit": list(range(n)), "concept": ["sky"] * n, "iou": [0.5 - 0.1 * u for u in range(n)],
                             "threshold": thresholds, "rank": [1] * n, "detector": [True] * n}),
                   folder / "dissection.parquet")
    if maps_thresholds is not None:
        (folder / "maps").mkdir()
        units = {}
        for u, t in enumerate(maps_thresholds):
            Image.new("RGB", (4, 4)).save(folder / "maps" / f"{u}.png")
            units[str(u)] = maps_entry or {"images": ["a"], "peaks": [1.0], "threshold": t}
        (folder / "maps" / "maps.json").write_text(json.dumps({"units": units}))


def test_page_keeps_layers_apart_and_shows_only_this_dissections_maps(tmp_path):
    """Folders 'a_b' and 'a/b' get their own maps (they shared one before); a map drawn at another threshold (a
    dissection killed between its table and its maps) is not shown; a malformed maps index is one sentence."""
    import re

    import pytest

    from unitscope.errors import UnitscopeError
    from unitscope.report.dissection import write_dissection_page

    _layer(tmp_path / "a_b", [0.25, 0.5], [0.25, 0.5])
    _layer(tmp_path / "a" / "b", [0.75, 1.5], [0.75, 9.0])  # unit 1's maps belong to another dissection
    html = write_dissection_page(tmp_path).read_text()
    srcs = re.findall(r'src="(maps/[^"]+)"', html)
    assert sorted(srcs) == ["maps/a_b/0.png", "maps/a_b/1.png", "maps/a~b/0.png"]
    for src in srcs:  # each image the page names is there
        assert (tmp_path / "report" / src).is_file()
    assert len(set(re.findall(r'<tr id="([^"]+)"', html))) == 4  # no id shared by two layers
    for bad in ({"images": ["a"], "peaks": 5, "threshold": 0.25}, {"images": 3, "peaks": [1.0], "threshold": 0.25},
                {"images": ["a"], "peaks": ["x"], "threshold": 0.25}):
        root = tmp_path / f"bad{len(list(tmp_path.glob('bad*')))}"
        _layer(root / "l", [0.25], [0.25], maps_entry=bad)
        with pytest.raises(UnitscopeError, match="is not the maps index"):
            write_dissection_page(root)


GAN_ROWS = """const t = [...document.querySelectorAll('table')].find(
  t => t.rows[0].textContent.includes('random units'));
  return [...t.querySelectorAll('tr')].slice(1).map(r => [...r.cells].map(c => c.textContent))"""


def test_the_generator_section_shows_the_demos_figures_and_images(browser, tmp_path):
    """The GAN demo's real output kept in docs/gan (`unitscope dissect --gan-demo`), paged by `unitscope report`: a
    row per concept with its figures as the JSON has them, and every before/after image loads."""
    from conftest import REPO

    out = tmp_path / "gan"
    shutil.copytree(REPO / "docs" / "gan", out)
    assert main(["report", str(out)]) == 0
    g = json.loads((out / "gan_dissection.json").read_text())
    browser.get((out / "report" / "index.html").as_uri())
    wait_for(browser, "return [...document.images].length > 0 && [...document.images].every(i => i.complete)")
    assert errors(browser) == []
    rows = browser.execute_script(GAN_ROWS)
    assert [r[0] for r in rows] == list(g["concepts"]) and len(rows) == 5
    for row, c in zip(rows, g["concepts"].values()):
        assert int(row[1]) == c["n_units"] and float(row[2]) == c["before"]
        assert float(row[4]) == c["ablation_relative"] and float(row[7]) == c["insertion_region_before"]
        missed = [k for k, ok in c["passes"].items() if not ok]
        assert row[-1] == ("passes" if not missed else "misses " + ", ".join(missed))
    shown = browser.execute_script("return [...document.images].map(i => [i.getAttribute('src'), i.naturalWidth])")
    wanted = {g["images"]["fresh"]} | {v for c in g["concepts"].values() for v in c["images"].values()}
    assert {src for src, _ in shown} == wanted and all(w > 0 for _, w in shown)
