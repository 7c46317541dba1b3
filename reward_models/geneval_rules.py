"""GenEval's scoring rules: what a prompt asks for, and whether an image's detections satisfy it.

GenEval (Ghosh et al. 2023, github.com/djghosh13/geneval) describes each prompt by metadata, one
JSON object per line of its ``evaluation_metadata.jsonl``::

    {"tag": "position", "prompt": "a photo of a dog right of a cup",
     "include": [{"class": "cup", "count": 1},
                 {"class": "dog", "count": 1, "position": ["right of", 0]}]}

and judges an image from its detections (class, box, and a colour for the objects whose colour
is asked), with these rules, which :func:`judge` follows:

- ``include`` clauses are ANDed. A clause takes the first ``count`` detections of its class
  (detections are ordered most confident first); fewer than ``count`` fails it. With a
  ``color``, at least ``count`` of those must have that colour. With a ``position`` ``[relation,
  i]``, each of them must stand in ``relation`` to each object taken by include clause ``i``
  (:func:`relative_position`), and the clause fails when clause ``i`` failed.
- ``exclude`` clauses fail the image when ``count`` or more objects of their class were detected
  (counting: "three cups" also excludes four).
- An image is correct when every clause holds. A task's score is the fraction of its images that
  are correct; the overall score is the mean of the task scores.

Two extensions, both off in GenEval's own metadata: an include clause may ask for a ``size``
(a detection's ``size`` attribute), and ``colour_first=True`` takes the detections of the class
that have the asked colour before the others (the first ``count`` of the class, those of the
colour first, rather than the most confident ones), then checks colours as GenEval does. The tiny
world uses it: its checker reads colours exactly, and its prompts name two shapes of one kind in
two colours ("a red circle left of a blue circle"), which GenEval's prompts never do.

Graded score (:attr:`Verdict.graded`): the fraction of the prompt's checks that hold, where each
include clause has one check for being present and one for each attribute it asks for (colour,
size, position; each fails with the clause's presence), and each exclude clause is one check. It
is 1 exactly when the image is correct.
"""

from __future__ import annotations

import dataclasses
import json
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from reward_models.errors import RewardConfigError

RELATIONS = ("left of", "right of", "above", "below")
POSITION_THRESHOLD = 0.1  # GenEval's default: the offset must exceed 0.1 x the two box sizes


@dataclasses.dataclass(frozen=True)
class Detection:
    """One detected object: its ``label`` (class), ``box`` (x0, y0, x1, y1; any units, the
    same for every detection of an image), and the attributes read from it (None when not read)."""

    label: str
    box: tuple[float, float, float, float]
    colour: str | None = None
    size: str | None = None


@dataclasses.dataclass(frozen=True)
class Include:
    """``count`` objects of ``label``, optionally of a colour and size, optionally standing in
    ``position[0]`` to the objects of include clause ``position[1]``."""

    label: str
    count: int = 1
    colour: str | None = None
    size: str | None = None
    position: tuple[str, int] | None = None


@dataclasses.dataclass(frozen=True)
class Exclude:
    """Fewer than ``count`` objects of ``label``."""

    label: str
    count: int


@dataclasses.dataclass(frozen=True)
class PromptSpec:
    """What one prompt asks for: its task ``tag``, the ``prompt`` text and its clauses."""

    tag: str
    prompt: str
    include: tuple[Include, ...]
    exclude: tuple[Exclude, ...] = ()

    def __post_init__(self) -> None:
        for index, clause in enumerate(self.include):
            if clause.count < 1:
                raise RewardConfigError(f"{self.prompt!r}: include clause {index} asks for count {clause.count}; use 1 or more")
            if clause.position is not None:
                relation, target = clause.position
                if relation not in RELATIONS:
                    raise RewardConfigError(f"{self.prompt!r}: unknown relation {relation!r}; valid: {', '.join(RELATIONS)}")
                if not 0 <= target < index:
                    raise RewardConfigError(
                        f"{self.prompt!r}: include clause {index} is positioned against clause {target}, "
                        "which must come before it"
                    )

    @property
    def checks(self) -> int:
        """How many checks the graded score counts (module docstring)."""
        attributes = sum((c.colour is not None) + (c.size is not None) + (c.position is not None) for c in self.include)
        return len(self.include) + attributes + len(self.exclude)

    @classmethod
    def from_geneval(cls, record: dict[str, Any]) -> PromptSpec:
        """A spec from one line of GenEval's ``evaluation_metadata.jsonl`` (its keys: ``tag``,
        ``prompt``, ``include`` of ``class``, ``count``, ``color``, ``position``; ``exclude``)."""
        try:
            include = tuple(
                Include(
                    label=str(c["class"]),
                    count=int(c.get("count", 1)),
                    colour=c.get("color"),
                    size=c.get("size"),
                    position=None if c.get("position") is None else (str(c["position"][0]), int(c["position"][1])),
                )
                for c in record["include"]
            )
            exclude = tuple(Exclude(str(c["class"]), int(c["count"])) for c in record.get("exclude", []))
            return cls(str(record["tag"]), str(record["prompt"]), include, exclude)
        except (KeyError, TypeError, ValueError, IndexError) as err:
            raise RewardConfigError(f"not a GenEval metadata record ({err!r}): {json.dumps(record)[:200]}") from err


def read_geneval_metadata(path: str | Path) -> list[PromptSpec]:
    """Every spec of a GenEval ``evaluation_metadata.jsonl`` file, in its order."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise RewardConfigError(f"GenEval metadata file not found: {path}")
    specs = []
    for number, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            record = json.loads(line)
        except json.JSONDecodeError as err:
            raise RewardConfigError(f"{path}:{number}: not JSON ({err.msg})") from err
        specs.append(PromptSpec.from_geneval(record))
    if not specs:
        raise RewardConfigError(f"{path} holds no metadata records")
    return specs


def relative_position(a: Detection, b: Detection, threshold: float = POSITION_THRESHOLD) -> set[str]:
    """Where ``a`` is relative to ``b`` (a subset of RELATIONS), GenEval's rule: the offset of
    the box centres, each axis shrunk toward 0 by ``threshold`` x (the two boxes' sizes on that
    axis), then divided by the offset's length; a relation holds where that exceeds 0.5 (so a
    diagonal offset can be both "left of" and "above"; overlapping centres are neither)."""
    (ax0, ay0, ax1, ay1), (bx0, by0, bx1, by1) = a.box, b.box
    offset = ((ax0 + ax1 - bx0 - bx1) / 2, (ay0 + ay1 - by0 - by1) / 2)
    sizes = ((ax1 - ax0) + (bx1 - bx0), (ay1 - ay0) + (by1 - by0))
    revised = [max(abs(o) - threshold * s, 0.0) * (1 if o > 0 else -1 if o < 0 else 0) for o, s in zip(offset, sizes, strict=True)]
    if all(abs(r) < 1e-3 for r in revised):
        return set()
    length = (offset[0] ** 2 + offset[1] ** 2) ** 0.5
    dx, dy = revised[0] / length, revised[1] / length
    found = set()
    if dx < -0.5:
        found.add("left of")
    if dx > 0.5:
        found.add("right of")
    if dy < -0.5:
        found.add("above")
    if dy > 0.5:
        found.add("below")
    return found


@dataclasses.dataclass(frozen=True)
class Verdict:
    """One image judged against one spec: ``correct`` (every clause holds), ``passed`` of
    ``checks`` checks (the graded score's parts) and why it failed (empty when correct)."""

    correct: bool
    passed: int
    checks: int
    reasons: tuple[str, ...]

    @property
    def graded(self) -> float:
        return self.passed / self.checks if self.checks else 1.0


def judge(
    spec: PromptSpec,
    detections: Sequence[Detection],
    *,
    colour_first: bool = False,
    position_threshold: float = POSITION_THRESHOLD,
) -> Verdict:
    """Whether ``detections`` (most confident first) satisfy ``spec``, by the rules of the module
    docstring."""
    reasons: list[str] = []
    passed = 0
    groups: list[list[Detection] | None] = []
    for clause in spec.include:
        candidates = [d for d in detections if d.label == clause.label]
        if colour_first and clause.colour is not None:
            candidates.sort(key=lambda d: d.colour != clause.colour)  # stable: the asked colour first
        taken = candidates[: clause.count]
        if len(taken) < clause.count:
            reasons.append(f"expected {clause.label} >= {clause.count}, found {len(taken)}")
            groups.append(None)
            continue
        passed += 1
        matched = True
        if clause.colour is not None:
            right = sum(d.colour == clause.colour for d in taken)
            if right >= clause.count:
                passed += 1
            else:
                matched = False
                found = ", ".join(str(d.colour) for d in taken)
                reasons.append(f"expected {clause.colour} {clause.label} >= {clause.count}, found {found}")
        if clause.size is not None:
            if all(d.size == clause.size for d in taken):
                passed += 1
            else:
                matched = False
                reasons.append(f"expected {clause.size} {clause.label}, found {', '.join(str(d.size) for d in taken)}")
        if clause.position is not None:
            relation, target = clause.position
            targets = groups[target]
            if targets is None:
                matched = False
                reasons.append(f"no target for {clause.label} to be {relation}")
            else:
                wrong = [
                    relative_position(d, t, position_threshold) for d in taken for t in targets
                    if relation not in relative_position(d, t, position_threshold)
                ]
                if wrong:
                    matched = False
                    reasons.append(f"expected {clause.label} {relation} target, found {' and '.join(sorted(wrong[0])) or 'no relation'}")
                else:
                    passed += 1
        groups.append(taken if matched else None)
    for clause in spec.exclude:
        found = sum(d.label == clause.label for d in detections)
        if found >= clause.count:
            reasons.append(f"expected {clause.label} < {clause.count}, found {found}")
        else:
            passed += 1
    return Verdict(correct=not reasons, passed=passed, checks=spec.checks, reasons=tuple(reasons))
