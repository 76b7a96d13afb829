"""Training-time reductions: same loss as stock with reduction off, gradients with it on."""

import pytest
import torch

from model import data
from model.budget import ReductionConfig, plan
from model.train import encode
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
        loss, tokens, _ = reduced_loss(engine, p, enc["input_ids"], enc["pixel_values"], labels, salient)
        loss.backward()
    assert torch.isfinite(loss) and tokens.shape[:2] == (2, p.tokens_per_frame)
    tower = engine.vision.encoder.layers[0].self_attn.q_proj.weight.grad
    assert tower is not None and tower.abs().sum() > 0
    assert engine.projector.linear_1.weight.grad.abs().sum() > 0
    assert engine.lm.layers[-1].mlp.down_proj.weight.grad.abs().sum() > 0
    engine.model.zero_grad()
