"""Typed run configuration: dataclasses, read from YAML, with ``key.sub=value`` overrides.

One dataclass per concern, every field documented with its unit and where its default comes
from. Unknown keys and badly typed values raise :class:`ConfigError` naming the key and the
valid choices. The objective's own section is typed by the objective's config class, looked up
in the objective registry by ``objective.name``, so a new objective brings its own knobs without
touching this file.
"""

from __future__ import annotations

import dataclasses
import difflib
import math
import types
import typing
from pathlib import Path
from typing import Any, Literal

import yaml

from align_gen.errors import ConfigError
from align_gen.objectives import objective_config_class
from align_gen.objectives.base import ObjectiveConfig

Dtype = Literal["float32", "float16", "bfloat16"]


@dataclasses.dataclass
class LoraConfig:
    """LoRA adapters (peft) on the denoiser or a VLM's language model. ``enabled: false``
    fine-tunes all their weights."""

    enabled: bool = True  # false = no adapters: all the weights of the denoiser (or the VLM's language model) train
    rank: int = 4  # DDPO anchor: 4
    alpha: float = 4.0  # scale = alpha / rank; the anchor uses alpha == rank
    dropout: float = 0.0  # dropout on the adapters' input (peft's lora_dropout)
    # Module names (or name suffixes) that get adapters; empty = the family's attention
    # projections: [to_q, to_k, to_v, to_out.0] for diffusers' UNet / transformer blocks,
    # [q_proj, k_proj, v_proj, o_proj] for a VLM's language model.
    target_modules: list[str] = dataclasses.field(default_factory=list)


@dataclasses.dataclass
class ModelConfig:
    """Which model to fine-tune and how to hold it in memory."""

    pretrained: str = "align-gen:tiny-random-sd"  # hub id, local folder, or an align-gen:NAME built-in
    revision: str | None = None  # hub revision (branch, tag or commit)
    variant: str | None = None  # weight file variant on the hub, e.g. "fp16"
    dtype: Dtype = "float32"  # dtype of the frozen weights; trainable weights stay float32
    # Diffusion denoisers' attention: "sdpa" lets PyTorch's scaled_dot_product_attention pick its
    # kernel; "sdpa_flash" / "sdpa_efficient" / "sdpa_cudnn" / "sdpa_math" allow only that one
    # (flash and math also run on a CPU; efficient and cudnn need CUDA); "xformers" needs the
    # `gpu` extra and CUDA.
    attention: Literal["sdpa", "sdpa_flash", "sdpa_efficient", "sdpa_cudnn", "sdpa_math", "xformers"] = "sdpa"
    gradient_checkpointing: bool = False  # trades ~30% more compute for much less activation memory
    # Diffusion policies: the denoiser's weights in channels_last memory format (faster
    # convolutions with tensor cores on a GPU; a UNet's, a transformer has few convolutions).
    channels_last: bool = False
    # torch.compile the forward pass (sampling and training; LoRA included). The first passes of
    # every new batch shape pay the compilation (minutes at full size). compile_backend "eager"
    # traces without compiling (checks the wiring fast).
    compile: bool = False
    compile_backend: str = "inductor"  # torch.compile backend; "eager" traces without compiling
    # Diffusion policies: keep the frozen VAE and text encoders on the CPU and move them to the
    # device only while they run (prompt encoding, decoding): frees their accelerator memory
    # (SD3's T5-XXL: ~9 GB in bf16) for a PCIe transfer per use.
    offload_frozen: bool = False
    train_vision_tower: bool = False  # VLM only: also adapt (LoRA) or train (full) the vision encoder
    lora: LoraConfig = dataclasses.field(default_factory=LoraConfig)


@dataclasses.dataclass
class SDEWindowConfig:
    """Noise at a window of consecutive steps only, the deterministic step (the ODE) elsewhere,
    and only the window's steps trained (Flow-GRPO-Fast, MixGRPO): an update costs size / T of a
    full one. For policy-gradient objectives (ddpo, grpo) on diffusion policies."""

    size: int = 0  # steps in the window; 0 = no window, every step adds noise
    # random: a start drawn uniformly per rollout batch, the window inside the first `span` steps
    # (Flow-GRPO-Fast: size 3 within the first 5 of 10 steps); sliding: starts at step 0 and moves
    # `stride` steps every `shift_every` epochs, back to 0 past the end of the span (MixGRPO:
    # size 4, stride 1 every 25 iterations, 25 steps)
    placement: Literal["random", "sliding"] = "random"
    span: int | None = None  # the window lies within steps [0, span); None = all sampling steps
    stride: int = 1  # sliding: steps per move
    shift_every: int = 1  # sliding: epochs between moves


@dataclasses.dataclass
class SampleConfig:
    """The stochastic sampler that produces training rollouts."""

    num_steps: int = 50  # denoising steps (DDPO anchor: 50)
    eta: float = 1.0  # DDIM stochasticity; must be > 0 for log-probs (anchor: 1.0)
    # Flow policies only (SD3): a in the flow SDE's std a * sqrt(sigma / (1 - sigma)); 0 = the
    # deterministic ODE (evaluation; no log-probs to train on). Flow-GRPO's default: 0.7.
    noise_level: float = 0.7
    guidance_scale: float = 5.0  # classifier-free guidance; 1 disables it (anchor: 5.0)
    batch_size: int = 8  # rollouts per forward pass, per process
    num_batches_per_epoch: int = 4  # rollout batches per epoch, per process
    samples_per_prompt: int = 1  # >1 draws groups of the same prompt (REBEL pairs, AWM groups)
    resolution: int | None = None  # image side in pixels; None = the model's native size
    negative_prompt: str = ""  # the unconditional branch of CFG
    # VLM policies only, the answer sampler: log-probs are of the temperature-scaled softmax;
    # top_p < 1 or top_k > 0 filter sampling only, which makes ratios slightly off-policy.
    max_new_tokens: int = 32  # VLM: answer length cap, end-of-sequence token included
    temperature: float = 1.0  # VLM: softmax temperature of the answer sampler (> 0)
    top_p: float = 1.0  # VLM: nucleus sampling (filters sampling only); 1 = off
    top_k: int = 0  # VLM: top-k sampling (filters sampling only); 0 = off
    sde_window: SDEWindowConfig = dataclasses.field(default_factory=SDEWindowConfig)


@dataclasses.dataclass
class TrainConfig:
    """The optimiser and the update schedule."""

    learning_rate: float = 3e-4  # AdamW (anchor: 3e-4 with LoRA)
    # adamw: torch.optim.AdamW (anchor); adamw_8bit: bitsandbytes' AdamW8bit, moments in 8 bits
    # (about 1/4 of the optimizer state's memory: what matters for full fine-tuning).
    optimizer: Literal["adamw", "adamw_8bit"] = "adamw"
    adam_beta1: float = 0.9  # AdamW's beta1
    adam_beta2: float = 0.999  # AdamW's beta2
    weight_decay: float = 1e-4  # anchor: 1e-4
    adam_epsilon: float = 1e-8  # AdamW's eps
    batch_size: int | None = None  # samples per minibatch; None = sample.batch_size; must divide the rollouts per epoch
    gradient_accumulation_steps: int = 1  # minibatches per optimizer step
    inner_epochs: int = 1  # passes over each epoch's rollouts
    max_grad_norm: float = 1.0  # anchor: 1.0
    # Diffusion policies: denoising steps of each sample re-scored in one forward pass (k * B
    # rows, CFG doubling them) by DDPO, REBEL and the KL monitor. Same loss and gradient for any
    # k (float rounding aside); larger k = fewer, larger forwards (faster on a GPU) and about k
    # times the activation memory of a piece. Anchor / default: 1.
    steps_per_forward: int = 1
    mixed_precision: Literal["no", "fp16", "bf16"] = "no"  # accelerate's autocast mode

    def __post_init__(self) -> None:
        # What torch.optim.AdamW would reject at its first step, refused before any model loads.
        for name in ("adam_beta1", "adam_beta2"):
            if not 0 <= getattr(self, name) < 1:
                raise ConfigError(f"train.{name} must be in [0, 1), got {getattr(self, name)!r}.")
        if self.adam_epsilon < 0 or self.weight_decay < 0:
            raise ConfigError(
                f"train.adam_epsilon and train.weight_decay must be >= 0, got {self.adam_epsilon!r} and {self.weight_decay!r}."
            )


@dataclasses.dataclass
class RewardConfig:
    """What is optimised: a weighted sum of registered rewards (see reward_models)."""

    # reward name (built-in or registered) -> weight; several rewards are summed
    weights: dict[str, float] = dataclasses.field(
        default_factory=lambda: {"jpeg_compressibility": 1.0}
    )
    options: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)  # per reward


@dataclasses.dataclass
class AdvantageConfig:
    """How rewards become advantages (see align_gen.advantages)."""

    # per_prompt: a running buffer of each prompt's rewards; group: the same prompt's samples in
    # the batch; batch: the whole batch
    kind: Literal["per_prompt", "batch", "group"] = "per_prompt"
    buffer_size: int = 32  # per-prompt running buffer (anchor: 32)
    min_count: int = 16  # below this many rewards for a prompt, use batch statistics (anchor: 16)
    clip: float = 5.0  # advantages are clipped to +-clip
    # group only: divide by the std of the whole batch's rewards instead of the group's
    # (Flow-GRPO's and DiffusionNFT's global_std, on in their SD3.5 recipes)
    global_std: bool = False


@dataclasses.dataclass
class PromptConfig:
    """Where training prompts come from."""

    source: str = "builtin:simple_animals"  # builtin:NAME, a .txt file (one per line) or .jsonl
    # VLM only: one question asked about every image of the dataset, replacing its prompts
    # (e.g. "Describe this image in one sentence." for an image-caption dataset).
    instruction: str | None = None


@dataclasses.dataclass
class GridConfig:
    """A labelled grid of fixed prompts and seeds, rendered every ``every`` epochs."""

    prompts: list[str] = dataclasses.field(default_factory=list)  # empty = first prompts of source
    num_prompts: int = 4  # used when ``prompts`` is empty
    seeds: list[int] = dataclasses.field(default_factory=lambda: [0, 1])  # one grid column per seed
    every: int = 10  # epochs; 0 disables periodic grids (the first and last are always drawn)


@dataclasses.dataclass
class EvaluationConfig:
    """Mean reward on fixed held-out prompts and seeds (paired samples, see align_gen.evaluation),
    measured before the first update, every ``every`` epochs and after the last one."""

    prompts: str | None = None  # a prompt source like prompts.source; None = no evaluation
    num_prompts: int = 0  # an evenly spaced subset of that many prompts; 0 = all of them
    seeds: list[int] = dataclasses.field(default_factory=lambda: [1000, 1001])  # one sample per prompt per seed
    every: int = 0  # epochs; 0 = only before and after training
    batch_size: int = 32  # prompts per sampling batch
    # Other rewards scored on the same held-out samples, each logged beside the training reward
    # ({name}_mean and its per-sample {name}_scores): a gold reward watched while a proxy is
    # trained, e.g. {world_geneval: {mode: strict}}. {reward name: its options}.
    rewards: dict[str, dict[str, Any]] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class MonitorConfig:
    """Over-optimisation monitors (align_gen.monitors): ``monitor/*`` keys in metrics.jsonl.

    The training and held-out rewards (and their gap) cost nothing and are logged every epoch
    they exist; diversity and the KL to the base model cost forward passes and run every
    ``every`` epochs, before the epoch's update."""

    enabled: bool = True  # false logs no monitor/* key at all
    every: int = 1  # epochs between diversity / KL measurements (epochs 0, every, 2 every, ...)
    # Samples per process whose KL to the base model is estimated: 2 forward passes per step
    # each, i.e. 2 * kl_samples / (samples per epoch) of the sampling cost. 0 = no KL monitor.
    kl_samples: int = 8
    diversity: bool = True  # CLIP embeddings of every sample of the epoch (about 1 ms each, world CLIP on CPU)
    # A transformers CLIPModel (hub id, folder or align-gen:world-clip) for diversity. None = the
    # world CLIP for built-in models (align-gen:*); other models get no diversity until one is named.
    clip_model: str | None = None

    def __post_init__(self) -> None:
        if self.every < 1 or self.kl_samples < 0:
            raise ConfigError(
                f"monitors.every must be >= 1 and monitors.kl_samples >= 0 (0 = off); got {self.every}, {self.kl_samples}."
            )


@dataclasses.dataclass
class RunConfig:
    """A whole training run."""

    seed: int = 42  # every random draw of epoch e on process p derives from (seed, e, p)
    output_dir: str = "outputs/run"  # where the run writes everything: metrics, grids, checkpoints, final model
    epochs: int = 100  # sampling epochs
    save_every: int = 10  # epochs between checkpoints; the last epoch is always saved
    keep_checkpoints: int = 2  # older checkpoints are deleted
    resume: str | None = None  # "latest", a checkpoint folder, or None
    # An output_dir that already holds a run is refused unless resume continues it or this is
    # true: then that run's results (metrics, checkpoints, final model, grids) are deleted first.
    overwrite: bool = False
    # Resuming with a config that changes what is trained (anything but epochs, save_every,
    # keep_checkpoints, tensorboard, grid, evaluation, monitors) is refused unless this is true;
    # either way the change is shown and every config used is kept in config_history/.
    allow_config_changes: bool = False
    tensorboard: bool = True  # also log to TensorBoard when it is installed
    model: ModelConfig = dataclasses.field(default_factory=ModelConfig)
    sample: SampleConfig = dataclasses.field(default_factory=SampleConfig)
    train: TrainConfig = dataclasses.field(default_factory=TrainConfig)
    objective: ObjectiveConfig = dataclasses.field(default_factory=ObjectiveConfig)
    reward: RewardConfig = dataclasses.field(default_factory=RewardConfig)
    advantage: AdvantageConfig = dataclasses.field(default_factory=AdvantageConfig)
    prompts: PromptConfig = dataclasses.field(default_factory=PromptConfig)
    grid: GridConfig = dataclasses.field(default_factory=GridConfig)
    evaluation: EvaluationConfig = dataclasses.field(default_factory=EvaluationConfig)
    monitors: MonitorConfig = dataclasses.field(default_factory=MonitorConfig)

    def __post_init__(self) -> None:
        _check_positive(self, ["epochs", "save_every", "keep_checkpoints"])
        _check_positive(
            self.sample,
            ["num_steps", "batch_size", "num_batches_per_epoch", "samples_per_prompt", "max_new_tokens", "temperature"],
            "sample",
        )
        if not 0 < self.sample.top_p <= 1 or self.sample.top_k < 0:
            raise ConfigError(
                f"sample.top_p must be in (0, 1] and sample.top_k >= 0 (0 = off); got {self.sample.top_p}, {self.sample.top_k}."
            )
        _check_positive(
            self.train, ["learning_rate", "gradient_accumulation_steps", "inner_epochs", "max_grad_norm", "steps_per_forward"], "train"
        )
        _check_sde_window(self.sample.sde_window, self.sample.num_steps)
        if self.advantage.global_std and self.advantage.kind != "group":
            raise ConfigError(
                f"advantage.global_std applies to advantage.kind=group only (the group's mean over the batch's std), "
                f"got kind={self.advantage.kind}."
            )
        if not self.sample.noise_level >= 0:
            raise ConfigError(f"sample.noise_level must be >= 0 (0 = the ODE), got {self.sample.noise_level!r}.")
        if self.sample.batch_size % self.sample.samples_per_prompt:
            raise ConfigError(
                f"sample.batch_size ({self.sample.batch_size}) must be a multiple of "
                f"sample.samples_per_prompt ({self.sample.samples_per_prompt})."
            )
        if self.evaluation.num_prompts < 0 or self.evaluation.every < 0 or self.evaluation.batch_size < 1:
            raise ConfigError(
                "evaluation.num_prompts and evaluation.every must be >= 0 and evaluation.batch_size >= 1; got "
                f"{self.evaluation.num_prompts}, {self.evaluation.every}, {self.evaluation.batch_size}."
            )
        if self.evaluation.prompts is not None and not self.evaluation.seeds:
            raise ConfigError("evaluation.seeds is empty: give at least one seed (one sample per prompt per seed).")
        if self.train.batch_size is None:
            self.train.batch_size = self.sample.batch_size
        total = self.sample.batch_size * self.sample.num_batches_per_epoch
        if self.train.batch_size <= 0 or total % self.train.batch_size:
            raise ConfigError(
                f"train.batch_size ({self.train.batch_size}) must divide the rollouts per epoch "
                f"per process (sample.batch_size x sample.num_batches_per_epoch = {total})."
            )


def _check_sde_window(window: SDEWindowConfig, num_steps: int) -> None:
    span = num_steps if window.span is None else window.span
    if window.size < 0 or window.stride < 1 or window.shift_every < 1:
        raise ConfigError(
            "sample.sde_window.size must be >= 0 (0 = no window) and its stride and shift_every >= 1; got "
            f"{window.size}, {window.stride}, {window.shift_every}."
        )
    if window.size and not window.size <= span <= num_steps:
        raise ConfigError(
            f"sample.sde_window must fit its span and the span the sampling steps: size {window.size} <= span "
            f"{span} <= sample.num_steps {num_steps} does not hold."
        )


def _check_positive(section: Any, names: list[str], prefix: str = "") -> None:
    for name in names:
        value = getattr(section, name)
        if value <= 0:
            key = f"{prefix}.{name}" if prefix else name
            raise ConfigError(f"{key} must be > 0, got {value!r}.")


# --------------------------------------------------------------------------------------------
# Loading


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> RunConfig:
    """Reads a YAML file (or only defaults when ``path`` is None) and applies overrides.

    Args:
        path: a YAML file whose keys mirror :class:`RunConfig`.
        overrides: ``key.sub=value`` strings; values are parsed as YAML (``lr=1e-4``,
            ``model.lora.enabled=false``, ``grid.seeds=[0,1,2]``).
    """
    data: dict[str, Any] = {}
    if path is not None:
        path = Path(path)
        if not path.is_file():
            raise ConfigError(f"config file not found: {path}")
        try:
            data = yaml.safe_load(path.read_text()) or {}
        except yaml.YAMLError as error:
            mark = getattr(error, "problem_mark", None)
            where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
            problem = getattr(error, "problem", None) or str(error).splitlines()[0]
            raise ConfigError(f"{path} is not valid YAML{where}: {problem}.") from None
        if not isinstance(data, dict):
            raise ConfigError(f"{path} must hold a mapping of config keys, got {type(data).__name__}.")
    for override in overrides or []:
        apply_override(data, override)
    return from_dict(RunConfig, data)


def apply_override(data: dict[str, Any], override: str) -> None:
    """Sets ``data[a][b] = value`` for an override ``a.b=value`` (value parsed as YAML)."""
    key, sep, raw = override.partition("=")
    if not sep or not key.strip():
        raise ConfigError(f"override {override!r} must look like key.sub=value.")
    try:
        value = yaml.safe_load(raw) if raw.strip() else None
    except yaml.YAMLError:
        value = raw
    node = data
    parts = key.strip().split(".")
    for part in parts[:-1]:
        child = node.setdefault(part, {})
        if not isinstance(child, dict):
            raise ConfigError(f"override {override!r}: {part!r} is a value, not a section.")
        node = child
    node[parts[-1]] = value


def to_dict(config: Any) -> Any:
    """The config as plain YAML-able data (inverse of :func:`from_dict`)."""
    return dataclasses.asdict(config)


def save_config(config: RunConfig, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def from_dict(cls: type, data: Any, key: str = "") -> Any:
    """Builds dataclass ``cls`` from nested dicts, checking every key and type."""
    if not isinstance(data, dict):
        raise ConfigError(f"{key or 'config'} must be a mapping, got {data!r}.")
    if cls is ObjectiveConfig or (isinstance(cls, type) and issubclass(cls, ObjectiveConfig)):
        cls = _objective_config_class(data, key)
    hints = typing.get_type_hints(cls)
    fields = {f.name: f for f in dataclasses.fields(cls) if f.init}
    kwargs = {}
    for name, value in data.items():
        path = f"{key}.{name}" if key else str(name)
        if name not in fields:
            raise ConfigError(_unknown_key_message(path, name, list(fields)))
        kwargs[name] = _convert(hints[name], value, path)
    for name in fields.keys() - kwargs.keys():
        # Absent sections are still built through from_dict, so the objective section gets its
        # objective's own config class even when the YAML does not mention it.
        if dataclasses.is_dataclass(hints[name]):
            kwargs[name] = from_dict(hints[name], {}, f"{key}.{name}" if key else name)
    try:
        return cls(**kwargs)
    except ConfigError:
        raise
    except (TypeError, ValueError) as error:
        raise ConfigError(f"{key or 'config'}: {error}") from None


def _objective_config_class(data: dict[str, Any], key: str) -> type:
    name = data.get("name", ObjectiveConfig.name)
    return objective_config_class(str(name), key=f"{key}.name" if key else "name")


def _unknown_key_message(path: str, name: str, valid: list[str]) -> str:
    close = difflib.get_close_matches(str(name), valid, n=1)
    hint = f" Did you mean {close[0]!r}?" if close else ""
    return f"unknown config key {path!r}.{hint} Valid keys here: {', '.join(sorted(valid))}."


def _convert(hint: Any, value: Any, path: str) -> Any:
    origin = typing.get_origin(hint)
    args = typing.get_args(hint)
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        errors = []
        for arg in (a for a in args if a is not type(None)):
            try:
                return _convert(arg, value, path)
            except ConfigError as error:
                errors.append(str(error))
        raise ConfigError(errors[0])
    if origin is Literal:
        if value not in args:
            raise ConfigError(f"{path} must be one of {', '.join(map(repr, args))}; got {value!r}.")
        return value
    if dataclasses.is_dataclass(hint):
        return from_dict(hint, value, path)
    if origin is list:
        if not isinstance(value, list):
            raise ConfigError(f"{path} must be a list, got {value!r}.")
        return [_convert(args[0], item, f"{path}[{i}]") for i, item in enumerate(value)]
    if origin is dict:
        if not isinstance(value, dict):
            raise ConfigError(f"{path} must be a mapping, got {value!r}.")
        return {str(k): _convert(args[1], v, f"{path}.{k}") for k, v in value.items()}
    if hint is Any:
        return value
    return _convert_scalar(hint, value, path)


def _convert_scalar(hint: type, value: Any, path: str) -> Any:
    if hint is bool:
        if isinstance(value, bool):
            return value
    elif hint is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif hint is float:
        number = None
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            number = float(value)
        elif isinstance(value, str):  # YAML 1.1 reads "1e-4" (no dot) as a string
            try:
                number = float(value)
            except ValueError:
                pass
        if number is not None:
            if not math.isfinite(number):
                raise ConfigError(f"{path} must be a finite number, got {value!r}.")
            return number
    elif hint is str:
        if isinstance(value, str):
            return value
    else:
        raise ConfigError(f"{path}: unsupported config type {hint!r}.")
    raise ConfigError(f"{path} must be of type {hint.__name__}, got {value!r} ({type(value).__name__}).")
