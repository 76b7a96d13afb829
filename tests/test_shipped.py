"""The shipped checkpoint in assets/: a standard HF folder the engine serves by default."""

from __future__ import annotations

import json

import pytest
from transformers import AutoProcessor, LlavaForConditionalGeneration

from model import data
from model.budget import ReductionConfig
from model.engine import DEFAULT_MODEL, DuetLlava

INFO = json.loads((DEFAULT_MODEL / "training.json").read_text())


@pytest.fixture(scope="module")
def shipped():
    return DuetLlava.load(device="cpu")


def test_loads_with_stock_transformers_alone():
    model = LlavaForConditionalGeneration.from_pretrained(DEFAULT_MODEL)
    processor = AutoProcessor.from_pretrained(DEFAULT_MODEL, backend="pil")
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the star ?"}]}],
        add_generation_prompt=True)
    ids = processor(images=data.sample(0, "test", 0).image, text=prompt, return_tensors="pt")["input_ids"]
    assert (ids == model.config.image_token_id).sum() == 576
    assert processor.tokenizer.convert_ids_to_tokens(processor.tokenizer("what color is the star ?")["input_ids"]) == \
        ["what", "color", "is", "the", "star", "?"]


def test_engine_answers_reproduce_the_recorded_validation_accuracy(shipped):
    """The trainer scores teacher-forced batches; the engine decodes one prompt at a time. Both
    read the same weights, so greedy answers must give the accuracy training.json records."""
    assert INFO["data_seed"] == 0 and INFO["vocabulary"] == data.vocabulary()
    samples = [data.sample(0, "val", i) for i in range(INFO["val_samples"])]
    full = ReductionConfig("full")
    correct = sum(shipped.answer(s.image, s.question, full, max_new_tokens=2)["answer"] == s.answer for s in samples)
    assert correct == round(INFO["val_acc"] * len(samples))
