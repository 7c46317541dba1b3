"""Loading reward-model weights from the hub or a local folder, with one-line errors.

Shared by the learned rewards (aesthetic, PickScore, sequence classifiers): offline (the
``HF_HUB_OFFLINE`` flag as set now) only the cache is read, and every failure names what to
provide instead of a library traceback.
"""

from __future__ import annotations

import os
from typing import Any

from align_gen.errors import MissingWeightsError, RewardError


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
        MissingWeightsError: not cached offline, no such repository, or an incomplete folder.
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
            raise MissingWeightsError(
                f"{what}: could not load folder {source} ({reason}); {fix} (a save_pretrained folder)"
            ) from err
        raise MissingWeightsError(
            f"{what}: could not load {source!r} from the hub{' offline' if offline else ''} "
            f"({type(err).__name__}); download it once with network access "
            f"(huggingface-cli download {source}), or {fix}"
        ) from err
    except (ValueError, KeyError, RuntimeError, TypeError) as err:  # wrong kind of checkpoint
        reason = (str(err).strip().splitlines() or [""])[0][:300]
        raise RewardError(
            f"{what}: {source!r} does not load as {loader.__name__}: {type(err).__name__}: {reason}"
        ) from err
