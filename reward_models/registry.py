"""The reward contract, the reward registry, and weighted sums of rewards.

Every reward is a callable object with a ``name`` and one signature::

    reward(
        images: Tensor (B, 3, H, W) float in [0, 1],
        prompts: list[str] | list[ImagePrompt],
        *,
        texts: list[str] | None = None,
    ) -> Tensor (B,) float32

``images`` are a diffusion policy's samples, or a vision-language policy's input images;
``texts`` are a vision-language policy's generated answers (None for diffusion). Image rewards
ignore ``texts``; text rewards (``needs_texts = True``) score them and raise ``RewardError`` when
they are None. The scores come back on the images' device. ``build_reward`` turns the
``weights`` / ``options`` of a config into one callable (a ``WeightedSum`` when there are
several terms).

Configs are data: a reward is found only by name, never by importing what a config names. A
name is one registered in Python (``@register_reward("name")`` on a reward class, a factory, or
a plain function of ``(images, prompts)`` or ``(images, prompts, texts)``) or declared by an
installed package as an entry point of the group ``align_gen.rewards`` (imported only when its
name is asked for; installing the package is the user's decision to run its code).
"""

from __future__ import annotations

import difflib
import inspect
import math
from collections.abc import Callable, Iterable, Sequence
from importlib.metadata import entry_points
from typing import Any, Protocol, TypeVar, runtime_checkable

import torch

from reward_models.errors import RewardConfigError, RewardError

# Values this far outside [0, 1] are a caller bug (e.g. images still in [-1, 1]), not rounding.
RANGE_TOLERANCE = 1e-3



@runtime_checkable
class ImagePrompt(Protocol):
    """A vision-language policy's prompt: a question about an image, with the dataset's answer
    when it has one. ``str(prompt)`` is the question. align-gen's ``VisualPrompt`` is one; any
    object with these attributes is."""

    text: str
    image_key: str  # what identifies the image (a file path, or a dataset name and row)
    answer: str | None


# A diffusion policy's prompts are text; a vision-language policy's are questions about images.
Prompt = str | ImagePrompt


@runtime_checkable
class RewardFn(Protocol):
    """Anything that scores a batch of images (and generated texts) against their prompts.

    A reward that needs ``texts`` also has ``needs_texts = True``; read it with
    ``getattr(reward, "needs_texts", False)``, since user rewards may lack the attribute.
    """

    name: str

    def __call__(
        self, images: torch.Tensor, prompts: list[Prompt], *, texts: list[str] | None = None
    ) -> torch.Tensor: ...


def check_reward_inputs(images: torch.Tensor, prompts: list[Prompt], name: str) -> None:
    """Raise ``RewardError`` unless images is a finite (B, 3, H, W) float tensor in [0, 1]
    and ``prompts`` holds B prompts, each a string or an :class:`ImagePrompt`."""
    if not isinstance(images, torch.Tensor) or images.ndim != 4 or images.shape[1] != 3:
        shape = tuple(images.shape) if isinstance(images, torch.Tensor) else type(images).__name__
        raise RewardError(f"{name}: images must be a (B, 3, H, W) tensor, got {shape}")
    if not images.is_floating_point():
        raise RewardError(f"{name}: images must be float in [0, 1], got dtype {images.dtype}")
    if isinstance(prompts, str) or len(prompts) != images.shape[0]:
        got = "a single string" if isinstance(prompts, str) else f"{len(prompts)} prompts"
        raise RewardError(f"{name}: need one prompt per image ({images.shape[0]}), got {got}")
    for index, prompt in enumerate(prompts):
        if not isinstance(prompt, (str, ImagePrompt)):
            raise RewardError(
                f"{name}: prompts[{index}] is a {type(prompt).__name__}; prompts must be strings "
                "or image prompts (text, image_key and answer attributes)"
            )
    if images.numel() == 0:
        return
    if not bool(torch.isfinite(images).all()):
        raise RewardError(f"{name}: images contain NaN or inf")
    low, high = (float(v) for v in torch.aminmax(images.detach()))
    if low < -RANGE_TOLERANCE or high > 1 + RANGE_TOLERANCE:
        raise RewardError(
            f"{name}: images must be in [0, 1], got values in [{low:.3f}, {high:.3f}]; "
            "map [-1, 1] decoder output with (x + 1) / 2 first"
        )


def check_reward_texts(texts: Any, batch: int, name: str) -> list[str]:
    """``texts`` as a list, or ``RewardError`` unless it holds ``batch`` strings."""
    if texts is None:
        raise RewardError(
            f"{name} scores generated texts, so it needs a vision-language policy; got texts=None"
        )
    if isinstance(texts, str) or not isinstance(texts, list | tuple):
        raise RewardError(
            f"{name}: texts must be a list of {batch} strings (one generated answer per image), "
            f"got a {type(texts).__name__}"
        )
    if len(texts) != batch:
        raise RewardError(f"{name}: need one generated text per image ({batch}), got {len(texts)}")
    for index, text in enumerate(texts):
        if not isinstance(text, str):
            raise RewardError(f"{name}: texts[{index}] is a {type(text).__name__}, not a string")
    return list(texts)


def check_reward_output(scores: torch.Tensor, batch: int, name: str) -> torch.Tensor:
    """Return ``scores`` as a (B,) float32 tensor; raise ``RewardError`` on a bad shape or NaN."""
    if not isinstance(scores, torch.Tensor) or tuple(scores.shape) != (batch,):
        shape = tuple(scores.shape) if isinstance(scores, torch.Tensor) else type(scores).__name__
        raise RewardError(f"{name}: a reward must return shape ({batch},), got {shape}")
    if not bool(torch.isfinite(scores).all()):
        bad = int((~torch.isfinite(scores)).sum())
        raise RewardError(f"{name}: returned NaN or inf for {bad} of {batch} images")
    return scores.float()


class BatchedReward:
    """Base class: validates inputs, scores in chunks of ``batch_size`` without grad, checks
    the output. Subclasses set ``name`` and implement ``score_chunk``; text rewards also set
    ``needs_texts = True`` and get each chunk's generated texts as a third argument."""

    name: str = "reward"
    needs_texts: bool = False

    def __init__(self, batch_size: int = 32) -> None:
        if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
            raise RewardConfigError(f"{self.name}: batch_size must be a positive int, got {batch_size!r}")
        self.batch_size = batch_size

    def score_chunk(
        self, images: torch.Tensor, prompts: list[Prompt], texts: list[str] | None = None
    ) -> torch.Tensor:
        """Score (b, 3, H, W) images in [0, 1] -> (b,). Called under ``torch.no_grad()``.

        ``texts`` (b generated answers) is passed only when ``needs_texts`` is True.
        """
        raise NotImplementedError

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[Prompt], *, texts: list[str] | None = None
    ) -> torch.Tensor:
        check_reward_inputs(images, prompts, self.name)
        checked = check_reward_texts(texts, images.shape[0], self.name) if self.needs_texts else []
        images = images.detach().clamp(0.0, 1.0)  # absorb the tolerated rounding overshoot
        size = self.batch_size
        chunks = []
        for i in range(0, images.shape[0], size):
            args: tuple[Any, ...] = (images[i : i + size], list(prompts[i : i + size]))
            if self.needs_texts:  # image rewards keep their two-argument score_chunk
                args += (checked[i : i + size],)
            chunks.append(self.score_chunk(*args).reshape(-1))
        scores = torch.cat(chunks).to(images.device) if chunks else images.new_zeros(0)
        return check_reward_output(scores, images.shape[0], self.name)


def _texts_parameter(fn: Callable[..., Any]) -> tuple[str | None, bool]:
    """How ``fn`` takes generated texts: ("positional" | "keyword" | None, whether required).

    A third positional parameter takes them when it is required or named ``texts`` (so
    ``fn(images, prompts, scale=1.0)`` is not handed texts); else a keyword-only ``texts``.
    """
    try:
        params = list(inspect.signature(fn).parameters.values())
    except (TypeError, ValueError):
        return None, False
    empty = inspect.Parameter.empty
    positional = [p for p in params if p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD)]
    if len(positional) >= 3 and (positional[2].name == "texts" or positional[2].default is empty):
        return "positional", positional[2].default is empty
    keyword = next((p for p in params if p.name == "texts" and p.kind is p.KEYWORD_ONLY), None)
    if keyword is not None:
        return "keyword", keyword.default is empty
    return None, False


class FunctionReward:
    """Wraps a user's callable so that it obeys the contract (input and output checks).

    ``fn(images, prompts)`` is an image reward. ``fn(images, prompts, texts)`` (or with a
    keyword-only ``texts``) is a text reward: it gets the generated texts, and when ``texts``
    has no default, ``needs_texts`` is True and a call without texts is an error.
    """

    def __init__(self, fn: Callable[..., torch.Tensor], name: str) -> None:
        self.fn = fn
        self.name = name
        self._texts_by, self.needs_texts = _texts_parameter(fn)

    @torch.no_grad()
    def __call__(
        self, images: torch.Tensor, prompts: list[Prompt], *, texts: list[str] | None = None
    ) -> torch.Tensor:
        check_reward_inputs(images, prompts, self.name)
        if self.needs_texts or (self._texts_by is not None and texts is not None):
            texts = check_reward_texts(texts, images.shape[0], self.name)
            if self._texts_by == "positional":
                scores = self.fn(images, prompts, texts)
            else:
                scores = self.fn(images, prompts, texts=texts)
        else:  # an image reward, or texts is optional and absent: the function's default holds
            scores = self.fn(images, prompts)
        if isinstance(scores, torch.Tensor):
            scores = scores.to(images.device)
        return check_reward_output(scores, images.shape[0], self.name)


class WeightedSum:
    """sum_i w_i * r_i(images, prompts, texts=texts). ``last_terms`` holds each term's
    unweighted (B,) scores from the last call, keyed like ``weights``, for logging."""

    def __init__(self, rewards: dict[str, RewardFn], weights: dict[str, float]) -> None:
        if set(rewards) != set(weights):
            raise RewardConfigError(f"rewards {sorted(rewards)} and weights {sorted(weights)} differ")
        self.rewards = dict(rewards)
        self.weights = {key: float(w) for key, w in weights.items()}
        self.name = " + ".join(f"{w:g}*{key}" for key, w in self.weights.items())
        self.last_terms: dict[str, torch.Tensor] = {}

    @property
    def needs_texts(self) -> bool:
        """True when any term scores generated texts."""
        return any(getattr(reward, "needs_texts", False) for reward in self.rewards.values())

    def __call__(
        self, images: torch.Tensor, prompts: list[Prompt], *, texts: list[str] | None = None
    ) -> torch.Tensor:
        terms = {key: reward(images, prompts, texts=texts) for key, reward in self.rewards.items()}
        self.last_terms = {key: scores.detach() for key, scores in terms.items()}
        total = sum(self.weights[key] * scores for key, scores in terms.items())
        return check_reward_output(total, images.shape[0], self.name)


_REGISTRY: dict[str, Callable[..., RewardFn]] = {}
Factory = TypeVar("Factory", bound=Callable[..., Any])


def register_reward(name: str) -> Callable[[Factory], Factory]:
    """Decorator: register a reward class (or factory) under ``name`` for ``get_reward``."""

    def decorate(factory: Factory) -> Factory:
        if name in _REGISTRY and _REGISTRY[name] is not factory:
            raise RewardError(f"reward name {name!r} is already registered by {_REGISTRY[name]}")
        _REGISTRY[name] = factory
        if inspect.isclass(factory):
            factory.name = name
        return factory

    return decorate


def available_rewards() -> list[str]:
    """The registered reward names, sorted."""
    return sorted(_REGISTRY)


def _registry_listing() -> str:
    """The registered names for error messages, image rewards apart from text rewards."""
    text = [name for name in available_rewards() if getattr(_REGISTRY[name], "needs_texts", False)]
    image = [name for name in available_rewards() if name not in text]
    listing = f"image rewards: {', '.join(image)}"
    if text:
        listing += f"; text rewards (vision-language policies): {', '.join(text)}"
    declared = sorted(set(_declared_rewards()) - set(_REGISTRY))
    if declared:
        listing += f"; declared by installed packages: {', '.join(declared)}"
    return listing


ENTRY_POINT_GROUP = "align_gen.rewards"


def _declared_rewards() -> dict[str, Any]:
    """{name: entry point} of the rewards installed packages declare (group ``align_gen.rewards``)."""
    return {point.name: point for point in entry_points(group=ENTRY_POINT_GROUP)}


def _load_declared(name: str) -> Callable[..., Any] | None:
    """The reward an installed package declares under ``name`` (imported now), or None."""
    point = _declared_rewards().get(name)
    if point is None:
        return None
    try:
        factory = point.load()
    except Exception as err:  # noqa: BLE001 - any failure of the plugin's import is the plugin's
        raise RewardError(f"reward {name!r}: its entry point {point.value!r} failed to load: {err}") from err
    return register_reward(name)(factory)


def _is_plain_reward_function(obj: Any) -> bool:
    """True for a function taking exactly (images, prompts) or (images, prompts, texts);
    factories take options instead."""
    if inspect.isclass(obj) or not callable(obj):
        return False
    try:
        params = inspect.signature(obj).parameters.values()
    except (TypeError, ValueError):
        return False
    positional = (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)
    return sum(p.kind in positional and p.default is p.empty for p in params) in (2, 3)


def _call_factory(factory: Callable[..., Any], options: dict[str, Any], label: str) -> Any:
    """Call ``factory(**options)``, turning bad option names into a ``RewardConfigError``."""
    _check_options(factory, options, label)
    return factory(**options)


def _check_options(factory: Callable[..., Any], options: dict[str, Any], label: str) -> None:
    """Raises ``RewardConfigError`` unless ``factory`` accepts ``options`` (names and required ones)."""
    try:
        signature = inspect.signature(factory)
    except (TypeError, ValueError):
        return
    params = signature.parameters
    named = [n for n, p in params.items() if p.kind in (p.POSITIONAL_OR_KEYWORD, p.KEYWORD_ONLY)]
    valid = ", ".join(named) or "(none)"
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        unknown = [key for key in options if key not in named]
        if unknown:
            raise RewardConfigError(
                f"reward {label!r} has no option {unknown[0]!r}; valid options: {valid}"
            )
    try:
        signature.bind(**options)
    except TypeError as err:
        raise RewardConfigError(f"reward {label!r}: {err}; valid options: {valid}") from err


def _resolve(name: str) -> Callable[..., Any]:
    """The registered or declared reward factory called ``name``, or ``RewardError``."""
    if ":" in name:
        raise RewardError(
            f"reward {name!r} looks like a 'module:function' spec, and configs cannot import code. Register "
            "the reward in Python (@reward_models.register_reward('NAME')) or declare it as an "
            f"'{ENTRY_POINT_GROUP}' entry point of an installed package, then name it."
        )
    target = _REGISTRY.get(name) or _load_declared(name)
    if target is None:
        names = sorted({*available_rewards(), *_declared_rewards()})
        close = difflib.get_close_matches(name, names, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else ""
        raise RewardError(
            f"unknown reward {name!r}; {_registry_listing()}; your own: register_reward or an "
            f"'{ENTRY_POINT_GROUP}' entry point.{hint}"
        )
    return target


def check_reward_config(weights: dict[str, float], options: dict[str, dict[str, Any]] | None = None) -> None:
    """What :func:`build_reward` would refuse, found without building anything (no weights
    load): unknown or code-naming reward names, bad weights, option names a reward does not take.

    Raises:
        RewardError, RewardConfigError: as :func:`build_reward` would.
    """
    options = dict(options or {})
    _check_weights_and_options(weights, options)
    for key in weights:
        target = _resolve(key)
        if options.get(key) or not _is_plain_reward_function(target):
            _check_options(target, options.get(key, {}), key)


def check_reward_prompts(names: Iterable[str], options: dict[str, dict[str, Any]] | None, prompts: Sequence[Prompt]) -> None:
    """Each named reward's own check that it can score ``prompts`` (a reward class's optional
    classmethod ``check_prompts(prompts, **options)``, e.g. a reward that reads only some
    prompt language), before any weights load.

    Raises:
        RewardError: a prompt the reward cannot score, named.
    """
    options = dict(options or {})
    for name in names:
        check = getattr(_resolve(name), "check_prompts", None)
        if check is not None:
            check(list(prompts), **options.get(name, {}))


def get_reward(name: str, **options: Any) -> RewardFn:
    """A reward by registered or declared name (see the module docstring), built with ``options``."""
    target = _resolve(name)
    if not options and _is_plain_reward_function(target):
        return FunctionReward(target, name)
    reward = _call_factory(target, options, name)
    if not callable(reward):
        raise RewardError(f"reward {name!r} built a {type(reward).__name__}, which is not callable")
    if isinstance(reward, BatchedReward | FunctionReward | WeightedSum):
        return reward
    return FunctionReward(reward, getattr(reward, "name", name))


def build_reward(
    weights: dict[str, float], options: dict[str, dict[str, Any]] | None = None
) -> RewardFn:
    """One callable for ``weights`` ({reward name: weight}) with per-reward ``options``.

    One term of weight 1 gives that reward itself; anything else gives a ``WeightedSum``.
    """
    options = dict(options or {})
    _check_weights_and_options(weights, options)
    rewards = {key: get_reward(key, **options.get(key, {})) for key in weights}
    if len(rewards) == 1 and float(next(iter(weights.values()))) == 1.0:
        return next(iter(rewards.values()))
    return WeightedSum(rewards, {key: float(w) for key, w in weights.items()})


def _check_weights_and_options(weights: dict[str, float], options: dict[str, Any]) -> None:
    if not weights:
        raise RewardConfigError(
            f"reward weights are empty; give at least one, e.g. {{'aesthetic': 1.0}}; "
            f"{_registry_listing()}"
        )
    stray = sorted(set(options) - set(weights))
    if stray:
        raise RewardConfigError(
            f"reward options for {stray} but these rewards have no weight; "
            f"weighted rewards: {', '.join(weights)}"
        )
    for key, weight in weights.items():
        is_number = isinstance(weight, int | float) and not isinstance(weight, bool)
        if not is_number or not math.isfinite(weight):
            raise RewardConfigError(f"reward weight for {key!r} must be a finite number, got {weight!r}")
        if not isinstance(options.get(key, {}), dict):
            raise RewardConfigError(f"reward options for {key!r} must be a mapping, got {options[key]!r}")
