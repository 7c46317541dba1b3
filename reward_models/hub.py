"""Loading reward-model weights from the hub or a local folder, with one-line errors.

Shared by the learned rewards (aesthetic, PickScore, HPS v2, ImageReward, sequence
classifiers): offline (the ``HF_HUB_OFFLINE`` flag as set now) only the cache is read, and every
failure names what to provide instead of a library traceback. A single weights file is named by
its local path or as ``hub:<owner>/<repo>/<path in the repo>`` (``resolve_file``). Where a
reward model runs (device and dtype) is decided by ``resolve_placement``.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

import torch

from reward_models.errors import RewardConfigError, RewardError, RewardWeightsMissingError

HUB_FILE_PREFIX = "hub:"


def hub_offline() -> bool:
    """HF_HUB_OFFLINE as set now (huggingface_hub itself reads it only at import time)."""
    from huggingface_hub import constants

    flag = os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in {"1", "true", "yes", "on"}
    return flag or bool(constants.HF_HUB_OFFLINE)


def load_pretrained(loader: Any, source: str, local: bool, *, what: str, fix: str, **kwargs: Any) -> Any:
    """``loader.from_pretrained(source, **kwargs)``, cache-only when offline.

    Args:
        loader: a transformers class (``CLIPModel``, ``AutoTokenizer``, ...).
        source: a hub id or a local ``save_pretrained`` folder.
        local: whether ``source`` is a local folder.
        what: names the weights in messages, e.g. ``"pickscore: model"``.
        fix: what the user should set instead, e.g. ``"set reward.options.pickscore.model=/path"``.

    Raises:
        RewardWeightsMissingError: not cached offline, no such repository, or an incomplete folder.
        RewardError: the checkpoint is not one ``loader`` reads.
    """
    offline = hub_offline()
    try:
        return loader.from_pretrained(source, local_files_only=offline, **kwargs)
    except OSError as err:
        if local:
            # transformers' messages run on with advice about the hub; keep the first sentence.
            reason = (str(err).strip().splitlines() or [type(err).__name__])[0]
            reason = reason.split(". ")[0].rstrip(".")[:200]
            raise RewardWeightsMissingError(
                f"{what}: could not load folder {source} ({reason}); {fix} (a save_pretrained folder)"
            ) from err
        raise RewardWeightsMissingError(
            f"{what}: could not load {source!r} from the hub{' offline' if offline else ''} "
            f"({type(err).__name__}); download it once with network access "
            f"(huggingface-cli download {source}), or {fix}"
        ) from err
    except (ValueError, KeyError, RuntimeError, TypeError) as err:  # wrong kind of checkpoint
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise RewardError(
            f"{what}: {source!r} does not load as {loader.__name__}: {type(err).__name__}: {reason}"
        ) from err


def resolve_file(spec: str, *, what: str, fix: str) -> Path:
    """The local path of a weights file: ``spec`` itself, or for ``hub:<owner>/<repo>/<file>``
    the file downloaded from that hub repository (read from the cache only when offline).

    Args:
        spec: a local file path, or ``hub:`` + repository id + ``/`` + the file's path in it.
        what: names the file in messages, e.g. ``"hpsv2: model"``.
        fix: what the user should set instead, e.g. ``"set reward.options.hpsv2.model=/path"``.

    Raises:
        RewardConfigError: ``spec`` is empty or a malformed ``hub:`` spec.
        RewardWeightsMissingError: no such local file, or the hub file is not cached offline (or
            cannot be downloaded): one line naming the file, the repository and ``fix``.
    """
    if not isinstance(spec, str) or not spec.strip():
        raise RewardConfigError(f"{what} must be a file path or hub:<owner>/<repo>/<file>, got {spec!r}")
    if spec.startswith(HUB_FILE_PREFIX):
        parts = spec[len(HUB_FILE_PREFIX) :].split("/", 2)
        if len(parts) != 3 or not all(parts):
            raise RewardConfigError(
                f"{what}: {spec!r} is not a hub file; write hub:<owner>/<repo>/<file>, "
                "e.g. hub:xswu/HPSv2/HPS_v2.1_compressed.pt"
            )
        repo_id, filename = f"{parts[0]}/{parts[1]}", parts[2]
        from huggingface_hub import hf_hub_download

        offline = hub_offline()
        try:
            return Path(hf_hub_download(repo_id, filename, local_files_only=offline))
        except Exception as err:  # not cached offline, no such repo/file, HTTP errors
            raise RewardWeightsMissingError(
                f"{what}: could not get {filename!r} from hub repo {repo_id!r}"
                f"{' offline' if offline else ''} ({type(err).__name__}); download it once with "
                f"network access (hf download {repo_id} {filename}), or {fix}"
            ) from err
    path = Path(spec).expanduser()
    if not path.is_file():
        state = "is a folder, not a file" if path.is_dir() else "does not exist"
        raise RewardWeightsMissingError(f"{what}: file {path} {state}; {fix}")
    return path


def dtype_keyword() -> str:
    """from_pretrained's dtype keyword: ``dtype`` since transformers 4.56, ``torch_dtype`` before."""
    import transformers

    major, minor = (int(part) for part in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def resolve_device(device: str | torch.device | None) -> torch.device:
    """``None`` -> CUDA when available, else CPU."""
    if device is None:
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    return torch.device(device)


def resolve_dtype(dtype: str | torch.dtype) -> torch.dtype:
    """A floating torch dtype from a dtype or its name ("float32", "bfloat16", "float16")."""
    resolved = getattr(torch, dtype, None) if isinstance(dtype, str) else dtype
    if not isinstance(resolved, torch.dtype) or not resolved.is_floating_point:
        raise RewardConfigError(f"dtype must be one of float32, bfloat16, float16; got {dtype!r}")
    return resolved


def resolve_placement(
    device: str | torch.device | None, dtype: str | torch.dtype | None, reward: str
) -> tuple[torch.device, torch.dtype]:
    """A reward model's (device, dtype): CUDA when available; float16 on CUDA, float32 on CPU
    unless ``dtype`` says otherwise. A bad dtype is a RewardConfigError naming ``reward``."""
    resolved_device = resolve_device(device)
    if dtype is None:
        dtype = torch.float16 if resolved_device.type == "cuda" else torch.float32
    try:
        return resolved_device, resolve_dtype(dtype)
    except RewardConfigError as err:
        raise RewardConfigError(f"{reward}: {err}") from err
