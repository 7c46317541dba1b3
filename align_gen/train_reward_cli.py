"""``align-gen train-reward``: fit a Bradley-Terry preference head (the ``preference`` reward) on
CLIP features, from the tiny world's synthetic pairs (``--world``) or a pairs file (``--pairs``,
e.g. what ``align-gen make-pairs`` writes)."""

from __future__ import annotations

import argparse
import json
import textwrap
from pathlib import Path


def add_train_reward_parser(commands, **parser_options) -> None:
    """``align-gen train-reward``: the options default to None so that the handler can tell
    which were given (world-only and file-only options are errors with the other source); their
    help names the default. ``parser_options`` go to ``add_parser`` (e.g. ``formatter_class``)."""
    helptext = "train a Bradley-Terry preference head on CLIP features (the 'preference' reward)"
    command = commands.add_parser(
        "train-reward",
        help=helptext,
        description=textwrap.fill(
            "Train a Bradley-Terry preference head on CLIP features (the 'preference' reward), from the tiny "
            "world's synthetic pairs (--world) or a pairs file (--pairs, e.g. what align-gen make-pairs writes).",
            88,
        ),
        **parser_options,
    )
    source = command.add_mutually_exclusive_group(required=True)
    source.add_argument("--world", action="store_true", help="the tiny world's synthetic pairs (larger, more centred shapes)")
    source.add_argument(
        "--pairs", metavar="JSONL", help='pairs file: {"prompt", "chosen", "rejected"} lines, image paths relative to it'
    )
    command.add_argument(
        "--clip", help="transformers CLIP folder or hub id (default: the world's, align_gen/world/weights/clip)"
    )
    command.add_argument("--out", default="outputs/preference", help="output folder: the head and metrics.json")
    command.add_argument("--steps", type=int, help="optimiser steps (default: 2000)")
    command.add_argument("--lr", type=float, help="AdamW learning rate (default: 1e-3)")
    command.add_argument("--batch-size", type=int, help="pairs per step (default: 256)")
    command.add_argument("--seed", type=int, help="seeds the pairs (world) or the split (--pairs), and the head (default: 0)")
    command.add_argument("--features", choices=["image", "image+text"], help="what the head reads (default: image+text)")
    command.add_argument("--hidden-size", type=int, help="MLP hidden width; 0 = linear head (default: 64)")
    command.add_argument("--train-pairs", type=int, help="--world: training pairs (default: 8000)")
    command.add_argument("--heldout-pairs", type=int, help="--world: held-out pairs from held-out captions (default: 1000)")
    command.add_argument("--margin", type=float, help="--world: least utility gap of a pair (default: 0.05)")
    command.add_argument("--heldout-fraction", type=float, help="--pairs: fraction of prompts held out (default: 0.1)")
    command.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    command.set_defaults(handler=_train_reward)


def _given(args: argparse.Namespace, names: dict[str, str]) -> dict:
    """{field: value} of the options in ``names`` ({option dest: field}) that were given."""
    return {field: getattr(args, dest) for dest, field in names.items() if getattr(args, dest) is not None}


def _train_reward(args: argparse.Namespace) -> int:
    from align_gen.errors import ConfigError
    from align_gen.world.preference import WORLD_CLIP, PreferenceTrainConfig, train_world_preference
    from reward_models.preference_training import (
        METRICS_FILE,
        HeadTrainConfig,
        load_pair_file,
        split_by_prompt,
        train_preference_reward,
    )

    head_options = {"steps": "steps", "lr": "learning_rate", "batch_size": "batch_size", "seed": "seed",
                    "features": "features", "hidden_size": "hidden_size"}
    world_options = {"train_pairs": "train_pairs", "heldout_pairs": "heldout_pairs", "margin": "margin", "seed": "seed"}
    head = HeadTrainConfig(**_given(args, head_options))
    clip, out = args.clip or str(WORLD_CLIP), Path(args.out)
    if args.world:
        if args.heldout_fraction is not None:
            raise ConfigError("--heldout-fraction splits a --pairs file; with --world give --heldout-pairs")
        world = PreferenceTrainConfig(head=head, **_given(args, world_options))
        train_world_preference(out, world, clip, args.device)
    else:
        stray = [f"--{dest.replace('_', '-')}" for dest in world_options if dest != "seed" and getattr(args, dest) is not None]
        if stray:
            raise ConfigError(f"{', '.join(stray)}: options of --world; a --pairs file is split by --heldout-fraction")
        fraction = 0.1 if args.heldout_fraction is None else args.heldout_fraction
        train, heldout = split_by_prompt(load_pair_file(Path(args.pairs)), fraction, head.seed)
        extra = {"pairs_file": args.pairs, "heldout_fraction": fraction}
        train_preference_reward(train, heldout, clip, out, head, args.device, extra=extra)
    metrics = json.loads((out / METRICS_FILE).read_text())
    pairs, accuracy, baseline = metrics["pairs"], metrics["accuracy"], metrics["clip_score_accuracy"]

    def percent(value: float | None) -> str:
        return "   n/a" if value is None else f"{100 * value:5.1f}%"

    print(f"pairs               train {pairs['train']:>6}  held-out {pairs['heldout']:>6}")
    print(f"head accuracy       train {percent(accuracy['train'])}  held-out {percent(accuracy['heldout'])}")
    print(f"clip score accuracy train {percent(baseline['train'])}  held-out {percent(baseline['heldout'])}")
    print(f"seconds             {metrics['seconds']['total']:.1f} (CLIP features {metrics['seconds']['encode']:.1f})")
    print(f"reward              reward.options.preference.model={out}")
    print(f"metrics             {out / METRICS_FILE}")
    return 0
