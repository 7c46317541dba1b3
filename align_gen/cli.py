"""The ``align-gen`` command: ``train``, ``sample``, ``evaluate`` and ``world build``.

Errors caused by input (a bad config key, a missing file, an unknown reward, a NaN reward) are
printed as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path

from align_gen.errors import AlignGenError


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
        ("evaluate", "score samples with reward models: mean and std per reward"),
    ):
        command = commands.add_parser(name, help=helptext)
        command.add_argument(
            "model", help="hub id, diffusers or transformers VLM folder, align-gen:NAME, or a run's final/ folder"
        )
        command.add_argument("--lora", help="folder with LoRA weights (what align-gen train saves)")
        command.add_argument(
            "--prompts",
            required=True,
            help="prompt file (.txt, .jsonl) or builtin:NAME; for a VLM an (image, prompt) dataset (folder or .jsonl)",
        )
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
    evaluate = commands.choices["evaluate"]
    evaluate.add_argument("--reward", action="append", required=True, help="reward name (repeatable)")
    evaluate.add_argument(
        "--reward-option", action="append", default=[], help="NAME.option=value, e.g. clip_score.pretrained=/ckpt.pt"
    )
    evaluate.add_argument("--batch-size", type=int, default=8)
    evaluate.add_argument("--out", default="evaluation.json", help="output JSON")
    evaluate.set_defaults(handler=_evaluate)

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


def _train(args: argparse.Namespace) -> int:
    from align_gen.config import load_config
    from align_gen.train import train

    config = load_config(args.config, args.overrides)
    result = train(config)
    if int(os.environ.get("LOCAL_RANK", "0")) == 0:
        print()
        if result.first_reward is not None:
            print(f"reward (mean over samples): first epoch {result.first_reward:.4f}, last epoch {result.last_reward:.4f}")
        print(f"metrics        {result.metrics}")
        print(f"learning curve {result.learning_curve}")
        print(f"sample grids   {result.grids[0]} (before) ... {result.grids[-1]} (after)")
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


def _load_policy(args: argparse.Namespace):
    import torch

    from align_gen.config import ModelConfig, SampleConfig
    from align_gen.policies import build_policy
    from align_gen.policies.weights import MODEL_CARD_FILE

    model, lora = args.model, args.lora
    card = Path(model) / MODEL_CARD_FILE
    if card.is_file():  # a run's final/ folder: LoRA weights on top of the recorded base model
        description = json.loads(card.read_text())
        if description["kind"] == "lora":
            model, lora = description["base_model"], lora or args.model
    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    sample = SampleConfig(
        num_steps=args.steps,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )
    return build_policy(
        ModelConfig(pretrained=model, dtype=args.dtype), sample, device, trainable=False, lora_path=lora
    )


def _sample(args: argparse.Namespace) -> int:
    from align_gen.prompts import load_prompts
    from pipelines.grid import sample_grid

    _check_sampling_args(args)
    policy = _load_policy(args)
    prompts = load_prompts(args.prompts, visual=policy.takes_images)
    image = sample_grid(policy, prompts, args.seeds)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({len(prompts)} prompts x {len(args.seeds)} seeds)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    import torch

    from align_gen.config import apply_override
    from align_gen.prompts import load_prompts
    from reward_models import get_reward

    _check_sampling_args(args)
    options: dict = {}
    for option in args.reward_option:
        apply_override(options, option)
    unknown = set(options) - set(args.reward)
    if unknown:
        raise AlignGenError(f"--reward-option names rewards not given with --reward: {', '.join(sorted(unknown))}")
    rewards = {name: get_reward(name, **options.get(name, {})) for name in args.reward}
    policy = _load_policy(args)
    prompts = load_prompts(args.prompts, visual=policy.takes_images)
    scores: dict[str, list[torch.Tensor]] = {name: [] for name in rewards}
    for seed in args.seeds:
        generator = torch.Generator().manual_seed(seed)
        for start in range(0, len(prompts), args.batch_size):
            batch = prompts[start : start + args.batch_size]
            rollout = policy.sample(batch, generator=generator)
            for name, reward in rewards.items():
                scores[name].append(torch.as_tensor(reward(rollout.images, batch, texts=rollout.texts)).float().cpu())
    results = {}
    for name, values in scores.items():
        values = torch.cat(values)
        results[name] = {"mean": float(values.mean()), "std": float(values.std(unbiased=False)), "n": len(values)}
    print(f"{'reward':<28}{'mean':>12}{'std':>12}{'n':>6}")
    for name, row in results.items():
        print(f"{name:<28}{row['mean']:>12.4f}{row['std']:>12.4f}{row['n']:>6}")
    report = {"model": args.model, "lora": args.lora, "prompts": args.prompts, "seeds": args.seeds, "rewards": results}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(report, indent=1))
    print(f"wrote {args.out}")
    return 0


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
