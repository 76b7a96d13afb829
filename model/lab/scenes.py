"""Synthetic scenes VQA (SPEC §7): the data the shipped tiny LLaVA is trained and evaluated on.

A scene is a 336x336 RGB image: a background (flat, gradient, noise, or a crop of one of
scikit-image's bundled grey texture photos) and 1-6 non-overlapping objects, each a shape x colour
x size with its exact boolean mask. Backgrounds are desaturated and object colours saturated, so
a colour word names exactly one object colour. Each sample asks one templated question with a
one-word answer:

- colour:   "what color is the {shape} ?" -> a colour; asked when that shape occurs once.
- shape:    "what shape is the {colour} object ?" -> a shape; asked when that colour occurs once.
- count:    "how many {shape}s are there ?" / "how many {colour} objects are there ?" -> "one".."six";
            asked about a shape or colour that is present.
- exist:    "is there a {colour} {shape} ?" -> yes / no, balanced.
- position: "is the {colour} {shape} on the left or right ?" / "... at the top or bottom ?" -> left,
            right, top or bottom; asked when the pair is unique and its mask centroid lies at least
            POSITION_MARGIN_PX off the image's centre line.

Counts are answered as words ("one".."six") so every answer is one word-level token. A "no"
existence question changes one attribute of an object that is present, so it cannot be answered
from colours or shapes alone. `query` lists the objects a question is about (empty for a "no"):
their union mask is what the query-recall metric checks.

Reproducibility: sample `index` of a split is a pure function of (seed, split, index, max_objects,
kind); numpy's SeedSequence of the first four drives everything. `max_objects` < 6 only serves
the trainer's curriculum and `kind` its extra count questions; validation and test use the full
1-6 range and the drawn kind. The test split is never trained on.
"""

from __future__ import annotations

from dataclasses import dataclass
from functools import lru_cache

import numpy as np
from PIL import Image, ImageDraw

IMAGE_SIZE = 336
PATCH_SIZE = 14
COLOURS = {  # name -> RGB; saturated, far apart, none grey
    "red": (215, 35, 35),
    "green": (35, 165, 55),
    "blue": (40, 75, 225),
    "yellow": (240, 215, 30),
    "purple": (145, 55, 195),
    "orange": (245, 130, 20),
}
# Four shapes whose edge orientations differ (axis-aligned, +-60 deg, spiky, smooth): a cross or a
# diamond shares its edge directions with the square or the triangle, and a tiny ViT trained from
# scratch on one CPU core did not separate six shapes within thousands of steps.
SHAPES = ("circle", "square", "triangle", "star")
PLURALS = {"circle": "circles", "square": "squares", "triangle": "triangles", "star": "stars"}
SIZES_PX = {"small": (18, 26), "large": (28, 40)}  # radius of the circle the shape fits in
COUNT_WORDS = ("one", "two", "three", "four", "five", "six")
CHOICE_WORDS = ("left", "right", "top", "bottom")  # the answers a position question offers
KINDS = ("colour", "shape", "count", "exist", "position")
BACKGROUNDS = ("flat", "gradient", "noise", "texture")
TEXTURES = ("grass", "gravel", "brick", "camera", "moon")  # bundled with scikit-image, no download
SPLITS = {"train": 0, "val": 1, "test": 2}
MAX_OBJECTS = 6
POSITION_MARGIN_PX = 24
GAP_PX = 6  # minimum free space between two objects' bounding circles
COLOUR_JITTER = 15  # +- per channel, so colours are bands rather than exact values
TEMPLATE_WORDS = ("what color is the shape object how many are there a on left or right at top bottom "
                  "yes no objects ?").split()


@dataclass
class SceneObject:
    shape: str
    colour: str
    size: str  # "small" or "large"
    radius_px: float
    centre: tuple[float, float]  # (x, y) the shape was drawn around
    mask: np.ndarray  # (H, W) bool, exactly the painted pixels

    @property
    def centroid(self) -> tuple[float, float]:
        """(x, y) of the mask's centre of mass: what position answers are judged by."""
        ys, xs = np.nonzero(self.mask)
        return float(xs.mean()), float(ys.mean())

    def centre_patch(self, patch: int = PATCH_SIZE) -> int:
        """Index (row-major in the patch grid) of the patch holding the mask's centroid: one
        patch per object, what counting can count."""
        x, y = self.centroid
        return int(y) // patch * (IMAGE_SIZE // patch) + int(x) // patch


@dataclass
class Sample:
    image: Image.Image
    question: str
    answer: str
    kind: str
    query: list[int]  # indices into objects of the objects the question is about
    objects: list[SceneObject]

    @property
    def query_mask(self) -> np.ndarray:
        mask = np.zeros((self.image.height, self.image.width), dtype=bool)
        for i in self.query:
            mask |= self.objects[i].mask
        return mask


def vocabulary() -> list[str]:
    """Every word a question or answer can contain (for the word-level tokenizer)."""
    words = [*TEMPLATE_WORDS, *COLOURS, *SHAPES, *PLURALS.values(), *COUNT_WORDS]
    return list(dict.fromkeys(words))


def object_words() -> list[str]:
    """The words that name an object's attributes in a question: colours and shapes (singular and plural)."""
    return [*COLOURS, *SHAPES, *PLURALS.values()]


def sample(seed: int, split: str, index: int, max_objects: int = MAX_OBJECTS, kind: str | None = None) -> Sample:
    """Sample `index` of `split`: a pure function of its arguments. `kind` forces the question kind
    (None draws it); the scene is the same either way, and a kind the scene cannot ask raises."""
    if split not in SPLITS:
        raise ValueError(f"unknown split {split!r}; expected one of {list(SPLITS)}")
    if not 1 <= max_objects <= MAX_OBJECTS:
        raise ValueError(f"max_objects must be in 1..{MAX_OBJECTS}")
    if kind is not None and kind not in KINDS:
        raise ValueError(f"unknown question kind {kind!r}; expected one of {list(KINDS)}")
    rng = np.random.default_rng([seed, SPLITS[split], index, max_objects])
    background = _background(rng)
    objects = _place_objects(rng, int(rng.integers(1, max_objects + 1)))
    pixels = background
    for obj in objects:
        jitter = rng.integers(-COLOUR_JITTER, COLOUR_JITTER + 1, 3)
        pixels[obj.mask] = np.clip(np.array(COLOURS[obj.colour]) + jitter, 0, 255)
    kind, question, answer, query = _question(rng, objects, kind)
    return Sample(Image.fromarray(pixels), question, answer, kind, query, objects)


# ----------------------------------------------------------------------------- backgrounds
def _muted_rgb(rng: np.random.Generator) -> np.ndarray:
    """A grey with a faint tint: never mistaken for an object colour."""
    return rng.uniform(50, 205) + rng.uniform(-12, 12, 3)


@lru_cache(maxsize=None)
def _texture(name: str) -> np.ndarray:
    import skimage.data

    return getattr(skimage.data, name)().astype(np.float32)


def _background(rng: np.random.Generator) -> np.ndarray:
    kind = BACKGROUNDS[rng.integers(len(BACKGROUNDS))]
    size = IMAGE_SIZE
    if kind == "flat":
        image = np.broadcast_to(_muted_rgb(rng), (size, size, 3))
    elif kind == "gradient":
        start, end = _muted_rgb(rng), _muted_rgb(rng)
        angle = rng.uniform(0, 2 * np.pi)
        ys, xs = np.mgrid[0:size, 0:size] / (size - 1)
        t = (np.cos(angle) * xs + np.sin(angle) * ys)
        t = (t - t.min()) / (t.max() - t.min())
        image = start + t[..., None] * (end - start)
    elif kind == "noise":
        image = _muted_rgb(rng) + rng.normal(0, rng.uniform(8, 30), (size, size, 1))
    else:
        photo = _texture(TEXTURES[rng.integers(len(TEXTURES))])
        y0, x0 = (int(rng.integers(0, photo.shape[i] - size + 1)) for i in (0, 1))
        crop = photo[y0:y0 + size, x0:x0 + size]
        low = rng.uniform(30, 110)
        crop = low + (crop - crop.min()) / max(1.0, float(np.ptp(crop))) * rng.uniform(60, 200 - low)
        image = crop[..., None] + rng.uniform(-12, 12, 3)
    return np.clip(image, 0, 255).astype(np.uint8).copy()


# ----------------------------------------------------------------------------- objects
def _outline(shape: str, cx: float, cy: float, r: float) -> list[tuple[float, float]] | None:
    """Polygon of a shape inscribed in the circle (cx, cy, r); None for the circle itself."""
    def polar(radii, start_deg):
        angles = np.deg2rad(start_deg + np.arange(len(radii)) * 360 / len(radii))
        return [(cx + q * np.cos(a), cy + q * np.sin(a)) for q, a in zip(radii, angles)]

    if shape == "circle":
        return None
    if shape == "square":
        h = 0.7 * r
        return [(cx - h, cy - h), (cx + h, cy - h), (cx + h, cy + h), (cx - h, cy + h)]
    if shape == "triangle":
        return polar([r] * 3, -90)
    if shape == "star":
        return polar([r, 0.45 * r] * 5, -90)
    raise ValueError(f"unknown shape {shape!r}")


def draw_mask(shape: str, cx: float, cy: float, r: float, size: int = IMAGE_SIZE) -> np.ndarray:
    canvas = Image.new("L", (size, size), 0)
    draw = ImageDraw.Draw(canvas)
    polygon = _outline(shape, cx, cy, r)
    if polygon is None:
        draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
    else:
        draw.polygon(polygon, fill=255)
    return np.asarray(canvas) > 0


def _place_objects(rng: np.random.Generator, n: int) -> list[SceneObject]:
    """n non-overlapping objects (fewer only if 200 placement tries cannot fit them)."""
    objects: list[SceneObject] = []
    for _ in range(200):
        if len(objects) == n:
            break
        size = ("small", "large")[rng.integers(2)]
        r = float(rng.uniform(*SIZES_PX[size]))
        cx, cy = rng.uniform(r + 2, IMAGE_SIZE - r - 2, 2)
        if any(np.hypot(cx - o.centre[0], cy - o.centre[1]) < r + o.radius_px + GAP_PX for o in objects):
            continue
        shape = SHAPES[rng.integers(len(SHAPES))]
        colour = list(COLOURS)[rng.integers(len(COLOURS))]
        mask = draw_mask(shape, cx, cy, r)
        objects.append(SceneObject(shape, colour, size, r, (float(cx), float(cy)), mask))
    return objects


# ----------------------------------------------------------------------------- questions
def _question(rng: np.random.Generator, objects: list[SceneObject], kind: str | None = None):
    """(kind, question, answer, query) for `kind`, or for a kind chosen uniformly among those this
    scene allows."""
    if kind is not None:
        made = QUESTION_MAKERS[kind](rng, objects)
        if made is None:
            raise ValueError(f"this scene cannot ask a {kind} question")
        return (kind, *made)
    for k in rng.permutation(len(KINDS)):
        kind = KINDS[k]
        made = QUESTION_MAKERS[kind](rng, objects)
        if made is not None:
            return (kind, *made)
    raise AssertionError("existence questions are always possible")


def _colour_question(rng, objects):
    unique = [i for i, o in enumerate(objects) if sum(p.shape == o.shape for p in objects) == 1]
    if not unique:
        return None
    i = unique[rng.integers(len(unique))]
    return f"what color is the {objects[i].shape} ?", objects[i].colour, [i]


def _shape_question(rng, objects):
    unique = [i for i, o in enumerate(objects) if sum(p.colour == o.colour for p in objects) == 1]
    if not unique:
        return None
    i = unique[rng.integers(len(unique))]
    return f"what shape is the {objects[i].colour} object ?", objects[i].shape, [i]


def _count_question(rng, objects):
    anchor = objects[rng.integers(len(objects))]
    if rng.random() < 0.5:
        query = [i for i, o in enumerate(objects) if o.shape == anchor.shape]
        question = f"how many {PLURALS[anchor.shape]} are there ?"
    else:
        query = [i for i, o in enumerate(objects) if o.colour == anchor.colour]
        question = f"how many {anchor.colour} objects are there ?"
    return question, COUNT_WORDS[len(query) - 1], query


def _exist_question(rng, objects):
    present = {(o.colour, o.shape) for o in objects}
    anchor = objects[rng.integers(len(objects))]
    if rng.random() < 0.5:
        query = [i for i, o in enumerate(objects) if (o.colour, o.shape) == (anchor.colour, anchor.shape)]
        return f"is there a {anchor.colour} {anchor.shape} ?", "yes", query
    # keep one attribute of a present object, change the other to a combination that is absent
    # (if every recolouring, or every reshaping, is present, the other one cannot be)
    recoloured = [(c, anchor.shape) for c in COLOURS if (c, anchor.shape) not in present]
    reshaped = [(anchor.colour, s) for s in SHAPES if (anchor.colour, s) not in present]
    first, second = (recoloured, reshaped) if rng.random() < 0.5 else (reshaped, recoloured)
    pairs = first or second
    colour, shape = pairs[rng.integers(len(pairs))]
    return f"is there a {colour} {shape} ?", "no", []


def _position_question(rng, objects):
    choices = []
    for i, o in enumerate(objects):
        if sum((p.colour, p.shape) == (o.colour, o.shape) for p in objects) > 1:
            continue
        x, y = o.centroid
        middle = IMAGE_SIZE / 2
        if abs(x - middle) >= POSITION_MARGIN_PX:
            choices.append((i, "on the left or right", "left" if x < middle else "right"))
        if abs(y - middle) >= POSITION_MARGIN_PX:
            choices.append((i, "at the top or bottom", "top" if y < middle else "bottom"))
    if not choices:
        return None
    i, phrase, answer = choices[rng.integers(len(choices))]
    return f"is the {objects[i].colour} {objects[i].shape} {phrase} ?", answer, [i]


QUESTION_MAKERS = {
    "colour": _colour_question,
    "shape": _shape_question,
    "count": _count_question,
    "exist": _exist_question,
    "position": _position_question,
}


# ----------------------------------------------------------------------------- patch labels
def patch_coverage(mask: np.ndarray, patch: int = PATCH_SIZE) -> np.ndarray:
    """Fraction of each patch covered by `mask`: (H/patch, W/patch) floats in [0, 1]."""
    h, w = mask.shape
    return mask.reshape(h // patch, patch, w // patch, patch).mean(axis=(1, 3))


PATCH_TARGETS = ("colour", "shape", "centre", "across", "updown", "colour_count", "shape_count", "object")  # what patch_labels names


def patch_labels(objects: list[SceneObject], min_coverage: float = 0.3, patch: int = PATCH_SIZE) -> dict:
    """Per-patch class ids ({name in PATCH_TARGETS: rows x cols ints}) for dense auxiliary supervision.

    colour/shape are 1 + the index in COLOURS/SHAPES of the object covering the largest part of the
    patch when that part is >= min_coverage, else 0 (background); across/updown are 1 (left, top) or
    2 (right, bottom) for the image half that object's mask centroid lies in, what position answers
    are judged by, else 0; centre is 1 on the patch holding an object's mask centroid (what counting
    needs), else 0; colour_count / shape_count are how many objects of the scene share that
    object's colour / shape (1..6), else 0: what a count question about it answers; object is 1 +
    the index of that object, else 0.
    """
    side = IMAGE_SIZE // patch
    labels = {name: np.zeros((side, side), dtype=np.int64) for name in PATCH_TARGETS}
    if not objects:
        return labels
    coverage = np.stack([patch_coverage(o.mask, patch) for o in objects])
    best = coverage.argmax(axis=0)
    covered = coverage.max(axis=0) >= min_coverage
    centroids = np.array([o.centroid for o in objects])
    per_object = {
        "colour": [1 + list(COLOURS).index(o.colour) for o in objects],
        "shape": [1 + SHAPES.index(o.shape) for o in objects],
        "across": 1 + (centroids[:, 0] >= IMAGE_SIZE / 2),
        "updown": 1 + (centroids[:, 1] >= IMAGE_SIZE / 2),
        "colour_count": [sum(p.colour == o.colour for p in objects) for o in objects],
        "shape_count": [sum(p.shape == o.shape for p in objects) for o in objects],
        "object": 1 + np.arange(len(objects)),
    }
    for name, ids in per_object.items():
        labels[name][covered] = np.asarray(ids)[best[covered]]
    labels["centre"].reshape(-1)[[o.centre_patch(patch) for o in objects]] = 1
    return labels


def query_patches(sample: Sample, min_coverage: float = 0.5) -> set[int]:
    """Patches of the objects the question is about: those the mask covers >= ``min_coverage``
    of, or the single best-covered patch of an object smaller than that (SPEC §7 query recall)."""
    return object_patches(sample, sample.query, min_coverage)


def word_patches(sample: Sample, word: str, min_coverage: float = 0.5) -> set[int]:
    """Patches (as ``query_patches``) of the objects a colour or shape word names: "red" -> every
    red object, "stars" -> every star."""
    return object_patches(sample, [i for i, o in enumerate(sample.objects)
                                   if word in (o.colour, o.shape, PLURALS[o.shape])], min_coverage)


def object_patches(sample: Sample, indices: list[int], min_coverage: float = 0.5) -> set[int]:
    patches = set()
    for i in indices:
        coverage = patch_coverage(sample.objects[i].mask).reshape(-1)
        chosen = np.flatnonzero(coverage >= min_coverage)
        patches |= set(chosen.tolist() if len(chosen) else [int(coverage.argmax())])
    return patches


def calibration_items(n: int) -> list[tuple[list[Image.Image], str]]:
    """(frames, question) of the first n validation questions: FitPrune's default calibration set."""
    return [([s.image], s.question) for s in (sample(0, "val", i) for i in range(n))]
