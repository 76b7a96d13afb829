import pytest
import torch
import torch.nn.functional as F

from model.v2v import anchor_ranks, cls_attention, duet_merge, hired_select, pool_size, visionzip_merge

P = 576


@pytest.fixture
def frame():
    """(hidden (1 + P, d), metric (1 + P, dk), scores (P,)) of one frame, CLS first."""
    g = torch.Generator().manual_seed(0)
    return torch.randn(1 + P, 8, generator=g), torch.randn(1 + P, 6, generator=g), torch.rand(P, generator=g)


def official_duet(hidden, metric, scores, dominant, contextual, cluster_width):
    """The batched tensor steps of AMD-AGI/DUET-VLM visionzip/clip_encoder_cw.py l.50-144,
    transcribed for one frame: the oracle the pure-function rewrite is checked against."""
    top = scores.topk(dominant - 1).indices + 1
    keep = torch.cat([torch.zeros(1, dtype=torch.long), top])
    mask = torch.ones(hidden.shape[0], dtype=torch.bool).scatter_(0, keep, False)
    dominant_tokens = hidden[~mask]
    rest_metric = F.normalize(metric[mask], dim=-1)
    rest_hidden = hidden[mask]
    rest_scores = scores[mask[1:]]
    m = rest_metric.shape[0]
    pool = rest_scores.topk(min(max(1, cluster_width * contextual), m)).indices
    step = max(1, len(pool) // max(1, contextual))
    anchor_pos = torch.arange(0, len(pool), step)[:contextual]
    targets = pool[anchor_pos]
    is_joiner = torch.ones(len(pool), dtype=torch.bool)
    is_joiner[anchor_pos] = False
    joiners = pool[is_joiner]
    assign = F.one_hot((rest_metric[joiners] @ rest_metric[targets].T).argmax(1), len(targets)).float()
    counts = assign.sum(0).clamp(min=1)[:, None]
    contextual_tokens = rest_hidden[targets] + assign.T @ rest_hidden[joiners] / counts
    rest_ids = torch.nonzero(mask[1:]).flatten()
    return torch.cat([dominant_tokens, contextual_tokens]), rest_ids[targets].tolist(), rest_ids[pool].tolist()


def official_visionzip(hidden, metric, scores, dominant, contextual):
    """dvlab-research/VisionZip visionzip/clip_encoder.py, the same way: targets evenly spaced over
    all remaining tokens in index order."""
    top = scores.topk(dominant - 1).indices + 1
    keep = torch.cat([torch.zeros(1, dtype=torch.long), top])
    mask = torch.ones(hidden.shape[0], dtype=torch.bool).scatter_(0, keep, False)
    rest_metric = F.normalize(metric[mask], dim=-1)
    rest_hidden = hidden[mask]
    m = rest_metric.shape[0]
    targets = torch.arange(0, m, max(1, m // contextual))[:contextual]
    others = ~torch.isin(torch.arange(m), targets)
    assign = F.one_hot((rest_metric[others] @ rest_metric[targets].T).argmax(1), contextual).float()
    counts = assign.sum(0).clamp(min=1)[:, None]
    return torch.cat([hidden[~mask], rest_hidden[targets] + assign.T @ rest_hidden[others] / counts])


@pytest.mark.parametrize("dominant,contextual,width", [(300, 7, 4), (170, 35, 4), (85, 17, 4), (10, 3, 2),
                                                       (160, 32, 4), (2, 1, 1)])
def test_duet_equals_the_official_code(frame, dominant, contextual, width):
    hidden, metric, scores = frame
    expected, anchors, pool = official_duet(hidden, metric, scores, dominant, contextual, width)
    m = duet_merge(hidden, metric, scores, dominant, contextual, width)
    assert torch.allclose(m.tokens, expected, atol=1e-5)
    assert [c["centroid"] for c in m.clusters] == anchors
    assert sorted(p for c in m.clusters for p in c["members"]) == sorted(pool)


@pytest.mark.parametrize("dominant,contextual", [(162, 30), (108, 20), (54, 10), (5, 7)])
def test_visionzip_equals_the_official_code(frame, dominant, contextual):
    hidden, metric, scores = frame
    m = visionzip_merge(hidden, metric, scores, dominant, contextual)
    assert torch.allclose(m.tokens, official_visionzip(hidden, metric, scores, dominant, contextual), atol=1e-5)
    assert m.discarded == []
    assert sorted([p for c in m.clusters for p in c["members"]] + m.dominant) == list(range(P))


def test_duet_on_a_hand_computed_frame():
    """Six patches; scores rank them 4 > 1 > 5 > 0 > 3 > 2. dominant 2 = CLS + patch 4. The pool
    (width 1 x contextual 2 = 2) is the next best, patches 1 and 5, both anchors (step 1); 0, 3, 2
    are discarded. Then width 2: pool 1, 5, 0, 3; anchors at ranks 0 and 2 (patches 1 and 0);
    patch 5's metric (0.1, 1) is closest to patch 1's (0, 1), patch 3's (1, 0.1) to patch 0's (1, 0)."""
    scores = torch.tensor([0.4, 0.8, 0.1, 0.3, 0.9, 0.5])
    hidden = torch.arange(7.0)[:, None] * torch.tensor([[1.0, 10.0]])  # row i = (i, 10 i); patch p is row p + 1
    metric = torch.tensor([[0.0, 0.0], [1.0, 0.0], [0.0, 1.0], [0.0, 1.0], [1.0, 0.1], [1.0, 1.0], [0.1, 1.0]])
    m = duet_merge(hidden, metric, scores, dominant=2, contextual=2, cluster_width=1)
    assert m.dominant == [4] and m.discarded == [0, 2, 3]
    assert m.clusters == [{"centroid": 1, "members": [1]}, {"centroid": 5, "members": [5]}]
    assert m.token_patches == [[], [4], [1], [5]]
    assert m.tokens.tolist() == [[0, 0], [5, 50], [2, 20], [6, 60]]

    m = duet_merge(hidden, metric, scores, dominant=2, contextual=2, cluster_width=2)
    assert m.discarded == [2]
    assert m.clusters == [{"centroid": 1, "members": [1, 5]}, {"centroid": 0, "members": [0, 3]}]
    # contextual token = anchor + mean of the members that joined it (a sum, not a mean of all)
    assert m.tokens.tolist() == [[0, 0], [5, 50], [2 + 6, 20 + 60], [1 + 4, 10 + 40]]


def test_order_is_cls_then_dominant_in_raster_order_then_anchors_in_score_order(frame):
    hidden, metric, scores = frame
    m = duet_merge(hidden, metric, scores, 300, 7, 4)
    assert torch.equal(m.tokens[0], hidden[0])
    assert m.dominant == sorted(m.dominant) and len(m.dominant) == 299
    assert torch.equal(m.tokens[1:300], hidden[1:][m.dominant])
    anchors = [c["centroid"] for c in m.clusters]
    assert anchors == sorted(anchors, key=lambda p: -scores[p])
    assert len(m.tokens) == len(m.token_patches) == 307


def test_patches_outside_the_pool_are_discarded(frame):
    hidden, metric, scores = frame
    m = duet_merge(hidden, metric, scores, 300, 7, 4)
    ranked = torch.argsort(scores, descending=True).tolist()
    assert set(m.dominant) == set(ranked[:299])
    assert sorted(p for c in m.clusters for p in c["members"]) == sorted(ranked[299:327])
    assert m.discarded == sorted(ranked[327:])
    assert len(m.discarded) == 576 - 299 - 28


@pytest.mark.parametrize("pool,contextual,expected", [(28, 7, [0, 4, 8, 12, 16, 20, 24]), (140, 35, list(range(0, 140, 4))),
                                                      (10, 3, [0, 3, 6]), (2, 5, [0, 1]), (5, 0, [])])
def test_anchor_ranks(pool, contextual, expected):
    assert anchor_ranks(pool, contextual) == expected


def test_pool_size_is_clamped_to_the_remaining_patches():
    assert pool_size(277, 7, 4) == 28
    assert pool_size(20, 7, 4) == 20
    assert pool_size(277, 0, 4) == 1


def test_ties_go_to_the_lower_patch_index():
    scores = torch.tensor([0.5, 0.5, 0.5, 0.5])
    hidden, metric = torch.randn(5, 3), torch.randn(5, 2)
    m = duet_merge(hidden, metric, scores, dominant=3, contextual=1, cluster_width=1)
    assert m.dominant == [0, 1] and m.clusters == [{"centroid": 2, "members": [2]}] and m.discarded == [3]


def test_cls_attention_is_the_softmax_row_summed_over_heads_without_the_cls_column():
    g = torch.Generator().manual_seed(1)
    q, k = torch.randn(3, 4, generator=g), torch.randn(3, 6, 4, generator=g)
    probs = (torch.einsum("hd,hkd->hk", q, k) * 0.5).softmax(-1)
    assert torch.allclose(cls_attention(q, k, 0.5), probs[:, 1:].sum(0), atol=1e-6)


@pytest.mark.parametrize("dominant", [0, P + 2])
def test_invalid_dominant_is_rejected(frame, dominant):
    hidden, metric, scores = frame
    with pytest.raises(ValueError, match="counts the CLS token"):
        duet_merge(hidden, metric, scores, dominant, 4)


def official_hired(hidden, scores, kept):
    """hasanar1f/HiRED HiRED_token_selection (l.340-353), one image: a boolean mask of the top
    int(N * rate) patches by CLS attention; the features keep raster order."""
    mask = torch.zeros(scores.shape[0], dtype=torch.bool)
    mask[scores.topk(min(len(scores), int(len(scores) * (kept / len(scores))))).indices] = True
    return hidden[1:][mask]


@pytest.mark.parametrize("kept", [192, 128, 64, 1, P])
def test_hired_equals_the_official_selection(frame, kept):
    hidden, _, scores = frame
    m = hired_select(hidden, scores, kept)
    assert torch.equal(m.tokens, official_hired(hidden, scores, kept))
    assert m.dominant == sorted(m.dominant) and len(m.dominant) == kept
    assert sorted(m.dominant + m.discarded) == list(range(P)) and not m.cls_kept and m.clusters == []
    assert m.token_patches == [[p] for p in m.dominant]
