"""The generator's world: its scenes give every concept a sizeable share, and a briefly trained generator's searched
units remove a concept far more than as many random units do (a real search, real ablations, a real segmenter)."""

import numpy as np
import torch

from unitscope.worlds.generator import LATENT, NOISE, sample_latents


def test_gan_scenes_give_every_concept_a_share_and_latents_encode_them():
    z, images, masks = sample_latents(300, 32, seed=5)
    assert z.shape == (300, LATENT + NOISE) and images.shape == (300, 32, 32, 3) and masks.shape == (300, 32, 32)
    share = [(masks == c).mean() for c in range(1, 6)]
    assert all(s > 0.02 for s in share), share  # every concept covers a measurable share of the pixels
    assert (masks == 0).mean() > 0.3  # and the unlabelled backdrop stays
    has_sky = (masks == 1).reshape(300, -1).any(1)
    assert np.array_equal(has_sky, z[:, 0].numpy() > 0)  # latent 0 is the sky's height: 0 exactly when none drawn
    z2, images2, _ = sample_latents(300, 32, seed=5)
    assert torch.equal(z, z2) and np.array_equal(images, images2)


def test_gan_scenes_put_no_object_on_a_strip_or_on_another_object():
    """Drawn one at a time, the parts of a scene (each strip, the pond, each tree, the house) cover disjoint
    pixels, bar a pixel or two where a tree's trunk meets the grass's wave (occlusion would couple concepts)."""
    from dataclasses import replace

    from unitscope.worlds.generator import sample_gan_params
    from unitscope.worlds.scenes import SceneParams, draw

    rng, empty = np.random.default_rng(7), SceneParams(0.0, 0.0, None, [], None, (0.0, 0.0, 0.0))
    overlaps = []
    for _ in range(300):
        p = sample_gan_params(rng)
        parts = ([replace(empty, sky=p.sky)] if p.sky else []) + ([replace(empty, grass=p.grass)] if p.grass else [])
        parts += ([replace(empty, pond=p.pond)] if p.pond else []) + [replace(empty, trees=[t]) for t in p.trees]
        parts += [replace(empty, house=p.house)] if p.house else []
        cover = sum((draw(q, 32, np.random.default_rng(0))[1] > 0).astype(int) for q in parts)
        overlaps.append(int((np.asarray(cover) > 1).sum()))
    assert max(overlaps) <= 4 and np.mean(np.asarray(overlaps) > 0) < 0.02, overlaps


def test_searched_units_remove_sky_more_than_random_units():
    from unitscope.dissect.gan import concept_fractions, edit_units, layer_maps, search_units
    from unitscope.worlds.generator import train_generator, train_segmenter

    torch.set_num_threads(1)
    z, images, masks = sample_latents(600, 32, seed=0)
    seg = train_segmenter(images, masks, steps=150)
    gen = train_generator(z, images, steps=250, batch_size=32, lr=3e-3, width=64, stem=32)
    layer = "blocks.relu1:output"
    z_fit, _, _ = sample_latents(100, 32, seed=2)
    z_new, _, _ = sample_latents(100, 32, seed=3)  # fresh latents: seen by neither training nor search
    _, clean = layer_maps(gen, layer, z_new)
    before = concept_fractions(seg, clean, 6)[1]
    assert before > 0.05  # the generator draws sky, or the test would prove nothing
    alpha = search_units(gen, seg, layer, 1, z_fit, steps=60)
    n = 8
    top = torch.zeros(64)
    top[alpha.argsort(descending=True)[:n]] = 1
    with edit_units(gen, layer, top):
        _, ablated = layer_maps(gen, layer, z_new)
    after = concept_fractions(seg, ablated, 6)[1]
    rand_after = []
    for d in range(4):
        rand = torch.zeros(64)
        rand[torch.randperm(64, generator=torch.Generator().manual_seed(d))[:n]] = 1
        with edit_units(gen, layer, rand):
            _, r = layer_maps(gen, layer, z_new)
        rand_after.append(float(concept_fractions(seg, r, 6)[1]))
    assert after < 0.5 * before, (after, before)
    assert after < 0.5 * float(np.mean(rand_after)), (after, rand_after)
