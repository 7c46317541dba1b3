"""The tiny world: a procedural, seeded dataset of captioned images of coloured shapes that the
embedded default models (tiny CLIP, VAE, UNet) are trained on, so the toolkit runs end to end with
no hub and no GPU. See :mod:`align_gen.world.shapes`."""
