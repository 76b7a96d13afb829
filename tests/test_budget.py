import pytest

from model.budget import METHODS, ReductionConfig, average, plan


@pytest.mark.parametrize("budget,k1,k2,half,expected", [(192, 300, 7, 153, 191.75), (128, 170, 35, 102, 128.0),
                                                        (64, 85, 17, 51, 63.75)])
def test_duet_presets_match_spec_table(budget, k1, k2, half, expected):
    p = plan(ReductionConfig("duet", budget), n_layers=32)
    assert (p.k1, p.k2, p.tokens_per_frame) == (k1, k2, k1 + k2)
    assert [(s.layer, s.query, s.keep) for s in p.stages] == [(16, "salient", half), (24, "salient", 0)]
    assert p.counts_per_layer() == [k1 + k2] * 16 + [half] * 8 + [0] * 8
    assert average(p.counts_per_layer()) == expected
    assert p.positions == "contiguous"


def test_stage_keeps_are_int_of_ratio_times_all_frames_tokens():
    p = plan(ReductionConfig("duet", 192), n_layers=32)
    assert p.counts_per_layer(n_frames=3)[16] == int(0.5 * 3 * 307) == 460
    fastv = plan(ReductionConfig("fastv", 64), n_layers=32)
    assert fastv.counts_per_layer(n_frames=3)[2] == 3 * fastv.stages[0].keep


def test_small_cluster_width_limits_the_contextual_tokens():
    assert plan(ReductionConfig("duet", 64, k1=20, k2=6, cluster_width=0), 32).tokens_per_frame == 21
    assert plan(ReductionConfig("duet", 64, k1=20, k2=6, cluster_width=1), 32).tokens_per_frame == 26


@pytest.mark.parametrize("method", METHODS[1:])
@pytest.mark.parametrize("budget", [192, 128, 64, 100, 300, 17])
@pytest.mark.parametrize("n_layers", [32, 16, 12])
def test_every_method_meets_its_budget_on_average(method, budget, n_layers):
    p = plan(ReductionConfig(method, budget), n_layers=n_layers)
    if not p.feasible:  # only when the full-token layers before the first stage alone overshoot
        assert method in ("fastv", "pyramiddrop", "fitprune")
        assert budget * n_layers < p.stages[0].layer * 576
        return
    assert p.feasible
    assert average(p.counts_per_layer()) == pytest.approx(budget, abs=2)


def test_duet_budget_at_patch_count_is_no_reduction():
    p = plan(ReductionConfig("duet", 576), n_layers=32)
    assert (p.k1, p.k2, p.stages, p.tokens_per_frame) == (None, 0, (), 576)


def test_duet_large_budget_raises_stage_ratios_instead_of_exceeding_patches():
    p = plan(ReductionConfig("duet", 450), n_layers=32)
    assert p.k1 is None and p.tokens_per_frame == 576
    assert average(p.counts_per_layer()) == pytest.approx(450, abs=2)


def test_visionzip_presets_and_custom_split():
    assert (plan(ReductionConfig("visionzip", 64), 32).k1, plan(ReductionConfig("visionzip", 64), 32).k2) == (54, 10)
    custom = plan(ReductionConfig("visionzip", 100), 32)
    assert custom.k1 + custom.k2 == 100 and custom.k2 > 0


def test_pyramiddrop_uses_8_16_24_when_it_can():
    p = plan(ReductionConfig("pyramiddrop", 192), 32)
    assert [s.layer for s in p.stages] == [8, 16, 24]
    keeps = [s.keep for s in p.stages]
    assert keeps == sorted(keeps, reverse=True)
    assert keeps == [int(576 * s.ratio) for s in p.stages] and {s.query for s in p.stages} == {"last"}
    assert p.positions == "contiguous"


def test_fastv_drops_after_layer_two_ranked_by_layer_one():
    (stage,) = plan(ReductionConfig("fastv", 128), 32).stages
    assert (stage.layer, stage.score_layer, stage.query) == (2, 1, "last")
    assert plan(ReductionConfig("fastv", 128), 32).positions == "original"
    assert plan(ReductionConfig("fastv", 128, query="all", positions="contiguous"), 32).positions == "contiguous"
    assert plan(ReductionConfig("fastv", 128, query="all"), 32).stages[0].query == "all"


def test_overrides_win_over_solved_values():
    p = plan(ReductionConfig("duet", 64, k1=10, k2=5, stage_layers=(4, 8), stage_ratios=(0.4, 0.2)), 32)
    assert (p.k1, p.k2) == (10, 5)
    assert [(s.layer, s.keep) for s in p.stages] == [(4, 6), (8, 3)]


@pytest.mark.parametrize("kwargs", [
    dict(method="nope"), dict(budget=0), dict(k1=-1), dict(cluster_width=-1), dict(query="middle"),
    dict(positions="shuffled"),
    dict(stage_layers=(4,), stage_ratios=(1.5,)), dict(stage_layers=(4, 8), stage_ratios=(0.5,)),
])
def test_invalid_configs_are_rejected_with_a_message(kwargs):
    with pytest.raises(ValueError):
        ReductionConfig(**kwargs)


def test_duet_without_stage_layers_is_v2v_only_at_the_budget():
    p = plan(ReductionConfig("duet", 64, stage_layers=(), stage_ratios=()), n_layers=12)
    assert p.stages == () and p.k1 + p.k2 == 64 and p.k2 > 0
