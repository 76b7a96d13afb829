import json

import pytest
import torch

from model.lab import scenes
from model.cli import main
from model.lab.probe import PROBED, fit_probe, object_patch_features, offered_words, pair_swap, swap_pair


def test_a_probe_reads_a_linearly_coded_label_and_scores_held_out_rows_only():
    torch.manual_seed(0)
    y = torch.randint(0, 3, (300,))
    x = torch.randn(300, 8)
    x[:, 5] = 4.0 * y + torch.rand(300) - 0.5  # separable: the class is an interval of one feature
    fit = torch.arange(300) < 210
    result = fit_probe(x, y, fit)
    assert result["accuracy"] == 1.0
    assert result["held_out"] == 90
    assert result["majority"] == torch.bincount(y[~fit]).max().item() / 90


def test_features_are_the_object_patches_with_their_scene_labels(engine, tiny_checkpoint):
    features, labels, owner = object_patch_features(engine.model, engine.processor, n_scenes=2, tower_layers=True)
    n_layers = engine.model.config.vision_config.num_hidden_layers
    assert list(features) == ["projector", *(f"tower {k}" for k in range(n_layers + 1))]
    x = features["projector"]
    expected = []
    for index in range(2):
        grids = scenes.patch_labels(scenes.sample(0, "train", index).objects, min_coverage=0.5)
        on_object = torch.from_numpy(grids["colour"].reshape(-1)) > 0
        expected.append({name: torch.from_numpy(grids[name].reshape(-1))[on_object] for name in PROBED})
    assert x.shape == (len(owner), engine.model.config.text_config.hidden_size)
    for name in PROBED:
        assert torch.equal(labels[name], torch.cat([e[name] for e in expected]))
    assert owner.tolist() == [i for i, e in enumerate(expected) for _ in range(len(e["colour"]))]


def test_probe_command_reports_every_target(tiny_checkpoint, capsys):
    assert main(["probe", "--model", str(tiny_checkpoint), "--scenes", "4", "--json"]) == 0
    results = json.loads(capsys.readouterr().out)
    assert list(results) == ["projector"] and list(results["projector"]) == list(PROBED)
    assert main(["probe", "--model", str(tiny_checkpoint), "--scenes", "4"]) == 0
    table = capsys.readouterr().out.strip().splitlines()
    assert table[2] == "|---|---|---|---|---|" and table[3].startswith("| projector | ")


def test_the_pair_swap_offers_the_other_pair_and_nothing_else():
    question = "is the red circle on the left or right ?"
    swapped = swap_pair(question)
    assert swapped == "is the red circle at the top or bottom ?" and swap_pair(swapped) == question
    assert offered_words(question) == ("left", "right") and offered_words(swapped) == ("top", "bottom")
    with pytest.raises(ValueError):
        swap_pair("what color is the circle ?")


def test_pair_swap_asks_two_different_questions_and_reports_probabilities(engine, tiny_checkpoint, capsys):
    result = pair_swap(engine.model, engine.processor, questions=3)
    assert result["questions"] == 3
    assert all(0 < result[k] < 1 for k in ("offered_mass_asked", "offered_mass_swapped"))
    assert 0 < result["total_variation"] <= 1  # a random decoder still sees that the prompts differ
    assert main(["probe", "--model", str(tiny_checkpoint), "--pair-swap", "2", "--json"]) == 0
    assert set(json.loads(capsys.readouterr().out)) == set(result)


def test_cls_profile_of_a_cls_row_that_attends_uniformly(tiny_checkpoint, tmp_path):
    """A CLS query of zero attends every key alike: the profile must read exactly a uniform map."""
    from transformers import AutoProcessor, LlavaForConditionalGeneration

    from model.lab.probe import cls_profile

    model = LlavaForConditionalGeneration.from_pretrained(tiny_checkpoint)
    layer = model.model.vision_tower.encoder.layers[model.config.vision_config.num_hidden_layers - 2]
    with torch.no_grad():
        layer.self_attn.q_proj.weight.zero_()
        layer.self_attn.q_proj.bias.zero_()
    model.save_pretrained(tmp_path)
    AutoProcessor.from_pretrained(tiny_checkpoint).save_pretrained(tmp_path)
    profile = cls_profile(str(tmp_path), 3)
    assert profile["entropy"] == pytest.approx(1.0)
    assert profile["top10_share"] == pytest.approx(57 / 576)
    assert profile["enrichment"] == pytest.approx(1.0)
    assert profile["cls_self"] == pytest.approx(1 / 577)
    random = cls_profile(str(tiny_checkpoint), 3)
    assert random["entropy"] < 1.0 and random["top10_share"] > 57 / 576
