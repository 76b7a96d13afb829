"""Captions of synthetic scenes and their hard negatives: the dense, method-neutral text the
tower's contrastive stage and the decoder's alignment and instruction stages learn from.

A caption says how many objects there are, how many of each shape and of each colour, then
every object's size, colour, shape and place, in reading order (by place, top row first, left to
right within a row, then by mask centroid):

    "three objects : two circles , one star ; two red , one blue . a large red circle at the
     top left , a small red circle at the bottom , a small blue star in the middle ."

A place is the 3 x 3 cell of the centroid, with the middle band as wide as the margin position
questions leave out (``scenes.POSITION_MARGIN_PX`` either side of the centre line), so a caption
never contradicts a position answer. Captions are a pure function of the objects.

A hard negative changes the scene the caption describes in one way and is rendered by the same
rule: two objects trade their colour, shape, size or place (the counts stay true: only binding
tells them apart), or one object takes another colour, shape, size or place. Seven of them per
caption make the "true caption among 8" retrieval test and the contrastive stage's extra negatives.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from itertools import combinations

import numpy as np

from . import scenes

PROMPT = "describe the image ."
ROWS = ("top", "middle", "bottom")
COLUMNS = ("left", "middle", "right")
WORDS = ("describe", "image", "small", "large", "middle", "in", "objects", "object", ":", ";", ",", ".")


@dataclass(frozen=True)
class Described:
    """What a caption says about one object."""

    size: str
    colour: str
    shape: str
    row: int  # index into ROWS
    column: int  # index into COLUMNS


def cell(x: float, y: float) -> tuple[int, int]:
    """(row, column) of a point: 0 / 1 / 2 for top / middle / bottom and left / middle / right."""
    low, high = scenes.IMAGE_SIZE / 2 - scenes.POSITION_MARGIN_PX, scenes.IMAGE_SIZE / 2 + scenes.POSITION_MARGIN_PX
    band = lambda v: 0 if v <= low else 2 if v >= high else 1  # noqa: E731
    return band(y), band(x)


def describe(objects: list[scenes.SceneObject]) -> list[Described]:
    """The objects in reading order: by cell (rows top to bottom, columns left to right), then by
    centroid (top to bottom, then left to right)."""
    ordered = sorted(objects, key=lambda o: (cell(*o.centroid), o.centroid[::-1]))
    return [Described(o.size, o.colour, o.shape, *cell(*o.centroid)) for o in ordered]


def place(d: Described) -> str:
    row, column = ROWS[d.row], COLUMNS[d.column]
    if row == column == "middle":
        return "in the middle"
    if column == "middle":
        return f"at the {row}"
    if row == "middle":
        return f"on the {column}"
    return f"at the {row} {column}"


def count_phrase(n: int, singular: str, plural: str) -> str:
    return f"{scenes.COUNT_WORDS[n - 1]} {singular if n == 1 else plural}"


def render(described: list[Described]) -> str:
    """The caption of a description; objects are listed by cell (a stable sort, so objects that
    share a cell keep their order), so a variant that moves an object lists it where it now is."""
    described = sorted(described, key=lambda d: (d.row, d.column))
    shapes = [count_phrase(sum(d.shape == s for d in described), s, scenes.PLURALS[s])
              for s in scenes.SHAPES if any(d.shape == s for d in described)]
    colours = [f"{scenes.COUNT_WORDS[sum(d.colour == c for d in described) - 1]} {c}"
               for c in scenes.COLOURS if any(d.colour == c for d in described)]
    items = [f"a {d.size} {d.colour} {d.shape} {place(d)}" for d in described]
    return (f"{count_phrase(len(described), 'object', 'objects')} : {' , '.join(shapes)} ; "
            f"{' , '.join(colours)} . {' , '.join(items)} .")


def caption(objects: list[scenes.SceneObject]) -> str:
    return render(describe(objects))


def as_caption(sample: scenes.Sample) -> scenes.Sample:
    """The same scene asked for its caption: the question is ``PROMPT``, every object is queried."""
    return replace(sample, question=PROMPT, answer=caption(sample.objects), kind="caption",
                   query=list(range(len(sample.objects))))


def vocabulary() -> list[str]:
    """The scenes' question and answer words, then the words only captions use."""
    return list(dict.fromkeys([*scenes.vocabulary(), *WORDS]))


def _variants(described: list[Described]):
    """Every one-change variant of a scene description: trades between two objects, then
    single-object changes."""
    for i, j in combinations(range(len(described)), 2):
        a, b = described[i], described[j]
        for attr in ("colour", "shape", "size"):
            if getattr(a, attr) != getattr(b, attr):
                yield _with(described, {i: replace(a, **{attr: getattr(b, attr)}),
                                        j: replace(b, **{attr: getattr(a, attr)})})
        if (a.row, a.column) != (b.row, b.column):
            yield _with(described, {i: replace(a, row=b.row, column=b.column),
                                    j: replace(b, row=a.row, column=a.column)})
    options = {"colour": list(scenes.COLOURS), "shape": list(scenes.SHAPES), "size": list(scenes.SIZES_PX)}
    for i, d in enumerate(described):
        for attr, values in options.items():
            for value in values:
                if value != getattr(d, attr):
                    yield _with(described, {i: replace(d, **{attr: value})})
        for row in range(3):
            for column in range(3):
                if (row, column) != (d.row, d.column):
                    yield _with(described, {i: replace(d, row=row, column=column)})


def _with(described: list[Described], changes: dict[int, Described]) -> list[Described]:
    return [changes.get(i, d) for i, d in enumerate(described)]


def hard_negatives(objects: list[scenes.SceneObject], rng: np.random.Generator, n: int = 7) -> list[str]:
    """``n`` distinct captions of one-change variants of the scene, none equal to its caption.
    Trades (which keep every count true) are taken first, up to half of ``n``, when the scene has
    any; the rest are drawn from every variant. Fewer than ``n`` only if the scene has fewer."""
    described = describe(objects)
    positive = render(described)
    trades, singles = [], []
    for variant in _variants(described):
        text = render(variant)
        changed = sum(v != d for v, d in zip(variant, described))
        if text != positive:
            (trades if changed == 2 else singles).append(text)
    trades, singles = list(dict.fromkeys(trades)), [t for t in dict.fromkeys(singles) if t not in trades]
    chosen = [trades[k] for k in rng.permutation(len(trades))[: (n + 1) // 2]]
    rest = [t for t in trades + singles if t not in chosen]
    return chosen + [rest[k] for k in rng.permutation(len(rest))[: n - len(chosen)]]
