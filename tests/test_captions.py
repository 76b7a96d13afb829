"""Scene captions, their hard negatives, and the contrastive pieces of the tower's CLIP stage."""

from __future__ import annotations

import re
from collections import Counter

import numpy as np
import pytest
import torch

from model.checkpoint import build_processor
from model.lab import captions, scenes
from model.lab.clip import Clip, retrieval, tokenize

SAMPLES = [scenes.sample(0, "train", i) for i in range(40)]


def parse(text: str) -> tuple[int, dict, dict, list[tuple[str, str, str, str]]]:
    """(object count, shape counts, colour counts, [(size, colour, shape, place)]) read back from a caption."""
    head, rest = text.split(" : ")
    shapes, tail = rest.split(" ; ")
    colours, items = tail.split(" . ", 1)
    number = {w: i + 1 for i, w in enumerate(scenes.COUNT_WORDS)}
    singular = {p: s for s, p in scenes.PLURALS.items()}
    shape_counts = {singular.get(w, w): number[n] for n, w in (x.split() for x in shapes.split(" , "))}
    colour_counts = {w: number[n] for n, w in (x.split() for x in colours.split(" , "))}
    listed = [re.fullmatch(r"a (\w+) (\w+) (\w+) (.+)", x).groups() for x in items.rstrip(" .").split(" , ")]
    return number[head.split()[0]], shape_counts, colour_counts, listed


@pytest.mark.parametrize("sample", SAMPLES[:20])
def test_a_caption_states_every_object_and_every_count(sample):
    text = captions.caption(sample.objects)
    total, shapes, colours, listed = parse(text)
    assert total == len(sample.objects) == len(listed)
    assert sorted((o.size, o.colour, o.shape) for o in sample.objects) == sorted(x[:3] for x in listed)
    assert shapes == {s: sum(o.shape == s for o in sample.objects) for s in {o.shape for o in sample.objects}}
    assert colours == {c: sum(o.colour == c for o in sample.objects) for c in {o.colour for o in sample.objects}}
    assert captions.caption(sample.objects) == text  # a pure function of the objects


def test_places_agree_with_every_position_answer():
    checked = 0
    for i in range(300):
        s = scenes.sample(0, "train", i, kind=None)
        if s.kind != "position":
            continue
        obj = s.objects[s.query[0]]
        listed = parse(captions.caption(s.objects))[3]
        place = next(x[3] for x in listed if x[1:3] == (obj.colour, obj.shape))
        assert s.answer in place.split(), (s.question, s.answer, place)
        checked += 1
    assert checked > 30


def test_reading_order_is_by_place():
    order = {"top": 0, "middle": 1, "bottom": 2, "left": 0, "right": 2}
    for s in SAMPLES:
        keys = []
        for *_, place in parse(captions.caption(s.objects))[3]:
            words = place.split()[2:] if place != "in the middle" else ["middle", "middle"]
            row = next((order[w] for w in words if w in ("top", "bottom")), 1)
            column = next((order[w] for w in words if w in ("left", "right")), 1)
            keys.append((row, column))
        assert keys == sorted(keys)


def test_hard_negatives_are_distinct_one_change_variants():
    for k, s in enumerate(SAMPLES):
        positive = captions.caption(s.objects)
        negatives = captions.hard_negatives(s.objects, np.random.default_rng(k))
        assert len(negatives) == 7 == len(set(negatives)) and positive not in negatives
        true = parse(positive)
        for text in negatives:
            total, shapes, colours, listed = parse(text)
            assert total == true[0]
            moved = sum((Counter(listed) - Counter(true[3])).values())
            assert 1 <= moved <= 2, (positive, text)
        trades = [t for t in negatives if parse(t)[1:3] == true[1:3]]
        if len({o.colour for o in s.objects}) == len({o.shape for o in s.objects}) == len(s.objects) >= 3:
            assert len(trades) >= 4, "trades, which keep every count true, come first"


def test_every_caption_word_is_in_the_tokenizer():
    tok = build_processor(captions.vocabulary(), 336, 14).tokenizer
    for s in SAMPLES:
        for text in [captions.caption(s.objects), *captions.hard_negatives(s.objects, np.random.default_rng(0))]:
            assert tok.unk_token_id not in tok(text, add_special_tokens=False)["input_ids"], text
    assert tok.unk_token_id not in tok(captions.PROMPT, add_special_tokens=False)["input_ids"]
    assert captions.vocabulary()[: len(scenes.vocabulary())] == scenes.vocabulary()


def test_tokenize_ends_each_text_and_pads_after_it():
    tok = build_processor(captions.vocabulary(), 336, 14).tokenizer
    ids, real = tokenize(tok, ["one object : one star ; one red .", "a red star"])
    assert real.sum(1).tolist() == [10, 4]
    assert ids[0, 9] == ids[1, 3] == tok.eos_token_id and ids[1, 4] == tok.pad_token_id


def test_the_text_encoder_ignores_padding():
    tok = build_processor(captions.vocabulary(), 336, 14).tokenizer
    torch.manual_seed(0)
    clip = Clip(len(tok), 32).eval()
    text = "two objects : two stars ; two red ."
    alone = clip.text_embeddings(tok, [text])
    padded = clip.text_embeddings(tok, [text, captions.caption(SAMPLES[2].objects)])[:1]
    assert torch.allclose(alone, padded, atol=1e-5)


def test_the_contrastive_loss_is_symmetric_and_rewards_matching_pairs():
    torch.manual_seed(0)
    clip = Clip(10, 8, embed=8)
    images = torch.nn.functional.normalize(torch.randn(4, 8), dim=-1)
    matched, _ = clip.loss(images, images, 4)
    shuffled, _ = clip.loss(images, images[[1, 2, 3, 0]], 4)
    assert matched < shuffled
    negatives = torch.nn.functional.normalize(torch.randn(6, 8), dim=-1)
    with_negatives, stats = clip.loss(images, torch.cat([images, negatives]), 4)
    assert with_negatives > matched and "clip_margin" in stats
    transposed, _ = clip.loss(images[[1, 0, 2, 3]], images[[1, 0, 2, 3]], 4)
    assert torch.allclose(matched, transposed)


def test_retrieval_picks_the_true_caption_among_its_hard_negatives(monkeypatch):
    """With text embeddings that tell captions apart (a random unit vector per text) and images
    projected exactly onto their caption's vector, every image retrieves its caption; projected
    onto the opposite, none does."""
    tok = build_processor(captions.vocabulary(), 336, 14).tokenizer
    clip = Clip(len(tok), 16, embed=16).eval()

    def by_text(tokenizer, texts):
        vectors = [torch.randn(16, generator=torch.Generator().manual_seed(hash(t) % 2**31)) for t in texts]
        return torch.nn.functional.normalize(torch.stack(vectors), dim=-1)

    monkeypatch.setattr(clip, "text_embeddings", by_text)
    samples = SAMPLES[:6]
    truth = by_text(tok, [captions.caption(s.objects) for s in samples])
    pooled = torch.eye(16)[:6]
    with torch.no_grad():
        clip.image_projection.weight.zero_()
        clip.image_projection.weight[:, :6] = truth.T
    assert all(retrieval(clip, tok, pooled, samples, np.random.default_rng(3)))
    with torch.no_grad():
        clip.image_projection.weight[:, :6] = -truth.T
    assert not any(retrieval(clip, tok, pooled, samples, np.random.default_rng(3)))
