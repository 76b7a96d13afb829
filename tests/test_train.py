import json

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from model import data
from model.budget import ReductionConfig, plan
from model.checkpoint import build_processor
from model.engine import DuetLlava, Timer
from model.checkpoint import TinyLlavaSpec, build_model
from model.train import (VISION_PARTS, AuxHeads, ReadHeads, StateHeads, TrainConfig, centre_ranking_loss,
                         conversation, count_samples, count_targets, encode, exported_accuracy, forward_losses, init_grid_positions,
                         lr_at, max_objects_at, redraw_rows, train_main)

TINY = ["--vision-hidden", "16", "--vision-layers", "2", "--vision-heads", "2", "--vision-mlp", "32",
        "--text-hidden", "16", "--text-layers", "12", "--text-heads", "2", "--text-kv-heads", "1",
        "--text-mlp", "32"]
FAST = ["--batch-size", "2", "--pre-steps", "1", "--curriculum-steps", "1", "--warmup", "1",
        "--decay-frac", "0", "--eval-samples", "4", "--eval-every", "3", "--save-every", "1",
        "--log-every", "1", "--lr", "3e-3"]


def run(out, steps, *extra):
    return train_main(["--out", str(out), "--steps", str(steps), *TINY, *FAST, *extra])


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """4 steps straight through (vision pre-stage, then answer + aux loss, one evaluation)."""
    out = tmp_path_factory.mktemp("run")
    assert run(out, 4, "--export", str(out / "shipped")) == 0
    return out


def test_labels_cover_exactly_the_answer_and_end_of_turn():
    processor = build_processor(data.vocabulary(), data.IMAGE_SIZE, data.PATCH_SIZE)
    samples = [data.sample(0, "train", i) for i in range(3)]
    batch = encode(processor, samples, 0.3)
    assert batch["input_ids"].shape[0] == 3 and batch["pixel_values"].shape == (3, 3, 336, 336)
    for row, s in enumerate(samples):
        answer_ids = batch["labels"][row][batch["labels"][row] != -100]
        assert processor.tokenizer.convert_ids_to_tokens(answer_ids) == [s.answer, "</s>"]
        assert (batch["input_ids"][row] == processor.tokenizer.convert_tokens_to_ids("<image>")).sum() == 576
    assert batch["colour"].shape == (3, 576) and (batch["colour"] > 0).any()


def test_run_folder_holds_state_logs_and_an_exported_best_model(trained):
    state = torch.load(trained / "state.pt", weights_only=False)
    assert state["step"] == 4 and state["next_index"] == 8
    lines = [json.loads(line) for line in (trained / "metrics.jsonl").read_text().splitlines()]
    assert "aux_loss" in lines[0] and "answer_loss" not in lines[0]  # vision pre-stage
    assert any("answer_loss" in line for line in lines)
    evals = [line for line in lines if "val_acc" in line]
    assert [e["step"] for e in evals] == [3, 4] and all(0 <= e["val_acc"] <= 1 for e in evals)
    info = json.loads((trained / "shipped" / "training.json").read_text())
    assert info["val_acc"] == max(e["val_acc"] for e in evals)


def test_exported_model_loads_with_stock_transformers_and_the_engine(trained):
    folder = trained / "shipped"
    model = LlavaForConditionalGeneration.from_pretrained(folder)
    processor = AutoProcessor.from_pretrained(folder, backend="pil")
    assert model.config.vision_feature_layer == -2 and model.config.text_config.num_hidden_layers == 12
    assert not any("heads" in name for name in model.state_dict())
    s = data.sample(0, "test", 0)
    prompt = processor.apply_chat_template(
        [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": s.question}]}],
        add_generation_prompt=True)
    inputs = processor(images=s.image, text=prompt, return_tensors="pt")
    generated = model.generate(**inputs, max_new_tokens=2, do_sample=False)
    assert generated.shape[1] > inputs["input_ids"].shape[1]
    trace = DuetLlava.load(folder, device="cpu").answer(
        s.image, s.question, ReductionConfig(method="full", budget=576), max_new_tokens=2)
    assert isinstance(trace["answer"], str)


def test_resuming_continues_exactly_where_the_run_stopped(trained, tmp_path):
    assert run(tmp_path, 2) == 0
    assert run(tmp_path, 4) == 0
    assert "resumed at step 2" in (tmp_path / "train.log").read_text()
    straight = torch.load(trained / "state.pt", weights_only=False)
    resumed = torch.load(tmp_path / "state.pt", weights_only=False)
    assert (resumed["step"], resumed["next_index"]) == (4, 8)
    for name, tensor in straight["model"].items():
        assert torch.equal(tensor, resumed["model"][name]), name


def test_duet_training_runs_and_exports_a_loadable_model(tmp_path):
    assert run(tmp_path, 3, "--reduction", "duet", "--budget", "64", "--export", str(tmp_path / "twin")) == 0
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert state["step"] == 3
    log = (tmp_path / "train.log").read_text()
    assert "answer_loss" in log
    engine = DuetLlava.load(tmp_path / "best")
    assert engine.answer(data.sample(0, "val", 0).image, "what color is the circle ?",
                         ReductionConfig("duet", 64), max_new_tokens=2)["avg_visual_tokens"] == pytest.approx(64, abs=2)


# These check that each supervised loss is logged through the DUET training path. They run DUET at
# budget 450, where V2V keeps every patch and only T2V drops: the authors' V2V discards 249..424 of
# the 576 patches, and on a random tower that is every patch of the queried objects in most steps.
@pytest.mark.parametrize("reduction", ["none", "duet"])
def test_training_with_query_attention_supervision_logs_its_loss(tmp_path, reduction):
    assert run(tmp_path, 3, "--attn-weight", "1", "--bind-weight", "1", "--reduction", reduction, "--budget", "450") == 0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    answered = [m for m in logged if "answer_loss" in m]
    assert answered and all(m["attn_loss"] > 0 and m["bind_loss"] > 0 for m in answered)
    assert not any("attn_loss" in m or "bind_loss" in m for m in logged if "answer_loss" not in m and "aux_loss" in m)


@pytest.mark.parametrize("reduction", ["none", "duet"])
def test_absent_supervision_logs_its_loss_only_on_batches_with_an_existence_question(tmp_path, reduction):
    assert run(tmp_path, 4, "--absent-weight", "1", "--bind-layer", "1", "--reduction", reduction,
               "--budget", "450") == 0
    answered = [m for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "answer_loss" in m]
    exists = [any(data.sample(0, "train", i).kind == "exist" for i in (2 * m["step"] - 2, 2 * m["step"] - 1))
              for m in answered]
    assert any(exists) and not all(exists)
    assert [m.get("absent_loss", 0) > 0 for m in answered] == exists


@pytest.mark.parametrize("reduction", ["none", "duet"])
def test_ask_lookup_and_chosen_layers_log_their_losses(tmp_path, reduction):
    assert run(tmp_path, 3, "--ask-weight", "1", "--ask-layer", "1", "--lookup-weight", "1", "--bind-weight", "1",
               "--bind-layer", "2", "--reduction", reduction, "--budget", "450") == 0
    answered = [m for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "answer_loss" in m]
    assert answered and all(m["ask_loss"] > 0 and m["bind_loss"] > 0 and m["lookup_loss"] > 0 and "attn_loss" not in m
                            for m in answered)
    for flag in ("--bind-layer", "--ask-layer"):
        with pytest.raises(ValueError):
            run(tmp_path / "late", 1, "--bind-weight", "1", "--ask-weight", "1", flag, "6")


def test_late_drop_answers_without_late_visual_tokens_and_needs_full_token_training(tmp_path):
    assert run(tmp_path, 3, "--late-drop", "1", "--attn-weight", "1", "--clip-every", "3") == 0
    answered = [m for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "answer_loss" in m]
    assert [m["late_drop"] for m in answered] == [1.0, 0.0]  # the clip batch at step 3 keeps every token
    for bad in (["--late-drop", "0.5", "--reduction", "duet"], ["--late-drop", "1.5"]):
        with pytest.raises(ValueError):
            run(tmp_path / "refused", 1, *bad)


def test_init_parts_vision_keeps_the_tower_and_projector_and_starts_a_fresh_decoder(trained, tmp_path):
    source = LlavaForConditionalGeneration.from_pretrained(trained / "best")
    with torch.no_grad():
        for p in source.parameters():
            p.add_(1.0)  # far from anything a fresh initialisation draws
    source.save_pretrained(tmp_path / "source")
    weights = source.state_dict()
    for parts, decoder_kept in (("all", True), ("vision", False)):
        assert run(tmp_path / parts, 1, "--init-from", str(tmp_path / "source"), "--init-parts", parts) == 0
        started = torch.load(tmp_path / parts / "state.pt", weights_only=False)["model"]
        moved = {name: (started[name] - weights[name]).abs().max().item() for name in started}
        # one optimizer step at lr 3e-3 moves a weight by about that much
        assert all(v < 0.05 for name, v in moved.items() if name.startswith(VISION_PARTS)), parts
        decoder = [v for name, v in moved.items() if name.startswith("model.language_model.layers.")]
        assert all(v < 0.05 for v in decoder) if decoder_kept else min(decoder) > 0.5, parts


def test_init_vision_from_puts_one_models_tower_under_anothers_decoder(trained, tmp_path):
    weights = {}
    for name, shift in (("decoder", 1.0), ("tower", -1.0)):  # far apart, and from a fresh draw
        source = LlavaForConditionalGeneration.from_pretrained(trained / "best")
        with torch.no_grad():
            for p in source.parameters():
                p.add_(shift)
        source.save_pretrained(tmp_path / name)
        weights[name] = source.state_dict()
    assert run(tmp_path / "run", 1, "--init-from", str(tmp_path / "decoder"),
               "--init-vision-from", str(tmp_path / "tower")) == 0
    started = torch.load(tmp_path / "run" / "state.pt", weights_only=False)["model"]
    for name, value in started.items():
        origin = "tower" if name.startswith(VISION_PARTS) else "decoder"
        assert (value - weights[origin][name]).abs().max() < 0.05, name  # one step at lr 3e-3
    for bad in ([], ["--init-from", str(tmp_path / "decoder"), "--init-parts", "vision"]):
        with pytest.raises(ValueError):
            run(tmp_path / "refused", 1, *bad, "--init-vision-from", str(tmp_path / "tower"))


def test_rope_theta_reaches_the_exported_config(tmp_path):
    assert run(tmp_path, 2, "--rope-theta", "1e6", "--eval-every", "2") == 0
    config = LlavaForConditionalGeneration.from_pretrained(tmp_path / "best").config.text_config
    assert config.rope_parameters["rope_theta"] == 1e6


def test_shallow_decoders_are_refused(tmp_path):
    with pytest.raises(ValueError):
        run(tmp_path, 1, "--no-resume", "--text-layers", "8")


def test_schedule_warms_up_holds_then_decays_and_curriculum_grows():
    cfg = TrainConfig(steps=1000, lr=1e-3, warmup=100, decay_frac=0.2, min_lr_frac=0.1,
                      pre_steps=50, curriculum_steps=100)
    assert lr_at(0, cfg) == pytest.approx(1e-5) and lr_at(99, cfg) == pytest.approx(1e-3)
    assert lr_at(500, cfg) == pytest.approx(1e-3) and lr_at(1000, cfg) == pytest.approx(1e-4)
    assert [max_objects_at(s, cfg) for s in (0, 50, 149, 150, 10_000)] == [6, 1, 1, 2, 6]


def test_grid_positions_make_neighbouring_patches_more_alike_than_distant_ones():
    processor = build_processor(data.vocabulary(), data.IMAGE_SIZE, data.PATCH_SIZE)
    model = build_model(TinyLlavaSpec(vision_hidden=32), processor)
    init_grid_positions(model)
    table = model.model.vision_tower.embeddings.position_embedding.weight[1:].detach()
    assert table.shape == (576, 32)

    def similarity(a, b):
        return torch.nn.functional.cosine_similarity(table[a[0] * 24 + a[1]], table[b[0] * 24 + b[1]], dim=0)

    assert similarity((5, 5), (5, 6)) > similarity((5, 5), (5, 20))
    assert similarity((5, 5), (6, 5)) > similarity((5, 5), (20, 5))


def test_a_run_only_replaces_a_shipped_model_it_beats(trained, tmp_path):
    info = json.loads((trained / "shipped" / "training.json").read_text())
    assert exported_accuracy(trained / "shipped", info) == info["val_acc"]
    assert exported_accuracy(trained / "shipped", {**info, "val_samples": 999}) == -1.0
    assert exported_accuracy(trained / "shipped", {**info, "vocabulary": ["other"]}) == -1.0
    assert exported_accuracy(tmp_path, info) == -1.0
    shipped = tmp_path / "shipped"
    shipped.mkdir()
    (shipped / "training.json").write_text(json.dumps({**info, "val_acc": 2.0}))
    assert run(tmp_path / "run", 3, "--export", str(shipped)) == 0
    assert sorted(p.name for p in shipped.iterdir()) == ["training.json"]
    assert (tmp_path / "run" / "best" / "model.safetensors").exists()


def test_a_new_run_can_start_from_an_exported_model(trained, tmp_path):
    source = LlavaForConditionalGeneration.from_pretrained(trained / "shipped")
    assert run(tmp_path, 1, "--init-from", str(trained / "shipped"), "--lr", "1e-12", "--weight-decay", "0") == 0
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    for name, tensor in source.state_dict().items():
        assert torch.allclose(state["model"][name], tensor, atol=1e-6), name


WIDER = ["--text-hidden", "32", "--text-heads", "4", "--text-kv-heads", "2", "--text-mlp", "48"]


def answer_logits(folder, samples):
    processor = AutoProcessor.from_pretrained(folder)
    batch = encode(processor, samples, 0.3)
    model = LlavaForConditionalGeneration.from_pretrained(folder).eval()
    with torch.no_grad():
        return model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"],
                     pixel_values=batch["pixel_values"]).logits


def test_a_run_can_widen_an_exported_decoder_and_starts_from_what_it_computed(trained, tmp_path):
    assert run(tmp_path, 1, "--init-from", str(trained / "shipped"), *WIDER, "--lr", "1e-12",
               "--weight-decay", "0") == 0
    config = LlavaForConditionalGeneration.from_pretrained(tmp_path / "best").config.text_config
    assert (config.hidden_size, config.num_attention_heads, config.intermediate_size) == (32, 4, 48)
    samples = [data.sample(0, "val", i) for i in range(2)]
    narrow, wide = answer_logits(trained / "shipped", samples), answer_logits(tmp_path / "best", samples)
    assert torch.allclose(narrow, wide, atol=1e-4)
    assert run(tmp_path, 2, "--init-from", str(trained / "shipped"), *WIDER) == 0  # resumes from step 1
    resumed = LlavaForConditionalGeneration.from_pretrained(tmp_path / "final").config.text_config
    assert resumed.rms_norm_eps == pytest.approx(config.rms_norm_eps) and config.rms_norm_eps == pytest.approx(0.5e-6)


def test_widened_units_start_silent_but_learn_and_bad_widths_are_refused():
    from model.checkpoint import load_widened

    processor = build_processor(data.vocabulary(), data.IMAGE_SIZE, data.PATCH_SIZE)
    narrow = TinyLlavaSpec(vision_hidden=16, vision_layers=1, text_hidden=16, text_layers=2, text_heads=2,
                           text_kv_heads=1, text_mlp=32, words=data.vocabulary())
    torch.manual_seed(0)
    source = build_model(narrow, processor)
    wide = build_model(TinyLlavaSpec(**{**narrow.__dict__, "text_hidden": 32, "text_heads": 4,
                                        "text_kv_heads": 2, "text_mlp": 48}), processor)
    load_widened(source, wide)
    batch = encode(processor, [data.sample(0, "val", 0)], 0.3)
    wide(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], pixel_values=batch["pixel_values"],
         labels=batch["labels"]).loss.backward()
    layer = wide.model.language_model.layers[1]
    assert layer.self_attn.o_proj.weight.grad[16:, :16].abs().sum() > 0  # the new residual dimensions
    assert layer.self_attn.o_proj.weight.grad[:16, 16:].abs().sum() > 0  # the new heads
    assert layer.mlp.down_proj.weight.grad[:, 32:].abs().sum() > 0  # the new MLP units
    for bad in ({"text_heads": 4, "text_kv_heads": 1}, {"text_hidden": 8}):
        other = build_model(TinyLlavaSpec(**{**narrow.__dict__, **bad}), processor)
        with pytest.raises(ValueError):
            load_widened(source, other)


def test_clip_batches_are_multi_image_prompts_with_answer_labels():
    from model.train import clip_batch

    processor = build_processor(data.vocabulary(), data.IMAGE_SIZE, data.PATCH_SIZE)
    cfg = TrainConfig(batch_size=4, clip_frames=3)
    samples, clips = clip_batch(cfg, 0, 6)
    assert len(samples) == 2 and all(2 <= len(c) <= 3 for c in clips)
    batch = encode(processor, samples, 0.3, clips)
    image = processor.tokenizer.convert_tokens_to_ids("<image>")
    for row, (s, frames) in enumerate(zip(samples, clips)):
        assert (batch["input_ids"][row] == image).sum() == 576 * len(frames)
        answer_ids = batch["labels"][row][batch["labels"][row] != -100]
        assert processor.tokenizer.convert_ids_to_tokens(answer_ids) == [s.answer, "</s>"]
    assert batch["pixel_values"].shape[0] == sum(len(c) for c in clips) and "colour" not in batch


def test_training_with_clip_batches_runs(tmp_path):
    assert run(tmp_path, 4, "--clip-every", "2", "--clip-frames", "2") == 0
    assert "answer_loss" in (tmp_path / "train.log").read_text()
    with pytest.raises(ValueError, match="full tokens"):
        run(tmp_path / "other", 2, "--clip-every", "2", "--reduction", "duet")


def test_extra_count_questions_spread_their_answers_evenly_and_repeat_on_resume():
    cfg = TrainConfig(count_share=0.5)
    drawn = [s for step in range(60) for s in count_samples(cfg, step, 4, 6)]
    assert all(s.kind == "count" for s in drawn)
    answers = [s.answer for s in drawn]
    assert set(answers) == {"one", "two", "three"}
    assert min(answers.count(a) for a in ("one", "two", "three")) > len(drawn) / 5  # natural mix: ~11 % "three"
    again = count_samples(cfg, 7, 4, 6)
    assert [s.question for s in again] == [s.question for s in drawn[28:32]]
    assert {s.answer for step in range(20) for s in count_samples(cfg, step, 2, 2)} <= {"one", "two"}


def test_training_with_extra_count_questions_runs_and_checks_the_share(tmp_path):
    assert run(tmp_path, 3, "--count-share", "0.5") == 0
    assert '"count_share": 0.5' in (tmp_path / "train.log").read_text().replace("'", '"')
    with pytest.raises(ValueError, match="count-share"):
        run(tmp_path / "other", 2, "--count-share", "1")


def test_window_tokens_of_the_whole_grid_are_the_stock_image_features():
    from model.train import visual_tokens, window_tokens

    spec = TinyLlavaSpec(vision_layers=3)
    processor = build_processor(spec.words, spec.image_size, spec.patch_size)
    torch.manual_seed(0)
    model = build_model(spec, processor).eval()
    batch = encode(processor, [data.sample(0, "train", i) for i in range(2)], 0.3)
    with torch.no_grad():
        whole = window_tokens(model, batch["pixel_values"], torch.arange(576).expand(2, -1))
        assert torch.allclose(whole, visual_tokens(model, batch["pixel_values"]), atol=1e-5)


def test_crop_windows_carry_their_patches_targets_and_positions():
    from model.train import crop_batch

    processor = build_processor(data.vocabulary(), data.IMAGE_SIZE, data.PATCH_SIZE)
    samples = [data.sample(0, "train", i) for i in range(2)]
    batch = encode(processor, samples, 0.3)
    pixels, indices, targets = crop_batch(TrainConfig(pre_crops=8), 0, batch, samples)
    assert pixels.shape == (8, 3, 112, 112) and indices.shape == (8, 64)
    for k in range(8):
        row = k // 4
        for name in data.PATCH_TARGETS:
            assert torch.equal(targets[name][k], batch[name][row][indices[k]])
        first = int(indices[k][0])
        r0, c0 = divmod(first, 24)
        assert torch.equal(pixels[k], batch["pixel_values"][row, :, r0 * 14:r0 * 14 + 112, c0 * 14:c0 * 14 + 112])
        assert (targets["colour"][k] > 0).any()  # each window is cut around an object


def test_training_with_a_window_pre_stage_runs(tmp_path):
    assert run(tmp_path, 3, "--pre-steps", "2", "--pre-crops", "6") == 0
    assert "aux_shape_recall" in (tmp_path / "train.log").read_text()


def patch_targets(samples):
    return {name: torch.stack([torch.from_numpy(data.patch_labels(s.objects)[name].reshape(-1)) for s in samples])
            for name in data.PATCH_TARGETS}


def test_position_heads_start_small_and_their_loss_scales_with_the_weight():
    torch.manual_seed(0)
    tokens = 40 * torch.randn(2, 576, 64)  # norm ~320, as the shipped tower's projected tokens
    targets = patch_targets([data.sample(0, "train", i) for i in range(2)])
    losses = {}
    for weight in (0.0, 1.0, 2.5):
        torch.manual_seed(1)
        heads = AuxHeads(64, weight)
        losses[weight], stats = heads.loss(tokens, targets)
        assert ("aux_across_recall" in stats) == (weight > 0)
    assert torch.isclose(losses[2.5] - losses[0.0], 2.5 * (losses[1.0] - losses[0.0]))
    # Two heads x (background + object) terms, each near log 3 at the start rather than tens of nats.
    assert 0 < losses[1.0] - losses[0.0] < 4 * 2.0


def test_count_heads_start_small_and_their_loss_scales_with_the_weight():
    torch.manual_seed(0)
    tokens = 40 * torch.randn(2, 576, 64)
    targets = patch_targets([data.sample(0, "train", i) for i in range(2)])
    losses = {}
    for weight in (0.0, 1.0, 3.0):
        torch.manual_seed(1)
        heads = AuxHeads(64, count_aux_weight=weight)
        losses[weight], stats = heads.loss(tokens, targets)
        assert ("aux_colour_count_recall" in stats) == ("aux_shape_count_recall" in stats) == (weight > 0)
    assert torch.isclose(losses[3.0] - losses[0.0], 3.0 * (losses[1.0] - losses[0.0]))
    assert 0 < losses[1.0] - losses[0.0] < 4 * 2.5  # two heads x two terms, each near log 7


def test_centre_ranking_loss_is_the_cross_entropy_of_each_objects_centroid_among_its_patches():
    samples = [data.sample(0, "val", i) for i in range(3)]
    targets = patch_targets(samples)
    scores = torch.randn(3, 576)
    terms = []
    for b, s in enumerate(samples):
        for k, o in enumerate(s.objects):
            members = targets["object"][b] == k + 1
            if targets["object"][b, o.centre_patch()] == k + 1:
                own = scores[b][members]
                terms.append(torch.logsumexp(own, 0) - scores[b, o.centre_patch()])
    assert len(terms) > 3
    assert torch.isclose(centre_ranking_loss(scores, targets["object"], targets["centre"]), torch.stack(terms).mean())
    sharp = scores.clone()
    sharp[targets["centre"] == 1] += 20.0  # each centroid far above its object's other patches
    assert centre_ranking_loss(sharp, targets["object"], targets["centre"]) < 1e-3
    # a centroid patch that no object covers enough is background: it names no object to rank
    objects = targets["object"].clone()
    lone = samples[0].objects[0].centre_patch()
    objects[0, lone] = 0
    scores[0, lone] = 50.0
    expected = centre_ranking_loss(scores, objects, targets["centre"] * (objects > 0))
    assert torch.isclose(centre_ranking_loss(scores, objects, targets["centre"]), expected)


def test_training_with_per_object_centres_logs_the_ranking_loss(tmp_path):
    assert run(tmp_path, 3, "--pre-steps", "1", "--centre-per-object") == 0
    logged = [m for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "aux_loss" in m]
    assert logged and all(m["aux_centre_rank_loss"] > 0 and 0 <= m["aux_centre_precision"] <= 1 for m in logged)


def test_training_with_position_heads_logs_their_recall(tmp_path):
    assert run(tmp_path, 2, "--pre-steps", "1", "--position-weight", "1") == 0
    log = (tmp_path / "train.log").read_text()
    assert "aux_across_recall" in log and "aux_updown_recall" in log


def test_count_targets_are_a_count_questions_answer():
    samples = [data.sample(0, "val", i) for i in range(60)]
    targets = count_targets(samples)
    for s, count in zip(samples, targets.tolist()):
        assert count == (data.COUNT_WORDS.index(s.answer) if s.kind == "count" else -100)
    assert len(set(targets.tolist())) > 2


def test_state_targets_name_the_offered_pair_the_asked_objects_halves_and_the_count():
    samples = [data.sample(0, "val", i) for i in range(60)]
    targets = StateHeads.targets(samples)
    assert torch.equal(targets["count"], count_targets(samples))
    for s, pair, across, updown in zip(samples, *(targets[k].tolist() for k in ("pair", "across", "updown"))):
        if s.kind != "position":
            assert (pair, across, updown) == (0, -100, -100)
            continue
        offered = ("left", "right") if pair == 1 else ("top", "bottom")
        assert s.answer in offered and " or ".join(offered) in s.question
        assert s.answer == offered[across if pair == 1 else updown]
    assert {1, 2} <= set(targets["pair"].tolist())


class Recording(StateHeads):
    def loss(self, states, targets):
        self.seen = states.detach().clone()
        return super().loss(states, targets)


@pytest.mark.parametrize("layer", [-1, 2])
def test_state_heads_read_the_chosen_state_of_the_row_that_predicts_the_answer(trained, layer):
    model = LlavaForConditionalGeneration.from_pretrained(trained / "shipped")
    processor = AutoProcessor.from_pretrained(trained / "shipped")
    engine = DuetLlava(model, processor, "training")
    samples = [data.sample(0, "val", i) for i in (0, 5, 7)]  # questions of different lengths pad differently
    batch = encode(processor, samples, 0.3)
    width = model.config.text_config.hidden_size
    heads, state_heads = AuxHeads(width), Recording(width, layer)
    _, _, losses, stats = forward_losses(model, heads, batch, True, engine, state_heads=state_heads)
    assert losses["state"] > 0 and "state_pair_recall" in stats
    for row, sample in enumerate(samples):  # causal: the prompt alone ends in the same state
        prompt = processor.apply_chat_template(conversation(sample.question), add_generation_prompt=True)
        alone = model(**processor(images=sample.image, text=prompt, return_tensors="pt"), output_hidden_states=True)
        expected = (alone.hidden_states[-1][0, -1] if layer < 0
                    else engine.lm.layers[layer].input_layernorm(alone.hidden_states[layer][0, -1]))
        assert torch.allclose(state_heads.seen[row], expected, atol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "duet"])
def test_training_with_state_heads_logs_their_loss_and_resumes(tmp_path, reduction):
    flags = ("--state-weight", "1", "--state-layer", "2", "--reduction", reduction, "--budget", "64")
    assert run(tmp_path, 3, *flags) == 0
    answered = [m for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "answer_loss" in m]
    assert answered and all(m["state_loss"] > 0 and 0 <= m["state_pair_recall"] <= 1 for m in answered)
    assert run(tmp_path, 4, *flags) == 0
    assert torch.load(tmp_path / "state.pt", weights_only=False)["state_heads"] is not None
    with pytest.raises(ValueError):
        run(tmp_path / "late", 1, "--state-weight", "1", "--state-layer", "6")


def test_read_targets_are_the_halves_of_the_one_asked_object_off_the_centre_lines_and_the_count():
    samples = [data.sample(0, "val", i) for i in range(80)]
    targets = ReadHeads.targets(samples)
    assert torch.equal(targets["count"], count_targets(samples))
    middle = data.IMAGE_SIZE / 2
    for s, across, updown in zip(samples, targets["across"].tolist(), targets["updown"].tolist()):
        for label, axis in ((across, 0), (updown, 1)):
            if len(s.query) != 1:
                assert label == -100
                continue
            coordinate = s.objects[s.query[0]].centroid[axis]
            off = abs(coordinate - middle) >= data.POSITION_MARGIN_PX
            assert label == (int(coordinate >= middle) if off else -100)
        if s.kind == "position":  # the label is the answer when the question asks along that axis
            asked = across if s.answer in ("left", "right") else updown
            assert s.answer == (("left", "right") if s.answer in ("left", "right") else ("top", "bottom"))[asked]
    kinds = {s.kind for s, a in zip(samples, targets["across"].tolist()) if a != -100}
    assert {"colour", "shape", "position"} <= kinds


class RecordingReads(ReadHeads):
    def loss(self, reads, targets):
        self.seen = reads.detach().clone()
        return super().loss(reads, targets)


def test_read_heads_read_the_bind_layers_attention_output_at_the_row_that_predicts_the_answer(trained):
    model = LlavaForConditionalGeneration.from_pretrained(trained / "shipped")
    processor = AutoProcessor.from_pretrained(trained / "shipped")
    engine = DuetLlava(model, processor, "training")
    samples = [data.sample(0, "val", i) for i in (1, 5, 6)]  # position, exist, count: padded differently
    batch = encode(processor, samples, 0.3)
    read_heads = RecordingReads(model.config.text_config.hidden_size, 1)
    counting = RecordingReads(model.config.text_config.hidden_size, 2, ("count",))
    _, _, losses, stats = forward_losses(model, AuxHeads(read_heads.across.in_features), batch, True, engine,
                                         read_heads={"read": read_heads, "count_read": counting})
    assert losses["read"].requires_grad and losses["count_read"].requires_grad
    assert "read_across_recall" in stats and "read_count_recall" in stats
    for row, sample in enumerate(samples):  # causal: the prompt alone gives the same read at its last row
        prompt = processor.apply_chat_template(conversation(sample.question), add_generation_prompt=True)
        outputs = {1: [], 2: []}
        hooks = [engine.lm.layers[i].self_attn.register_forward_hook(lambda _m, _a, out, i=i: outputs[i].append(out[0]))
                 for i in outputs]
        try:
            model(**processor(images=sample.image, text=prompt, return_tensors="pt"))
        finally:
            for hook in hooks:
                hook.remove()
        assert torch.allclose(read_heads.seen[row], outputs[1][0][0, -1], atol=1e-5)
        assert torch.allclose(counting.seen[row], outputs[2][0][0, -1], atol=1e-5)


@pytest.mark.parametrize("reduction", ["none", "duet"])
def test_training_with_read_heads_logs_their_loss_and_resumes(tmp_path, reduction):
    flags = ("--read-weight", "1", "--bind-layer", "2", "--count-read-weight", "1", "--count-aux-weight", "1",
             "--reduction", reduction, "--budget", "64")
    assert run(tmp_path, 3, *flags) == 0
    answered = [m for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "answer_loss" in m]
    assert answered and all(m["read_loss"] > 0 and "aux_colour_count_recall" in m for m in answered)
    assert run(tmp_path, 4, *flags) == 0
    state = torch.load(tmp_path / "state.pt", weights_only=False)
    assert set(state["read_heads"]) == {"across.weight", "across.bias", "updown.weight", "updown.bias"}
    assert set(state["count_read_heads"]) == {"count.weight", "count.bias"}


@pytest.mark.parametrize("reduction", ["none", "duet"])
def test_v2v_loss_scores_the_attention_v2v_ranks_by(trained, reduction):
    model = LlavaForConditionalGeneration.from_pretrained(trained / "shipped")
    processor = AutoProcessor.from_pretrained(trained / "shipped")
    engine = DuetLlava(model, processor, "training")
    samples = [data.sample(0, "val", i) for i in range(3)]
    batch = encode(processor, samples, 0.3)
    duet = plan(ReductionConfig("duet", 64), engine.n_layers, engine.n_patches)
    _, _, losses, stats = forward_losses(model, AuxHeads(model.config.text_config.hidden_size), batch, True, engine,
                                         duet if reduction == "duet" else None, v2v=True)
    with torch.no_grad():
        visual = engine.reduce(engine.vision_states(batch["pixel_values"]), duet, Timer(engine.device))
    shares = [torch.tensor(f["scores"])[batch["colour"][b] > 0].sum() for b, f in enumerate(visual.frames)]
    assert stats["v2v_object_share"] == pytest.approx(torch.stack(shares).mean().item(), abs=1e-5)
    assert losses["v2v"].item() == pytest.approx(-torch.stack(shares).log().mean().item(), abs=1e-4)
    assert losses["v2v"].requires_grad


def test_training_with_v2v_supervision_logs_its_loss(tmp_path):
    assert run(tmp_path, 3, "--v2v-weight", "1") == 0
    answered = [m for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "answer_loss" in m]
    assert answered and all(m["v2v_loss"] > 0 and 0 < m["v2v_object_share"] < 1 for m in answered)


def test_the_last_weights_are_exported_whatever_their_score(trained):
    final = json.loads((trained / "final" / "training.json").read_text())
    assert final["step"] == 4 and final["config"]["steps"] == 4
    state = torch.load(trained / "state.pt", weights_only=False)
    model = LlavaForConditionalGeneration.from_pretrained(trained / "final")
    # exported in half precision (checkpoint.store_half): the last weights, rounded
    assert all(torch.equal(v, state["model"][k].half().float()) for k, v in model.state_dict().items())


def test_redrawn_answer_rows_come_apart_around_their_mean_and_leave_the_rest(trained):
    model = LlavaForConditionalGeneration.from_pretrained(trained / "shipped")
    tokenizer = AutoProcessor.from_pretrained(trained / "shipped").tokenizer
    words = list(data.CHOICE_WORDS)
    ids = tokenizer.convert_tokens_to_ids(words)
    weight = model.lm_head.weight
    with torch.no_grad():  # collapse the four rows onto one, as the shipped decoder's were; one entry far
        weight[ids] = weight[ids[0]].clone()  # from zero, so that a redraw that loses the mean shows
        weight[ids, 0] += 5 * weight.std()
    before = weight.detach().clone()
    redraw_rows(model, tokenizer, words, torch.Generator().manual_seed(0))
    after = weight.detach()
    others = [i for i in range(len(after)) if i not in ids]
    assert torch.equal(after[others], before[others])
    rows = torch.nn.functional.normalize(after[ids], dim=1)
    cosines = (rows @ rows.T)[~torch.eye(len(ids), dtype=torch.bool)]
    assert cosines.max() < 0.9
    assert torch.allclose(after[ids].mean(0), before[ids[0]], atol=3 * before.std().item())
    with pytest.raises(ValueError):
        redraw_rows(model, tokenizer, ["left", "sideways"], torch.Generator())


def test_redraw_answers_applies_to_the_initial_model_and_needs_init_from(trained, tmp_path):
    source = LlavaForConditionalGeneration.from_pretrained(trained / "shipped")
    ids = AutoProcessor.from_pretrained(trained / "shipped").tokenizer.convert_tokens_to_ids(["left", "right"])
    assert run(tmp_path / "run", 1, "--init-from", str(trained / "shipped"), "--redraw-answers", "left,right",
               "--lr", "1e-12", "--weight-decay", "0") == 0
    started = torch.load(tmp_path / "run" / "state.pt", weights_only=False)["model"]["lm_head.weight"]
    assert (started[ids] - source.lm_head.weight[ids]).abs().max() > 1e-3
    others = [i for i in range(len(started)) if i not in ids]
    assert torch.allclose(started[others], source.lm_head.weight[others], atol=1e-6)
    with pytest.raises(ValueError):
        run(tmp_path / "alone", 1, "--redraw-answers", "left,right")


@pytest.mark.parametrize("reduction, extra", [("none", ()), ("duet", ()), ("none", ("--count-spread", "--object-drop", "0.5"))])
def test_training_with_count_and_point_supervision_logs_their_losses(tmp_path, reduction, extra):
    assert run(tmp_path, 4, "--count-weight", "1", "--count-layer", "1", "--count-head", "1", "--point-weight", "1",
               "--reduction", reduction, "--budget", "64", "--batch-size", "8", *extra) == 0
    logged = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    for name in ("count_loss", "point_loss"):  # logged on steps whose batch asks a count / position question
        values = [m[name] for m in logged if name in m]
        assert values and all(loss > 0 for loss in values)
        assert not any(name in m for m in logged if "aux_loss" in m and "answer_loss" not in m)
    for flags in (("--count-layer", "6"), ("--count-head", "4"), ("--point-layer", "6"),
                  ("--point-weight", "1", "--point-head", "0", "--count-head", "0")):
        with pytest.raises(ValueError):
            run(tmp_path / "refused", 1, "--count-weight", "1", *flags)
    for flag in ("--count-exist", "--count-spread"):
        with pytest.raises(ValueError):
            run(tmp_path / "refused", 1, flag)


def test_early_late_and_object_drop_share_the_full_token_steps_and_need_them(tmp_path):
    assert run(tmp_path, 6, "--early-drop", "0.5", "--late-drop", "0.5") == 0
    answered = [m for m in map(json.loads, (tmp_path / "metrics.jsonl").read_text().splitlines()) if "answer_loss" in m]
    assert all(m["early_drop"] + m["late_drop"] == 1 for m in answered)
    assert {m["early_drop"] for m in answered} == {0.0, 1.0}
    assert run(tmp_path / "objects", 3, "--object-drop", "1") == 0
    answered = [m for m in map(json.loads, (tmp_path / "objects" / "metrics.jsonl").read_text().splitlines())
                if "answer_loss" in m]
    assert answered and all(m["object_drop"] == 1 and "early_drop" not in m for m in answered)
    for flags in (("--early-drop", "0.6", "--late-drop", "0.5"), ("--early-drop", "0.5", "--reduction", "duet"),
                  ("--object-drop", "0.5", "--early-drop", "0.3", "--late-drop", "0.3"),
                  ("--object-drop", "0.5", "--reduction", "duet")):
        with pytest.raises(ValueError):
            run(tmp_path / "refused", 1, *flags)
