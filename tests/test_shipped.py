"""The shipped checkpoints in assets/: the default model the engine serves, and its DUET-trained
twin; standard HF folders."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from model.lab import captions, scenes
from model.budget import ReductionConfig
from model.engine import DEFAULT_MODEL, DuetLlava

TWIN = DEFAULT_MODEL.with_name("duet-llava-tiny-duet64")
FOLDERS = [DEFAULT_MODEL, TWIN]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_loads_with_stock_transformers_alone(folder):
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    assert model.config.vision_config.image_size == 336 and model.config.vision_config.patch_size == 14
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": "what color is the star ?"}]}],
        add_generation_prompt=True)
    ids = processor(images=scenes.sample(0, "test", 0).image, text=prompt, return_tensors="pt")["input_ids"]
    assert (ids == model.config.image_token_id).sum() == 576
    assert processor.tokenizer.convert_ids_to_tokens(processor.tokenizer("what color is the star ?")["input_ids"]) == \
        ["what", "color", "is", "the", "star", "?"]


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_engine_answers_reproduce_the_recorded_validation_accuracy(folder):
    """The trainer scores teacher-forced batches; the engine decodes one prompt at a time. Both
    read the same weights, so greedy answers must give the accuracy training.json records (on the
    validation scenes of the run's data seed, under the reduction the recipe's last stage trains with)."""
    info = json.loads((folder / "training.json").read_text())
    assert info["vocabulary"] == captions.vocabulary()
    assert (info["recipe"], info["parent"]) == {DEFAULT_MODEL: ("duet-llava-tiny", None),
                                                TWIN: ("duet-llava-tiny-duet64", "assets/duet-llava-tiny")}[folder]
    engine = DuetLlava.load(folder, device="cpu")
    samples = [scenes.sample(info["data_seed"], "val", i) for i in range(info["val_samples"])]
    scored = info["val_reduction"]
    cfg = ReductionConfig(scored["method"], scored["budget"], query=scored["query"])
    correct = sum(engine.answer(s.image, s.question, cfg, max_new_tokens=2)["answer"] == s.answer for s in samples)
    assert correct == round(info["val_acc"] * len(samples))


SPACE_FILE_LIMIT = 10 * 2**20  # a Hugging Face Space refuses a pushed file above this unless Git LFS tracks it


def test_every_tracked_file_fits_a_space_push():
    import subprocess

    root = DEFAULT_MODEL.parent.parent
    tracked = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout.split(b"\0")
    sizes = {name.decode(): (root / name.decode()).stat().st_size for name in tracked if name}
    assert sizes and max(sizes.values()) <= SPACE_FILE_LIMIT, max(sizes.items(), key=lambda item: item[1])


@pytest.mark.parametrize("folder", FOLDERS, ids=lambda f: f.name)
def test_weights_are_stored_in_half_precision_and_load_in_float32(folder):
    from safetensors import safe_open

    with safe_open(folder / "model.safetensors", "pt") as weights:
        assert {str(weights.get_tensor(name).dtype) for name in weights.keys()} == {"torch.float16"}
    assert next(DuetLlava.load(folder, device="cpu").model.parameters()).dtype == torch.float32
    assert next(LlavaForConditionalGeneration.from_pretrained(folder).parameters()).dtype == torch.float32
