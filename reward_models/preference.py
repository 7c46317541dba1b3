"""A learned preference reward: a Bradley-Terry head on a CLIP's L2-normalised features.

The head is a small MLP (or, with ``hidden_size: 0``, a linear map) r(x) from the features of an
image (optionally concatenated with the features of its prompt) to a scalar. It is trained on
pairs (prompt, chosen image, rejected image) by the Bradley-Terry likelihood

    P(chosen > rejected) = sigmoid(r(chosen) - r(rejected)),   loss = -log sigmoid(r_w - r_l),

so only differences of r are meaningful (the scale is the log-odds of a preference, the offset is
arbitrary). ``align-gen train-reward`` trains one (see :mod:`reward_models.preference_training`);
the tiny world ships one at ``align_gen/world/weights/preference`` for its synthetic "larger and
more centred" preference (:mod:`align_gen.world.preference`).

A head folder holds ``model.safetensors`` (the head's float32 weights) and ``config.json``:
``kind`` ("bradley_terry_head"), ``clip`` (the transformers CLIP whose features it reads: a path
relative to the head folder when the CLIP was a sibling folder, else the folder or hub id as it
was given), ``features`` ("image" or "image+text"), ``input_dim`` and ``hidden_size``.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
import torch.nn.functional as F
from torch import nn

from reward_models.errors import RewardConfigError, RewardError, RewardWeightsMissingError
from reward_models.hub import resolve_placement
from reward_models.registry import BatchedReward, register_reward

if TYPE_CHECKING:
    from reward_models.hf_clip import TransformersClipEncoder

HEAD_KIND = "bradley_terry_head"
CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
FEATURES = ("image", "image+text")


def bradley_terry_loss(
    chosen_rewards: torch.Tensor, rejected_rewards: torch.Tensor
) -> tuple[torch.Tensor, dict[str, float]]:
    """Mean -log sigmoid(r_w - r_l) over B pairs, and detached statistics.

    Args:
        chosen_rewards, rejected_rewards: (B,) head outputs for the preferred / other image.

    Returns:
        (loss (), {"accuracy": fraction of pairs with r_w > r_l, "margin": mean r_w - r_l}).
    """
    if chosen_rewards.shape != rejected_rewards.shape or chosen_rewards.ndim != 1:
        raise ValueError(
            f"need two (B,) reward tensors, got {tuple(chosen_rewards.shape)} and "
            f"{tuple(rejected_rewards.shape)}"
        )
    margin = chosen_rewards - rejected_rewards  # (B,)
    loss = -F.logsigmoid(margin).mean()  # (), logsigmoid is stable for large |margin|
    detached = margin.detach()
    stats = {"accuracy": float((detached > 0).float().mean()), "margin": float(detached.mean())}
    return loss, stats


class PreferenceHead(nn.Module):
    """(B, input_dim) features -> (B,) rewards: Linear-GELU-Linear, or one Linear when
    ``hidden_size`` is 0."""

    def __init__(self, input_dim: int, hidden_size: int = 64) -> None:
        super().__init__()
        if input_dim < 1 or hidden_size < 0:
            raise ValueError(
                f"input_dim must be >= 1 and hidden_size >= 0, got {input_dim}, {hidden_size}"
            )
        self.input_dim, self.hidden_size = input_dim, hidden_size
        if hidden_size == 0:
            self.layers = nn.Sequential(nn.Linear(input_dim, 1))
        else:
            self.layers = nn.Sequential(
                nn.Linear(input_dim, hidden_size), nn.GELU(), nn.Linear(hidden_size, 1)
            )

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        return self.layers(features).squeeze(-1)  # (B,)


def head_inputs(
    image_features: torch.Tensor, text_features: torch.Tensor | None, features: str
) -> torch.Tensor:
    """The head's input: (B, D) image features, or (B, 2D) image and prompt features side by side."""
    if features == "image":
        return image_features
    if features == "image+text" and text_features is not None:
        return torch.cat([image_features, text_features], dim=-1)
    raise ValueError(
        f"features must be one of {FEATURES} (image+text needs text features), got {features!r}"
    )


def clip_reference(clip: str, out: Path) -> str:
    """How a head folder ``out`` names its CLIP: ``../<name>`` when ``clip`` is a local folder
    beside ``out`` (so the two move together), else ``clip`` as given (a hub id, or a path)."""
    path = Path(clip).expanduser()
    if path.is_dir() and path.resolve().parent == out.resolve().parent:
        return f"../{path.resolve().name}"
    return clip


def resolve_clip_reference(folder: Path, clip: str) -> str:
    """The CLIP a head folder's config names: a relative path that exists beside the head is
    read relative to the head folder; anything else (hub id, absolute path) is used as it is."""
    beside = folder / clip
    if not Path(clip).is_absolute() and beside.is_dir():
        return str(beside)
    return clip


def save_preference_head(head: PreferenceHead, out: Path, clip: str, features: str) -> None:
    """Write ``out/model.safetensors`` and ``out/config.json`` (see the module docstring)."""
    from safetensors.torch import save_file

    out.mkdir(parents=True, exist_ok=True)
    state = {
        key: value.detach().float().cpu().contiguous() for key, value in head.state_dict().items()
    }
    save_file(state, str(out / WEIGHTS_FILE))
    config = {
        "kind": HEAD_KIND,
        "clip": clip_reference(clip, out),
        "features": features,
        "input_dim": head.input_dim,
        "hidden_size": head.hidden_size,
    }
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=1) + "\n")


def load_preference_head(
    folder: str | Path, reward: str = "preference"
) -> tuple[PreferenceHead, dict[str, Any]]:
    """(head in float32 on the CPU, its config with ``clip`` resolved) from a head folder."""
    from safetensors.torch import load_file

    folder = Path(folder).expanduser()
    fix = f"set reward.options.{reward}.model to a folder written by 'align-gen train-reward --out'"
    for name in (CONFIG_FILE, WEIGHTS_FILE):
        if not (folder / name).is_file():
            why = (
                f"there is no folder {folder}"
                if not folder.is_dir()
                else "the folder is incomplete"
            )
            raise RewardWeightsMissingError(
                f"{reward}: head file {folder / name} does not exist ({why}); {fix}"
            )
    try:
        config = json.loads((folder / CONFIG_FILE).read_text())
    except json.JSONDecodeError as err:
        raise RewardError(
            f"{reward}: {folder / CONFIG_FILE} is not valid JSON ({err}); {fix}"
        ) from err
    if not isinstance(config, dict) or config.get("kind") != HEAD_KIND:
        raise RewardError(f"{reward}: {folder / CONFIG_FILE} is not a {HEAD_KIND} config; {fix}")
    if config.get("features") not in FEATURES:
        raise RewardError(
            f"{reward}: {folder / CONFIG_FILE} has features {config.get('features')!r}; valid: {FEATURES}"
        )
    try:
        head = PreferenceHead(int(config["input_dim"]), int(config["hidden_size"]))
        clip = str(config["clip"])
    except (KeyError, TypeError, ValueError) as err:
        raise RewardError(
            f"{reward}: {folder / CONFIG_FILE} needs clip, input_dim and hidden_size ({err!r}); {fix}"
        ) from err
    try:
        head.load_state_dict(load_file(str(folder / WEIGHTS_FILE), device="cpu"))
    except RuntimeError as err:
        raise RewardError(
            f"{reward}: {folder / WEIGHTS_FILE} does not fit its config.json: {err}"
        ) from err
    return head.eval().requires_grad_(False), {
        **config,
        "clip": resolve_clip_reference(folder, clip),
    }


@register_reward("preference")
class PreferenceReward(BatchedReward):
    """A Bradley-Terry preference head on CLIP features: (B,) log-odds-scaled scores.

    ``model``: a head folder (``align-gen train-reward --out``; the tiny world's is
    ``align_gen/world/weights/preference``). ``clip``: the CLIP folder or hub id to read features
    with (None: the one the head's config names). The head is read when the reward is built; the
    CLIP is loaded at the first call. ``device`` None = CUDA when available; ``dtype`` is the
    CLIP's (the head runs in float32).
    """

    def __init__(
        self,
        model: str | None = None,
        clip: str | None = None,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        super().__init__(batch_size=batch_size)
        if not isinstance(model, str | Path) or not str(model):
            raise RewardConfigError(
                f"{self.name}: model is required: a head folder written by 'align-gen train-reward', "
                "e.g. reward.options.preference.model=align_gen/world/weights/preference"
            )
        self.device, self.dtype = resolve_placement(device, dtype, self.name)
        head, config = load_preference_head(model, self.name)
        self.head = head.to(self.device)
        self.features: str = config["features"]
        self.clip: str = clip if clip is not None else config["clip"]
        from reward_models.hf_clip import resolve_source

        resolve_source(self.clip, self.name, "clip", "clip_model")  # a missing folder fails now
        self._encoder: TransformersClipEncoder | None = None

    @property
    def encoder(self) -> TransformersClipEncoder:
        """The CLIP, loaded on first use and checked against the head's input size."""
        if self._encoder is None:
            from reward_models.hf_clip import TransformersClipEncoder

            encoder = TransformersClipEncoder(
                self.clip, device=self.device, dtype=self.dtype, reward=self.name
            )
            width = encoder.embed_dim * (2 if self.features == "image+text" else 1)
            if width != self.head.input_dim:
                raise RewardError(
                    f"{self.name}: the head reads {self.head.input_dim}-d {self.features} features but "
                    f"clip {self.clip!r} gives {width}; use the CLIP the head was trained with"
                )
            self._encoder = encoder
        return self._encoder

    def score_chunk(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        text_features = None
        if self.features == "image+text":
            if not all(isinstance(prompt, str) for prompt in prompts):
                raise RewardError(
                    f"{self.name}: this head reads the prompt's text, so prompts must be strings"
                )
            text_features = self.encoder.encode_texts(prompts)  # (b, D), unit norm
        image_features = self.encoder.encode_images(images)  # (b, D), unit norm
        return self.head(head_inputs(image_features, text_features, self.features))  # (b,)
