"""The ``align-gen`` command: ``train``, ``sample``, ``evaluate``, ``make-pairs``, ``train-reward`` and
``world build``.

Errors caused by input (a bad config key, a missing file, an unknown reward, a NaN reward) are
printed as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from pathlib import Path

from align_gen.errors import AlignGenError
from align_gen.train_reward_cli import add_train_reward_parser


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except AlignGenError as error:
        message = " ".join(str(error).splitlines())
        print(f"align-gen {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"align-gen {args.command}: interrupted; resume with resume=latest", file=sys.stderr)
        return 130


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="align-gen", description=__doc__.splitlines()[0])
    commands = parser.add_subparsers(dest="command", required=True)

    train = commands.add_parser("train", help="fine-tune a model with an RL objective from a YAML config")
    train.add_argument("config", help="YAML config (see configs/)")
    train.add_argument("overrides", nargs="*", help="key.sub=value overrides, e.g. train.learning_rate=1e-4")
    train.set_defaults(handler=_train)

    for name, helptext in (
        ("sample", "render a labelled grid of samples (prompts x seeds)"),
        ("evaluate", "score samples with reward models (one model, or two compared on the same prompts and seeds)"),
        ("make-pairs", "preference pairs of a model's samples judged by a reward (SePPO winners, train-reward --pairs)"),
    ):
        command = commands.add_parser(name, help=helptext)
        command.add_argument(
            "model",
            nargs="?" if name == "evaluate" else None,
            help="hub id, diffusers or transformers VLM folder, align-gen:NAME, a run's output or final/ folder, "
            "or a run's checkpoint folder",
        )
        command.add_argument("--lora", help="folder with LoRA weights (what align-gen train saves)")
        command.add_argument(
            "--prompts",
            required=True,
            help="prompt file (.txt, .jsonl), builtin:NAME or hf:<dataset id>[@split][#column]; for a VLM an "
            "(image, prompt) dataset (folder or .jsonl)",
        )
        if name != "make-pairs":
            command.add_argument("--seeds", type=int, nargs="+", default=[0], help="one sample per prompt per seed")
        command.add_argument("--steps", type=int, default=50, help="denoising steps")
        command.add_argument("--guidance-scale", type=float, default=5.0)
        command.add_argument("--eta", type=float, default=1.0, help="DDIM eta (> 0)")
        command.add_argument("--max-new-tokens", type=int, default=32, help="VLM answer length cap")
        command.add_argument("--temperature", type=float, default=1.0, help="VLM sampling temperature (> 0)")
        command.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"])
        command.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    commands.choices["sample"].add_argument("--out", default="grid.png", help="output PNG")
    commands.choices["sample"].set_defaults(handler=_sample)
    _add_evaluate_options(commands.choices["evaluate"])
    _add_make_pairs_options(commands.choices["make-pairs"])

    add_train_reward_parser(commands)

    world = commands.add_parser("world", help="the tiny offline world: build (train) its models")
    world_commands = world.add_subparsers(dest="world_command", required=True)
    build = world_commands.add_parser(
        "build", help="train the world's models from its seed (resumable: run it again after an interruption)"
    )
    build.add_argument("--out", default="outputs/world", help="output folder (the shipped weights: align_gen/world/weights)")
    build.add_argument("--stages", nargs="+", default=None, help="stages to build (default: all)")
    build.add_argument("--quick", action="store_true", help="a few steps per stage: checks the build, not for use")
    build.set_defaults(handler=_world_build)
    return parser


def _add_reward_options(command: argparse.ArgumentParser) -> None:
    command.add_argument("--reward", action="append", default=[], help="reward name (repeatable)")
    command.add_argument(
        "--reward-weights", nargs="+", metavar="NAME=W", default=[], help="one weighted-sum reward, 'weighted'"
    )
    command.add_argument(
        "--reward-option", action="append", default=[], help="NAME.option=value, e.g. clip_score.pretrained=/ckpt.pt"
    )


def _add_make_pairs_options(command: argparse.ArgumentParser) -> None:
    _add_reward_options(command)
    command.add_argument("--candidates", type=int, default=4, help="samples per prompt; the best and worst make the pair")
    command.add_argument("--seed", type=int, default=0, help="seeds the one generator that draws every sample")
    command.add_argument("--num-prompts", type=int, default=0, help="prompts spread over the list (0 = all)")
    command.add_argument("--batch-size", type=int, default=8, help="prompts sampled together (x candidates images)")
    command.add_argument("--out", default="pairs", help="output folder: pairs.jsonl and images/")
    command.set_defaults(handler=_make_pairs)


def _add_evaluate_options(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("--model", dest="model_flag", metavar="MODEL", help="the model A (or give it first)")
    evaluate.add_argument("--compare", metavar="MODEL", help="a model B sampled with the same prompts and seeds")
    evaluate.add_argument("--compare-lora", help="LoRA weights for --compare")
    _add_reward_options(evaluate)
    evaluate.add_argument("--num-prompts", type=int, default=0, help="prompts spread over the list (0 = all)")
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--grid-prompts", type=int, default=8, help="prompts in the sample grid (up to 4 seeds)")
    evaluate.add_argument("--run", help="a training output folder: its monitors and held-out curve join the report")
    evaluate.add_argument(
        "--out",
        default="evaluation",
        help="output folder (scores, summary, CSV, report, grid); a path ending in .json writes the summary only",
    )
    evaluate.set_defaults(handler=_evaluate, seeds=[0, 1, 2])


def _train(args: argparse.Namespace) -> int:
    from align_gen.config import load_config

    config = load_config(args.config, args.overrides)  # before the heavy imports: config errors come fast
    from align_gen.run_folder import check_output_dir

    check_output_dir(config)
    from align_gen.train import train

    result = train(config)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print()
        if result.first_reward is not None:
            print(f"reward (mean over samples): first epoch {result.first_reward:.4f}, last epoch {result.last_reward:.4f}")
        if result.evaluation_change is not None:
            change, error = result.evaluation_change
            print(
                f"held-out reward (evaluation.prompts, paired samples): before {result.evaluation_before:.4f}, "
                f"after {result.evaluation_after:.4f} ({change:+.4f} +- {error:.4f} s.e.)"
            )
        print(f"metrics        {result.metrics}")
        if result.evaluation is not None:
            print(f"evaluation     {result.evaluation}")
        print(f"learning curve {result.learning_curve}")
        print(f"sample grids   {result.grids[0]} (before) ... {result.grids[-1]} (after)")
        if result.before_after_grid is not None:
            print(f"before | after {result.before_after_grid}")
        print(f"final model    {result.final_model}")
        print(f"checkpoints    {result.output_dir / 'checkpoints'}")
    return 0


def _check_sampling_args(args: argparse.Namespace) -> None:
    if args.steps < 1:
        raise AlignGenError(f"--steps must be >= 1, got {args.steps}.")
    if not args.eta > 0:
        raise AlignGenError(f"--eta must be > 0 (the sampler records log-probs), got {args.eta}.")
    if args.max_new_tokens < 1 or not args.temperature > 0:
        raise AlignGenError("--max-new-tokens must be >= 1 and --temperature > 0.")
    if getattr(args, "batch_size", 1) < 1:
        raise AlignGenError(f"--batch-size must be >= 1, got {args.batch_size}.")


@dataclasses.dataclass
class _ModelSource:
    """What a MODEL argument names, resolved without loading anything: a model (hub id, folder
    or built-in) with optional LoRA weights, or a run's checkpoint on the run's base model."""

    model: str
    lora: str | None
    checkpoint: Path | None = None

    @property
    def takes_images(self) -> bool:
        """Whether it is a vision-language model (its prompts are (image, question) examples)."""
        from align_gen.policies.loading import is_vlm_source

        return is_vlm_source(self.model)


def _resolve_model(model: str, lora: str | None) -> _ModelSource:
    """A run's output folder stands for its final/ folder, a run's final/ folder holding LoRA
    weights for them on the recorded base model, and a run's checkpoint folder for the run's
    model (its config.yaml) with the checkpoint's trained weights."""
    from align_gen.config import load_config
    from align_gen.policies.weights import MODEL_CARD_FILE

    if (Path(model) / "final" / MODEL_CARD_FILE).is_file():  # a run's output folder
        model = str(Path(model) / "final")
    card = Path(model) / MODEL_CARD_FILE
    if card.is_file():  # a run's final/ folder: LoRA weights on top of the recorded base model
        description = json.loads(card.read_text())
        if description["kind"] == "lora":
            return _ModelSource(description["base_model"], lora or model)
    checkpoint = Path(model)
    if (checkpoint / "trainable.safetensors").is_file():
        config_path = checkpoint.parent.parent / "config.yaml"
        if not config_path.is_file():
            raise AlignGenError(f"{checkpoint} looks like a checkpoint but {config_path} (the run's config) is missing.")
        return _ModelSource(load_config(config_path).model.pretrained, None, checkpoint)
    return _ModelSource(model, lora)


def _load_policy(args: argparse.Namespace, source: _ModelSource):
    """The policy of ``source``, for sampling with the command's settings."""
    import torch

    from align_gen.checkpoint import load_checkpoint_weights
    from align_gen.config import ModelConfig, SampleConfig, load_config
    from align_gen.policies import build_policy

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sample = SampleConfig(
        num_steps=args.steps,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )
    if source.checkpoint is None:
        model_config = ModelConfig(pretrained=source.model, dtype=args.dtype)
        return build_policy(model_config, sample, device, trainable=False, lora_path=source.lora)
    run = load_config(source.checkpoint.parent.parent / "config.yaml")
    weights = load_checkpoint_weights(source.checkpoint)  # verified against its manifest
    policy = build_policy(dataclasses.replace(run.model, dtype=args.dtype), sample, device, trainable=True)
    policy.load_trainable_state_dict(weights)
    return policy


def _check_output(path: str, flag: str, *, is_folder: bool) -> None:
    """Refuses an output path that a file (or a folder, for a file output) stands in the way of."""
    from align_gen.durable import file_in_the_way

    blocker = file_in_the_way(Path(path), is_folder=is_folder)
    if blocker is not None:
        kind = "a file" if blocker.is_file() else "a folder"
        raise AlignGenError(f"{flag} {path}: {blocker} is {kind}; choose another {flag}.")


def _sample(args: argparse.Namespace) -> int:
    from align_gen.prompts import load_prompts
    from pipelines.grid import sample_grid

    _check_sampling_args(args)
    _check_output(args.out, "--out", is_folder=False)
    source = _resolve_model(args.model, args.lora)
    prompts = load_prompts(args.prompts, visual=source.takes_images)
    policy = _load_policy(args, source)
    image = sample_grid(policy, prompts, args.seeds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({len(prompts)} prompts x {len(args.seeds)} seeds)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Samples model A (and B with --compare) on the same prompts and seeds, scores every sample
    and writes the outputs of :mod:`align_gen.report` (a .json --out: the summary only)."""
    from align_gen.evaluation import sample_and_score, select_prompts
    from align_gen.prompts import load_prompts
    from align_gen.report import EvaluatedModel, build_summary, summary_table, write_outputs

    _check_sampling_args(args)
    model, run_dir = _evaluation_model(args)
    _check_output(args.out, "--out", is_folder=not args.out.endswith(".json"))
    sources = {"A": _resolve_model(model, args.lora)}
    if args.compare is not None:
        sources["B"] = _resolve_model(args.compare, args.compare_lora)
    visual = {role: source.takes_images for role, source in sources.items()}
    if len(set(visual.values())) > 1:
        raise AlignGenError("--compare: a text-to-image model and a vision-language model answer different prompts.")
    prompts = select_prompts(load_prompts(args.prompts, visual=visual["A"]), args.num_prompts)
    shown = select_prompts(range(len(prompts)), args.grid_prompts) if args.grid_prompts > 0 else []
    rewards = _evaluation_rewards(args)
    settings = {
        "prompts": args.prompts,
        "seeds": args.seeds,
        "batch_size": args.batch_size,
        "sampling": {
            key: getattr(args, key) for key in ("steps", "guidance_scale", "eta", "max_new_tokens", "temperature", "dtype")
        },
        "run": None if run_dir is None else str(run_dir),
    }
    models: list[EvaluatedModel] = []
    for (role, source), (name, lora) in zip(
        sources.items(), ((model, args.lora), (args.compare, args.compare_lora)), strict=False
    ):
        policy = _load_policy(args, source)
        samples = sample_and_score(policy, rewards, prompts, args.seeds, args.batch_size, keep_prompts=shown,
                                   keep_seeds=min(len(args.seeds), 4), desc=f"evaluating {role}")
        models.append(EvaluatedModel(role, name, lora, samples))
        del policy  # B loads after A is gone: one model in memory at a time
    out = Path(args.out)
    if out.suffix == ".json":
        summary = build_summary(models, prompts, settings)
        out.parent.mkdir(parents=True, exist_ok=True)
        out.write_text(json.dumps(summary, indent=1))
        written = [out]
    else:
        summary = write_outputs(out, models, prompts, settings, run_dir)
        names = ["summary.json", "scores.json", "scores.csv", "report.md", "report.html"]
        names += ["comparison.png", "samples.png", "training.png"]
        written = [out / name for name in names if (out / name).is_file()]
    print(summary_table(summary))
    for path in written:
        print(f"wrote {path}")
    return 0


def _make_pairs(args: argparse.Namespace) -> int:
    """Samples ``--candidates`` images per prompt, judges them with the one reward given, and
    writes the best and the worst of each prompt as a pair (:mod:`align_gen.pairs`)."""
    from align_gen.evaluation import select_prompts
    from align_gen.pairs import make_pairs, summarise_pairs
    from align_gen.prompts import load_prompts

    _check_sampling_args(args)
    if args.num_prompts < 0:
        raise AlignGenError(f"--num-prompts must be >= 0, got {args.num_prompts}.")
    judges = _evaluation_rewards(args)
    if len(judges) != 1:
        raise AlignGenError(f"make-pairs takes one judge: one --reward or one --reward-weights sum; got {', '.join(judges)}.")
    _check_output(args.out, "--out", is_folder=True)
    source = _resolve_model(args.model, args.lora)
    if source.takes_images:
        raise AlignGenError("make-pairs draws images: give a text-to-image model, not a vision-language model.")
    prompts = select_prompts(load_prompts(args.prompts), args.num_prompts)
    policy = _load_policy(args, source)
    (judge,) = judges.values()
    path = make_pairs(policy, judge, prompts, args.out, candidates=args.candidates, seed=args.seed,
                      prompts_per_batch=args.batch_size)
    summary = summarise_pairs(path)
    print(f"pairs          {summary['pairs']} ({args.candidates} candidates per prompt, judge {next(iter(judges))})")
    print(f"judge's score  chosen {summary['chosen_mean']:.4f}  rejected {summary['rejected_mean']:.4f}  "
          f"all candidates {summary['candidates_mean']:.4f}")
    print(f"wrote {path}")
    print(f"SePPO winners  prompts.source={path}")
    print(f"preference     align-gen train-reward --pairs {path}")
    return 0


def _evaluation_model(args: argparse.Namespace) -> tuple[str, Path | None]:
    """Model A (the positional MODEL, --model, or the --run folder's final model) and the --run
    folder, checked before anything is sampled."""
    if args.num_prompts < 0 or args.grid_prompts < 0:
        raise AlignGenError(f"--num-prompts and --grid-prompts must be >= 0, got {args.num_prompts} and {args.grid_prompts}.")
    if args.model and args.model_flag:
        raise AlignGenError(f"give the model once: {args.model!r} and --model {args.model_flag!r}.")
    run_dir = None if args.run is None else Path(args.run)
    if run_dir is not None and args.out.endswith(".json"):
        raise AlignGenError("--run adds a section to the report; give --out a folder (a .json --out is the summary only).")
    if run_dir is not None and not any((run_dir / name).is_file() for name in ("metrics.jsonl", "evaluation.jsonl")):
        raise AlignGenError(f"--run {run_dir}: not a training output folder (no metrics.jsonl or evaluation.jsonl).")
    model = args.model or args.model_flag or (str(run_dir) if run_dir is not None else None)
    if model is None:
        raise AlignGenError("give the model to evaluate: align-gen evaluate MODEL (or --model MODEL, or --run DIR).")
    return model, run_dir


def _evaluation_rewards(args: argparse.Namespace) -> dict:
    """{name: reward} of --reward and --reward-weights (the weighted sum is named 'weighted')."""
    from align_gen.config import apply_override
    from reward_models import build_reward, get_reward

    if not args.reward and not args.reward_weights:
        raise AlignGenError("give at least one --reward NAME (repeatable) or --reward-weights NAME=W ...")
    options: dict = {}
    for option in args.reward_option:
        apply_override(options, option)
    weights: dict[str, float] = {}
    for item in args.reward_weights:
        name, sep, weight = item.partition("=")
        try:
            weights[name] = float(weight)
        except ValueError:
            sep = ""
        if not sep or not name:
            raise AlignGenError(f"--reward-weights takes NAME=WEIGHT items, e.g. clip_score=1.0; got {item!r}.")
    unknown = set(options) - set(args.reward) - set(weights)
    if unknown:
        raise AlignGenError(f"--reward-option names rewards not given with --reward: {', '.join(sorted(unknown))}")
    rewards = {name: get_reward(name, **options.get(name, {})) for name in args.reward}
    if weights:
        rewards["weighted"] = build_reward(weights, {name: options[name] for name in weights if name in options})
    return rewards


def _world_build(args: argparse.Namespace) -> int:
    from align_gen.world.build import STAGES, WorldBuildConfig, build_world

    config = WorldBuildConfig()
    stages = tuple(args.stages or STAGES)
    unknown = sorted(set(stages) - set(STAGES))
    if unknown:
        raise AlignGenError(f"unknown world build stage(s) {unknown}; stages: {', '.join(STAGES)}")
    manifest = build_world(Path(args.out), config.quick() if args.quick else config, stages)
    for stage in stages:
        record = manifest["stages"][stage]
        print(f"{stage:<8} {record['seconds']:>8.1f} s  quality {record['quality']}")
    print(f"manifest       {Path(args.out) / 'manifest.json'}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
