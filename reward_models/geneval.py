"""GenEval at full size without mmcv / mmdet: the ``geneval`` reward and its prompt set.

GenEval (Ghosh et al. 2023) judges an image against a compositional prompt: Mask2Former (Swin-S,
COCO instance segmentation) finds the objects, CLIP ViT-L/14 classifies the colour of each object
a prompt asks a colour of, and the rules of :mod:`reward_models.geneval_rules` decide. Its own
code needs mmcv and mmdet; this reward runs the same protocol on the detector as packaged for
transformers (``facebook/mask2former-swin-small-coco-instance``) and open_clip's ViT-L-14
(``openai``), so ``pip install 'align-gen[geneval]'`` is enough (the extra adds scipy, which
transformers' Mask2Former needs).

The protocol, as GenEval runs it:

- **Detection.** Instances scoring at least ``threshold`` (0.3; ``counting_threshold`` 0.9 for
  counting prompts), at most ``max_objects`` (16) per class, most confident first; with
  ``max_overlap`` < 1 a box overlapping a kept one of its class by more IoU is dropped (GenEval's
  default 1.0: none is). An instance's box is its mask's bounding box.
- **Colour** of an object: its mask pasted on a grey (#999999) canvas, cropped to its box, and
  classified zero-shot among red, orange, yellow, green, blue, purple, pink, brown, black and
  white, each colour's text embedding the normalised mean over "a photo of a {colour}
  {class}", "a photo of a {colour}-colored {class}" and "a photo of a {colour} object".
- **Rules**: :func:`reward_models.geneval_rules.judge` (position threshold 0.1).

What each prompt asks for comes from GenEval's metadata (``metadata``: its
``evaluation_metadata.jsonl``, one record per prompt) or, without it, from the prompt itself when
it is written in the templates of :func:`generate_prompts` ("a photo of a cup", "a photo of a
dog and a cup", "a photo of three cups", "a photo of a red cup", "a photo of a dog right of a
cup", "a photo of a red dog and a blue cup").

How its numbers may differ from GenEval's official ones, and why:

- transformers' Mask2Former port runs at its processor's resolution (384 px on the short side
  for the hub checkpoint; GenEval's mmdet config resizes to 1024), so small objects are found
  less often; ``detector_size`` sets another short side;
- transformers scores an instance as its class probability times its mean mask probability and
  keeps the top ``num_queries`` (class, query) pairs, as mmdet does, but resamples masks through
  384 x 384; boxes and masks differ by a few pixels;
- the CLIP crops are preprocessed in torch (bicubic, antialiased), not by PIL;
- :func:`generate_prompts` writes its own prompt set over GenEval's six tasks and the detector's
  80 COCO classes from a seed; it is not GenEval's published 553 prompts (give ``metadata`` for
  those). Class names in metadata are matched to the detector's labels, with the common COCO
  spelling variants mapped (``CLASS_ALIASES``).
"""

from __future__ import annotations

import functools
import re
from pathlib import Path
from typing import Any

import numpy as np
import torch

from reward_models.errors import RewardConfigError, RewardError
from reward_models.geneval_rules import (
    POSITION_THRESHOLD,
    RELATIONS,
    Detection,
    Exclude,
    Include,
    PromptSpec,
    judge,
    read_geneval_metadata,
)
from reward_models.hf_clip import resolve_source
from reward_models.hub import dtype_keyword, load_pretrained, resolve_placement
from reward_models.registry import BatchedReward, Prompt, register_reward

DEFAULT_DETECTOR = "facebook/mask2former-swin-small-coco-instance"
COLOURS = ("red", "orange", "yellow", "green", "blue", "purple", "pink", "brown", "black", "white")
COLOUR_TEMPLATES = ("a photo of a {colour} {label}", "a photo of a {colour}-colored {label}", "a photo of a {colour} object")
NUMBERS = ("zero", "one", "two", "three", "four", "five", "six", "seven", "eight", "nine", "ten")
TASKS = ("single_object", "two_object", "counting", "colors", "position", "color_attr")
CROP_BACKGROUND = 0x99 / 255  # GenEval's grey canvas, #999999
# COCO's 80 instance classes, as transformers' and mmdet's COCO detectors name them.
COCO_CLASSES = (
    "person", "bicycle", "car", "motorcycle", "airplane", "bus", "train", "truck", "boat", "traffic light",
    "fire hydrant", "stop sign", "parking meter", "bench", "bird", "cat", "dog", "horse", "sheep", "cow",
    "elephant", "bear", "zebra", "giraffe", "backpack", "umbrella", "handbag", "tie", "suitcase", "frisbee",
    "skis", "snowboard", "sports ball", "kite", "baseball bat", "baseball glove", "skateboard", "surfboard",
    "tennis racket", "bottle", "wine glass", "cup", "fork", "knife", "spoon", "bowl", "banana", "apple",
    "sandwich", "orange", "broccoli", "carrot", "hot dog", "pizza", "donut", "cake", "chair", "couch",
    "potted plant", "bed", "dining table", "toilet", "tv", "laptop", "mouse", "remote", "keyboard", "cell phone",
    "microwave", "oven", "toaster", "sink", "refrigerator", "book", "clock", "vase", "scissors", "teddy bear",
    "hair drier", "toothbrush",
)  # fmt: skip
CLASS_ALIASES = {
    "computer mouse": "mouse", "tv remote": "remote", "computer keyboard": "keyboard", "motorbike": "motorcycle",
    "aeroplane": "airplane", "sofa": "couch", "pottedplant": "potted plant", "diningtable": "dining table",
    "tvmonitor": "tv", "hair dryer": "hair drier", "donuts": "donut",
}  # fmt: skip


# ------------------------------------------------------------------------------------------
# the prompt set


def _with_article(word: str) -> str:
    return f"{'an' if word[0] in 'aeiou' else 'a'} {word}"


def _plural(label: str) -> str:
    return f"{label}es" if label.endswith(("s", "sh", "ch", "x")) else f"{label}s"


def generate_prompts(seed: int = 0, per_task: int = 100, classes: tuple[str, ...] = COCO_CLASSES) -> list[PromptSpec]:
    """GenEval's six tasks over ``classes``, drawn from ``seed``: one single-object prompt per
    class, and ``per_task`` prompts of each other task (counts 2-4; colours from :data:`COLOURS`;
    never a colour for "person", as GenEval), duplicates dropped, in task order."""
    rng = np.random.default_rng(seed)

    def pick(count: int) -> list[str]:
        return [classes[i] for i in rng.choice(len(classes), size=count, replace=False)]

    colourable = [label for label in classes if label != "person"]
    specs = [PromptSpec("single_object", f"a photo of {_with_article(label)}", (Include(label),)) for label in classes]
    for _ in range(per_task):
        a, b = pick(2)
        specs.append(PromptSpec("two_object", f"a photo of {_with_article(a)} and {_with_article(b)}", (Include(a), Include(b))))
    for _ in range(per_task):
        (label,), count = pick(1), int(rng.integers(2, 5))
        specs.append(PromptSpec("counting", f"a photo of {NUMBERS[count]} {_plural(label)}", (Include(label, count),),
                                (Exclude(label, count + 1),)))
    for _ in range(per_task):
        label, colour = colourable[rng.integers(len(colourable))], COLOURS[rng.integers(len(COLOURS))]
        specs.append(PromptSpec("colors", f"a photo of {_with_article(colour)} {label}", (Include(label, colour=colour),)))
    for _ in range(per_task):
        (a, b), relation = pick(2), RELATIONS[rng.integers(len(RELATIONS))]
        specs.append(PromptSpec("position", f"a photo of {_with_article(a)} {relation} {_with_article(b)}",
                                (Include(b), Include(a, position=(relation, 0)))))
    for _ in range(per_task):
        a, b = (colourable[i] for i in rng.choice(len(colourable), size=2, replace=False))
        ca, cb = (COLOURS[i] for i in rng.choice(len(COLOURS), size=2, replace=False))
        specs.append(PromptSpec("color_attr", f"a photo of {_with_article(ca)} {a} and {_with_article(cb)} {b}",
                                (Include(a, colour=ca), Include(b, colour=cb))))
    unique: dict[tuple[str, str], PromptSpec] = {}
    for spec in specs:
        unique.setdefault((spec.tag, spec.prompt), spec)
    return list(unique.values())


def training_prompts(seed: int = 1, per_task: int = 500, evaluation_seed: int = 0) -> list[str]:
    """Prompts to train on: :func:`generate_prompts` from ``seed``, without any prompt of the
    evaluation set (``evaluation_seed``, 100 per task), so training never sees a test prompt
    (every single-object prompt is one: those are left to the other tasks)."""
    held_out = {spec.prompt for spec in generate_prompts(evaluation_seed)}
    return list(dict.fromkeys(spec.prompt for spec in generate_prompts(seed, per_task) if spec.prompt not in held_out))


@functools.lru_cache(maxsize=8)
def _templates(classes: tuple[str, ...]) -> tuple[list[tuple[str, re.Pattern]], dict[str, str]]:
    """The generated prompts' templates as compiled patterns over ``classes``, most specific
    first, and each class's plural -> the class (built once per class list)."""
    label = "|".join(sorted((re.escape(c) for c in classes), key=len, reverse=True))
    colour = "|".join(COLOURS)
    article = r"an? "
    patterns = [
        ("color_attr", rf"a photo of {article}(?P<ca>{colour}) (?P<a>{label}) and {article}(?P<cb>{colour}) (?P<b>{label})"),
        ("position", rf"a photo of {article}(?P<a>{label}) (?P<rel>{'|'.join(RELATIONS)}) {article}(?P<b>{label})"),
        ("two_object", rf"a photo of {article}(?P<a>{label}) and {article}(?P<b>{label})"),
        ("counting", rf"a photo of (?P<n>{'|'.join(NUMBERS[2:])}) (?P<a>.+)"),
        ("colors", rf"a photo of {article}(?P<ca>{colour}) (?P<a>{label})"),
        ("single_object", rf"a photo of {article}(?P<a>{label})"),
    ]
    return [(tag, re.compile(pattern)) for tag, pattern in patterns], {_plural(c): c for c in classes}


def parse_prompt(prompt: str, classes: tuple[str, ...] = COCO_CLASSES) -> PromptSpec | None:
    """The spec of a prompt written in :func:`generate_prompts`' templates, or None."""
    patterns, singulars = _templates(tuple(classes))
    text = prompt.strip().lower()
    for tag, pattern in patterns:
        match = pattern.fullmatch(text)
        if match is None:
            continue
        found = match.groupdict()
        if tag == "counting":
            singular = singulars.get(found["a"])
            if singular is None:
                continue
            count = NUMBERS.index(found["n"])
            return PromptSpec(tag, prompt, (Include(singular, count),), (Exclude(singular, count + 1),))
        if tag == "color_attr":
            return PromptSpec(tag, prompt, (Include(found["a"], colour=found["ca"]), Include(found["b"], colour=found["cb"])))
        if tag == "position":
            return PromptSpec(tag, prompt, (Include(found["b"]), Include(found["a"], position=(found["rel"], 0))))
        if tag == "two_object":
            return PromptSpec(tag, prompt, (Include(found["a"]), Include(found["b"])))
        if tag == "colors":
            return PromptSpec(tag, prompt, (Include(found["a"], colour=found["ca"]),))
        return PromptSpec(tag, prompt, (Include(found["a"]),))
    return None


# ------------------------------------------------------------------------------------------
# the reward


def _unreadable(prompt: str) -> RewardError:
    return RewardError(f"geneval: no metadata for {prompt!r}, and it is not in the generated prompts' templates; "
                       "give metadata=<GenEval's evaluation_metadata.jsonl>")


def _iou(a: tuple[float, ...], b: tuple[float, ...]) -> float:
    width = max(0.0, min(a[2], b[2]) - max(a[0], b[0]))
    height = max(0.0, min(a[3], b[3]) - max(a[1], b[1]))
    inter = width * height
    union = (a[2] - a[0]) * (a[3] - a[1]) + (b[2] - b[0]) * (b[3] - b[1]) - inter
    return inter / union if union > 0 else 0.0


@register_reward("geneval")
class GenEval(BatchedReward):
    """GenEval's verdict on each image (module docstring): 1 / 0 (``mode: strict``, GenEval's) or
    the fraction of the prompt's checks that hold (``mode: graded``).

    Options: ``metadata`` (GenEval's ``evaluation_metadata.jsonl``; None: prompts are parsed from
    :func:`generate_prompts`' templates), ``detector`` (hub id or folder of a transformers
    Mask2Former instance-segmentation model with its image processor), ``detector_size`` (the
    short side the detector sees; None: its processor's), ``clip`` (the colour classifier's
    options, as ``clip_score``'s: ``model_name`` + ``pretrained``, default ViT-L-14 / openai, or
    ``model``: a transformers CLIP), ``threshold``, ``counting_threshold``, ``max_objects``,
    ``max_overlap``, ``position_threshold``, ``mode``, ``device``, ``dtype``, ``batch_size``.
    """

    def __init__(
        self,
        metadata: str | None = None,
        detector: str = DEFAULT_DETECTOR,
        detector_size: int | None = None,
        clip: dict[str, Any] | None = None,
        threshold: float = 0.3,
        counting_threshold: float = 0.9,
        max_objects: int = 16,
        max_overlap: float = 1.0,
        position_threshold: float = POSITION_THRESHOLD,
        mode: str = "strict",
        batch_size: int = 8,
        device: str | torch.device | None = None,
        dtype: str | torch.dtype | None = None,
    ) -> None:
        super().__init__(batch_size=batch_size)
        from transformers import AutoImageProcessor, AutoModelForUniversalSegmentation

        from reward_models.clip_score import ClipScore

        try:
            import scipy  # noqa: F401 - transformers' Mask2Former needs it to build
        except ImportError as err:
            raise RewardConfigError(f"{self.name} needs scipy for the Mask2Former detector: pip install "
                                    "'align-gen[geneval]'") from err
        if mode not in ("strict", "graded"):
            raise RewardConfigError(f"{self.name}: unknown mode {mode!r}; valid: strict, graded")
        for option, value in (("threshold", threshold), ("counting_threshold", counting_threshold),
                              ("max_overlap", max_overlap)):
            if not isinstance(value, int | float) or not 0 <= value <= 1:
                raise RewardConfigError(f"{self.name}: {option} must be in [0, 1], got {value!r}")
        if not isinstance(max_objects, int) or max_objects < 1:
            raise RewardConfigError(f"{self.name}: max_objects must be a positive int, got {max_objects!r}")
        self.mode, self.max_objects, self.max_overlap = mode, max_objects, max_overlap
        self.threshold, self.counting_threshold, self.position_threshold = threshold, counting_threshold, position_threshold
        self.specs = {spec.prompt: spec for spec in read_geneval_metadata(metadata)} if metadata else {}
        self.device, self.dtype = resolve_placement(device, dtype, self.name)
        source, local = resolve_source(detector, self.name, "detector", "mask2former")
        fix = f"set reward.options.{self.name}.detector=/path/to/folder or a hub id"
        self.processor = load_pretrained(AutoImageProcessor, source, local, what=f"{self.name}: detector", fix=fix)
        if detector_size is not None:
            self.processor.size = {"shortest_edge": int(detector_size), "longest_edge": int(detector_size) * 2}
        model = load_pretrained(AutoModelForUniversalSegmentation, source, local, what=f"{self.name}: detector", fix=fix,
                                **{dtype_keyword(): self.dtype})
        self.detector = model.to(self.device).eval().requires_grad_(False)
        self.labels = [str(self.detector.config.id2label[i]) for i in range(len(self.detector.config.id2label))]
        for spec in self.specs.values():
            self.check_labels(spec)
        self.colour_encoder = ClipScore(**{"device": device, **(clip or {})}).encoder
        self.colour_classifiers: dict[str, torch.Tensor] = {}

    @classmethod
    def check_prompts(cls, prompts: list, metadata: str | None = None, **options: Any) -> None:
        """A ``RewardError`` naming the first prompt with no metadata record that is not in the
        generated prompts' templates either (over COCO's classes), before the detector loads."""
        known = {spec.prompt for spec in read_geneval_metadata(metadata)} if metadata else set()
        for prompt in prompts:
            if str(prompt) not in known and parse_prompt(str(prompt)) is None:
                raise _unreadable(str(prompt))

    def check_labels(self, spec: PromptSpec) -> None:
        unknown = sorted({c.label for c in (*spec.include, *spec.exclude)} - set(self.labels) - set(CLASS_ALIASES))
        if unknown:
            raise RewardConfigError(f"{self.name}: {spec.prompt!r} names classes the detector lacks: {', '.join(unknown)}")

    def spec(self, prompt: Prompt) -> PromptSpec:
        """What ``prompt`` asks for: its metadata record, or its parse (classes aliased to the
        detector's labels)."""
        text = str(prompt)
        spec = self.specs.get(text) or parse_prompt(text, tuple(self.labels))
        if spec is None:
            raise _unreadable(text)
        alias = CLASS_ALIASES.get
        return PromptSpec(spec.tag, spec.prompt,
                          tuple(Include(alias(c.label, c.label), c.count, c.colour, c.size, c.position) for c in spec.include),
                          tuple(Exclude(alias(c.label, c.label), c.count) for c in spec.exclude))

    @torch.no_grad()
    def detect(self, images: torch.Tensor, thresholds: list[float]) -> list[list[tuple[str, tuple[float, ...], torch.Tensor]]]:
        """Per image, (label, box, mask) of the instances GenEval keeps, most confident first
        within each class (module docstring); boxes in pixels (x0, y0, x1, y1), exclusive ends."""
        pixels = [image.detach().float().clamp(0, 1).mul(255).round().to(torch.uint8).permute(1, 2, 0).cpu().numpy()
                  for image in images]
        inputs = self.processor(images=pixels, return_tensors="pt")
        inputs = {key: value.to(self.device) for key, value in inputs.items()}
        inputs["pixel_values"] = inputs["pixel_values"].to(self.dtype)
        outputs = self.detector(**inputs)
        sizes = [tuple(image.shape[-2:]) for image in images]
        results = self.processor.post_process_instance_segmentation(
            outputs, threshold=min(thresholds), target_sizes=sizes, return_binary_maps=True
        )
        found = []
        for result, threshold in zip(results, thresholds, strict=True):
            masks = result["segmentation"]
            by_label: dict[str, list[tuple[float, tuple[float, ...], torch.Tensor]]] = {}
            for index, info in enumerate(result["segments_info"]):
                mask = masks[index].bool()
                if info["score"] < threshold or not mask.any():
                    continue
                rows, cols = torch.nonzero(mask, as_tuple=True)
                box = (float(cols.min()), float(rows.min()), float(cols.max()) + 1, float(rows.max()) + 1)
                by_label.setdefault(self.labels[info["label_id"]], []).append((info["score"], box, mask))
            kept = []
            for label, candidates in by_label.items():
                candidates.sort(key=lambda item: -item[0])
                chosen: list[tuple[float, tuple[float, ...], torch.Tensor]] = []
                for candidate in candidates[: self.max_objects]:
                    if self.max_overlap >= 1 or all(_iou(candidate[1], other[1]) < self.max_overlap for other in chosen):
                        chosen.append(candidate)
                kept += [(label, box, mask) for _, box, mask in chosen]
            found.append(kept)
        return found

    def colour_classifier(self, label: str) -> torch.Tensor:
        """(colours, D) normalised text embeddings of :data:`COLOURS` for objects of ``label``."""
        if label not in self.colour_classifiers:
            rows = []
            for colour in COLOURS:
                embedded = self.colour_encoder.encode_texts([t.format(colour=colour, label=label) for t in COLOUR_TEMPLATES])
                mean = embedded.float().mean(dim=0)
                rows.append(mean / mean.norm())
            self.colour_classifiers[label] = torch.stack(rows)
        return self.colour_classifiers[label]

    def colours(self, image: torch.Tensor, objects: list[tuple[str, tuple[float, ...], torch.Tensor]]) -> list[str]:
        """GenEval's colour of each object: its masked crop on grey, classified zero-shot."""
        names = []
        for label, box, mask in objects:
            pasted = torch.where(mask.to(image.device), image, torch.full_like(image, CROP_BACKGROUND))
            x0, y0, x1, y1 = (int(v) for v in box)
            crop = pasted[:, y0:y1, x0:x1].unsqueeze(0)
            features = self.colour_encoder.encode_images(crop).float()
            features = features / features.norm(dim=-1, keepdim=True)
            names.append(COLOURS[int((features @ self.colour_classifier(label).to(features.device).T).argmax())])
        return names

    def score_chunk(self, images: torch.Tensor, prompts: list[Prompt]) -> torch.Tensor:
        specs = [self.spec(prompt) for prompt in prompts]
        thresholds = [self.counting_threshold if spec.tag == "counting" else self.threshold for spec in specs]
        scores = []
        for image, spec, objects in zip(images, specs, self.detect(images, thresholds), strict=True):
            coloured = {c.label for c in spec.include if c.colour is not None}
            asked = [index for index, (label, _, _) in enumerate(objects) if label in coloured]
            colour_of = dict(zip(asked, self.colours(image, [objects[i] for i in asked]), strict=True))
            detections = [Detection(label, box, colour_of.get(index)) for index, (label, box, _) in enumerate(objects)]
            verdict = judge(spec, detections, position_threshold=self.position_threshold)
            scores.append(float(verdict.correct) if self.mode == "strict" else verdict.graded)
        return torch.tensor(scores, dtype=torch.float32, device=images.device)


def geneval_task_prompts(metadata: str | Path | None = None, seed: int = 0, per_task: int = 100) -> dict[str, list[str]]:
    """Each task's prompts: from GenEval's metadata file, or :func:`generate_prompts`."""
    specs = read_geneval_metadata(metadata) if metadata else generate_prompts(seed, per_task)
    prompts: dict[str, list[str]] = {}
    for spec in specs:
        prompts.setdefault(spec.tag, []).append(spec.prompt)
    return prompts
