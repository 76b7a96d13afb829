"""Training-time reductions: same loss as stock with reduction off, gradients with it on; the query
attention loss reads the same attention the stock model computes."""

import math

import pytest
import torch
from transformers import AutoProcessor, LlavaForConditionalGeneration

from model import data
from model.budget import ReductionConfig, plan
from model.engine import DuetLlava
from model.train import AuxHeads, encode, forward_losses, stage_layer
from model.train_reduce import reduced_loss

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
                                            supervised={"attn": (stage_layer(engine), False)})
        shares = stock_query_share(model, enc, rows, stage_layer(engine), engine.image_token_id)
    assert attention["attn"].item() == pytest.approx(-sum(math.log(s) for s in shares) / len(shares), rel=1e-4)


def test_query_attention_loss_on_merged_tokens_trains_the_stage_layer(engine):
    enc, labels, salient = batch(engine)
    p = plan(ReductionConfig("duet", 64), engine.n_layers)
    engine.model.zero_grad()
    with torch.enable_grad():
        *_, attention = reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], labels, salient, enc["query"],
                                     {"attn": (p.stages[0].layer, False)})
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
    p = plan(ReductionConfig("duet", 64), engine.n_layers)
    early = engine.n_layers // 4
    with torch.no_grad():
        *_, both = reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], labels, salient, enc["query"],
                                {"all": (early, False), "last": (early, True)})
        *_, last_only = reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], labels,
                                     [rows[-1:] for rows in salient], enc["query"], {"all": (early, False)})
    assert both["last"].item() == pytest.approx(last_only["all"].item(), rel=1e-6)
    assert any(len(rows) > 1 for rows in salient) and both["all"].item() != pytest.approx(both["last"].item())
    with pytest.raises(ValueError):
        reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], labels, salient, enc["query"],
                     {"late": (p.stages[0].layer + 1, True)})
