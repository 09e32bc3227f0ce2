"""The drawn scenes: deterministic, masks exact by geometry, and the dataset folder round trip."""

from __future__ import annotations

import numpy as np

from unitscope.vision.images import open_dataset
from unitscope.worlds.scenes import CONCEPTS, SceneParams, draw, make_scenes, presence, write_dataset


def test_same_seed_same_scenes_and_other_seed_differs():
    a, ma = make_scenes(5, 32, seed=3)
    b, mb = make_scenes(5, 32, seed=3)
    c, _ = make_scenes(5, 32, seed=4)
    assert np.array_equal(a, b) and np.array_equal(ma, mb) and not np.array_equal(a, c)


def test_masks_follow_the_geometry():
    p = SceneParams(sky=0.25, grass=0.0, pond=None, trees=[], house=(0.25, 0.75, 0.5, 0.25), tint=(0, 0, 0))
    img, mask = draw(p, 64, np.random.default_rng(0))
    expected = np.zeros((64, 64), np.uint8)
    expected[:16] = 1  # y < 0.25
    expected[32:48, 16:48] = 5  # walls: 0.5 <= y < 0.75, 0.25 <= x < 0.75
    roof = mask[:32] == 5  # a triangle above the walls, apex at the centre
    expected[:32][roof] = 5
    assert np.array_equal(mask, expected)
    assert roof.sum() > 50 and roof[31, 16:48].sum() >= 28 and roof[17, :].sum() <= 4
    assert img[mask == 1, 2].mean() > img[mask == 1, 0].mean() + 60  # sky is blue
    assert img[mask == 5, 0].mean() > img[mask == 5, 2].mean() + 60  # the house red


def test_dataset_round_trip_and_concept_share(tmp_path):
    images, masks = make_scenes(40, 32, seed=0)
    write_dataset(tmp_path / "ds", images, masks)
    ds = open_dataset(tmp_path / "ds")
    assert ds.concepts == CONCEPTS and ds.image_size == (32, 32)
    x, m = next(ds.batches(40))
    assert np.array_equal((x.permute(0, 2, 3, 1) * 255).round().byte().numpy(), images)
    assert np.array_equal(m.numpy(), masks)
    share = np.array([(masks == c).mean() for c in CONCEPTS])
    assert (share < 0.08).all() and (share > 0.005).all()  # objects a few percent each, so IoU > 0.04 is reachable
    assert presence(masks).shape == (40, 5)
