"""Network dissection (units × concept segmentations, IoU) and GAN dissection (units of a generator, causally)."""
