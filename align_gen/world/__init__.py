"""The tiny world: a procedural, seeded dataset of captioned images of coloured shapes that the
embedded default models (tiny CLIP, VAE, UNet, captioner, preference head) are trained on, so the
toolkit runs end to end with no hub and no GPU. See :mod:`align_gen.world.shapes`.

The built models ship in ``align_gen/world/weights/`` and are named anywhere a model or reward
folder is expected by ``align-gen:world`` (the text-to-image model), ``align-gen:world-clip``,
``align-gen:world-captioner`` and ``align-gen:world-preference``, which work from any working
directory (:func:`resolve_shipped`).
"""

from __future__ import annotations

from pathlib import Path

from align_gen.errors import MissingWeightsError

WEIGHTS_DIR = Path(__file__).parent / "weights"  # what the package ships (and `make demo` uses)
SHIPPED_MODELS = {  # align-gen:<name> -> its folder under WEIGHTS_DIR
    "world": "sd",
    "world-clip": "clip",
    "world-captioner": "captioner",
    "world-preference": "preference",
}
PREFIX = "align-gen:"  # every built-in name's prefix (the policies' tiny models too)


def is_shipped(spec: str) -> bool:
    """Whether ``spec`` names one of the world's shipped models (``align-gen:world...``)."""
    return isinstance(spec, str) and spec.startswith(PREFIX) and spec[len(PREFIX) :] in SHIPPED_MODELS


def resolve_shipped(spec: str) -> str:
    """The folder of a shipped world model named ``align-gen:world...``; any other ``spec``
    (a hub id, a folder, another built-in) unchanged.

    Raises:
        MissingWeightsError: the name is a world model whose folder is absent (not built).
    """
    if not is_shipped(spec):
        return spec
    folder = WEIGHTS_DIR / SHIPPED_MODELS[spec[len(PREFIX) :]]
    if not folder.is_dir():
        raise MissingWeightsError(
            f"{spec} is not built: {folder} is missing; build it with "
            f"`align-gen world build --out {WEIGHTS_DIR}` (see the README's tiny-world section)."
        )
    return str(folder)
