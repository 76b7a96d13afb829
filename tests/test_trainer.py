"""The lab's trainer: batches, the training forward through the one decoder loop, recipes, resume."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from model.budget import ReductionConfig
from model.checkpoint import TinyLlavaSpec, build_processor, build_random_checkpoint
from model.engine import DuetLlava
from safetensors.torch import load_file

from model.lab import captions, scenes, trainer
from model.lab.batches import encode, windows
from model.lab.trainer import Recipe, StageConfig, answer_forward, init_grid_positions, lr_at, train_main

SCENE_SPEC = TinyLlavaSpec(vision_hidden=32, text_layers=12, words=scenes.vocabulary())


@pytest.fixture(scope="module")
def scene_engine(tmp_path_factory):
    """A random tiny LLaVA that knows the scene vocabulary, 12 decoder layers (stages at 6 and 9)."""
    folder = build_random_checkpoint(tmp_path_factory.mktemp("scene-llava"), SCENE_SPEC, seed=1)
    return DuetLlava.load(folder, device="cpu")


@pytest.fixture(scope="module")
def samples():
    return [scenes.sample(0, "train", i) for i in range(3)]


def test_labels_cover_exactly_the_answer_and_end_of_turn(scene_engine, samples):
    batch = encode(scene_engine.processor, samples)
    tok = scene_engine.processor.tokenizer
    for row, s in enumerate(samples):
        answer = batch["labels"][row][batch["labels"][row] != -100]
        assert tok.convert_ids_to_tokens(answer) == [s.answer, "</s>"]
        assert (batch["input_ids"][row] == tok.convert_tokens_to_ids("<image>")).sum() == 576
        first_answer = int(torch.nonzero(batch["labels"][row] != -100)[0])
        assert batch["salient"][row][-1] == first_answer - 1  # the last prompt token ranks
    assert batch["colour"].shape == (3, 576) and (batch["colour"] > 0).any()


def test_full_token_training_loss_equals_stock_transformers(scene_engine, samples):
    batch = encode(scene_engine.processor, samples)
    assert (batch["attention_mask"] == 0).any(), "the batch must be padded for this test to mean something"
    with torch.no_grad():
        loss, _, _, _ = answer_forward(scene_engine, batch, StageConfig("t", 1))
        stock = scene_engine.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                                   pixel_values=batch["pixel_values"], labels=batch["labels"]).loss
    assert torch.allclose(loss, stock, atol=1e-5)


@pytest.mark.parametrize("method", ["duet", "pyramiddrop", "visionzip"])
def test_a_batch_makes_the_decisions_and_losses_each_sequence_makes_alone(scene_engine, samples, method):
    cfg = StageConfig("t", 1, reduction=method, budget=64)
    with torch.no_grad():
        loss, _, _, out = answer_forward(scene_engine, encode(scene_engine.processor, samples), cfg)
        alone = [answer_forward(scene_engine, encode(scene_engine.processor, [s]), cfg) for s in samples]
    # every sequence has two answer tokens, so the batch loss is the mean of the single ones
    assert torch.allclose(loss, torch.stack([a[0] for a in alone]).mean(), atol=1e-5)
    for b, single in enumerate(alone):
        assert {k: v[b] for k, v in out.kept.items()} == {k: v[0] for k, v in single[3].kept.items()}


def test_training_ranks_as_inference_does_on_the_prompt(scene_engine, samples):
    """The answer rows come after every ranking row, so causal attention makes the training
    forward's choice at each stage the engine's choice for the prompt alone (query "text")."""
    cfg = StageConfig("t", 1, reduction="duet", budget=128)
    s = samples[0]
    with torch.no_grad():
        _, _, _, out = answer_forward(scene_engine, encode(scene_engine.processor, [s]), cfg)
    trace = scene_engine.answer(s.image, s.question, ReductionConfig("duet", 128, query="text"), max_new_tokens=1)
    assert {stage["layer"]: stage["kept"] for stage in trace["t2v"]} == {k: v[0] for k, v in out.kept.items()}


def test_reduced_training_has_gradients_everywhere_tokens_survive(scene_engine, samples):
    scene_engine.model.zero_grad()
    loss, _, every_patch, _ = answer_forward(scene_engine, encode(scene_engine.processor, samples),
                                             StageConfig("t", 1, reduction="duet", budget=64))
    loss.backward()
    assert every_patch.shape == (3, 576, scene_engine.projector.linear_2.out_features)
    assert scene_engine.vision.encoder.layers[0].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert scene_engine.projector.linear_1.weight.grad.abs().sum() > 0
    assert scene_engine.lm.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    scene_engine.model.zero_grad()


def test_a_whole_grid_window_is_encoded_as_the_whole_image(scene_engine, samples):
    batch = encode(scene_engine.processor, samples[:2])
    with torch.no_grad():
        whole = scene_engine.vision_states(batch["pixel_values"], patches=torch.arange(576).expand(2, -1))
        stock = scene_engine.vision_states(batch["pixel_values"])
    assert torch.allclose(whole[-1], stock[-1], atol=1e-5)


def test_windows_carry_their_patches_targets_and_positions(scene_engine, samples):
    import numpy as np

    batch = encode(scene_engine.processor, samples[:2])
    pixels, patches, targets = windows(batch, samples[:2], 8, np.random.default_rng(0))
    assert pixels.shape == (8, 3, 112, 112) and patches.shape == (8, 64)
    for k in range(8):
        first = int(patches[k, 0])
        r0, c0 = divmod(first, 24)
        full = batch["pixel_values"][k // 4]
        assert torch.equal(pixels[k], full[:, r0 * 14:(r0 + 8) * 14, c0 * 14:(c0 + 8) * 14])
        assert torch.equal(targets["shape"][k], batch["shape"][k // 4][patches[k]])
        assert (targets["colour"][k] > 0).any(), "each window is cut around an object"


def test_schedule_warms_up_then_decays_by_cosine_to_its_floor():
    cfg = StageConfig("t", 100, lr=1e-3, warmup=10, min_lr_frac=0.1)
    assert lr_at(0, cfg) == pytest.approx(1e-4) and lr_at(9, cfg) == pytest.approx(1e-3)
    assert lr_at(10, cfg) == pytest.approx(1e-3)
    assert lr_at(100, cfg) == pytest.approx(1e-4)
    values = [lr_at(s, cfg) for s in range(10, 101)]
    assert all(a >= b for a, b in zip(values, values[1:]))


def test_curriculum_grows_the_scenes_one_object_at_a_time():
    cfg = StageConfig("t", 100, curriculum=10, batch_size=16)
    assert max(len(s.objects) for s in trainer.scene_batch(cfg, 0)) == 1
    assert max(len(s.objects) for s in trainer.scene_batch(cfg, 25)) <= 3
    assert max(len(s.objects) for s in trainer.scene_batch(StageConfig("t", 100, batch_size=64), 0)) > 3


def test_an_lm_stage_asks_its_share_of_scenes_for_their_caption():
    mixed = trainer.scene_batch(StageConfig("t", 10, captions=0.5, batch_size=64), 3)
    kinds = [s.kind for s in mixed]
    assert 10 < kinds.count("caption") < 54
    plain = trainer.scene_batch(StageConfig("t", 10, batch_size=64), 3)
    for a, b in zip(mixed, plain):
        assert a.image is not None and a.objects[0].centre == b.objects[0].centre
        assert (a.answer == captions.caption(b.objects)) if a.kind == "caption" else (a.question == b.question)
    assert {s.kind for s in trainer.scene_batch(StageConfig("t", 10, captions=1.0, batch_size=8), 0)} == {"caption"}


def test_grid_positions_make_neighbouring_patches_more_alike_than_distant_ones():
    from model.checkpoint import build_model

    processor = build_processor(SCENE_SPEC.words, 336, 14)
    model = build_model(SCENE_SPEC, processor)
    init_grid_positions(model)
    table = model.model.vision_tower.embeddings.position_embedding.weight[1:].detach()

    def similarity(a, b):
        return torch.nn.functional.cosine_similarity(table[a[0] * 24 + a[1]], table[b[0] * 24 + b[1]], dim=0)

    assert similarity((5, 5), (5, 6)) > similarity((5, 5), (5, 20))
    assert similarity((5, 5), (6, 5)) > similarity((5, 5), (20, 5))


def write_recipe(folder: Path, export: Path, parent: str = "", reduction: str = "full", steps: int = 3) -> Path:
    model = "" if parent else "\n[model]\nvision_hidden = 32\ntext_layers = 12\n"
    stages = "" if parent else ('[[stage]]\nname = "tower"\nobjective = "patches"\nsteps = 2\nwindows = 6\nwarmup = 1\n'
                                'save_every = 1\n\n[[stage]]\nname = "clip"\nobjective = "clip"\nsteps = 2\nwarmup = 1\n'
                                'batch_size = 4\neval_samples = 4\nsave_every = 1\n\n')
    freeze = "" if parent else 'freeze = ["tower"]\ncaptions = 0.5\n'
    path = folder / "recipe.toml"
    path.write_text(f'export = "{export}"\nparent = "{parent}"\n{model}\n{stages}'
                    f'[[stage]]\nname = "answer"\nsteps = {steps}\nwarmup = 1\neval_every = 2\neval_samples = 4\n'
                    f'save_every = 1\nreduction = "{reduction}"\nbudget = 64\n{freeze}')
    return path


def test_a_recipe_runs_its_stages_and_exports_a_model_the_engine_loads(tmp_path):
    recipe = write_recipe(tmp_path, tmp_path / "shipped")
    assert train_main(["--recipe", str(recipe), "--out", str(tmp_path / "run")]) == 0
    info = json.loads((tmp_path / "shipped" / "training.json").read_text())
    assert info["recipe"] == "recipe" and info["parent"] is None
    assert [s["name"] for s in info["stages"]] == ["tower", "clip", "answer"]
    assert set(info["wall_s"]) == {"tower", "clip", "answer"}
    assert 0 <= info["val_acc"] <= 1 and 0 <= info["val_caption"] <= 1 and info["vocabulary"] == captions.vocabulary()
    losses = {s["name"]: " ".join(s["losses"]) for s in info["stages"]}
    assert "InfoNCE" in losses["clip"] and losses["answer"].startswith("answer cross-entropy caption cross-entropy")
    assert not any("attention" in text for text in losses.values())
    log = (tmp_path / "run" / "train.log").read_text()
    assert "answer eval step 2" in log and "answer eval step 3" in log and "clip eval step 2 val_retrieval" in log
    assert (tmp_path / "run" / "clip" / "clip.pt").exists()
    clip_final = load_file(tmp_path / "run" / "clip" / "final" / "model.safetensors")
    shipped = load_file(tmp_path / "shipped" / "model.safetensors")
    tower = [k for k in shipped if "vision_tower" in k]
    assert tower and all(torch.equal(clip_final[k], shipped[k]) for k in tower), "the answer stage froze the tower"
    assert not torch.equal(clip_final["multi_modal_projector.linear_1.weight"],
                           shipped["multi_modal_projector.linear_1.weight"])
    engine = DuetLlava.load(tmp_path / "shipped", device="cpu")
    trace = engine.answer(scenes.sample(0, "val", 0).image, "what color is the circle ?", ReductionConfig("duet", 64),
                          max_new_tokens=2)
    assert trace["avg_visual_tokens"] == pytest.approx(64, abs=1)
    twin = write_recipe(tmp_path / "run", tmp_path / "twin", parent=str(tmp_path / "shipped"), reduction="duet", steps=2)
    assert train_main(["--recipe", str(twin), "--out", str(tmp_path / "twin-run")]) == 0
    assert json.loads((tmp_path / "twin" / "training.json").read_text())["parent"] == str(tmp_path / "shipped")


@pytest.mark.parametrize("stage,at", [("tower", 1), ("clip", 1), ("answer", 2)])
def test_resuming_continues_exactly_where_the_run_stopped(tmp_path, monkeypatch, stage, at):
    recipe = write_recipe(tmp_path, tmp_path / "straight", steps=4)
    assert train_main(["--recipe", str(recipe), "--out", str(tmp_path / "a")]) == 0
    real_lr = trainer.lr_at

    def interrupted(step, cfg):
        if cfg.name == stage and step == at:
            raise KeyboardInterrupt
        return real_lr(step, cfg)

    monkeypatch.setattr(trainer, "lr_at", interrupted)
    with pytest.raises(KeyboardInterrupt):
        train_main(["--recipe", str(recipe), "--out", str(tmp_path / "b")])
    monkeypatch.setattr(trainer, "lr_at", real_lr)
    assert train_main(["--recipe", str(recipe), "--out", str(tmp_path / "b")]) == 0
    assert f"{stage}: resumed at step {at}" in (tmp_path / "b" / "train.log").read_text()
    straight = torch.load(tmp_path / "a" / "answer" / "state.pt", weights_only=False)
    resumed = torch.load(tmp_path / "b" / "answer" / "state.pt", weights_only=False)
    assert resumed["step"] == 4
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_recipes_in_the_repository_parse_and_unknown_keys_are_refused(tmp_path):
    shipped = Recipe.load("duet-llava-tiny")
    assert shipped.parent == "" and [s.objective for s in shipped.stages] == ["patches", "clip", "lm", "lm"]
    assert all("tower" in s.freeze for s in shipped.stages[2:]), "LLaVA's stages run on a frozen tower"
    assert shipped.stages[2].captions == 1.0 and 0 < shipped.stages[3].captions < 1
    twin = Recipe.load("duet-llava-tiny-duet64")
    assert twin.parent == shipped.export and twin.stages[-1].reduction == "duet" and twin.stages[-1].budget == 64
    assert twin.stages[-1].freeze == ["tower"]
    bad = tmp_path / "bad.toml"
    bad.write_text('export = "x"\n[[stage]]\nname = "a"\nsteps = 1\nattn_weight = 1.0\n')
    with pytest.raises(ValueError, match="attn_weight"):
        Recipe.load(str(bad))
    with pytest.raises(FileNotFoundError, match="duet-llava-tiny"):
        Recipe.load("no-such-recipe")
    with pytest.raises(ValueError, match="objective"):
        StageConfig("a", 1, objective="attention")
    with pytest.raises(ValueError, match="cannot freeze"):
        StageConfig("a", 1, freeze=["cls"])
