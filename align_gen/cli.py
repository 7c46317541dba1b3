"""The ``align-gen`` command: ``train``, ``sample``, ``evaluate``, ``make-pairs``, ``train-reward`` and
``world build``.

Errors caused by input (a bad config key, a missing file, an unknown reward, a NaN reward) are
printed as one line on stderr with exit status 2, never as a traceback.
"""

from __future__ import annotations

import argparse
import json
import os
import re
import sys
import textwrap
from pathlib import Path

from align_gen.errors import USER_ERRORS, AlignGenError
from align_gen.train_reward_cli import add_train_reward_parser

DESCRIPTION = (
    "Align text-to-image diffusion models and vision-language models with reinforcement learning "
    "(DDPO, REBEL, AWM, SePPO): train from a YAML config, then sample and evaluate the result."
)
EPILOG = """\
first steps (from the repository root):
  make demo        install into .venv and align the shipped tiny world model with AWM
                   (offline, CPU, minutes): align-gen train configs/tiny/awm_world_preference.yaml
  make test        run the test suite (offline, CPU)
  align-gen train --help       the shipped configs, one line each
  align-gen COMMAND --help     a command's options and their defaults
"""
CONFIGS_DIR = Path(__file__).resolve().parents[1] / "configs"


class _HelpFormatter(argparse.RawDescriptionHelpFormatter):
    """Help that keeps the line breaks of descriptions and epilogs and ends each option's help
    with its default, unless the help already names it or there is none (None, off, empty)."""

    def _get_help_string(self, action: argparse.Action) -> str:
        text = action.help or ""
        default = action.default
        if (
            default is None
            or default is argparse.SUPPRESS
            or isinstance(default, bool)
            or default == []
            or "default" in text
        ):
            return text
        shown = " ".join(map(str, default)) if isinstance(default, list | tuple) else str(default)
        return f"{text} (default: {shown.replace('%', '%%')})"


def main(argv: list[str] | None = None) -> int:
    parser = _build_parser()
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except USER_ERRORS as error:
        message = " ".join(str(error).splitlines())
        print(f"align-gen {args.command}: error: {message}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"align-gen {args.command}: interrupted; resume with resume=latest", file=sys.stderr)
        return 130


def _say(message: str) -> None:
    """What the command is about to do, before a step that can take minutes (on stdout, so that
    stderr stays the one error line when the step fails)."""
    print(message, flush=True)


def _config_summary(path: Path) -> str:
    """One line about a shipped config: the first sentence of its header comment (parenthetical
    remarks dropped when it is long, the part before a colon when it is still very long)."""
    lines = []
    for line in path.read_text(encoding="utf-8", errors="replace").splitlines():
        text = line[1:].strip()
        if not line.startswith("#") or not text or line.startswith("#  "):  # a blank or a command line ends it
            break
        lines.append(text)
    sentence = re.split(r"(?<=\.)\s", " ".join(lines), maxsplit=1)[0]
    if len(sentence) > 100:
        sentence = re.sub(r"\s*\([^()]*\)", "", sentence)
    if len(sentence) > 140:
        sentence = re.split(r":\s", sentence, maxsplit=1)[0]
    sentence = sentence.rstrip(" .:;,")
    return f"{sentence}." if sentence else "(no header comment)"


def shipped_configs_help(configs_dir: Path | None = None) -> str:
    """The train command's epilog: every YAML file under ``configs_dir`` (default: the
    repository's configs/ folder, next to the package; top level and ``tiny/``) with one line
    about it, or where the configs live when there is no such folder."""
    configs_dir = CONFIGS_DIR if configs_dir is None else configs_dir
    groups = [
        (configs_dir / "tiny", "offline, CPU, seconds to minutes"),
        (configs_dir, "a GPU, and models and datasets from the hub or local copies"),
    ]
    in_repository = (configs_dir.parent / "pyproject.toml").is_file()  # not a stray configs/ in site-packages
    sections = []
    for folder, note in groups:
        files = sorted(folder.glob("*.yaml")) if in_repository and folder.is_dir() else []
        if not files:
            continue
        width = max(len(path.name) for path in files)
        shown = folder.relative_to(configs_dir.parent)
        rows = [f"  {path.name:<{width}}  {_config_summary(path)}" for path in files]
        sections.append(f"{shown}/ ({note}):\n" + "\n".join(rows))
    if not sections:
        return (
            f"shipped configs: no configs folder at {configs_dir} (align-gen was installed without its\n"
            "repository). The example configs live in the configs/ folder of the align-gen source\n"
            "repository (configs/tiny/ runs offline on a CPU); copy one and give its path."
        )
    return (
        f"shipped configs, in {configs_dir} (give the path, e.g. align-gen train\n"
        "configs/tiny/awm_world_preference.yaml; each file's header comment explains it):\n\n"
        + "\n\n".join(sections) + "\n"
    )


WORLD_STAGES = ("clip", "vae", "unet", "captioner")  # align_gen.world.build.STAGES (not imported: torch)
MODEL_HELP = (
    "hub id, diffusers or transformers VLM folder, align-gen:NAME (built-in: align-gen:world, "
    "align-gen:tiny-random-sd, ...), a run's output or final/ folder, or a run's checkpoint folder"
)


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="align-gen", description=textwrap.fill(DESCRIPTION, 88), epilog=EPILOG, formatter_class=_HelpFormatter
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def add_command(name: str, helptext: str, **options) -> argparse.ArgumentParser:
        return commands.add_parser(name, help=helptext, description=_sentence(helptext),
                                   formatter_class=_HelpFormatter, **options)

    train = add_command("train", "fine-tune a model with an RL objective from a YAML config",
                        epilog=shipped_configs_help())
    train.add_argument("config", help="YAML config file (the shipped ones are listed below)")
    train.add_argument(
        "overrides", nargs="*", metavar="KEY=VALUE",
        help="config values to override, dotted keys, e.g. train.learning_rate=1e-4 epochs=2",
    )
    train.set_defaults(handler=_train)

    for name, helptext in (
        ("sample", "render a labelled grid of samples (rows = prompts, columns = seeds) to a PNG"),
        ("evaluate", "score samples with reward models (one model, or two compared on the same prompts and seeds)"),
        ("make-pairs", "preference pairs of a model's samples judged by a reward (SePPO winners, train-reward --pairs)"),
    ):
        command = add_command(name, helptext)
        command.add_argument("model", nargs="?" if name == "evaluate" else None, metavar="MODEL",
                             help=("the model A: " if name == "evaluate" else "") + MODEL_HELP)
        command.add_argument("--lora", metavar="DIR",
                             help="folder with LoRA weights to load on MODEL (what align-gen train saves)")
        command.add_argument(
            "--prompts",
            required=name != "evaluate",  # evaluate takes --prompts or --benchmark
            help="prompt file (.txt, .jsonl), builtin:NAME or hf:<dataset id>[@split][#column]; for a VLM an "
            "(image, prompt) dataset (folder or .jsonl)",
        )
        if name != "make-pairs":
            command.add_argument("--seeds", type=int, nargs="+", default=[0], metavar="SEED",
                                 help="sampling seeds: one sample per prompt per seed")
        command.add_argument("--steps", type=int, default=50, help="denoising steps per sample, for diffusion models")
        command.add_argument("--guidance-scale", type=float, default=5.0,
                             help="classifier-free guidance scale, for diffusion models (1 = no guidance)")
        command.add_argument("--eta", type=float, default=1.0,
                             help="DDIM eta, the sampler's noise (> 0: the sampler records log-probs)")
        command.add_argument("--max-new-tokens", type=int, default=32, help="VLM answer length cap in tokens")
        command.add_argument("--temperature", type=float, default=1.0, help="VLM sampling temperature (> 0)")
        command.add_argument("--dtype", default="float32", choices=["float32", "float16", "bfloat16"],
                             help="the model's weight and compute precision (float16/bfloat16: GPUs)")
        command.add_argument("--device", default=None, help="cpu, cuda, cuda:1 (default: cuda if available)")
    _add_sample_options(commands.choices["sample"])
    _add_evaluate_options(commands.choices["evaluate"])
    _add_make_pairs_options(commands.choices["make-pairs"])

    add_train_reward_parser(commands, formatter_class=_HelpFormatter)

    world = add_command("world", "the tiny offline world: build (train) its models")
    world_commands = world.add_subparsers(dest="world_command", required=True, metavar="WORLD_COMMAND")
    build_help = "train the world's models from its seed (resumable: run it again after an interruption)"
    build = world_commands.add_parser("build", help=build_help, description=_sentence(build_help),
                                      formatter_class=_HelpFormatter)
    build.add_argument("--out", default="outputs/world",
                       help="output folder (the shipped weights are in align_gen/world/weights)")
    build.add_argument("--stages", nargs="+", default=None,
                       help=f"stages to build, any of: {' '.join(WORLD_STAGES)} (default: all, in that order)")
    build.add_argument("--quick", action="store_true", help="a few steps per stage: checks the build, not for use")
    build.set_defaults(handler=_world_build)
    return parser


def _sentence(text: str) -> str:
    """A command's help as its description: a capitalised sentence, wrapped."""
    return textwrap.fill(text[0].upper() + text[1:] + ".", 88)


def _add_sample_options(sample: argparse.ArgumentParser) -> None:
    sample.add_argument("--num-prompts", type=int, default=0, help="prompts spread evenly over the list (0 = all)")
    sample.add_argument(
        "--batch-size", type=int, default=None,
        help="prompts sampled together, for long prompt lists: less memory and a progress step per batch, "
        "but other noise than one batch (default: all prompts of a seed in one batch, as the training grids)",
    )
    sample.add_argument("--out", default="grid.png", help="output PNG")
    sample.set_defaults(handler=_sample)


def _add_reward_options(command: argparse.ArgumentParser, *, judge: bool = False) -> None:
    command.add_argument(
        "--reward", action="append", default=[], metavar="NAME",
        help="the judge: a reward, e.g. jpeg_compressibility or clip_score (give one --reward or --reward-weights)"
        if judge else "reward to score with, e.g. jpeg_compressibility or clip_score (repeatable)",
    )
    command.add_argument(
        "--reward-weights", nargs="+", metavar="NAME=W", default=[],
        help="one weighted sum of rewards, named 'weighted', e.g. clip_score=1 aesthetic=0.5",
    )
    command.add_argument(
        "--reward-option", action="append", default=[], metavar="NAME.OPTION=VALUE",
        help="a reward's option (repeatable), e.g. clip_score.pretrained=/ckpt.pt",
    )


def _add_make_pairs_options(command: argparse.ArgumentParser) -> None:
    _add_reward_options(command, judge=True)
    command.add_argument("--candidates", type=int, default=4, help="samples per prompt; the best and worst make the pair")
    command.add_argument("--seed", type=int, default=0, help="seeds the one generator that draws every sample")
    command.add_argument("--num-prompts", type=int, default=0, help="prompts spread evenly over the list (0 = all)")
    command.add_argument("--batch-size", type=int, default=8, help="prompts sampled together (x candidates images)")
    command.add_argument("--out", default="pairs", help="output folder: pairs.jsonl and images/")
    command.set_defaults(handler=_make_pairs)


def _add_evaluate_options(evaluate: argparse.ArgumentParser) -> None:
    evaluate.add_argument("--model", dest="model_flag", metavar="MODEL", help="the model A (or give it first)")
    evaluate.add_argument(
        "--compare", metavar="MODEL",
        help="a model B sampled with the same prompts and seeds (e.g. the base model); differences are B - A",
    )
    evaluate.add_argument("--compare-lora", metavar="DIR", help="LoRA weights for --compare")
    _add_reward_options(evaluate)
    evaluate.add_argument(
        "--benchmark", metavar="NAME",
        help="score a task benchmark instead of --prompts and --reward: each task's accuracy with its 95%% interval "
        "and the overall score (world-geneval: GenEval's six tasks on the tiny world, judged by its gold checker)",
    )
    evaluate.add_argument("--split", default=None, help="the benchmark's prompt split (default: its first)")
    evaluate.add_argument("--metadata", default=None, metavar="FILE",
                          help="geneval: GenEval's evaluation_metadata.jsonl instead of the generated prompt set")
    evaluate.add_argument("--num-prompts", type=int, default=0,
                          help="prompts spread evenly over the list, or over each benchmark task (0 = all)")
    evaluate.add_argument("--batch-size", type=int, default=8, help="prompts sampled together")
    evaluate.add_argument("--grid-prompts", type=int, default=8, help="prompts in the sample grid (up to 4 seeds)")
    evaluate.add_argument("--run", metavar="DIR", help="a training output folder: its monitors and held-out curve join the report")
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
        for name, (before, after, change, error) in result.watched.items():
            print(f"held-out {name} (evaluation.rewards, watched, same samples): before {before:.4f}, after {after:.4f} "
                  f"({change:+.4f} +- {error:.4f} s.e.)")
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
    if getattr(args, "batch_size", None) is not None and args.batch_size < 1:
        raise AlignGenError(f"--batch-size must be >= 1, got {args.batch_size}.")


def _load_policy(args: argparse.Namespace, source):
    """The policy of ``source`` (a :class:`~align_gen.models.ModelSource`), sampling with the
    command's settings."""
    from align_gen.config import SampleConfig
    from align_gen.models import load_policy

    sample = SampleConfig(
        num_steps=args.steps,
        guidance_scale=args.guidance_scale,
        eta=args.eta,
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
    )
    return load_policy(source, sample, dtype=args.dtype, device=args.device)


def _check_output(path: str, flag: str, *, is_folder: bool) -> None:
    """Refuses an output path that a file (or a folder, for a file output) stands in the way of."""
    from align_gen.durable import file_in_the_way

    blocker = file_in_the_way(Path(path), is_folder=is_folder)
    if blocker is not None:
        kind = "a file" if blocker.is_file() else "a folder"
        raise AlignGenError(f"{flag} {path}: {blocker} is {kind}; choose another {flag}.")


def _sample(args: argparse.Namespace) -> int:
    from align_gen.evaluation import select_prompts
    from align_gen.models import resolve_model
    from align_gen.prompts import load_prompts
    from align_gen.report import model_label
    from pipelines.grid import sample_grid

    _check_sampling_args(args)
    if args.num_prompts < 0:
        raise AlignGenError(f"--num-prompts must be >= 0, got {args.num_prompts}.")
    _check_output(args.out, "--out", is_folder=False)
    source = resolve_model(args.model, args.lora)
    prompts = select_prompts(load_prompts(args.prompts, visual=source.takes_images), args.num_prompts)
    _say(f"loading {model_label(args.model, args.lora)} ...")
    policy = _load_policy(args, source)
    _say(f"sampling {len(prompts)} prompts x {len(args.seeds)} seeds ({args.steps} steps each) ...")
    image = sample_grid(policy, prompts, args.seeds, progress=True, batch_size=args.batch_size)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    image.save(args.out)
    print(f"wrote {args.out} ({len(prompts)} prompts x {len(args.seeds)} seeds)")
    return 0


def _evaluate(args: argparse.Namespace) -> int:
    """Samples model A (and B with --compare) on the same prompts and seeds, scores every sample
    and writes the outputs of :mod:`align_gen.report` (a .json --out: the summary only)."""
    from align_gen.evaluation import sample_and_score, select_prompts
    from align_gen.models import resolve_model
    from align_gen.prompts import load_prompts
    from align_gen.report import (
        EvaluatedModel,
        build_summary,
        summary_table,
        write_outputs,
    )

    _check_sampling_args(args)
    model, run_dir = _evaluation_model(args)
    if args.benchmark is not None:
        return _evaluate_benchmark(args, model, run_dir)
    if args.prompts is None or args.split is not None:
        raise AlignGenError("give --prompts (with --reward) or --benchmark NAME (--split goes with --benchmark).")
    _check_output(args.out, "--out", is_folder=not args.out.endswith(".json"))
    request = _reward_request(args)  # names and options, before any model is resolved
    sources = {"A": resolve_model(model, args.lora)}
    if args.compare is not None:
        sources["B"] = resolve_model(args.compare, args.compare_lora)
    visual = {role: source.takes_images for role, source in sources.items()}
    if len(set(visual.values())) > 1:
        raise AlignGenError("--compare: a text-to-image model and a vision-language model answer different prompts.")
    prompts = select_prompts(load_prompts(args.prompts, visual=visual["A"]), args.num_prompts)
    _check_prompts_for(request, prompts)
    shown = select_prompts(range(len(prompts)), args.grid_prompts) if args.grid_prompts > 0 else []
    rewards = _evaluation_rewards(request)
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
    for role, name, lora, policy in _one_model_at_a_time(args, sources, model):
        _say(f"sampling {role}: {len(prompts)} prompts x {len(args.seeds)} seeds ({args.steps} steps each) ...")
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


def _one_model_at_a_time(args: argparse.Namespace, sources: dict, model: str):
    """(role, name, LoRA, policy) of model A, then of B (--compare) when there is one, each
    loaded when asked for: a caller that drops its policy has one model in memory at a time."""
    from align_gen.report import model_label

    for (role, source), (name, lora) in zip(
        sources.items(), ((model, args.lora), (args.compare, args.compare_lora)), strict=False
    ):
        _say(f"loading {role}: {model_label(name, lora)} ...")
        yield role, name, lora, _load_policy(args, source)


def _evaluate_benchmark(args: argparse.Namespace, model: str, run_dir: Path | None) -> int:
    """``evaluate --benchmark``: every task of the benchmark's split sampled by model A (and B),
    judged by its reward; writes :func:`align_gen.benchmark.write_benchmark_outputs`."""
    from align_gen.benchmark import (
        benchmark_table,
        get_benchmark,
        run_benchmark,
        write_benchmark_outputs,
    )
    from align_gen.builtins import resolve_folders_in
    from align_gen.config import apply_override
    from align_gen.models import resolve_model
    from align_gen.report import model_label
    from reward_models import check_reward_config

    benchmark = get_benchmark(args.benchmark)
    split = args.split or benchmark.splits[0]
    if split not in benchmark.splits:
        raise AlignGenError(f"--split {split}: {benchmark.name} has the splits {', '.join(benchmark.splits)}.")
    if args.prompts is not None or args.reward or args.reward_weights:
        raise AlignGenError(f"--benchmark {benchmark.name} brings its prompts and its reward ({benchmark.reward}); "
                            "drop --prompts, --reward and --reward-weights.")
    if args.metadata is not None and not benchmark.reads_metadata:
        raise AlignGenError(f"--metadata goes with --benchmark geneval; {benchmark.name} has its own prompts.")
    if args.metadata is not None and not Path(args.metadata).is_file():
        raise AlignGenError(f"--metadata {args.metadata}: no such file.")
    options: dict = {}
    for option in args.reward_option:
        apply_override(options, option)
    if set(options) - {benchmark.reward}:
        raise AlignGenError(f"--reward-option names {', '.join(sorted(set(options) - {benchmark.reward}))}; "
                            f"--benchmark {benchmark.name} scores with {benchmark.reward} only.")
    reward_options = resolve_folders_in(options).get(benchmark.reward, {})
    if args.out.endswith(".json"):
        raise AlignGenError("--benchmark writes a report folder; give --out a folder, not a .json file.")
    _check_output(args.out, "--out", is_folder=True)
    check_reward_config({benchmark.reward: 1.0}, {benchmark.reward: reward_options})  # before any model loads
    sources = {"A": resolve_model(model, args.lora)}
    if args.compare is not None:
        sources["B"] = resolve_model(args.compare, args.compare_lora)
    if any(source.takes_images for source in sources.values()):
        raise AlignGenError(f"--benchmark {benchmark.name} judges generated images; give a text-to-image model.")
    settings = {
        "split": split,
        "seeds": args.seeds,
        "batch_size": args.batch_size,
        "num_prompts": args.num_prompts,
        "metadata": args.metadata,
        "sampling": {key: getattr(args, key) for key in ("steps", "guidance_scale", "eta", "dtype")},
    }
    models = []
    for role, name, lora, policy in _one_model_at_a_time(args, sources, model):
        _say(f"sampling {role}: {benchmark.name} ({split}) x {len(args.seeds)} seeds ({args.steps} steps each) ...")
        results = run_benchmark(policy, benchmark, split, args.seeds, args.batch_size, num_prompts=args.num_prompts,
                                grid_prompts=args.grid_prompts, metadata=args.metadata,
                                reward_options=reward_options, desc=f"{role} ")
        models.append((model_label(name, lora), results))
        del policy  # B loads after A is gone
    summary = write_benchmark_outputs(Path(args.out), benchmark, models, settings, run_dir)
    print(benchmark_table(summary))
    for name in ("summary.json", "scores.jsonl", "report.md", "report.html"):
        print(f"wrote {Path(args.out) / name}")
    return 0


def _make_pairs(args: argparse.Namespace) -> int:
    """Samples ``--candidates`` images per prompt, judges them with the one reward given, and
    writes the best and the worst of each prompt as a pair (:mod:`align_gen.pairs`)."""
    from align_gen.evaluation import select_prompts
    from align_gen.models import resolve_model
    from align_gen.pairs import make_pairs, summarise_pairs
    from align_gen.prompts import load_prompts
    from align_gen.report import model_label

    _check_sampling_args(args)
    if args.num_prompts < 0:
        raise AlignGenError(f"--num-prompts must be >= 0, got {args.num_prompts}.")
    request = _reward_request(args)
    names = [*request[0], *(["weighted"] if request[1] else [])]
    if len(names) != 1:
        raise AlignGenError(f"make-pairs takes one judge: one --reward or one --reward-weights sum; got {', '.join(names)}.")
    prompts = select_prompts(load_prompts(args.prompts), args.num_prompts)
    _check_prompts_for(request, prompts)
    judges = _evaluation_rewards(request)
    _check_output(args.out, "--out", is_folder=True)
    source = resolve_model(args.model, args.lora)
    if source.takes_images:
        raise AlignGenError("make-pairs draws images: give a text-to-image model, not a vision-language model.")
    _say(f"loading {model_label(args.model, args.lora)} ...")
    policy = _load_policy(args, source)
    _say(f"sampling {len(prompts)} prompts x {args.candidates} candidates ({args.steps} steps each) ...")
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


def _reward_request(args: argparse.Namespace) -> tuple[list[str], dict[str, float], dict]:
    """(--reward names, --reward-weights, --reward-option options), checked by name and option
    without building anything (no weights load), so a bad one is reported before any model."""
    from align_gen.builtins import resolve_folders_in
    from align_gen.config import apply_override
    from reward_models import check_reward_config

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
    for name in args.reward:
        check_reward_config({name: 1.0}, {name: options.get(name, {})})
    if weights:
        check_reward_config(weights, {name: options[name] for name in weights if name in options})
    return list(args.reward), weights, resolve_folders_in(options)  # align-gen:world-clip and the other shipped folders


def _check_prompts_for(request: tuple[list[str], dict[str, float], dict], prompts: list) -> None:
    """The requested rewards' own checks of the prompts, before any model loads."""
    from reward_models import check_reward_prompts

    names, weights, options = request
    check_reward_prompts([*names, *weights], options, prompts)


def _evaluation_rewards(request: tuple[list[str], dict[str, float], dict]) -> dict:
    """{name: reward} of a :func:`_reward_request` (the weighted sum is named 'weighted')."""
    from reward_models import build_reward, get_reward

    names, weights, options = request
    _say(f"loading rewards: {', '.join([*names, *weights])} ...")
    rewards = {name: get_reward(name, **options.get(name, {})) for name in names}
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
