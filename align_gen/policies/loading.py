"""Loading models: diffusion pipelines and vision-language models, from hub ids and local
folders, and ``align-gen:NAME`` built-ins, which :mod:`align_gen.builtins` resolves (a shipped
folder is then loaded like any folder; a tiny random model is built in-process)."""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from align_gen.builtins import find_builtin, resolve_folder
from align_gen.errors import ConfigError, MissingWeightsError


def dtype_from_name(name: str) -> torch.dtype:
    return {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}[name]


def _diffusers_dtype_keyword() -> str:
    """from_pretrained's dtype keyword: ``dtype`` in diffusers releases that deprecate
    ``torch_dtype`` (they resolve the two in ``deprecation_utils._resolve_dtype``), else
    ``torch_dtype``."""
    from diffusers.utils import deprecation_utils

    return "dtype" if hasattr(deprecation_utils, "_resolve_dtype") else "torch_dtype"


def _absent_components(pretrained: str) -> dict[str, None]:
    """``{name: None}`` for the components a local folder's model_index.json saved as absent
    (``[null, null]``, e.g. an SD3 folder without its T5 encoder): diffusers then needs them
    passed as None explicitly."""
    index = Path(pretrained).expanduser() / "model_index.json"
    if not index.is_file():
        return {}
    entries = json.loads(index.read_text())
    return {name: None for name, value in entries.items() if isinstance(value, list) and value[:2] == [None, None]}


def load_pipeline(
    pretrained: str,
    *,
    revision: str | None = None,
    variant: str | None = None,
    dtype: torch.dtype = torch.float32,
):
    """A diffusers pipeline from a built-in name, a local folder or a hub id; its class comes
    from the model's ``model_index.json`` (StableDiffusionPipeline, FluxPipeline, ...).

    Raises:
        MissingWeightsError: the folder does not exist, or the hub id is not cached and the
            hub cannot be reached; the message names what to provide.
    """
    from diffusers import DiffusionPipeline

    pretrained = resolve_folder(pretrained)  # a shipped folder loads like any folder
    builtin = find_builtin(pretrained)
    if builtin is not None:
        if builtin.kind != "diffusers":
            raise ConfigError(f"{pretrained} is a vision-language model, not a diffusion pipeline.")
        pipeline = builtin.load()
        for component in pipeline.components.values():  # as from_pretrained leaves them: no dropout
            if isinstance(component, torch.nn.Module):
                component.eval()
        return pipeline if dtype == torch.float32 else pipeline.to(dtype=dtype)
    looks_local = pretrained.startswith((".", "/", "~")) or os.path.sep in pretrained.rstrip("/").split("/", 1)[-1]
    if looks_local and not Path(pretrained).expanduser().is_dir():
        raise MissingWeightsError(f"model folder not found: {pretrained}")
    try:
        return DiffusionPipeline.from_pretrained(
            pretrained,
            revision=revision,
            variant=variant,
            **{_diffusers_dtype_keyword(): dtype},
            **{**_absent_components(pretrained), "safety_checker": None},
            requires_safety_checker=False,
        )
    except (OSError, ValueError) as error:
        offline = os.environ.get("HF_HUB_OFFLINE", "0") not in ("0", "", "false")
        where = "the hub is offline (HF_HUB_OFFLINE=1)" if offline else "it could not be loaded"
        raise MissingWeightsError(
            f"cannot load the diffusion model {pretrained!r}: {where}. Provide a local diffusers "
            f"folder (model.pretrained=/path/to/model) or download it once with "
            f"`huggingface-cli download {pretrained}`. ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from None


def is_vlm_source(pretrained: str) -> bool:
    """Whether ``pretrained`` names a transformers vision-language model rather than a diffusers
    pipeline: a VLM built-in, a local folder with a ``config.json`` and no ``model_index.json``,
    or a hub id whose repository has no ``model_index.json`` (checked only when the hub or the
    cache can answer; otherwise it is taken for a diffusion model, whose loader names it)."""
    pretrained = resolve_folder(pretrained)
    builtin = find_builtin(pretrained)
    if builtin is not None:
        return builtin.kind == "vlm"
    folder = Path(pretrained).expanduser()
    if folder.is_dir():
        return (folder / "config.json").is_file() and not (folder / "model_index.json").is_file()
    from huggingface_hub import hf_hub_download
    from huggingface_hub.errors import LocalEntryNotFoundError, RemoteEntryNotFoundError

    try:
        hf_hub_download(pretrained, "model_index.json")
    except LocalEntryNotFoundError:  # offline and not cached: unknown (it subclasses EntryNotFoundError)
        return False
    except RemoteEntryNotFoundError:  # the repository exists and has no model_index.json
        return True
    except Exception:  # offline, unknown repo, no access: let the diffusion loader report it
        return False
    return False


def load_vlm(pretrained: str, *, revision: str | None = None, dtype: torch.dtype = torch.float32):
    """(model, processor) of a vision-language model: ``AutoModelForImageTextToText`` and
    ``AutoProcessor`` from a local folder or hub id, or a built-in tiny model.

    Raises:
        MissingWeightsError: the folder does not exist, or the hub id is not cached and the
            hub cannot be reached; the message names what to provide.
    """
    pretrained = resolve_folder(pretrained)
    builtin = find_builtin(pretrained)
    if builtin is not None:
        if builtin.kind != "vlm":
            raise ConfigError(f"{pretrained} is a diffusion pipeline, not a vision-language model.")
        model, processor = builtin.load()
        return (model if dtype == torch.float32 else model.to(dtype)), processor
    from transformers import AutoModelForImageTextToText, AutoProcessor

    try:
        processor = AutoProcessor.from_pretrained(pretrained, revision=revision)
        model = AutoModelForImageTextToText.from_pretrained(pretrained, revision=revision, dtype=dtype)
    except (OSError, ValueError) as error:
        raise MissingWeightsError(
            f"cannot load the vision-language model {pretrained!r}: provide a local folder with its config, "
            f"weights and processor files (model.pretrained=/path/to/model) or download it once with "
            f"`huggingface-cli download {pretrained}`. ({type(error).__name__}: {str(error).splitlines()[0]})"
        ) from None
    return model.eval(), processor
