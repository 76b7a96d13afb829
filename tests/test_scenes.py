import re

import numpy as np
import pytest
from skimage.measure import label
from transformers import AutoProcessor

from model.lab import scenes
from model.checkpoint import build_processor

SAMPLES = [scenes.sample(7, "train", i) for i in range(150)]


def test_a_sample_is_a_pure_function_of_seed_split_and_index():
    a, b = scenes.sample(3, "val", 11), scenes.sample(3, "val", 11)
    assert (a.question, a.answer, a.kind, a.query) == (b.question, b.answer, b.kind, b.query)
    assert np.array_equal(np.asarray(a.image), np.asarray(b.image))
    assert all(np.array_equal(p.mask, q.mask) for p, q in zip(a.objects, b.objects))
    others = [scenes.sample(3, "test", 11), scenes.sample(3, "val", 12), scenes.sample(4, "val", 11)]
    assert all(not np.array_equal(np.asarray(a.image), np.asarray(o.image)) for o in others)


def test_bad_split_or_object_count_is_rejected():
    with pytest.raises(ValueError):
        scenes.sample(0, "holdout", 0)
    with pytest.raises(ValueError):
        scenes.sample(0, "train", 0, max_objects=7)


def test_a_forced_kind_asks_that_kind_about_the_same_scene():
    for i in range(40):
        drawn = scenes.sample(5, "train", i)
        forced = {kind: scenes.sample(5, "train", i, kind=kind) for kind in ("count", "exist")}
        for kind, sample in forced.items():
            assert sample.kind == kind
            assert np.array_equal(np.asarray(sample.image), np.asarray(drawn.image))
        counted = forced["count"]
        named = counted.question.split()[2]
        same = [o for o in counted.objects if named in (o.colour, scenes.PLURALS[o.shape])]
        assert counted.answer == scenes.COUNT_WORDS[len(same) - 1] and counted.query == [counted.objects.index(o) for o in same]
    with pytest.raises(ValueError, match="kind"):
        scenes.sample(0, "train", 0, kind="size")
    single = next(i for i in range(200) if len(scenes.sample(0, "train", i, max_objects=1).objects) == 1)
    assert scenes.sample(0, "train", single, max_objects=1, kind="colour").kind == "colour"


def test_scenes_have_1_to_6_disjoint_objects_painted_in_their_colour():
    counts = set()
    for s in SAMPLES:
        counts.add(len(s.objects))
        assert s.image.size == (scenes.IMAGE_SIZE, scenes.IMAGE_SIZE) and s.image.mode == "RGB"
        pixels = np.asarray(s.image).astype(int)
        painted = np.zeros((scenes.IMAGE_SIZE, scenes.IMAGE_SIZE), dtype=int)
        for o in s.objects:
            assert o.mask.shape == painted.shape and o.mask.sum() > 100
            painted += o.mask
            colours = pixels[o.mask]
            assert np.all(colours == colours[0]), "an object is painted in one colour"
            assert np.abs(colours[0] - scenes.COLOURS[o.colour]).max() <= scenes.COLOUR_JITTER
            assert label(o.mask).max() == 1, "every shape is one connected region"
        assert painted.max() <= 1, "objects never overlap"
    assert counts == set(range(1, scenes.MAX_OBJECTS + 1))


def test_curriculum_limits_the_object_count():
    assert all(len(scenes.sample(0, "train", i, max_objects=2).objects) <= 2 for i in range(40))


def _matching(s, colour=None, shape=None):
    return [i for i, o in enumerate(s.objects)
            if (colour is None or o.colour == colour) and (shape is None or o.shape == shape)]


def test_answers_agree_with_the_objects_and_masks():
    kinds = set()
    for s in SAMPLES:
        kinds.add(s.kind)
        words = s.question.split()
        if s.kind == "colour":
            shape = words[4]
            assert s.query == _matching(s, shape=shape) and len(s.query) == 1
            assert s.answer == s.objects[s.query[0]].colour
        elif s.kind == "shape":
            colour = words[4]
            assert s.query == _matching(s, colour=colour) and len(s.query) == 1
            assert s.answer == s.objects[s.query[0]].shape
        elif s.kind == "count":
            asked = words[2]
            shape = {plural: name for name, plural in scenes.PLURALS.items()}.get(asked)
            query = _matching(s, shape=shape) if shape else _matching(s, colour=asked)
            assert s.query == query and s.answer == scenes.COUNT_WORDS[len(query) - 1]
            assert label(s.query_mask, connectivity=2).max() == len(query), "one region per counted object"
        elif s.kind == "exist":
            query = _matching(s, colour=words[3], shape=words[4])
            assert s.answer == ("yes" if query else "no") and s.query == query
        else:
            colour, shape = words[2], words[3]
            assert s.query == _matching(s, colour, shape) and len(s.query) == 1
            ys, xs = np.nonzero(s.query_mask)
            along = xs if "left" in words else ys
            offset = along.mean() - scenes.IMAGE_SIZE / 2
            assert abs(offset) >= scenes.POSITION_MARGIN_PX
            if "left" in words:
                assert s.answer == ("left" if offset < 0 else "right")
            else:
                assert s.answer == ("top" if offset < 0 else "bottom")
    assert kinds == set(scenes.KINDS)


def test_query_mask_is_the_union_of_the_queried_objects():
    for s in SAMPLES[:30]:
        expected = np.zeros_like(s.query_mask)
        for i in s.query:
            expected |= s.objects[i].mask
        assert np.array_equal(s.query_mask, expected)
        assert s.query_mask.any() == (s.answer != "no")


def test_a_no_is_always_possible_even_when_one_colour_takes_every_shape():
    rng = np.random.default_rng(0)
    objects = [scenes.SceneObject(shape, "red", "small", 20.0, (0.0, 0.0), np.ones((2, 2), bool))
               for shape in scenes.SHAPES]
    for _ in range(20):
        question, answer, query = scenes.QUESTION_MAKERS["exist"](rng, objects)
        colour, shape = question.split()[3:5]
        assert answer == "yes" or (colour != "red" and not query)


def test_existence_answers_are_balanced_and_negatives_share_an_attribute():
    exist = [scenes.sample(1, "val", i) for i in range(300)]
    exist = [s for s in exist if s.kind == "exist"]
    assert 0.3 < np.mean([s.answer == "yes" for s in exist]) < 0.7
    for s in exist:
        if s.answer == "no":
            colour, shape = s.question.split()[3:5]
            assert _matching(s, colour=colour) or _matching(s, shape=shape)


def test_every_question_and_answer_word_is_in_the_vocabulary_and_tokenizer(tmp_path):
    vocab = set(scenes.vocabulary())
    for s in SAMPLES:
        assert set(s.question.split()) <= vocab and s.answer in vocab
    build_processor(scenes.vocabulary(), scenes.IMAGE_SIZE, scenes.PATCH_SIZE).save_pretrained(tmp_path)
    tok = AutoProcessor.from_pretrained(tmp_path, backend="pil").tokenizer
    for s in SAMPLES[:40]:
        text = f"{s.question} {s.answer}"
        ids = tok(text, add_special_tokens=False)["input_ids"]
        assert tok.unk_token_id not in ids
        assert tok.decode(ids) == text


def test_patch_labels_follow_the_mask():
    mask = scenes.draw_mask("circle", 100, 200, 30)
    circle = scenes.SceneObject("circle", "blue", "large", 30.0, (100.0, 200.0), mask)
    labels = scenes.patch_labels([circle], min_coverage=0.5)
    colour, shape, centre = labels["colour"], labels["shape"], labels["centre"]
    coverage = scenes.patch_coverage(circle.mask)
    assert colour.shape == (24, 24) and coverage.shape == (24, 24)
    assert np.array_equal(colour > 0, coverage >= 0.5)
    assert set(colour[colour > 0]) == {1 + list(scenes.COLOURS).index("blue")}
    assert set(shape[shape > 0]) == {1 + scenes.SHAPES.index("circle")}
    assert np.argwhere(centre).tolist() == [[200 // 14, 100 // 14]]
    assert np.isclose(coverage.sum() * 14 * 14, circle.mask.sum())
    assert set(labels["across"][colour > 0]) == {1} and set(labels["updown"][colour > 0]) == {2}  # x 100, y 200
    assert not labels["across"][colour == 0].any() and not labels["updown"][colour == 0].any()


def test_count_labels_name_how_many_objects_share_the_patchs_colour_and_shape():
    def obj(shape, colour, x, y):
        return scenes.SceneObject(shape, colour, "large", 30.0, (x, y), scenes.draw_mask(shape, x, y, 30))
    objects = [obj("circle", "red", 60, 60), obj("circle", "blue", 200, 60), obj("square", "red", 60, 220),
               obj("circle", "red", 220, 220)]
    labels = scenes.patch_labels(objects, min_coverage=0.5)
    for o in objects:
        own = scenes.patch_coverage(o.mask) >= 0.5
        assert own.any()
        assert set(labels["colour_count"][own]) == {sum(p.colour == o.colour for p in objects)}
        assert set(labels["shape_count"][own]) == {sum(p.shape == o.shape for p in objects)}
    assert not labels["colour_count"][labels["colour"] == 0].any() and not labels["shape_count"][labels["colour"] == 0].any()
    assert {3, 1} <= set(labels["colour_count"].flat) and {3, 1} <= set(labels["shape_count"].flat)


def test_position_labels_give_each_patch_its_own_objects_half():
    """Two objects overlapping the vertical midline's neighbourhood: a patch is labelled by the
    object that covers most of it, with that object's centroid half, not the patch's own half."""
    left = scenes.SceneObject("square", "red", "large", 40.0, (150.0, 80.0), scenes.draw_mask("square", 150, 80, 40))
    right = scenes.SceneObject("circle", "green", "large", 40.0, (240.0, 260.0), scenes.draw_mask("circle", 240, 260, 40))
    labels = scenes.patch_labels([left, right], min_coverage=0.5)
    red = labels["colour"] == 1 + list(scenes.COLOURS).index("red")
    green = labels["colour"] == 1 + list(scenes.COLOURS).index("green")
    assert red.any() and green.any()
    assert set(labels["across"][red]) == {1} and set(labels["updown"][red]) == {1}
    assert set(labels["across"][green]) == {2} and set(labels["updown"][green]) == {2}
    assert (np.argwhere(red)[:, 1] >= 12).any()  # the square reaches past the middle column, still "left"


def test_questions_use_one_template_per_kind():
    patterns = {
        "colour": r"what color is the \w+ \?",
        "shape": r"what shape is the \w+ object \?",
        "count": r"how many (\w+|\w+ objects) are there \?",
        "exist": r"is there a \w+ \w+ \?",
        "position": r"is the \w+ \w+ (on the left or right|at the top or bottom) \?",
    }
    for s in SAMPLES:
        assert re.fullmatch(patterns[s.kind], s.question), s.question
