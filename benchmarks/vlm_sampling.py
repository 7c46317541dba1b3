"""VLM sampling: ``VLMPolicy.sample`` (answers with log-probs) vs plain transformers ``generate``.

What is measured: wall-clock seconds per batch of answers to (image, question) prompts, and the
answer tokens per second, of
  (A) ours:  ``policy.sample(prompts, images=images, generator=g)``: checks and clamps the
             images, builds the chat prompts with the processor, samples the answers with
             ``model.generate``, then runs ONE teacher-forced forward pass over prompt + answers
             to record every answer token's float32 log-prob (align_gen/policies/vlm.py), and
             decodes the answers' texts;
  (B) plain: the same processor inputs, built inside the timed region with the policy's own
             helpers (``policy._prompt_inputs`` then ``policy._model_inputs``), then
             ``model.generate(**inputs, generation_config=...)`` on the SAME model object, with
             the generation config the policy builds (do_sample, temperature, top-p, top-k,
             max_new_tokens, pad and end-of-sequence ids, suppressed image placeholder tokens)
             and the same random seed (one seed drawn from ``torch.Generator().manual_seed(--seed)``
             and set on a forked global RNG, as the policy does).
The images are loaded from disk and resized once, outside both timed regions; building the
prompts (chat template, processor) is inside both. Both sample the same answers (checked on the
last pair: the script prints whether the token ids are identical), so the difference in time is
the cost of the scoring pass, the log-softmax, the image checks and the decoding.

Tokens: neither side forces the answer length (the policy has no ``min_new_tokens``, and the
plain side keeps the policy's generation config so that both draw the same answers); each
counts the tokens it actually generated: ours ``rollout.step_mask.sum()``, plain the tokens of
each row up to and including its first end-of-sequence token. ``generate`` stops once every row
has ended, so a batch runs as many decoding steps as its longest answer.

How: one process, one warm-up pair, then ``--repeats`` interleaved pairs A B A B ... (so that
machine noise hits both alike), each call under ``torch.inference_mode`` and timed between
``torch.cuda.synchronize()`` calls on CUDA. Reported: median s/batch; tokens/s = median tokens
per batch / median s per batch, for each; ratio = tokens/s plain / tokens/s ours, overhead =
ratio - 1; the median over pairs of (tokens/s plain / tokens/s ours) within the pair; the extra
milliseconds per batch. Beside each wall-clock time, the process's CPU time over the same call.
``--json OUT`` writes the result (``harness.BenchmarkResult``: rows "align-gen" and "plain
generate").

Models: ``--size tiny`` (default) is the built-in ``align-gen:tiny-random-llava`` (49k params);
``--size mid`` is a LLaVA built here from configs with random weights (no download): the tiny
model's tokenizer (37 tokens), processor and 32 px CLIP geometry, with a 4-layer vision tower
of width 256 and an 8-layer Llama of width 512 (29M parameters). ``--model`` takes any other
built-in, hub id or folder of an image-text-to-text model instead. ``--resolution`` sets the
side of the images given to the processor (default: the policy's own choice).

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/vlm_sampling.py [--size mid] [--json OUT]

``--model random:qwen2vl-2b`` (or ``-mid``, ``-tiny``) is Qwen2-VL-2B's architecture with random
weights and a word-level tokenizer, built offline by ``full_size.py`` (448 px images, 256 image
tokens at full size). On a GPU, with no hub:

    python benchmarks/vlm_sampling.py --model random:qwen2vl-2b --device cuda --dtype bfloat16 \\
        --batch-size 8 --max-new-tokens 64 --json out/vlm_sampling_random_qwen2vl2b.json

On a GPU, the real model (hub reachable, or the model in the local cache):

    python benchmarks/vlm_sampling.py --model Qwen/Qwen2-VL-2B-Instruct --device cuda \\
        --dtype bfloat16 --batch-size 8 --max-new-tokens 64 --json out/vlm_sampling_qwen2vl2b.json
"""

from __future__ import annotations

import argparse
import copy
from collections.abc import Sequence

import torch
import transformers
from harness import (
    BenchmarkResult,
    Comparison,
    Table,
    Timing,
    add_common_flags,
    describe_machine,
    median,
    pair_order,
    print_machine,
    publish,
    resolve_dtype,
    resolve_model,
    settings_of,
    timed,
    timing_numbers,
)

from align_gen.builtins.tiny_vlms import build_tiny_random_llava
from align_gen.config import ModelConfig, SampleConfig
from align_gen.image_datasets import load_prompt_images
from align_gen.policies import VLMPolicy, build_policy
from align_gen.policies.loading import dtype_from_name
from align_gen.prompts import load_prompts
from align_gen.types import VisualPrompt

SIZES = {"tiny": "align-gen:tiny-random-llava", "mid": "mid-random-llava"}
# The mid LLaVA: the language model's and the vision tower's sizes (the rest is the tiny one's).
# head_dim is explicit: LlamaConfig derives it once, at construction, from the tiny sizes.
MID_TEXT = {
    "hidden_size": 512,
    "head_dim": 64,
    "intermediate_size": 1376,
    "num_hidden_layers": 8,
    "num_attention_heads": 8,
    "num_key_value_heads": 8,
}
MID_VISION = {
    "hidden_size": 256,
    "intermediate_size": 1024,
    "num_hidden_layers": 4,
    "num_attention_heads": 4,
}


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0], conflict_handler="resolve"
    )
    add_common_flags(parser, batch_size=8, steps=32, repeats=7)
    # Replaces the common --model: its default depends on --size.
    parser.add_argument(
        "--model",
        default=None,
        help="hub id, folder or random:qwen2vl-2b[-mid] of an image-text-to-text model "
        "(default: the --size model)",
    )
    parser.add_argument(
        "--size",
        choices=sorted(SIZES),
        default=None,
        help="tiny: align-gen:tiny-random-llava (default); mid: a ~29M-param random LLaVA built here",
    )
    # Replaces the common --steps: a VLM's steps are its answer tokens.
    parser.add_argument(
        "--max-new-tokens",
        "--steps",
        dest="max_new_tokens",
        type=int,
        default=32,
        help="answer length cap (sample.max_new_tokens), end-of-sequence token included",
    )
    # The common --guidance-scale and --eta are the diffusion sampler's: refused here.
    for flag in ("--guidance-scale", "--eta"):
        parser.add_argument(flag, default=None, help=argparse.SUPPRESS)
    parser.add_argument(
        "--temperature", type=float, default=1.0, help="sampling temperature (sample.temperature)"
    )
    parser.add_argument(
        "--resolution",
        type=int,
        default=None,
        help="image side in pixels given to the processor (sample.resolution; default: the policy's)",
    )
    parser.add_argument(
        "--prompts",
        default="configs/tiny/data/shape_questions.jsonl",
        help="(image, question) dataset; its first --batch-size examples (cycled) form the batch",
    )
    args = parser.parse_args()
    for flag in ("guidance_scale", "eta"):
        if getattr(args, flag) is not None:
            parser.error(
                f"--{flag.replace('_', '-')} is a diffusion sampler's flag; a VLM has none"
            )
    if args.model is not None and args.size is not None:
        parser.error("give --model (a hub id or folder) or --size (a model built here), not both")
    if args.max_new_tokens < 1 or args.batch_size < 1 or args.repeats < 1:
        parser.error("--max-new-tokens, --batch-size and --repeats must be >= 1")
    if args.model is None:
        args.size = args.size or "tiny"
        args.model = SIZES[args.size]
    return args


def build_mid_llava(
    sample_config: SampleConfig, device: torch.device, dtype: str, seed: int
) -> VLMPolicy:
    """A frozen VLMPolicy around a random LLaVA of :data:`MID_TEXT` / :data:`MID_VISION` sizes
    with the tiny LLaVA's tokenizer and processor (so the same prompts, ~37-token vocabulary)."""
    tiny_model, processor = build_tiny_random_llava()
    config = copy.deepcopy(tiny_model.config)
    for key, value in MID_TEXT.items():
        setattr(config.text_config, key, value)
    for key, value in MID_VISION.items():
        setattr(config.vision_config, key, value)
    torch.manual_seed(seed)
    model = transformers.LlavaForConditionalGeneration(config).to(dtype_from_name(dtype)).eval()
    return VLMPolicy(
        model,
        processor,
        ModelConfig(pretrained=SIZES["mid"], dtype=dtype),
        sample_config,
        device,
        trainable=False,
    )


def answer_lengths(generated: torch.Tensor, eos_token_ids: Sequence[int]) -> torch.Tensor:
    """(B,) tokens of each row of ``generated`` (B, T) up to and including its first
    end-of-sequence token (all T when it has none)."""
    is_end = torch.isin(generated, torch.as_tensor(list(eos_token_ids), device=generated.device))
    ended_before = (is_end.long().cumsum(dim=1) - is_end.long()) > 0  # an earlier EOS in the row
    return (~ended_before).sum(dim=1)


def same_tokens(ours: torch.Tensor, generated: torch.Tensor, eos_token_ids: Sequence[int]) -> bool:
    """Whether the policy's answers (B, T), -1 padded, equal the plain side's generated ids
    (B, T') up to and including each row's first end-of-sequence token."""
    lengths = answer_lengths(generated, eos_token_ids)
    if not torch.equal((ours >= 0).sum(dim=1).cpu(), lengths.cpu()):
        return False
    return all(
        torch.equal(ours[row, :length].cpu(), generated[row, :length].cpu())
        for row, length in enumerate(lengths.tolist())
    )


def main() -> None:
    args = parse_args()
    model_name = resolve_model(args)
    device = torch.device(args.device)
    dtype = resolve_dtype(args)
    machine = {**describe_machine(device), "transformers": transformers.__version__}
    print_machine(machine)

    sample_config = SampleConfig(
        max_new_tokens=args.max_new_tokens,
        temperature=args.temperature,
        batch_size=args.batch_size,
        resolution=args.resolution,
    )
    if args.size == "mid":
        policy = build_mid_llava(sample_config, device, dtype, args.seed)
    else:
        policy = build_policy(
            ModelConfig(pretrained=args.model, dtype=dtype), sample_config, device, trainable=False
        )
    if not isinstance(policy, VLMPolicy):
        raise SystemExit(f"--model {model_name!r} is not a vision-language model")
    model = policy.model  # the same object for both sides
    parameters = sum(p.numel() for p in model.parameters())
    all_prompts: list[VisualPrompt] = load_prompts(args.prompts, visual=True)
    prompts = [all_prompts[i % len(all_prompts)] for i in range(args.batch_size)]
    questions = [str(prompt) for prompt in prompts]
    images = load_prompt_images(prompts, policy.resolution)  # outside both timed regions
    prompt_tokens = policy._prompt_inputs(questions, images)["input_ids"].shape[1]  # (B, P)
    generation = policy.generation_config()
    devices = [device] if device.type == "cuda" else []

    @torch.inference_mode()
    def ours() -> tuple[int, torch.Tensor]:
        generator = torch.Generator().manual_seed(args.seed)
        rollout = policy.sample(prompts, images=images, generator=generator)
        return int(rollout.step_mask.sum()), rollout.trajectory

    @torch.inference_mode()
    def plain() -> tuple[int, torch.Tensor]:
        conditioning = policy._prompt_inputs(questions, images)
        inputs = policy._model_inputs(conditioning, conditioning["input_ids"][:, :0])
        # The policy's seeding: one seed drawn from the generator, global RNG forked around it.
        seed = int(torch.randint(2**62, (1,), generator=torch.Generator().manual_seed(args.seed)))
        with torch.random.fork_rng(devices=devices):
            torch.manual_seed(seed)
            sequences = model.generate(**inputs, generation_config=generation)
        generated = sequences[:, inputs["input_ids"].shape[1] :]
        return int(answer_lengths(generated, policy.eos_token_ids).sum()), generated

    timings: dict[str, list[Timing]] = {"ours": [], "plain": []}
    tokens: dict[str, list[int]] = {"ours": [], "plain": []}
    answers: dict[str, torch.Tensor] = {}
    sides = {"ours": ours, "plain": plain}
    for repeat in range(args.repeats + 1):  # repeat 0 is the warm-up
        # The order within a pair alternates, so that a drift in the load favours neither side.
        for name in pair_order(sides, repeat - 1):
            timing, (count, answers[name]) = timed(sides[name], device)
            if repeat:
                timings[name].append(timing)
                tokens[name].append(count)
    same_answers = same_tokens(answers["ours"], answers["plain"], policy.eos_token_ids)

    times = {name: [t.wall_s for t in values] for name, values in timings.items()}
    med = {name: median(values) for name, values in times.items()}
    med_tokens = {name: median([float(n) for n in values]) for name, values in tokens.items()}
    tokens_per_s = {name: med_tokens[name] / med[name] for name in times}
    ratio = tokens_per_s["plain"] / tokens_per_s["ours"]
    pair_ratios = [
        (n_plain / t_plain) / (n_ours / t_ours)
        for n_ours, t_ours, n_plain, t_plain in zip(
            tokens["ours"], times["ours"], tokens["plain"], times["plain"], strict=True
        )
    ]
    paired = median(pair_ratios)
    cpu = {name: median([t.cpu_s for t in values]) for name, values in timings.items()}
    cpu_ratio = (med_tokens["plain"] / cpu["plain"]) / (med_tokens["ours"] / cpu["ours"])
    extra_ms = 1e3 * (med["ours"] - med["plain"])
    print(
        f"\nmodel={model_name} ({parameters:,} params) dtype={dtype} batch={args.batch_size} "
        f"max_new_tokens={args.max_new_tokens} temperature={args.temperature} "
        f"resolution={policy.resolution} prompt_tokens={prompt_tokens} "
        f"repeats={args.repeats} (+1 warm-up), interleaved pairs in alternating order"
    )
    names = {"ours": "align-gen", "plain": "plain generate"}
    rows = [
        {
            "name": names[side],
            **timing_numbers(timings[side]),
            "tokens": tokens[side],
            "median_tokens": med_tokens[side],
            "tokens_per_s": tokens_per_s[side],
        }
        for side in timings
    ]
    table = Table.of(
        ["", "median s/batch", "min s/batch", "max s/batch", "median CPU s", "tokens/batch", "tokens/s"],
        [
            [row["name"], row["median_wall_s"], row["min_wall_s"], row["max_wall_s"], row["median_cpu_s"],
             row["median_tokens"], row["tokens_per_s"]]
            for row in rows
        ],
    )
    result = BenchmarkResult(
        benchmark="vlm_sampling",
        description=__doc__.splitlines()[0],
        settings=settings_of(
            args,
            model=model_name,
            model_folder=args.model,
            dtype=dtype,
            resolution=policy.resolution,
            parameters=parameters,
        ),
        machine=machine,
        rows=rows,
        table=table,
        comparisons=[
            Comparison(
                "plain / align-gen tokens/s",
                ratio,
                paired,
                f"overhead {100 * (ratio - 1):+.1f}%",
                per_pair_min=min(pair_ratios),
                per_pair_max=max(pair_ratios),
                cpu_value=cpu_ratio,
            )
        ],
        notes=[
            f"extra time per batch: {extra_ms:+.1f} ms ({extra_ms / med_tokens['ours']:+.3f} ms per answer token)",
            f"same answers (token ids): {same_answers} (same seed: both should sample the same tokens)",
        ],
        extra={
            "overhead_percent": 100 * (ratio - 1),
            "extra_ms_per_batch": extra_ms,
            "same_answers": same_answers,
            "prompt_tokens": prompt_tokens,
        },
    )
    publish(result, args.json)


if __name__ == "__main__":
    main()
