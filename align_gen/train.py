"""The one training loop: rollout -> reward -> advantage -> update -> log / save.

Every objective and every policy goes through :func:`train`; what differs between methods lives
in the objective's ``loss_terms``. Multi-process runs (``accelerate launch``) sample and update on
every process; rewards and prompts are gathered so that advantages are computed on the global
batch, then each process trains on its own rollouts.
"""

from __future__ import annotations

import dataclasses
import math
import time
from collections import defaultdict
from pathlib import Path
from typing import Any

import torch
from accelerate import Accelerator
from accelerate.utils import gather_object
from tqdm.auto import tqdm

from align_gen.advantages import build_advantage_fn
from align_gen.builtins import resolve_folders_in
from align_gen.checkpoint import Checkpoint, save_checkpoint, set_aside_diverged
from align_gen.config import RunConfig, SampleConfig
from align_gen.durable import write_folder_atomic
from align_gen.errors import (
    AlignGenError,
    ConfigError,
    NonFiniteSamplesError,
    RewardError,
    TrainingDivergedError,
)
from align_gen.evaluation import paired_change, score_samples, select_prompts, watched_changes
from align_gen.monitors import Monitors
from align_gen.objectives import build_objective
from align_gen.objectives.base import Objective
from align_gen.optimizers import build_optimizer
from align_gen.policies import build_policy
from align_gen.policies.loading import is_vlm_source
from align_gen.policy import Policy
from align_gen.prompts import load_prompts, sample_prompts
from align_gen.run_folder import open_run, record_config
from align_gen.tracking import (
    EVALUATION_FILE,
    METRICS_FILE,
    MetricsLog,
    plot_learning_curve,
    read_metrics,
)
from align_gen.types import Rollout, VisualPrompt
from pipelines.grid import sample_grid, side_by_side
from reward_models import build_reward, check_reward_config, check_reward_prompts, get_reward

EXTRA_PREFIX = "evaluation.rewards:"  # the score keys of evaluation.rewards while they are gathered


@dataclasses.dataclass
class TrainResult:
    """Where a run's outputs went; its first and last epoch's mean reward; and, when the run
    has an ``evaluation:`` section, the held-out mean reward before and after training."""

    output_dir: Path
    final_model: Path
    metrics: Path
    learning_curve: Path
    grids: list[Path]
    first_reward: float | None
    last_reward: float | None
    before_after_grid: Path | None = None
    evaluation: Path | None = None
    evaluation_before: float | None = None
    evaluation_after: float | None = None
    evaluation_change: tuple[float, float] | None = None  # (mean, standard error) of paired differences
    # Each reward of ``evaluation.rewards`` (watched, not trained) on the same samples:
    # name -> (before, after, change, standard error), as the three fields above.
    watched: dict[str, tuple[float, float, float, float]] = dataclasses.field(default_factory=dict)


def epoch_generator(seed: int, epoch: int, process: int) -> torch.Generator:
    """The source of every random draw of one epoch on one process (makes resume exact)."""
    return torch.Generator().manual_seed(seed * 1_000_003 + epoch * 1009 + process)


@dataclasses.dataclass
class TrainingRun:
    """Everything one run holds between its epochs (built by :func:`setup`)."""

    config: RunConfig
    accelerator: Accelerator
    output_dir: Path
    policy: Policy
    objective: Objective
    reward_fn: Any
    advantage_fn: Any
    optimizer: torch.optim.Optimizer
    monitors: Monitors
    prompts: list
    grid_prompts: list
    evaluation_prompts: list | None
    evaluation_rewards: dict[str, Any]  # evaluation.rewards, built: scored beside the training reward
    log: MetricsLog | None = None
    evaluation_log: MetricsLog | None = None
    grids: list[Path] = dataclasses.field(default_factory=list)
    start_epoch: int = 0
    global_step: int = 0
    updates_done: int = 0  # the epochs of updates behind the current weights


def train(config: RunConfig) -> TrainResult:
    """Trains ``config``'s policy with its objective; returns where the outputs went."""
    run = setup(config)
    epochs = tqdm(
        range(run.start_epoch, config.epochs),
        desc="epochs",
        initial=run.start_epoch,
        total=config.epochs,
        disable=not run.accelerator.is_local_main_process,
    )
    try:
        for epoch in epochs:
            metrics = run_epoch(run, epoch)
            epochs.set_postfix(reward=f"{metrics['reward_mean']:.4g}", kl=f"{metrics.get('approx_kl', 0):.2g}")
        run.log.close()
        run.evaluation_log.close()
        run.grids.append(_save_grid(run, config.epochs))
    except NonFiniteSamplesError as error:  # finite weights that sample NaN: the training diverged
        raise _diverged(error, config, run.output_dir, run.updates_done, run.accelerator) from None
    return finish(run)


# --------------------------------------------------------------------------------------------
# setup


def setup(config: RunConfig) -> TrainingRun:
    """Checks what can be checked before any model loads, builds the run's parts, resumes from
    its checkpoint when there is one, opens its logs and draws the grid and held-out evaluation
    of the untrained model."""
    accelerator = Accelerator(mixed_precision=config.train.mixed_precision)
    check_reward_config(config.reward.weights, config.reward.options)  # names and options, before any model loads
    if config.evaluation.rewards:
        check_reward_config(dict.fromkeys(config.evaluation.rewards, 1.0), config.evaluation.rewards)
    checkpoint = open_run(
        config, is_main=accelerator.is_main_process, barrier=accelerator.wait_for_everyone, say=accelerator.print
    )
    run = build_run(config, accelerator)
    if checkpoint is not None:
        resume(run, checkpoint)
    run.optimizer = prepare_model(run.policy, run.optimizer, config, accelerator)
    open_logs(run)
    if run.start_epoch == 0:
        run.grids.append(_save_grid(run, 0))
        run.monitors.record_heldout(0, _evaluate(run, 0))
    elif accelerator.is_main_process:  # the evaluation of the checkpoint's weights, for its monitor row
        run.monitors.read_heldout(run.output_dir / EVALUATION_FILE, run.start_epoch)
    return run


def build_run(config: RunConfig, accelerator: Accelerator) -> TrainingRun:
    """The objective, the prompts (before the model: a bad prompt file is reported before
    minutes of loading), the policy, the reward, the advantage normaliser, the optimizer and
    the monitors."""
    objective = build_objective(config.objective)
    objective.check(config)
    takes_images = is_vlm_source(config.model.pretrained)
    objective.check_policy_kind(takes_images)
    if takes_images and config.sample.sde_window.size:
        raise ConfigError("sample.sde_window is for diffusion samplers; a VLM's tokens are all sampled: set its size to 0.")
    prompts = load_prompts(config.prompts.source, visual=takes_images, instruction=config.prompts.instruction)
    grid_prompts = _grid_prompts(config, prompts, takes_images)
    evaluation_prompts = _evaluation_prompts(config, takes_images)
    check_reward_prompts(config.reward.weights, config.reward.options, prompts)  # before any model loads
    if evaluation_prompts is not None:
        check_reward_prompts([*config.reward.weights, *config.evaluation.rewards],
                             {**config.reward.options, **config.evaluation.rewards}, evaluation_prompts)
    accelerator.print(f"loading {config.model.pretrained} ...")
    policy = build_policy(config.model, config.sample, accelerator.device)
    reward_fn = build_reward(config.reward.weights, resolve_folders_in(config.reward.options))
    evaluation_rewards = {
        name: get_reward(name, **options) for name, options in resolve_folders_in(config.evaluation.rewards).items()
    }
    if getattr(reward_fn, "needs_texts", False) and not policy.takes_images:
        raise ConfigError(
            f"the reward {reward_fn.name!r} scores generated texts, so it needs a vision-language policy; "
            f"{config.model.pretrained!r} generates images."
        )
    advantage_settings = {"clip": config.advantage.clip}
    if config.advantage.kind == "per_prompt":
        advantage_settings.update(buffer_size=config.advantage.buffer_size, min_count=config.advantage.min_count)
    if config.advantage.kind == "group":
        advantage_settings.update(global_std=config.advantage.global_std)
    optimizer = build_optimizer(policy, config.train)
    objective.setup(policy, config)
    monitors = Monitors(config, policy, objective, accelerator)
    for note in monitors.notes:
        accelerator.print(note)
    return TrainingRun(
        config=config,
        accelerator=accelerator,
        output_dir=Path(config.output_dir),
        policy=policy,
        objective=objective,
        reward_fn=reward_fn,
        advantage_fn=build_advantage_fn(config.advantage.kind, **advantage_settings),
        optimizer=optimizer,
        monitors=monitors,
        prompts=prompts,
        grid_prompts=grid_prompts,
        evaluation_prompts=evaluation_prompts,
        evaluation_rewards=evaluation_rewards,
    )


def resume(run: TrainingRun, checkpoint: Checkpoint) -> None:
    """Loads the checkpoint's weights, optimizer, advantage and objective state and counters."""
    run.policy.load_trainable_state_dict(checkpoint.weights)
    run.optimizer.load_state_dict(checkpoint.optimizer_state)
    run.advantage_fn.load_state_dict(checkpoint.state["advantage"])
    run.objective.load_state_dict(checkpoint.objective_state)
    run.start_epoch, run.global_step = checkpoint.state["epoch"], checkpoint.state["global_step"]
    run.updates_done = run.start_epoch
    run.accelerator.print(f"resumed from {checkpoint.path} after epoch {run.start_epoch}")


def open_logs(run: TrainingRun) -> None:
    """The training metrics and held-out evaluation logs (rows from ``start_epoch`` on are
    redone), and the run's config record."""
    config, is_main = run.config, run.accelerator.is_main_process
    run.log = MetricsLog(run.output_dir, redo_from=run.start_epoch, tensorboard=config.tensorboard, enabled=is_main)
    run.evaluation_log = MetricsLog(
        run.output_dir,
        redo_from=run.start_epoch + 1,
        tensorboard=config.tensorboard,
        enabled=is_main and run.evaluation_prompts is not None,
        filename=EVALUATION_FILE,
        epoch_key="epochs_done",
        tensorboard_prefix="evaluation/",
    )
    if is_main:
        record_config(config, run.start_epoch)


# --------------------------------------------------------------------------------------------
# one epoch


def run_epoch(run: TrainingRun, epoch: int) -> dict[str, Any]:
    """The five steps of an epoch: 1. rollouts, 2. rewards, 3. advantages over the global
    batch, 4. the update, 5. log, grids, evaluation and checkpoints. Returns the logged row."""
    config, accelerator, policy = run.config, run.accelerator, run.policy
    generator = epoch_generator(config.seed, epoch, accelerator.process_index)
    torch.manual_seed(generator.initial_seed())  # anything drawing from the global RNG
    started, cpu_started = time.perf_counter(), time.process_time()

    rollouts = collect_rollouts(policy, run.objective, run.prompts, config, generator, accelerator, epoch=epoch)
    sampled = time.perf_counter()

    all_rewards = assign_rewards(run, rollouts)
    monitoring, cpu_monitoring = time.perf_counter(), time.process_time()
    monitor_metrics = run.monitors.measure(epoch, policy, rollouts, float(all_rewards.mean()))  # no grad
    monitored, cpu_monitored = time.perf_counter(), time.process_time()

    # (a non-finite loss, gradient or weight stops the run here, before any save)
    update_metrics, steps = update(policy, run.objective, run.optimizer, rollouts, config, generator, accelerator)
    check_finite_weights(policy, config, epoch)
    run.updates_done = epoch + 1
    run.global_step += steps
    update_metrics.update(run.objective.end_epoch(policy, run.global_step))
    finished, cpu_finished = time.perf_counter(), time.process_time()

    metrics = {
        "epoch": epoch,
        "global_step": run.global_step,
        "reward_mean": float(all_rewards.mean()),
        "reward_std": float(all_rewards.std(unbiased=False)),
        **_reward_term_metrics(run.reward_fn),
        **update_metrics,
        **monitor_metrics,
        "samples": len(all_rewards),
        "time_sampling_s": sampled - started,
        "time_monitors_s": monitored - monitoring,
        "time_update_s": finished - sampled - (monitored - monitoring),  # rewards and update
        # this process's CPU seconds for sampling, rewards and update (all its threads)
        "time_cpu_s": cpu_finished - cpu_started - (cpu_monitored - cpu_monitoring),
    }
    run.log.log(metrics)
    end_epoch(run, epoch + 1)
    return metrics


def assign_rewards(run: TrainingRun, rollouts: Rollout) -> torch.Tensor:
    """Scores the rollouts and sets their rewards and advantages, the advantages normalised
    over every process's rollouts; returns every process's rewards (the global batch)."""
    accelerator = run.accelerator
    rewards = score(run.reward_fn, rollouts).to(accelerator.device)
    all_rewards = accelerator.gather(rewards).cpu()
    all_prompts = gather_object([_prompt_key(prompt) for prompt in rollouts.prompts])
    all_advantages = run.advantage_fn(all_prompts, all_rewards)
    local = slice(accelerator.process_index * len(rollouts), (accelerator.process_index + 1) * len(rollouts))
    rollouts.rewards = rewards
    rollouts.advantages = all_advantages[local].to(accelerator.device)
    return all_rewards


def end_epoch(run: TrainingRun, done: int) -> None:
    """After ``done`` epochs: the grid, the held-out evaluation and the checkpoint when due."""
    config, accelerator = run.config, run.accelerator
    if config.grid.every and done % config.grid.every == 0 and done != config.epochs:
        run.grids.append(_save_grid(run, done))
    if done == config.epochs or (config.evaluation.every and done % config.evaluation.every == 0):
        run.monitors.record_heldout(done, _evaluate(run, done))
    if done % config.save_every == 0 or done == config.epochs:
        if accelerator.is_main_process:
            save_checkpoint(
                run.output_dir,
                epoch=done,
                weights=run.policy.trainable_state_dict(),
                optimizer_state=run.optimizer.state_dict(),
                state={"global_step": run.global_step, "advantage": run.advantage_fn.state_dict()},
                keep=config.keep_checkpoints,
                objective_state=run.objective.state_dict(),
            )
        accelerator.wait_for_everyone()


# --------------------------------------------------------------------------------------------
# finish


def finish(run: TrainingRun) -> TrainResult:
    """Saves the final model (atomically), the learning curve and the before / after grid."""
    output_dir = run.output_dir
    final_model = output_dir / "final"
    curve = output_dir / "learning_curve.png"
    before_after = output_dir / "grids" / "before_after.png"
    if run.accelerator.is_main_process:
        write_folder_atomic(final_model, run.policy.save)
        if (output_dir / METRICS_FILE).exists():
            plot_learning_curve(output_dir / METRICS_FILE, curve, evaluation_path=output_dir / EVALUATION_FILE)
        first_grid = output_dir / "grids" / f"epoch_{0:06d}.png"
        if first_grid.is_file():
            from PIL import Image

            side_by_side([Image.open(first_grid), Image.open(run.grids[-1])], ["before", "after"]).save(before_after)
    run.accelerator.wait_for_everyone()
    return _result(output_dir, final_model, curve, run.grids, before_after)


# --------------------------------------------------------------------------------------------
# the pieces


def prepare_model(
    policy: Policy, optimizer: torch.optim.Optimizer, config: RunConfig, accelerator: Accelerator
) -> torch.optim.Optimizer:
    """Readies the policy's forward passes for training and returns the prepared optimizer:
    accelerate's wrapper (DDP, FSDP, DeepSpeed) around the model, ``torch.compile`` around that
    when ``model.compile`` asks (every forward of the trainer goes through it), and
    ``train.steps_per_forward`` for re-scoring (a VLM keeps None: one pass scores every token)."""
    forward_module, optimizer = accelerator.prepare(policy.model, optimizer)
    if config.model.compile:
        forward_module = torch.compile(forward_module, backend=config.model.compile_backend)
    policy.use_forward_module(forward_module)
    policy.set_steps_per_forward(config.train.steps_per_forward)
    return optimizer


def collect_rollouts(
    policy: Policy,
    objective: Objective,
    prompts: list[str],
    config: RunConfig,
    generator: torch.Generator,
    accelerator: Accelerator,
    *,
    epoch: int = 0,
) -> Rollout:
    """``sample.num_batches_per_epoch`` batches of rollouts for drawn prompts, sampled the way
    the objective asks (the current policy, or SePPO's reference model), each with noise in the
    epoch's window of steps when ``sample.sde_window`` sets one."""
    batches = []
    for _ in tqdm(
        range(config.sample.num_batches_per_epoch),
        desc="sampling",
        leave=False,
        disable=not accelerator.is_local_main_process,
    ):
        batch_prompts = sample_prompts(prompts, config.sample.batch_size, config.sample.samples_per_prompt, generator)
        with policy.sde_window(sde_window_steps(config.sample, epoch, generator)):
            batches.append(objective.sample(policy, batch_prompts, generator))
    return Rollout.concatenate(batches).check_finite()


def sde_window_steps(sample: SampleConfig, epoch: int, generator: torch.Generator) -> tuple[int, ...] | None:
    """The steps a rollout batch of ``epoch`` adds noise at under ``sample.sde_window`` (None:
    every step): ``size`` consecutive steps inside the first ``span``, starting at a uniform
    draw from ``generator`` (random) or at ``stride`` x (epoch // ``shift_every``), back to 0
    once the window would leave the span (sliding)."""
    window = sample.sde_window
    if not window.size:
        return None
    starts = (sample.num_steps if window.span is None else window.span) - window.size + 1
    if window.placement == "random":
        start = int(torch.randint(starts, (1,), generator=generator))
    else:
        positions = (starts - 1) // window.stride + 1  # 0, stride, 2 stride, ... then back to 0
        start = (epoch // window.shift_every) % positions * window.stride
    return tuple(range(start, start + window.size))


@torch.no_grad()
def score(reward_fn, rollouts: Rollout) -> torch.Tensor:
    """(B,) float32 rewards; a non-finite reward stops the run (it would poison the update)."""
    rewards = torch.as_tensor(reward_fn(rollouts.images, rollouts.prompts, texts=rollouts.texts)).float().flatten()
    if rewards.shape[0] != len(rollouts):
        raise RewardError(f"reward {reward_fn.name!r} returned {rewards.shape[0]} values for {len(rollouts)} images.")
    bad = ~torch.isfinite(rewards)
    if bad.any():
        index = int(bad.nonzero()[0])
        raise RewardError(
            f"reward {getattr(reward_fn, 'name', reward_fn)!r} returned {rewards[index].item()} for prompt "
            f"{rollouts.prompts[index]!r} ({int(bad.sum())} of {len(rewards)} values are not finite)."
        )
    return rewards


def update(
    policy: Policy,
    objective: Objective,
    optimizer: torch.optim.Optimizer,
    rollouts: Rollout,
    config: RunConfig,
    generator: torch.Generator,
    accelerator: Accelerator,
) -> tuple[dict[str, float], int]:
    """``train.inner_epochs`` passes over the rollouts in shuffled minibatches.

    Returns the mean of every metric over the loss pieces, the mean gradient norm, and the
    number of optimizer steps taken. The statistics stay on the device until the update ends
    and are read back then, in one transfer: a read per loss piece or optimizer step would stall
    a GPU every time. A non-finite gradient norm is found there and stops the run before anything
    is saved (the weights it reached are discarded with the run).
    """
    train_config = config.train
    values: dict[str, list[torch.Tensor | float]] = defaultdict(list)
    steps = 0
    parameters = list(policy.trainable_parameters())
    policy.set_training_mode(True)
    group = config.sample.samples_per_prompt
    for _ in range(train_config.inner_epochs):
        # Shuffle whole groups (the samples of one prompt draw), keeping each group's samples
        # consecutive, so an even minibatch size never splits one of REBEL's pairs.
        group_order = torch.randperm(len(rollouts) // group, generator=generator)
        order = (group_order[:, None] * group + torch.arange(group)).flatten().tolist()  # host-side indices
        size = train_config.batch_size
        minibatches = [order[start : start + size] for start in range(0, len(order), size)]
        for index, minibatch in enumerate(minibatches):
            batch = rollouts.select(minibatch)
            with accelerator.autocast():
                for term in objective.loss_terms(policy, batch, generator):
                    accelerator.backward(term.loss / train_config.gradient_accumulation_steps)
                    for key, value in term.metrics.items():
                        values[key].append(value)
            if (index + 1) % train_config.gradient_accumulation_steps == 0 or index + 1 == len(minibatches):
                grad_norm = accelerator.clip_grad_norm_(parameters, train_config.max_grad_norm)
                if grad_norm is not None:  # None: DeepSpeed clips inside its engine
                    values["grad_norm"].append(grad_norm)
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                steps += 1
    policy.set_training_mode(False)
    read = read_values(values)  # the update's one read back to the host
    norms = read.get("grad_norm", [])
    bad_step = next((step for step, norm in enumerate(norms) if not math.isfinite(norm)), None)
    if bad_step is not None:  # NaN loss or overflow
        raise TrainingDivergedError(
            f"the gradient norm is {norms[bad_step]} at optimizer step {bad_step + 1} of this epoch: "
            f"the loss or its gradient is not finite. {_divergence_advice(config)}"
        )
    metrics = {key: sum(numbers) / len(numbers) for key, numbers in read.items()}
    bad = sorted(key for key, value in metrics.items() if not math.isfinite(value))
    if bad:
        raise TrainingDivergedError(f"the update's {', '.join(bad)} are not finite. {_divergence_advice(config)}")
    return metrics, steps


def read_values(values: dict[str, list[torch.Tensor | float]]) -> dict[str, list[float]]:
    """``values`` as Python floats, every tensor among them read back in one transfer."""
    tensors = [value for numbers in values.values() for value in numbers if isinstance(value, torch.Tensor)]
    if tensors:
        device = tensors[0].device
        host = iter(torch.stack([value.detach().reshape(()).to(device, torch.float64) for value in tensors]).tolist())
    return {
        key: [next(host) if isinstance(value, torch.Tensor) else float(value) for value in numbers]
        for key, numbers in values.items()
    }


def check_finite_weights(policy: Policy, config: RunConfig, epoch: int) -> None:
    """Stops the run when an update left a NaN or infinite trainable weight (one device read)."""
    parameters = dict(policy.model.named_parameters())
    trainable = {name: p for name, p in parameters.items() if p.requires_grad}
    if bool(torch.stack([torch.isfinite(p).all() for p in trainable.values()]).all()):
        return
    names = [name for name, p in trainable.items() if not bool(torch.isfinite(p).all())]
    raise TrainingDivergedError(
        f"after the update of epoch {epoch}, {len(names)} trainable tensors hold NaN or inf (e.g. {names[0]}). "
        f"{_divergence_advice(config)}"
    )


def _diverged(
    error: NonFiniteSamplesError, config: RunConfig, output_dir: Path, updates_done: int, accelerator: Accelerator
) -> AlignGenError:
    """The error to stop with when the weights after ``updates_done`` epochs sample NaN; a
    checkpoint saved with those weights is set aside (``.diverged``), out of resume's reach."""
    if updates_done == 0:
        return NonFiniteSamplesError(f"{error} This is the untrained model: try model.dtype=float32.")
    aside = set_aside_diverged(output_dir, updates_done) if accelerator.is_main_process else None
    moved = f" Its checkpoint was set aside as {aside}." if aside is not None else ""
    return TrainingDivergedError(
        f"after the update of epoch {updates_done - 1}, {error}{moved} {_divergence_advice(config)}"
    )


def _divergence_advice(config: RunConfig) -> str:
    """The rest of a divergence error: what was kept, and the likely cause."""
    precision = "" if config.train.mixed_precision == "no" else f" or train.mixed_precision={config.train.mixed_precision} overflowed"
    return (
        f"Training diverged: train.learning_rate={config.train.learning_rate:g} is likely too high{precision}. "
        "Lower it and continue from the last good checkpoint with resume=latest allow_config_changes=true "
        "(resume never loads weights set aside as diverged)."
    )


def _reward_term_metrics(reward_fn) -> dict[str, Any]:
    terms = getattr(reward_fn, "last_terms", None) or {}
    return {f"reward/{name}": float(values.float().mean()) for name, values in terms.items()}


def _prompt_key(prompt: str | VisualPrompt) -> str | tuple[str, str]:
    """What identifies a prompt across processes for per-prompt statistics (a VisualPrompt's
    image opener need not be picklable)."""
    return (prompt.text, prompt.image_key) if isinstance(prompt, VisualPrompt) else prompt


def _grid_prompts(config: RunConfig, prompts: list, takes_images: bool) -> list:
    """``grid.prompts``, or the first ``grid.num_prompts`` training prompts (a VLM's grid always
    takes dataset examples: its prompts need images)."""
    if config.grid.prompts and takes_images:
        raise ConfigError(
            "grid.prompts lists text prompts, but a vision-language model's grid shows dataset examples: "
            "leave grid.prompts empty and set grid.num_prompts."
        )
    return config.grid.prompts or prompts[: config.grid.num_prompts]


def _evaluation_prompts(config: RunConfig, takes_images: bool) -> list | None:
    """The fixed held-out prompts of ``evaluation:`` (None when the run has no evaluation)."""
    if config.evaluation.prompts is None:
        return None
    prompts = load_prompts(
        config.evaluation.prompts, visual=takes_images, instruction=config.prompts.instruction
    )
    return select_prompts(prompts, config.evaluation.num_prompts)


def _evaluate(run: TrainingRun, epochs_done: int) -> float | None:
    """Scores the held-out prompts (each process its share), logs the mean over all of them and
    returns it (None when the run has no evaluation)."""
    prompts, accelerator, config = run.evaluation_prompts, run.accelerator, run.config
    if prompts is None:
        return None
    started = time.perf_counter()
    share = prompts[accelerator.process_index :: accelerator.num_processes]
    extra = {f"{EXTRA_PREFIX}{name}": reward for name, reward in run.evaluation_rewards.items()}
    scores = score_samples(
        run.policy,
        {"reward": run.reward_fn, **extra},
        share,
        config.evaluation.seeds,
        config.evaluation.batch_size,
        progress=accelerator.is_local_main_process,
    )
    gathered = {
        name: torch.tensor([value for part in gather_object([values.tolist()]) for value in part])
        for name, values in scores.items()
    }
    values = gathered.pop("reward")
    others = {name.removeprefix(EXTRA_PREFIX): gathered.pop(name) for name in list(gathered) if name.startswith(EXTRA_PREFIX)}
    run.evaluation_log.log(
        {
            "epochs_done": epochs_done,
            "reward_mean": float(values.mean()),
            "reward_std": float(values.std(unbiased=False)),
            **{f"{name}_mean": float(term.mean()) for name, term in gathered.items()},  # reward/TERM_mean
            **{f"{name}_mean": float(other.mean()) for name, other in others.items() if "/" not in name},
            "n": len(values),
            "time_s": time.perf_counter() - started,
            "scores": [round(value, 6) for value in values.tolist()],  # seed-major; paired across rows
            **{f"{name}_scores": [round(v, 6) for v in other.tolist()] for name, other in others.items() if "/" not in name},
        }
    )
    return float(values.mean())


def _save_grid(run: TrainingRun, epoch: int) -> Path:
    """Every process samples (their forward passes may be collective); the main one saves."""
    path = run.output_dir / "grids" / f"epoch_{epoch:06d}.png"
    image = sample_grid(run.policy, run.grid_prompts, run.config.grid.seeds)
    if run.accelerator.is_main_process:
        path.parent.mkdir(parents=True, exist_ok=True)
        image.save(path)
    return path


def _result(output_dir: Path, final_model: Path, curve: Path, grids: list[Path], before_after: Path) -> TrainResult:
    metrics_path = output_dir / METRICS_FILE
    evaluation_path = output_dir / EVALUATION_FILE
    rows = read_metrics(metrics_path) if metrics_path.exists() else []
    evaluations = read_metrics(evaluation_path) if evaluation_path.exists() else []
    paired = len(evaluations) > 1 and evaluations[0]["epochs_done"] == 0 and evaluations[0]["n"] > 1
    first, last = (evaluations[0], evaluations[-1]) if paired else ({}, {})
    return TrainResult(
        output_dir=output_dir,
        final_model=final_model,
        metrics=metrics_path,
        learning_curve=curve,
        grids=grids,
        first_reward=rows[0]["reward_mean"] if rows else None,
        last_reward=rows[-1]["reward_mean"] if rows else None,
        before_after_grid=before_after if before_after.is_file() else None,
        evaluation=evaluation_path if evaluations else None,
        evaluation_before=evaluations[0]["reward_mean"] if evaluations and evaluations[0]["epochs_done"] == 0 else None,
        evaluation_after=evaluations[-1]["reward_mean"] if evaluations else None,
        evaluation_change=paired_change(first["scores"], last["scores"]) if paired else None,
        watched=watched_changes(first, last),
    )
