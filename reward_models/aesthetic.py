"""Aesthetic score: the LAION "improved aesthetic predictor" on CLIP ViT-L/14 image embeddings.

Source: the improved-aesthetic-predictor project (christophschuhmann), whose head
``sac+logos+ava1-l14-linearMSE.pth`` was trained by MSE regression onto human ratings (SAC, LAION
logos, AVA) from L2-normalised OpenAI CLIP ViT-L/14 image embeddings; DDPO (Black et al. 2023)
uses it as its aesthetic reward. The head is an MLP 768 -> 1024 -> 128 -> 64 -> 16 -> 1 with
dropout between the first layers (no activations, as in the original). The score approximates
the 1-10 rating scale: typical photos score about 4-6, strong images 6.5+. Prompts are ignored.

The head comes from ``head_path`` (a local .pth or .safetensors state dict) or, when that is not
set, from the hub (``head_repo``/``head_filename``, the copy trl's DDPO example uses).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from reward_models.clip_score import OpenClipEncoder
from reward_models.errors import RewardConfigError, RewardError, RewardWeightsMissingError
from reward_models.hub import hub_offline
from reward_models.registry import BatchedReward, register_reward

HEAD_KEYS = tuple(f"layers.{i}.{p}" for i in (0, 2, 4, 6, 7) for p in ("weight", "bias"))


class AestheticHead(nn.Module):
    """The LAION aesthetic MLP: (B, input_dim) normalised embeddings -> (B, 1) scores."""

    def __init__(self, input_dim: int = 768) -> None:
        super().__init__()
        self.layers = nn.Sequential(
            nn.Linear(input_dim, 1024),
            nn.Dropout(0.2),
            nn.Linear(1024, 128),
            nn.Dropout(0.2),
            nn.Linear(128, 64),
            nn.Dropout(0.1),
            nn.Linear(64, 16),
            nn.Linear(16, 1),
        )

    def forward(self, embeddings: torch.Tensor) -> torch.Tensor:
        return self.layers(embeddings)


def resolve_head_file(head_path: str | None, head_repo: str, head_filename: str) -> Path:
    """The local head file: ``head_path`` if given, else the hub file (cache-only offline)."""
    if head_path is not None:
        path = Path(head_path).expanduser()
        if not path.is_file():
            raise RewardWeightsMissingError(
                f"aesthetic: head file {path} does not exist; set reward options "
                "aesthetic.head_path=/path/to/sac+logos+ava1-l14-linearMSE.pth"
            )
        return path
    from huggingface_hub import hf_hub_download

    try:
        return Path(hf_hub_download(head_repo, head_filename, local_files_only=hub_offline()))
    except Exception as err:  # offline, not cached, no such repo/file, HTTP errors
        raise RewardWeightsMissingError(
            f"aesthetic: could not get {head_filename!r} from hub repo {head_repo!r} "
            f"({type(err).__name__}); download it once with network access, or set reward "
            "options aesthetic.head_path=/path/to/sac+logos+ava1-l14-linearMSE.pth"
        ) from err


def load_aesthetic_head(path: Path) -> AestheticHead:
    """Read a head state dict (.pth/.pt/.bin via torch.load, or .safetensors) into the MLP."""
    if path.suffix == ".safetensors":
        from safetensors.torch import load_file

        state = load_file(str(path), device="cpu")
    else:
        state = torch.load(path, map_location="cpu", weights_only=True)
    if isinstance(state, dict) and isinstance(state.get("state_dict"), dict):
        state = state["state_dict"]
    if not isinstance(state, dict) or set(state) != set(HEAD_KEYS):
        found = sorted(state) if isinstance(state, dict) else type(state).__name__
        raise RewardError(
            f"aesthetic: {path} is not an aesthetic head state dict; expected keys "
            f"{list(HEAD_KEYS)}, found {found}"
        )
    head = AestheticHead(input_dim=int(state["layers.0.weight"].shape[1]))
    try:
        head.load_state_dict(state)
    except RuntimeError as err:
        raise RewardError(f"aesthetic: {path} has the wrong layer shapes: {err}") from err
    return head


@register_reward("aesthetic")
class AestheticScore(BatchedReward):
    """LAION aesthetic MLP on normalised CLIP image embeddings: (B,) scores on a ~1-10 scale."""

    def __init__(
        self,
        head_path: str | None = None,
        head_repo: str = "trl-lib/ddpo-aesthetic-predictor",
        head_filename: str = "aesthetic-model.pth",
        clip_model: str = "ViT-L-14",
        clip_pretrained: str = "openai",
        device: str | torch.device | None = None,
        dtype: str | torch.dtype = torch.float32,
        batch_size: int = 32,
    ) -> None:
        super().__init__(batch_size=batch_size)
        # The head is small: fetch and check it before building the (large) CLIP backbone.
        head = load_aesthetic_head(resolve_head_file(head_path, head_repo, head_filename))
        try:
            self.encoder = OpenClipEncoder(
                clip_model,
                clip_pretrained,
                device=device,
                dtype=dtype,
                option="reward options aesthetic.clip_pretrained",
            )
        except (RewardConfigError, RewardWeightsMissingError, RewardError) as err:
            raise type(err)(f"{self.name}: {err}") from err
        head_dim, clip_dim = head.layers[0].in_features, self.encoder.embed_dim
        if head_dim != clip_dim:
            raise RewardError(
                f"aesthetic: the head expects {head_dim}-d CLIP embeddings but clip_model "
                f"{clip_model!r} gives {clip_dim}-d; use the CLIP the head was trained on "
                "(ViT-L-14 for the LAION head)"
            )
        self.head = head.to(device=self.encoder.device, dtype=self.encoder.dtype).eval()
        self.head.requires_grad_(False)

    def score_chunk(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        embeddings = self.encoder.encode_images(images)  # (b, 768), unit norm, float32
        return self.head(embeddings.to(self.encoder.dtype)).squeeze(-1)  # (b,)
