"""The tiny world: a procedural, seeded dataset of captioned images of coloured shapes that the
embedded default models (tiny CLIP, VAE, UNet, captioner, preference head) are trained on, so the
toolkit runs end to end with no hub and no GPU. See :mod:`align_gen.world.shapes`.

The built models ship in ``align_gen/world/weights/`` and are built-in models (see
:mod:`align_gen.builtins`): ``align-gen:world`` (the text-to-image model),
``align-gen:world-clip``, ``align-gen:world-captioner`` and ``align-gen:world-preference`` name
them anywhere a model or reward folder is expected, from any working directory.
"""

from __future__ import annotations

from pathlib import Path

from align_gen.builtins import register_builtin
from align_gen.errors import MissingWeightsError

WEIGHTS_DIR = Path(__file__).parent / "weights"  # what the package ships (and `make demo` uses)
SHIPPED_MODELS = {  # align-gen:<name> -> its folder under WEIGHTS_DIR
    "world": "sd",
    "world-clip": "clip",
    "world-captioner": "captioner",
    "world-preference": "preference",
}


def shipped_folder(name: str) -> Path:
    """The folder of the shipped world model ``align-gen:name``.

    Raises:
        MissingWeightsError: the folder is absent (not built).
    """
    folder = WEIGHTS_DIR / SHIPPED_MODELS[name]
    if not folder.is_dir():
        raise MissingWeightsError(
            f"align-gen:{name} is not built: {folder} is missing; build it with "
            f"`align-gen world build --out {WEIGHTS_DIR}` (see the docs' tiny-world page)."
        )
    return folder


for _name in SHIPPED_MODELS:
    register_builtin(_name, "folder")(lambda name=_name: shipped_folder(name))
