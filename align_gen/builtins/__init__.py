"""Built-in models: what ``align-gen:NAME`` names, wherever a model or reward model is expected.

A built-in is one of three kinds:

- ``diffusers``: a diffusers pipeline built in-process (the tiny random SD, SD 2.x, SDXL, SD3
  and FLUX pipelines of :mod:`align_gen.builtins.tiny_diffusion`);
- ``vlm``: a transformers ``(model, processor)`` pair built in-process (the tiny random VLMs of
  :mod:`align_gen.builtins.tiny_vlms`);
- ``folder``: a folder the package ships, loaded like any local folder (the tiny world's
  models: ``align-gen:world``, ``align-gen:world-clip``, ...; see :mod:`align_gen.world`).

Providers register their names with :func:`register_builtin`; this registry imports them the
first time a name is looked up. Real models never pass through here: :func:`find_builtin`
answers None for anything without the ``align-gen:`` prefix.
"""

from __future__ import annotations

import dataclasses
import difflib
from collections.abc import Callable, Mapping
from typing import Any, Literal

from align_gen.errors import MissingWeightsError

PREFIX = "align-gen:"

BuiltinKind = Literal["diffusers", "vlm", "folder"]


@dataclasses.dataclass(frozen=True)
class Builtin:
    """One built-in model.

    Attributes:
        name: the NAME of ``align-gen:NAME``.
        kind: ``diffusers`` (``load()`` returns a pipeline), ``vlm`` (``load()`` returns
            ``(model, processor)``) or ``folder`` (``load()`` returns the folder's path, and
            raises :class:`~align_gen.errors.MissingWeightsError` when it is absent).
        load: builds the model, or finds the folder.
    """

    name: str
    kind: BuiltinKind
    load: Callable[[], Any]

    @property
    def spec(self) -> str:
        return PREFIX + self.name


_REGISTRY: dict[str, Builtin] = {}
_PROVIDERS_LOADED = False


def register_builtin(name: str, kind: BuiltinKind) -> Callable[[Callable[[], Any]], Callable[[], Any]]:
    """Decorator: ``load`` (a function of no arguments) provides ``align-gen:name``."""
    if kind not in ("diffusers", "vlm", "folder"):
        raise ValueError(f"unknown built-in kind {kind!r}")

    def decorate(load: Callable[[], Any]) -> Callable[[], Any]:
        if name in _REGISTRY and _REGISTRY[name].load is not load:
            raise ValueError(f"built-in model {PREFIX + name} is registered twice")
        _REGISTRY[name] = Builtin(name, kind, load)
        return load

    return decorate


def builtins() -> Mapping[str, Builtin]:
    """Every built-in model by NAME."""
    _load_providers()
    return dict(_REGISTRY)


def find_builtin(spec: str) -> Builtin | None:
    """The built-in ``spec`` names, or None when ``spec`` is not an ``align-gen:`` name (a hub
    id or a folder).

    Raises:
        MissingWeightsError: ``spec`` has the prefix but names no built-in.
    """
    if not isinstance(spec, str) or not spec.startswith(PREFIX):
        return None
    known = builtins()
    name = spec[len(PREFIX) :]
    if name not in known:
        close = difflib.get_close_matches(name, known, n=1)
        hint = f" Did you mean {PREFIX + close[0]}?" if close else ""
        raise MissingWeightsError(
            f"unknown built-in model {spec!r}.{hint} Built-ins: {', '.join(PREFIX + n for n in sorted(known))}"
        )
    return known[name]


def resolve_folder(spec: str) -> str:
    """The folder a shipped built-in (kind ``folder``) stands for; any other ``spec`` unchanged.

    Raises:
        MissingWeightsError: the built-in's folder is absent, or ``spec`` has the prefix but
            names no built-in.
    """
    builtin = find_builtin(spec)
    return str(builtin.load()) if builtin is not None and builtin.kind == "folder" else spec


def resolve_folders_in(options: Mapping[str, Any]) -> dict[str, Any]:
    """``options`` (e.g. a config's ``reward.options``: {reward: {option: value}}) with every
    string value that names a shipped folder replaced by the folder's path, so libraries that
    know nothing of ``align-gen:`` names (the reward models) get a plain folder."""

    def resolve(value: Any) -> Any:
        if isinstance(value, Mapping):
            return {key: resolve(item) for key, item in value.items()}
        if isinstance(value, list):
            return [resolve(item) for item in value]
        return resolve_folder(value) if isinstance(value, str) and value.startswith(PREFIX) else value

    return resolve(options)


def _load_providers() -> None:
    """Imports the modules that register built-ins (once)."""
    global _PROVIDERS_LOADED
    if _PROVIDERS_LOADED:
        return
    from align_gen import world  # noqa: F401  (the world's shipped folders)
    from align_gen.builtins import tiny_diffusion, tiny_vlms  # noqa: F401

    _PROVIDERS_LOADED = True
