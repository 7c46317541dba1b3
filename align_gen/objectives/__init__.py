"""The objective registry: ``objective.name`` in a config selects a class registered here.

A new objective is one file: a config dataclass (subclass of ObjectiveConfig) and a class with
``check`` and ``loss_terms``, registered with :func:`register_objective`.
"""

from __future__ import annotations

import difflib
from collections.abc import Callable

from align_gen.errors import ConfigError

_REGISTRY: dict[str, tuple[type, type]] = {}


def register_objective(name: str, config_class: type) -> Callable[[type], type]:
    def decorator(objective_class: type) -> type:
        _REGISTRY[name] = (objective_class, config_class)
        return objective_class

    return decorator


def available_objectives() -> list[str]:
    _import_builtin_objectives()
    return sorted(_REGISTRY)


def objective_config_class(name: str, key: str = "objective.name") -> type:
    _import_builtin_objectives()
    if name not in _REGISTRY:
        close = difflib.get_close_matches(name, list(_REGISTRY), n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise ConfigError(
            f"{key}: unknown objective {name!r}.{hint} Valid: {', '.join(sorted(_REGISTRY))}."
        )
    return _REGISTRY[name][1]


def build_objective(config):
    """The objective instance for a parsed objective config."""
    objective_config_class(config.name)
    return _REGISTRY[config.name][0](config)


def _import_builtin_objectives() -> None:
    from align_gen.objectives import awm, ddpo, diffusion_dpo, grpo, nft, rebel, seppo  # noqa: F401
