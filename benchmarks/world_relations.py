"""Where the world model's compositions fail: the relation each sample draws against the one its
caption asks, and how far apart the text encoder holds captions that differ in one word.

1. **Drawn against asked.** For each ``--model`` (the base world model, a run's folder, a
   checkpoint), the relation captions of ``--split`` (``--captions`` of them, evenly spread; 0 =
   all) are sampled once per ``--seeds`` seed (DDIM ``--steps``, guidance 3) and read by the gold
   checker. Where both named shapes are found in their named colours (the largest of each), the
   first shape's place relative to the second is read by GenEval's rule and tallied against the
   caption's relation: ``right`` (the asked relation holds), ``opposite`` (its mirror holds
   instead: "right of" for "left of"), ``across`` (only the other axis's relations hold) or
   ``none`` (the centres overlap). Samples missing a named shape or colour are counted apart
   (``colours missed``).
2. **The text encoder.** Each relation caption against the same caption with one part changed:
   the relation mirrored ("left of" -> "right of"), the relation turned to the other axis
   ("left of" -> "above"), the two colours swapped, the two kinds swapped. The distance is that of
   the text encoder's last hidden states (what the UNet attends to), relative to the caption's
   own norm, at the tokens that differ and over the whole padded sequence; the mean over the
   captions. The UNet's LoRA sees nothing else of the caption, so two captions the encoder holds
   close are two prompts it can hardly tell apart.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_relations.py \\
        --models align-gen:world outputs/gold_run --json benchmarks/results/world_relations.json
"""

from __future__ import annotations

import argparse
from collections import Counter
from pathlib import Path

import torch
from harness import BenchmarkResult, Table, describe_machine, print_machine, publish, settings_of

from align_gen.evaluation import select_prompts
from align_gen.world.geneval import benchmark_captions, shape_detections
from align_gen.world.shapes import RELATIONS, caption_composition, relation_caption
from reward_models.geneval_rules import relative_position

MIRROR = {"left of": "right of", "right of": "left of", "above": "below", "below": "above"}
TURNED = {"left of": "above", "right of": "below", "above": "left of", "below": "right of"}
OUTCOMES = ("right", "opposite", "across", "none")


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--models", nargs="+", default=["align-gen:world"], help="models, run folders or checkpoints")
    parser.add_argument("--split", default="heldout", choices=["heldout", "train"])
    parser.add_argument("--captions", type=int, default=0, help="relation captions, evenly spread (0: all of the split)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[1000, 1001])
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def relation_captions(split: str, count: int) -> list[str]:
    captions = [c for c in benchmark_captions(split) if caption_composition(c)[0] == "relation"]
    return select_prompts(captions, count)


def drawn_outcome(caption: str, image: torch.Tensor) -> str | None:
    """How the sample's relation compares with the caption's (module docstring, item 1); None
    when a named shape is not found in its colour."""
    colour1, kind1, relation, colour2, kind2 = caption_composition(caption)[1]
    found = shape_detections(image)  # largest first
    first = next((d for d in found if (d.label, d.colour) == (kind1, colour1)), None)
    second = next((d for d in found if (d.label, d.colour) == (kind2, colour2) and d is not first), None)
    if first is None or second is None:
        return None
    drawn = relative_position(first, second)
    if relation in drawn:
        return "right"
    if MIRROR[relation] in drawn:
        return "opposite"
    return "across" if drawn else "none"


def outcome_row(model: str, policy, args: argparse.Namespace, captions: list[str]) -> tuple[dict, dict]:
    """The tally of ``model`` (loaded as ``policy``; module docstring, item 1) and its counts
    per asked relation."""
    tally: Counter = Counter()
    by_relation: dict[str, Counter] = {relation: Counter() for relation in RELATIONS}
    with torch.no_grad():
        for seed in args.seeds:
            generator = torch.Generator().manual_seed(seed)
            for start in range(0, len(captions), args.batch_size):
                batch = captions[start:start + args.batch_size]
                images = policy.sample(batch, generator=generator).images.float().clamp(0, 1).cpu()
                for caption, image in zip(batch, images, strict=True):
                    outcome = drawn_outcome(caption, image) or "colours missed"
                    tally[outcome] += 1
                    by_relation[caption_composition(caption)[1][2]][outcome] += 1
    samples = sum(tally.values())
    found = samples - tally["colours missed"]
    row = {"name": model, "samples": samples, "found": found,
           **{outcome: tally[outcome] / max(found, 1) for outcome in OUTCOMES},
           "colours_missed": tally["colours missed"] / samples}
    print(row, flush=True)
    return row, {relation: dict(counts) for relation, counts in by_relation.items()}


def variant_caption(caption: str, change: str) -> str:
    """``caption`` with one part changed (module docstring, item 2), written as the world writes it."""
    colour1, kind1, relation, colour2, kind2 = caption_composition(caption)[1]
    if change == "mirrored":
        relation = MIRROR[relation]
    elif change == "turned":
        relation = TURNED[relation]
    elif change == "colours swapped":
        colour1, colour2 = colour2, colour1
    elif change == "kinds swapped":
        kind1, kind2 = kind2, kind1
    else:
        raise ValueError(change)
    return relation_caption(colour1, kind1, relation, colour2, kind2)


def text_distances(encoder, tokenizer, captions: list[str]) -> list[dict]:
    """The text encoder's relative distances per change (module docstring, item 2)."""
    from align_gen.world.diffusion import encode_text

    base = encode_text(encoder, tokenizer, captions)
    ids = tokenizer(captions, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                    return_tensors="pt").input_ids
    rows = []
    for change in ("mirrored", "turned", "colours swapped", "kinds swapped"):
        variants = [variant_caption(caption, change) for caption in captions]
        changed = torch.tensor([v != c for v, c in zip(variants, captions, strict=True)])  # a swap of equals is none
        other = encode_text(encoder, tokenizer, variants)
        other_ids = tokenizer(variants, padding="max_length", max_length=tokenizer.model_max_length, truncation=True,
                              return_tensors="pt").input_ids
        differ = ids != other_ids  # (B, L): the tokens that differ
        token_distance = (base - other).norm(dim=-1) / base.norm(dim=-1)
        at_words = (token_distance * differ).sum(1) / differ.sum(1).clamp(min=1)
        whole = (base - other).flatten(1).norm(dim=1) / base.flatten(1).norm(dim=1)
        example = int(changed.nonzero()[0])
        rows.append({"change": change, "example": f"{captions[example]} -> {variants[example]}",
                     "captions": int(changed.sum()), "distance_at_changed_tokens": float(at_words[changed].mean()),
                     "distance_whole": float(whole[changed].mean())})
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    args = parse_args()
    machine = describe_machine(torch.device(args.device))
    print_machine(machine)
    captions = relation_captions(args.split, args.captions)
    from align_gen.config import SampleConfig
    from align_gen.models import load_policy, resolve_model

    rows, by_relation = [], {}
    for model in args.models:
        policy = load_policy(resolve_model(model, None), SampleConfig(num_steps=args.steps, guidance_scale=3.0, eta=1.0),
                             device=args.device)
        if model == args.models[0]:  # the first model's text encoder (a LoRA run trains only the UNet)
            distances = text_distances(policy.text_encoder, policy.tokenizer, captions)
        row, by_relation[model] = outcome_row(model, policy, args, captions)
        rows.append(row)
        del policy  # one model in memory at a time
    table = Table.of(
        ["model", "samples", "both found in colour", "right", "opposite", "across", "none"],
        [[r["name"], r["samples"], f"{100 * r['found'] / r['samples']:.1f}%",
          *(f"{100 * r[k]:.1f}%" for k in OUTCOMES)] for r in rows],
    )
    notes = [f"relation captions of the {args.split} split: {len(captions)} x seeds {args.seeds}",
             "right / opposite / across / none: shares of the samples with both named shapes in colour"]
    notes += [f"text encoder, {d['change']} ({d['example']}): relative distance {d['distance_at_changed_tokens']:.3f} at "
              f"the changed tokens, {d['distance_whole']:.3f} over the sequence" for d in distances]
    for note in notes:
        print(note)
    publish(BenchmarkResult(benchmark="world_relations", description=__doc__.splitlines()[0], settings=settings_of(args),
                            machine=machine, rows=rows, table=table, notes=notes, extra={"text_encoder": distances, "by_relation": by_relation}),
            args.json)


if __name__ == "__main__":
    main()
