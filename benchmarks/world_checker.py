"""How well the world's gold checker reads images: rendered scenes against the renderer's truth,
and generated samples against a person's visual inspection.

1. **Rendered scenes** (``--scenes`` per split, the world's fixed datasets), clean and degraded
   (each ``--blur`` radius, a Gaussian blur in pixels, with each ``--noise`` level, Gaussian
   noise of that std on [0, 1] pixels): per attribute, the share read right. ``count``: scenes
   whose number of shapes is read right; ``colour``, ``kind``, ``size``: the shapes of those
   scenes (each true shape matched to the found shape of nearest centre); ``relation``: the
   relation scenes whose caption's relation holds between the matched shapes (GenEval's rule);
   ``caption``: scenes whose whole caption the checker confirms (``world_geneval``, strict).
2. **Generated samples** (``--generated`` of them: benchmark captions of ``--split``, a third
   single shapes, a third counts (as far as the split has them), the rest relations, each spread
   evenly; the world model at DDIM ``--steps`` and guidance 3, one sample per caption and seed): the
   checker's reading of each, written to ``--sheets`` as numbered contact sheets (12 per page,
   each tile labelled with its number, caption, the shapes read and the strict verdict) and as
   ``readings.json``. A person looks at every tile and writes down where the reading is wrong
   (``--inspection FILE``: JSON ``{"inspected": [numbers], "disagree": {number: "what the
   image shows"}, "verdict_disagree": {number: "why the caption is or is not true of it"}}``);
   the script reports both agreements.

    OMP_NUM_THREADS=1 HF_HUB_OFFLINE=1 .venv/bin/python benchmarks/world_checker.py \\
        --sheets benchmarks/results/world_checker \\
        --inspection benchmarks/results/world_checker/inspection.json \\
        --json benchmarks/results/world_checker.json
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from harness import BenchmarkResult, Table, describe_machine, print_machine, publish, settings_of
from PIL import ImageFilter

from align_gen.evaluation import select_prompts
from align_gen.world.checker import read_shapes
from align_gen.world.geneval import (
    WorldGenEval,
    benchmark_captions,
    exact_spec,
    judge_world,
    shape_detections,
)
from align_gen.world.shapes import ShapesWorld, caption_composition, render, to_tensor
from reward_models.geneval_rules import Detection, relative_position

SHEET_TILES = 12
TILE_PX = 192  # each sample drawn this wide on a sheet, so a person can see its pixels


def parse_args() -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--scenes", type=int, default=2000, help="rendered scenes per split")
    parser.add_argument("--blur", type=float, nargs="*", default=[0.5, 1.0], help="blur radii in pixels")
    parser.add_argument("--noise", type=float, nargs="*", default=[0.03], help="noise stds on [0, 1] pixels")
    parser.add_argument("--generated", type=int, default=120, help="generated samples to read (0: none)")
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2], help="sampling seeds of the generated samples")
    parser.add_argument("--split", default="heldout", choices=["heldout", "train"], help="captions of the generated samples")
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--model", default="align-gen:world")
    parser.add_argument("--device", default="cpu", help="where the generated samples are drawn")
    parser.add_argument("--sheets", type=Path, default=None, help="folder for the contact sheets and readings.json")
    parser.add_argument("--inspection", type=Path, default=None, help="a person's verdicts on the sheets (JSON)")
    parser.add_argument("--json", type=Path, default=None)
    return parser.parse_args()


def attribute_accuracy(images: torch.Tensor, captions: list[str], scenes: list) -> dict[str, float]:
    """The share read right per attribute (module docstring, item 1)."""
    right = {"count": 0, "colour": 0, "kind": 0, "size": 0, "relation": 0, "caption": 0}
    total = {"count": len(scenes), "colour": 0, "kind": 0, "size": 0, "relation": 0, "caption": len(scenes)}
    caption_scores = WorldGenEval(mode="strict")(images, captions)
    right["caption"] = int(caption_scores.sum())
    for image, caption, scene in zip(images, captions, scenes, strict=True):
        found = read_shapes(image)
        kind, words = caption_composition(caption)
        if kind == "relation":
            total["relation"] += 1
        if len(found) != len(scene.shapes):
            continue
        right["count"] += 1
        matched = [min(found, key=lambda f, s=s: (f.x - s.x) ** 2 + (f.y - s.y) ** 2) for s in scene.shapes]
        for shape, match in zip(scene.shapes, matched, strict=True):
            for attribute in ("colour", "kind", "size"):
                total[attribute] += 1
                right[attribute] += getattr(match, attribute) == getattr(shape, attribute)
        if kind == "relation":
            first, second = (Detection(m.kind, m.box) for m in matched)
            right["relation"] += words[2] in relative_position(first, second)
    return {name: right[name] / total[name] if total[name] else float("nan") for name in right}


def degraded(scenes: list, blur: float, noise: float, seed: int) -> torch.Tensor:
    images = [render(scene) for scene in scenes]
    if blur > 0:
        images = [image.filter(ImageFilter.GaussianBlur(blur)) for image in images]
    pixels = torch.stack([to_tensor(image) for image in images])
    if noise > 0:
        pixels = pixels + noise * torch.randn(pixels.shape, generator=torch.Generator().manual_seed(seed))
    return pixels.clamp(0, 1)


def reading_text(detections: list[Detection]) -> str:
    return ", ".join(f"{d.colour} {d.label} {d.size[0].upper()}" for d in detections) or "nothing"


def balanced_captions(split: str, count: int) -> list[str]:
    """``count`` captions of the benchmark's ``split``: a third each (as far as there are) single
    and count captions, the rest relations, each kind's spread evenly over its sorted list."""
    by_kind: dict[str, list[str]] = {"single": [], "count": [], "relation": []}
    for caption in benchmark_captions(split):
        by_kind[caption_composition(caption)[0]].append(caption)
    few = min(count // 3, len(by_kind["single"]), len(by_kind["count"]))
    return (select_prompts(by_kind["single"], few) + select_prompts(by_kind["count"], few)
            + select_prompts(by_kind["relation"], count - 2 * few))


def generated_readings(args: argparse.Namespace) -> tuple[torch.Tensor, list[dict]]:
    """The generated samples (module docstring, item 2) and the checker's reading of each."""
    from align_gen.config import SampleConfig
    from align_gen.models import load_policy, resolve_model

    captions = balanced_captions(args.split, -(-args.generated // len(args.seeds)))
    policy = load_policy(resolve_model(args.model, None), SampleConfig(num_steps=args.steps, guidance_scale=3.0, eta=1.0),
                         device=args.device)
    images, readings = [], []
    with torch.no_grad():
        for seed in args.seeds:
            rollout = policy.sample(captions, generator=torch.Generator().manual_seed(seed))
            images.append(rollout.images.float().clamp(0, 1).cpu())
            for caption, image in zip(captions, rollout.images, strict=True):
                detections = shape_detections(image)
                verdict = judge_world(exact_spec(caption), detections)
                readings.append({"number": len(readings), "caption": caption, "seed": seed, "read": reading_text(detections),
                                 "correct": verdict.correct, "reasons": list(verdict.reasons)})
    return torch.cat(images)[: args.generated], readings[: args.generated]


def write_sheets(folder: Path, images: torch.Tensor, readings: list[dict]) -> None:
    from pipelines.grid import render_grid

    folder.mkdir(parents=True, exist_ok=True)
    (folder / "readings.json").write_text(json.dumps(readings, indent=1))
    for start in range(0, len(readings), SHEET_TILES):
        page = readings[start : start + SHEET_TILES]
        labels = [f"#{r['number']} {r['caption']} | read: {r['read']} | {'ok' if r['correct'] else 'wrong'}" for r in page]
        tiles = torch.nn.functional.interpolate(images[start : start + len(page)], size=(TILE_PX, TILE_PX), mode="nearest")
        render_grid(tiles, labels, columns=4).save(folder / f"sheet_{start // SHEET_TILES:02d}.png")


def main() -> None:
    args = parse_args()
    machine = describe_machine(torch.device("cpu"))
    print_machine(machine)
    rows, notes, extra = [], [], {}
    conditions = [(0.0, 0.0)] + [(blur, 0.0) for blur in args.blur] + [(blur, noise) for blur in args.blur for noise in args.noise]
    for split in ("train", "heldout"):
        _, captions, scenes = ShapesWorld(seed=0).dataset(args.scenes, split)
        for blur, noise in conditions:
            accuracy = attribute_accuracy(degraded(scenes, blur, noise, seed=1), captions, scenes)
            rows.append({"name": f"{split} blur {blur:g} noise {noise:g}", "split": split, "blur": blur, "noise": noise,
                         "scenes": len(scenes), **accuracy})
            print(rows[-1], flush=True)
    table = Table.of(
        ["rendered scenes", "n", "count", "colour", "kind", "size", "relation", "caption"],
        [[r["name"], r["scenes"], *(f"{100 * r[k]:.1f}%" for k in ("count", "colour", "kind", "size", "relation", "caption"))]
         for r in rows],
    )
    if args.generated > 0:
        images, readings = generated_readings(args)
        extra["generated_correct"] = sum(r["correct"] for r in readings) / len(readings)
        notes.append(f"generated: {len(readings)} samples; the checker calls {100 * extra['generated_correct']:.1f}% "
                     "of them correct (every shape, colour, size and relation of the caption, nothing else)")
        if args.sheets is not None:
            write_sheets(args.sheets, images, readings)
            notes.append(f"contact sheets: {args.sheets}")
        if args.inspection is not None and args.inspection.is_file():
            inspection = json.loads(args.inspection.read_text())
            inspected, disagree, verdicts = inspection["inspected"], inspection["disagree"], inspection["verdict_disagree"]
            extra |= {"inspected": len(inspected), "disagreements": disagree, "verdict_disagreements": verdicts,
                      "reading_agreement": 1 - len(disagree) / len(inspected),
                      "verdict_agreement": 1 - len(verdicts) / len(inspected)}
            notes.append(f"visual inspection of {len(inspected)} samples: the reading agrees on {len(inspected) - len(disagree)} "
                         f"({100 * extra['reading_agreement']:.1f}%), the verdict on {len(inspected) - len(verdicts)} "
                         f"({100 * extra['verdict_agreement']:.1f}%)")
    for note in notes:
        print(note)
    result = BenchmarkResult(
        benchmark="world_checker",
        description=__doc__.splitlines()[0],
        settings=settings_of(args),
        machine=machine,
        rows=rows,
        table=table,
        notes=notes,
        extra=extra,
    )
    publish(result, args.json)


if __name__ == "__main__":
    main()
