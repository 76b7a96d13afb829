"""Training-time reductions: same loss as stock with reduction off, gradients with it on."""

import pytest
import torch

from model.budget import ReductionConfig, plan
from model.train_reduce import reduced_loss

QUESTIONS = [("what color is the red circle ?", "red"), ("what shape ?", "square")]


def batch(engine, image):
    proc, tok = engine.processor, engine.tokenizer
    texts, prompts = [], []
    for q, a in QUESTIONS:
        user = [{"role": "user", "content": [{"type": "image"}, {"type": "text", "text": q}]}]
        prompts.append(proc.apply_chat_template(user, add_generation_prompt=True))
        texts.append(proc.apply_chat_template(user + [{"role": "assistant", "content": [{"type": "text", "text": a}]}]))
    enc = proc(images=[image, image.rotate(90)], text=texts, padding=True, return_tensors="pt")
    labels = torch.full_like(enc["input_ids"], -100)
    salient = []
    for row, ((q, _), prompt) in enumerate(zip(QUESTIONS, prompts)):
        n_prompt = len(proc(images=image, text=prompt)["input_ids"][0])
        end = int(enc["attention_mask"][row].sum())
        labels[row, n_prompt:end] = enc["input_ids"][row, n_prompt:end]
        salient.append(engine._salient_positions(prompt, q, enc["input_ids"][row, :n_prompt], None))
    assert tok.padding_side == "right"
    return enc, labels, salient


def test_no_reduction_loss_equals_stock(engine, image):
    enc, labels, salient = batch(engine, image)
    stock = engine.model(input_ids=enc["input_ids"], pixel_values=enc["pixel_values"], labels=labels).loss
    for cfg in (ReductionConfig("full"), ReductionConfig("duet", 576)):
        loss, *_ = reduced_loss(engine, plan(cfg, engine.n_layers), enc["input_ids"], enc["pixel_values"], labels,
                               salient)
        assert loss.item() == pytest.approx(stock.item(), abs=1e-5)


@pytest.mark.parametrize("method", ["duet", "visionzip", "pyramiddrop"])
def test_reduced_training_loss_has_gradients_everywhere_tokens_survive(engine, image, method):
    enc, labels, salient = batch(engine, image)
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
