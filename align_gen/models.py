"""What a model argument names, and the policy that samples it.

Everywhere a model is named (the CLI's ``sample``, ``evaluate`` and ``make-pairs``, or Python)
it may be a hub id, a local diffusers or transformers folder, an ``align-gen:NAME`` built-in, or
one of a run's folders: the run's output folder, its ``final/`` folder, or one of its
checkpoints. :func:`resolve_model` says what such a name stands for without loading anything;
:func:`load_policy` loads it for sampling::

    from align_gen.models import load_policy
    policy = load_policy("outputs/ddpo_world")  # the run's final model on its base model
    rollout = policy.sample(["a red circle"])
"""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import torch

from align_gen.checkpoint import WEIGHTS_FILE, load_checkpoint_weights
from align_gen.config import ModelConfig, SampleConfig, load_config
from align_gen.errors import MissingWeightsError
from align_gen.policies.weights import MODEL_CARD_FILE


@dataclasses.dataclass(frozen=True)
class ModelSource:
    """A model, resolved without loading anything: ``model`` (hub id, folder or built-in) with
    optional LoRA weights ``lora``, or, with ``checkpoint``, a run's checkpoint folder whose
    trained weights go on the run's model."""

    model: str
    lora: str | None = None
    checkpoint: Path | None = None

    @property
    def takes_images(self) -> bool:
        """Whether it is a vision-language model (its prompts are (image, question) examples)."""
        from align_gen.policies.loading import is_vlm_source

        return is_vlm_source(self.model)


def resolve_model(model: str, lora: str | None = None) -> ModelSource:
    """What ``model`` stands for: a run's output folder stands for its ``final/`` folder; a
    ``final/`` folder holding LoRA weights for those weights on the recorded base model; a
    checkpoint folder for the run's model (from the run's config.yaml) with the checkpoint's
    weights; anything else for itself (with ``lora`` when given).

    Raises:
        MissingWeightsError: a checkpoint folder whose run has no config.yaml.
    """
    if (Path(model) / "final" / MODEL_CARD_FILE).is_file():  # a run's output folder
        model = str(Path(model) / "final")
    card = Path(model) / MODEL_CARD_FILE
    if card.is_file():  # a run's final/ folder: LoRA weights on top of the recorded base model
        description = json.loads(card.read_text())
        if description["kind"] == "lora":
            return ModelSource(description["base_model"], lora or model)
    checkpoint = Path(model)
    if (checkpoint / WEIGHTS_FILE).is_file():
        config_path = checkpoint.parent.parent / "config.yaml"
        if not config_path.is_file():
            raise MissingWeightsError(f"{checkpoint} looks like a checkpoint but {config_path} (the run's config) is missing.")
        return ModelSource(load_config(config_path).model.pretrained, None, checkpoint)
    return ModelSource(model, lora)


def load_policy(
    source: ModelSource | str,
    sample: SampleConfig | None = None,
    *,
    dtype: str = "float32",
    device: torch.device | str | None = None,
):
    """The frozen policy of ``source`` (a :class:`ModelSource` or anything
    :func:`resolve_model` takes), sampling with ``sample`` (default :class:`SampleConfig`) on
    ``device`` (default: CUDA when available). A checkpoint's weights are verified against its
    manifest before they are loaded."""
    from align_gen.policies import build_policy

    source = resolve_model(source) if isinstance(source, str) else source
    sample = sample or SampleConfig()
    device = device or ("cuda" if torch.cuda.is_available() else "cpu")
    if source.checkpoint is None:
        model_config = ModelConfig(pretrained=source.model, dtype=dtype)
        return build_policy(model_config, sample, device, trainable=False, lora_path=source.lora)
    run = load_config(source.checkpoint.parent.parent / "config.yaml")
    weights = load_checkpoint_weights(source.checkpoint)
    policy = build_policy(dataclasses.replace(run.model, dtype=dtype), sample, device, trainable=True)
    policy.load_trainable_state_dict(weights)
    return policy
