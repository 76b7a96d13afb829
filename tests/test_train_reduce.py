"""Training-time reductions: same loss as stock with reduction off, gradients with it on; the query
attention loss reads the same attention the stock model computes."""

import math

import pytest
import torch
import torch.nn.functional as F
from transformers import AutoProcessor, LlavaForConditionalGeneration

from model import data
from model.budget import Plan, ReductionConfig, Stage, plan
from model.engine import DuetLlava
from model.train import LATE_DROP_KEEPS, AuxHeads, encode, forward_losses, late_drop_plan, stage_layer
from model.train_reduce import EARLY_DROP, OBJECT_DROP, Supervision, reduced_loss, row_targets

def batch(engine):
    """Two right-padded training rows built by the trainer's own encoder."""
    enc = encode(engine.processor, [data.sample(0, "train", i) for i in range(2)], 0.3)
    assert engine.tokenizer.padding_side == "right"
    return enc, enc["labels"], enc["salient"]


def test_no_reduction_loss_equals_stock(engine):
    enc, labels, salient = batch(engine)
    stock = engine.model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"], labels=labels).loss
    for cfg in (ReductionConfig("full"), ReductionConfig("duet", 576)):
        loss, *_ = reduced_loss(engine, plan(cfg, engine.n_layers), enc["input_ids"], enc["pixel_values"], labels,
                               salient)
        assert loss.item() == pytest.approx(stock.item(), abs=1e-5)


@pytest.mark.parametrize("method", ["duet", "visionzip", "pyramiddrop"])
def test_reduced_training_loss_has_gradients_everywhere_tokens_survive(engine, method):
    enc, labels, salient = batch(engine)
    p = plan(ReductionConfig(method, 64), engine.n_layers)
    engine.model.zero_grad()
    with torch.enable_grad():
        loss, tokens, _, _ = reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], labels, salient)
        loss.backward()
    assert torch.isfinite(loss) and tokens.shape[:2] == (2, p.tokens_per_frame)
    tower = engine.vision.encoder.layers[0].self_attn.q_proj.weight.grad
    assert tower is not None and tower.abs().sum() > 0
    assert engine.projector.linear_1.weight.grad.abs().sum() > 0
    assert engine.lm.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    engine.model.zero_grad()


def stock_query_share(model, enc, rows: list[int], layer: int, image_token: int) -> list[float]:
    """Share of the salient rows' attention on the queried patches, from the stock eager forward's
    attention maps (mean over heads and salient rows, renormalised over the visual columns)."""
    out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                pixel_values=enc["pixel_values"], output_attentions=True)
    shares = []
    for b in rows:
        visual = torch.nonzero(enc["input_ids"][b] == image_token).flatten()
        score = out.attentions[layer][b][:, enc["salient"][b]][:, :, visual].mean((0, 1))
        on = torch.tensor([p in enc["query"][b] for p in range(len(visual))])
        shares.append(float(score[on].sum() / score.sum()))
    return shares


def test_query_attention_loss_is_minus_log_of_the_stock_attention_share(tiny_checkpoint):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    engine = DuetLlava(model, processor, "eager")
    samples = [data.sample(0, "train", i) for i in range(6)]
    enc = encode(processor, samples, 0.3)
    rows = [b for b, patches in enumerate(enc["query"]) if patches]
    assert rows
    with torch.no_grad():
        _, _, attention, _ = forward_losses(model, AuxHeads(model.config.text_config.hidden_size), enc, True, engine,
                                            supervised={"attn": Supervision(stage_layer(engine), False)})
        shares = stock_query_share(model, enc, rows, stage_layer(engine), engine.image_token_id)
    assert attention["attn"].item() == pytest.approx(-sum(math.log(s) for s in shares) / len(shares), rel=1e-4)


def test_query_attention_loss_on_merged_tokens_trains_the_stage_layer(engine):
    enc, labels, salient = batch(engine)
    # at 192 V2V keeps 327 of 576 patches (at 64 the queried objects can all be discarded)
    p = plan(ReductionConfig("duet", 192), engine.n_layers)
    engine.model.zero_grad()
    with torch.enable_grad():
        *_, attention = reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], labels, salient, enc["query"],
                                     {"attn": Supervision(p.stages[0].layer, False)})
        attention = attention["attn"]
        attention.backward()
    # a fraction of the V2V tokens show the queried objects, so the share is below 1 at random init
    assert torch.isfinite(attention) and attention.item() > 0
    stage = p.stages[0].layer
    assert engine.lm.layers[stage].self_attn.q_proj.weight.grad.abs().sum() > 0
    assert engine.lm.layers[stage - 1].mlp.down_proj.weight.grad.abs().sum() > 0
    assert engine.lm.layers[stage].mlp.down_proj.weight.grad is None  # the loss reads the layer's input only
    engine.model.zero_grad()
    *_, none = reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], labels, salient)
    assert none == {}


def test_bind_supervision_reads_only_the_last_prompt_row_and_stays_before_the_stages(engine):
    enc, labels, salient = batch(engine)
    p = plan(ReductionConfig("duet", 192), engine.n_layers)
    early = engine.n_layers // 4
    with torch.no_grad():
        *_, both = reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], labels, salient, enc["query"],
                                {"all": Supervision(early, False), "last": Supervision(early, True)})
        *_, last_only = reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], labels,
                                     [rows[-1:] for rows in salient], enc["query"], {"all": Supervision(early, False)})
    assert both["last"].item() == pytest.approx(last_only["all"].item(), rel=1e-6)
    assert any(len(rows) > 1 for rows in salient) and both["all"].item() != pytest.approx(both["last"].item())
    with pytest.raises(ValueError):
        reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], labels, salient, enc["query"],
                     {"late": Supervision(p.stages[0].layer + 1, True)})


def words_share(model, embeds: torch.Tensor, last: int, asked: list[int]) -> float:
    """Share of the last prompt row's layer-0 attention on the asked positions (stock eager
    decoder on these input embeddings, mean over heads)."""
    out = model.model.language_model(inputs_embeds=embeds[None], output_attentions=True)
    return float(out.attentions[0][0, :, last, asked].sum(-1).mean())


def stock_last_row_shares(model, engine, enc, rows_per_sequence: list[list[int]]) -> list[float]:
    """Per sequence, the last prompt row's stock layer-0 share on the given rows (full image tokens)."""
    lengths = enc["attention_mask"].sum(1) - (enc["labels"] != -100).sum(1)
    merged = model.model.language_model.embed_tokens(enc["input_ids"])
    image = torch.cat(model.model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output)
    merged = merged.masked_scatter((enc["input_ids"] == engine.image_token_id)[..., None].expand_as(merged), image)
    return [words_share(model, merged[b], int(lengths[b]) - 1, rows) for b, rows in enumerate(rows_per_sequence)]


def test_ask_supervision_is_minus_log_of_the_stock_layer0_share_on_the_object_words(tiny_checkpoint):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    engine = DuetLlava(model, processor, "eager")
    object_words = set(data.object_words()) & set(engine.tokenizer.get_vocab())  # the test vocabulary lacks some
    samples = [s for s in (data.sample(0, "train", i) for i in range(20))
               if object_words & set(s.question.split())][:3]
    enc = encode(processor, samples, 0.3)
    for b, s in enumerate(samples):
        words = engine.tokenizer.convert_ids_to_tokens(enc["input_ids"][b, enc["asked"][b]].tolist())
        assert words == [w for w in s.question.split() if w in object_words]
    ask = {"ask": Supervision(0, True, "words")}
    lengths = enc["attention_mask"].sum(1) - (enc["labels"] != -100).sum(1)
    with torch.no_grad():
        _, _, full, _ = forward_losses(model, AuxHeads(model.config.text_config.hidden_size), enc, True, engine,
                                       supervised=ask)
        shares = stock_last_row_shares(model, engine, enc, enc["asked"])
        assert full["ask"].item() == pytest.approx(-sum(math.log(s) for s in shares) / 3, rel=1e-4)

        p = plan(ReductionConfig("duet", 192), engine.n_layers)
        _, tokens, _, reduced = reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], enc["labels"],
                                             enc["salient"], enc["query"], ask, enc["asked"])
        shares = []
        for b in range(3):  # the same sequence with the image's 576 tokens replaced by its V2V tokens
            n = tokens.shape[1]
            image_at = int(torch.nonzero(enc["input_ids"][b] == engine.image_token_id)[0])
            ids = torch.cat([enc["input_ids"][b, :image_at + n], enc["input_ids"][b, image_at + 576:]])
            row = model.model.language_model.embed_tokens(ids)
            row[image_at:image_at + n] = tokens[b]
            shift = 576 - n
            shares.append(words_share(model, row, int(lengths[b]) - 1 - shift, [a - shift for a in enc["asked"][b]]))
    assert reduced["ask"].item() == pytest.approx(-sum(math.log(s) for s in shares) / 3, rel=1e-4)
    assert reduced["ask"].item() != pytest.approx(full["ask"].item(), rel=1e-3)


def test_choices_supervision_is_minus_log_of_the_stock_layer0_share_on_the_offered_answers(tiny_checkpoint):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    engine = DuetLlava(model, processor, "eager")
    choices = set(data.CHOICE_WORDS) & set(engine.tokenizer.get_vocab())
    samples = [s for s in (data.sample(0, "train", i) for i in range(60)) if s.kind == "position"][:2]
    samples.append(next(s for s in (data.sample(0, "train", i) for i in range(60)) if s.kind == "colour"))
    enc = encode(processor, samples, 0.3)
    for b, s in enumerate(samples):
        words = engine.tokenizer.convert_ids_to_tokens(enc["input_ids"][b, enc["offered"][b]].tolist())
        assert words == [w for w in s.question.split() if w in choices]
    assert [len(rows) for rows in enc["offered"]] == [2, 2, 0]
    supervised = {"choices": Supervision(0, True, "choices")}
    with torch.no_grad():
        _, _, full, _ = forward_losses(model, AuxHeads(model.config.text_config.hidden_size), enc, True, engine,
                                       supervised=supervised)
        shares = stock_last_row_shares(model, engine, enc, enc["offered"][:2])
        *_, reduced = reduced_loss(engine, plan(ReductionConfig("full"), engine.n_layers), enc["input_ids"],
                                   enc["pixel_values"], enc["labels"], enc["salient"], supervised=supervised,
                                   offered=enc["offered"])
    expected = -sum(math.log(s) for s in shares) / 2  # the colour question offers nothing and is left out
    assert full["choices"].item() == pytest.approx(expected, rel=1e-4)
    assert reduced["choices"].item() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError):
        reduced_loss(engine, plan(ReductionConfig("full"), engine.n_layers), enc["input_ids"], enc["pixel_values"],
                     enc["labels"], enc["salient"], supervised=supervised)


def test_absent_supervision_scores_every_token_onto_the_first_for_no_and_the_object_for_yes(tiny_checkpoint):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    engine = DuetLlava(model, processor, "eager")
    pool = [data.sample(0, "train", i) for i in range(80)]
    samples = [next(s for s in pool if s.kind == "exist" and s.answer == answer) for answer in ("no", "yes")]
    samples.append(next(s for s in pool if s.kind == "colour"))
    enc = encode(processor, samples, 0.3)
    assert enc["absent"] == [True, False, None]
    image_at = int(torch.nonzero(enc["input_ids"][1] == engine.image_token_id)[0])
    found = [[0], [image_at + p for p in sorted(enc["query"][1])]]  # the first token; the object's patches
    supervised = {"absent": Supervision(0, True, "absent")}
    with torch.no_grad():
        _, _, full, _ = forward_losses(model, AuxHeads(model.config.text_config.hidden_size), enc, True, engine,
                                       supervised=supervised)
        shares = stock_last_row_shares(model, engine, enc, found)
        *_, reduced = reduced_loss(engine, plan(ReductionConfig("full"), engine.n_layers), enc["input_ids"],
                                   enc["pixel_values"], enc["labels"], enc["salient"], enc["query"],
                                   supervised=supervised, absent=enc["absent"])
    expected = -sum(math.log(s) for s in shares) / 2  # the colour question is left out
    assert full["absent"].item() == pytest.approx(expected, rel=1e-4)
    assert reduced["absent"].item() == pytest.approx(expected, rel=1e-4)
    with pytest.raises(ValueError):
        reduced_loss(engine, plan(ReductionConfig("full"), engine.n_layers), enc["input_ids"], enc["pixel_values"],
                     enc["labels"], enc["salient"], enc["query"], supervised=supervised)


def test_lookup_supervision_scores_each_object_word_row_on_the_objects_it_names(tiny_checkpoint):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    engine = DuetLlava(model, processor, "eager")
    vocab = set(engine.tokenizer.get_vocab())
    samples = [s for s in (data.sample(0, "train", i) for i in range(40))
               if len(s.objects) > 1 and len(set(data.object_words()) & vocab & set(s.question.split())) > 1][:3]
    enc = encode(processor, samples, 0.3)
    for b, s in enumerate(samples):
        for at, patches in zip(enc["asked"][b], enc["named"][b]):
            word = engine.tokenizer.convert_ids_to_tokens(int(enc["input_ids"][b, at]))
            named = [i for i, o in enumerate(s.objects) if word in (o.colour, o.shape, data.PLURALS[o.shape])]
            assert patches == data.object_patches(s, named)  # empty when the word names no object here
    lookup = {"lookup": Supervision(0, False, "named")}
    with torch.no_grad():
        _, _, full, _ = forward_losses(model, AuxHeads(model.config.text_config.hidden_size), enc, True, engine,
                                       supervised=lookup)
        out = model(input_ids=enc["input_ids"], attention_mask=enc["attention_mask"],
                    pixel_values=enc["pixel_values"], output_attentions=True)
    expected = []
    for b in range(len(samples)):
        visual = torch.nonzero(enc["input_ids"][b] == engine.image_token_id).flatten()
        for at, patches in zip(enc["asked"][b], enc["named"][b]):
            if not patches:
                continue
            score = out.attentions[0][b][:, at, visual].mean(0)
            expected.append(-math.log(float(score[sorted(patches)].sum() / score.sum())))
    assert len(expected) > len(samples)  # several words per question: entries map back to their sequence
    assert full["lookup"].item() == pytest.approx(sum(expected) / len(expected), rel=1e-4)
    # VisionZip merges every patch into some token (DUET discards most at 64)
    p = plan(ReductionConfig("visionzip", 64), engine.n_layers)
    with torch.no_grad():
        *_, reduced = reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], enc["labels"], enc["salient"],
                                   enc["query"], lookup, enc["asked"], enc["named"])
    assert 0 < reduced["lookup"].item() < full["lookup"].item()  # merged tokens cover more of the named patches


def late_stage(engine, layer: int, keep: int) -> Plan:
    return Plan("late-drop", engine.n_patches, engine.n_layers, engine.n_patches,
                stages=(Stage(layer, keep, "random", layer),))


def test_dropping_every_visual_token_late_continues_the_stock_text_rows_alone(engine):
    """Keep 0 from layer l: the loss is the stock forward's text rows at l run through the later
    layers on their own, at their own positions."""
    enc, labels, salient = batch(engine)
    layer = engine.n_layers * 3 // 4
    with torch.no_grad():
        loss, *_ = reduced_loss(engine, late_stage(engine, layer, 0), enc["input_ids"], enc["pixel_values"], labels,
                                salient, generator=torch.Generator().manual_seed(0))
        states = engine.model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"],
                              output_hidden_states=True).hidden_states[layer]
        logits, targets = [], []
        for b, ids in enumerate(enc["input_ids"]):
            rows = torch.nonzero(ids != engine.image_token_id).flatten()
            h, pos = states[b, rows][None], rows[None]
            rope = engine.lm.rotary_emb(h, pos)
            for decoder_layer in engine.lm.layers[layer:]:
                h = decoder_layer(h, attention_mask=None, position_ids=pos, position_embeddings=rope)
            logits.append(engine.lm_head(engine.lm.norm(h))[0, :-1])
            targets.append(labels[b, rows][1:])
        expected = F.cross_entropy(torch.cat(logits).float(), torch.cat(targets), ignore_index=-100)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-5)


def test_late_drop_plans_are_random_late_and_reproducible(engine):
    enc, labels, salient = batch(engine)
    plans = [late_drop_plan(engine, torch.Generator().manual_seed(seed)) for seed in range(40)]
    assert {p.stages[0].layer for p in plans} <= set(range(engine.n_layers // 2, engine.n_layers))
    assert {p.stages[0].keep for p in plans} == {round(k * engine.n_patches) for k in LATE_DROP_KEEPS}
    assert all(p.k1 is None and p.stages[0].query == "random" for p in plans)
    assert late_drop_plan(engine, torch.Generator().manual_seed(7)) == plans[7]

    def loss(seed: int) -> float:
        quarter = late_stage(engine, engine.n_layers // 2, engine.n_patches // 4)
        with torch.no_grad():
            return reduced_loss(engine, quarter, enc["input_ids"], enc["pixel_values"], labels, salient,
                                generator=torch.Generator().manual_seed(seed))[0].item()

    assert loss(1) == loss(1) and loss(1) != loss(2)
    with pytest.raises(ValueError):
        reduced_loss(engine, late_stage(engine, 16, 0), enc["input_ids"], enc["pixel_values"], labels, salient)


@pytest.mark.parametrize("kind", ["count", "exist"])
def test_count_supervision_is_the_cross_entropy_of_one_stock_head_against_first_token_and_centroids(tiny_checkpoint,
                                                                                                   kind):
    """Count questions, and with --count-exist existence questions ("no": the first token alone)."""
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    engine = DuetLlava(model, processor, "eager")
    pool = [data.sample(0, "train", i) for i in range(80)]
    if kind == "count":
        samples = [s for s in pool if s.kind == "count" and len(s.query) > 1][:1]
        samples += [s for s in pool if s.kind == "count" and len(s.query) == 1][:1]
    else:
        samples = [next(s for s in pool if s.kind == "exist" and s.answer == a) for a in ("yes", "no")]
    samples.append(next(s for s in pool if s.kind == "colour"))
    enc = encode(processor, samples, 0.3, counted_kinds=("count", kind))
    assert enc["centres"][2] is None
    assert [len(c) for c in enc["centres"][:2]] == [len(s.query) for s in samples[:2]]
    assert encode(processor, samples, 0.3)["centres"][:2] == (enc["centres"][:2] if kind == "count" else [None] * 2)
    for s, centres in zip(samples[:2], enc["centres"]):
        assert [data.patch_labels(s.objects)["centre"].reshape(-1)[p] for p in centres] == [1] * len(s.query)
    layer, head = 2, 3
    supervised = {"count": Supervision(layer, True, "count", head)}
    lengths = enc["attention_mask"].sum(1) - (enc["labels"] != -100).sum(1)
    with torch.no_grad():
        _, _, full, _ = forward_losses(model, AuxHeads(model.config.text_config.hidden_size), enc, True, engine,
                                       supervised=supervised)
        *_, unreduced = reduced_loss(engine, plan(ReductionConfig("full"), engine.n_layers), enc["input_ids"],
                                     enc["pixel_values"], enc["labels"], enc["salient"], supervised=supervised,
                                     centres=enc["centres"])
        merged = model.model.language_model.embed_tokens(enc["input_ids"])
        image = torch.cat(model.model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output)
        merged = merged.masked_scatter((enc["input_ids"] == engine.image_token_id)[..., None].expand_as(merged), image)
        expected = []
        for b in range(2):
            out = model.model.language_model(inputs_embeds=merged[b:b + 1], output_attentions=True)
            probs = out.attentions[layer][0, head, int(lengths[b]) - 1]
            image_at = int(torch.nonzero(enc["input_ids"][b] == engine.image_token_id)[0])
            rows = [0] + [image_at + p for p in enc["centres"][b]]
            expected.append(-probs[rows].log().mean())
    assert full["count"].item() == pytest.approx(float(torch.stack(expected).mean()), rel=1e-4)
    assert unreduced["count"].item() == pytest.approx(full["count"].item(), rel=1e-4)
    with pytest.raises(ValueError):
        reduced_loss(engine, plan(ReductionConfig("full"), engine.n_layers), enc["input_ids"], enc["pixel_values"],
                     enc["labels"], enc["salient"], supervised=supervised)


def test_spread_count_target_is_each_objects_mask_share_per_patch_and_both_paths_score_it_alike(tiny_checkpoint):
    """--count-spread: mass 1 on the first token and 1 per counted object, spread over the patches
    its mask touches by the share of the mask each holds."""
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    engine = DuetLlava(model, processor, "eager")
    pool = [data.sample(0, "train", i) for i in range(80)]
    samples = [next(s for s in pool if s.kind == "count" and len(s.query) > 1),
               next(s for s in pool if s.kind == "colour")]
    enc = encode(processor, samples, 0.3, count_spread=True)
    assert enc["centres"][1] is None and enc["centre_masses"][1] is None
    assert encode(processor, samples, 0.3)["centre_masses"] is None
    patches, masses = enc["centres"][0], enc["centre_masses"][0]
    expected = torch.zeros(engine.n_patches)
    for i in samples[0].query:
        coverage = torch.from_numpy(data.patch_coverage(samples[0].objects[i].mask).reshape(-1)).float()
        expected += coverage / coverage.sum()
    spread = torch.zeros(engine.n_patches).index_add_(0, torch.tensor(patches), torch.tensor(masses))
    assert torch.allclose(spread, expected, atol=1e-6)
    assert sum(masses) == pytest.approx(len(samples[0].query))
    layer, head = 2, 1
    supervised = {"count": Supervision(layer, True, "count", head)}
    with torch.no_grad():
        _, _, full, _ = forward_losses(model, AuxHeads(model.config.text_config.hidden_size), enc, True, engine,
                                       supervised=supervised)
        *_, unreduced = reduced_loss(engine, plan(ReductionConfig("full"), engine.n_layers), enc["input_ids"],
                                     enc["pixel_values"], enc["labels"], enc["salient"], supervised=supervised,
                                     centres=enc["centres"], centre_masses=enc["centre_masses"])
        out = model(input_ids=enc["input_ids"][:1], pixel_values=enc["pixel_values"][:1], output_attentions=True)
    length = int(enc["attention_mask"][0].sum() - (enc["labels"][0] != -100).sum())
    probs = out.attentions[layer][0, head, length - 1, :length]
    image_at = int(torch.nonzero(enc["input_ids"][0] == engine.image_token_id)[0])
    target = torch.zeros_like(probs)
    target[0] = 1.0
    target[image_at:image_at + engine.n_patches] += spread
    target /= target.sum()
    assert full["count"].item() == pytest.approx(float(-(target * probs.log()).sum()), rel=1e-4)
    assert unreduced["count"].item() == pytest.approx(full["count"].item(), rel=1e-4)


def test_row_targets_follow_centroids_into_merged_tokens_and_add_up_when_two_share_one(engine):
    present = torch.ones(2, 6, dtype=torch.bool)
    present[1, 5] = False
    targets = row_targets([[0, 2, 2, 4], None], present)
    assert targets[1] is None
    assert targets[0].tolist() == [0.25, 0, 0.5, 0, 0.25, 0]

    samples = [s for s in (data.sample(0, "train", i) for i in range(80)) if s.kind == "count"][:2]
    enc = encode(engine.processor, samples, 0.3)
    captured = {}
    real = row_targets

    def spy(marked, present, masses=None):
        captured["rows"] = marked
        return real(marked, present, masses)

    supervised = {"count": Supervision(2, True, "count", 0)}
    import model.train_reduce as train_reduce
    train_reduce.row_targets = spy
    try:
        with torch.no_grad():
            _, tokens, _, losses = reduced_loss(engine, plan(ReductionConfig("visionzip", 64), engine.n_layers),
                                                enc["input_ids"], enc["pixel_values"], enc["labels"], enc["salient"],
                                                supervised=supervised, centres=enc["centres"])
    finally:
        train_reduce.row_targets = real
    assert losses["count"] > 0
    hidden = engine.vision_states(enc["pixel_values"])
    from model.engine import Timer
    visual = engine.reduce(hidden, plan(ReductionConfig("visionzip", 64), engine.n_layers), Timer(engine.device))
    for b, rows in enumerate(captured["rows"]):
        image_at = int(torch.nonzero(enc["input_ids"][b] == engine.image_token_id)[0])
        assert rows[0] == 0 and len(rows) == 1 + len(enc["centres"][b])
        for row, patch in zip(rows[1:], enc["centres"][b]):
            assert patch in visual.frames[b]["token_patches"][row - image_at]


def test_point_supervision_is_minus_log_of_one_stock_head_on_the_questions_copy_of_the_answer(tiny_checkpoint):
    processor = AutoProcessor.from_pretrained(tiny_checkpoint)
    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint, attn_implementation="eager")
    engine = DuetLlava(model, processor, "eager")
    pool = [data.sample(0, "train", i) for i in range(80)]
    samples = [s for s in pool if s.kind == "position"][:2] + [next(s for s in pool if s.kind == "count")]
    enc = encode(processor, samples, 0.3)
    assert enc["pointed"][2] is None
    for b, s in enumerate(samples[:2]):
        assert len(enc["pointed"][b]) == 1 and enc["pointed"][b][0] in enc["offered"][b]
        assert engine.tokenizer.convert_ids_to_tokens(int(enc["input_ids"][b, enc["pointed"][b][0]])) == s.answer
    layer, head = 3, 1
    supervised = {"point": Supervision(layer, True, "point", head)}
    lengths = enc["attention_mask"].sum(1) - (enc["labels"] != -100).sum(1)
    p64 = plan(ReductionConfig("duet", 64), engine.n_layers)
    with torch.no_grad():
        _, _, full, _ = forward_losses(model, AuxHeads(model.config.text_config.hidden_size), enc, True, engine,
                                       supervised=supervised)
        *_, unreduced = reduced_loss(engine, plan(ReductionConfig("full"), engine.n_layers), enc["input_ids"],
                                     enc["pixel_values"], enc["labels"], enc["salient"], supervised=supervised,
                                     pointed=enc["pointed"])
        _, tokens, _, reduced = reduced_loss(engine, p64, enc["input_ids"], enc["pixel_values"], enc["labels"],
                                             enc["salient"], supervised=supervised, pointed=enc["pointed"])
        merged = model.model.language_model.embed_tokens(enc["input_ids"])
        image = torch.cat(model.model.get_image_features(pixel_values=enc["pixel_values"]).pooler_output)
        merged = merged.masked_scatter((enc["input_ids"] == engine.image_token_id)[..., None].expand_as(merged), image)
        expected, expected_reduced = [], []
        for b in range(2):
            out = model.model.language_model(inputs_embeds=merged[b:b + 1], output_attentions=True)
            expected.append(-out.attentions[layer][0, head, int(lengths[b]) - 1, enc["pointed"][b][0]].log())
            n = tokens.shape[1]  # the same sequence with the image's 576 tokens replaced by its V2V tokens
            image_at = int(torch.nonzero(enc["input_ids"][b] == engine.image_token_id)[0])
            ids = torch.cat([enc["input_ids"][b, :image_at + n], enc["input_ids"][b, image_at + 576:]])
            row = model.model.language_model.embed_tokens(ids)
            row[image_at:image_at + n] = tokens[b]
            out = model.model.language_model(inputs_embeds=row[None], output_attentions=True)
            shift = 576 - n
            expected_reduced.append(-out.attentions[layer][0, head, int(lengths[b]) - 1 - shift,
                                                           enc["pointed"][b][0] - shift].log())
    assert full["point"].item() == pytest.approx(float(torch.stack(expected).mean()), rel=1e-4)
    assert unreduced["point"].item() == pytest.approx(full["point"].item(), rel=1e-4)
    assert reduced["point"].item() == pytest.approx(float(torch.stack(expected_reduced).mean()), rel=1e-4)
    with pytest.raises(ValueError):
        reduced_loss(engine, p64, enc["input_ids"], enc["pixel_values"], enc["labels"], enc["salient"],
                     supervised=supervised)


def test_early_drop_lets_a_random_subset_of_the_projected_patches_into_the_llm(engine):
    enc, labels, salient = batch(engine)
    stock = engine.model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"], labels=labels).loss
    every = Plan(EARLY_DROP, 576, engine.n_layers, 576)
    loss, *_ = reduced_loss(engine, every, enc["input_ids"], enc["pixel_values"], labels, salient,
                            generator=torch.Generator().manual_seed(0))
    assert loss.item() == pytest.approx(stock.item(), abs=1e-5)
    quarter = Plan(EARLY_DROP, 144, engine.n_layers, 576)
    with torch.no_grad():
        draws = [reduced_loss(engine, quarter, enc["input_ids"], enc["pixel_values"], labels, salient,
                              generator=torch.Generator().manual_seed(seed)) for seed in (1, 1, 2)]
    (_, tokens, every_patch, _), same, other = draws
    assert tokens.shape[1] == 144
    chosen = [torch.nonzero((every_patch[b][:, None] == tokens[b][None]).all(-1).any(1)).flatten() for b in range(2)]
    assert all(len(c) == 144 for c in chosen) and not torch.equal(chosen[0], chosen[1])
    assert torch.equal(same[1], tokens) and not torch.equal(other[1], tokens)
    with pytest.raises(ValueError):
        reduced_loss(engine, quarter, enc["input_ids"], enc["pixel_values"], labels, salient)


def test_object_drop_draws_the_marked_patches_first_then_random_others(engine):
    enc, labels, salient = batch(engine)
    marked = torch.zeros(2, 576, dtype=torch.bool)
    marked[0, 100:150] = True  # 50 patches in row 0, 10 in row 1
    marked[1, torch.arange(300, 400, 10)] = True

    def kept(budget, seed):
        with torch.no_grad():
            _, tokens, every_patch, _ = reduced_loss(engine, Plan(OBJECT_DROP, budget, engine.n_layers, 576),
                                                     enc["input_ids"], enc["pixel_values"], labels, salient,
                                                     generator=torch.Generator().manual_seed(seed), objects=marked)
        return [torch.nonzero((every_patch[b][:, None] == tokens[b][None]).all(-1).any(1)).flatten() for b in range(2)]

    few = kept(20, 0)  # fewer than row 0 marks: only marked patches, a random choice of them
    assert len(few[0]) == 20 and marked[0, few[0]].all() and not torch.equal(few[0], kept(20, 1)[0])
    assert len(few[1]) == 20 and marked[1, few[1]].sum() == 10
    many = kept(144, 0)  # every marked patch, the rest unmarked
    assert all(len(k) == 144 and marked[b, k].sum() == marked[b].sum() for b, k in enumerate(many))
    with pytest.raises(ValueError):
        reduced_loss(engine, Plan(OBJECT_DROP, 20, engine.n_layers, 576), enc["input_ids"], enc["pixel_values"],
                     labels, salient, generator=torch.Generator().manual_seed(0))
