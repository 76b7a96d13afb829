import pytest
import torch

from model.v2v import cls_attention, duet_merge, visionzip_merge

GRID = (24, 24)
P = 576


@pytest.fixture
def patches():
    g = torch.Generator().manual_seed(0)
    return torch.randn(P, 8, generator=g), torch.randn(P, 6, generator=g), torch.rand(P, generator=g)


@pytest.mark.parametrize("k1,k2", [(300, 7), (170, 32), (72, 30), (10, 1)])
def test_duet_clusters_partition_the_non_dominant_patches(patches, k1, k2):
    hidden, keys, scores = patches
    m = duet_merge(hidden, keys, scores, GRID, k1, k2, cluster_width=4)
    assert len(m.dominant) == k1 and len(m.clusters) == k2
    assert set(m.dominant) == set(torch.topk(scores, k1).indices.tolist())
    members = [p for c in m.clusters for p in c["members"]]
    assert len(members) == len(set(members)) == P - k1
    assert set(members) | set(m.dominant) == set(range(P))
    assert all(c["centroid"] in c["members"] for c in m.clusters)
    assert m.tokens.shape == (k1 + k2, 8)


def test_centroids_are_the_best_scoring_non_dominant_patches(patches):
    hidden, keys, scores = patches
    m = duet_merge(hidden, keys, scores, GRID, 50, 20)
    ranked = torch.argsort(scores, descending=True).tolist()
    assert {c["centroid"] for c in m.clusters} == set(ranked[50:70])


def test_output_is_in_raster_order_of_representatives_and_dominant_tokens_unchanged(patches):
    hidden, keys, scores = patches
    m = duet_merge(hidden, keys, scores, GRID, 72, 30)
    representatives = [g[0] if len(g) == 1 else next(c["centroid"] for c in m.clusters if c["members"] == g)
                       for g in m.token_patches]
    assert representatives == sorted(representatives)
    for token, group in zip(m.tokens, m.token_patches):
        assert torch.allclose(token, hidden[group].mean(0), atol=1e-6)


def test_members_join_a_near_centroid_when_one_exists(patches):
    hidden, keys, scores = patches
    width = 2
    m = duet_merge(hidden, keys, scores, GRID, 100, 40, cluster_width=width)
    centroids = [c["centroid"] for c in m.clusters]

    def cheb(a, b):
        return max(abs(a // 24 - b // 24), abs(a % 24 - b % 24))

    for c in m.clusters:
        for p in c["members"]:
            if any(cheb(p, other) <= width for other in centroids):
                assert cheb(p, c["centroid"]) <= width


def test_similarity_decides_between_near_centroids():
    hidden = torch.zeros(P, 2)
    keys = torch.zeros(P, 2)
    keys[:, 0] = 1.0
    scores = torch.zeros(P)
    scores[0], scores[2] = 1.0, 0.9  # two centroids (k1 = 0) close to patch 1
    keys[2] = torch.tensor([0.0, 1.0])
    keys[1] = torch.tensor([0.1, 1.0])  # patch 1 looks like centroid 2
    m = duet_merge(hidden, keys, scores, GRID, 0, 2, cluster_width=1)
    by_centroid = {c["centroid"]: c["members"] for c in m.clusters}
    assert 1 in by_centroid[2] and 1 not in by_centroid[0]


def test_merge_is_deterministic_with_tied_scores():
    hidden, keys = torch.randn(P, 4), torch.randn(P, 4)
    scores = torch.ones(P)
    a = duet_merge(hidden, keys, scores, GRID, 20, 5)
    b = duet_merge(hidden, keys, scores, GRID, 20, 5)
    assert a.dominant == b.dominant == list(range(20))
    assert a.clusters == b.clusters


def test_k2_zero_keeps_only_dominant(patches):
    hidden, keys, scores = patches
    m = duet_merge(hidden, keys, scores, GRID, 64, 0)
    assert m.clusters == [] and m.token_patches == [[p] for p in sorted(m.dominant)]


def test_visionzip_targets_are_uniformly_spaced_and_partition(patches):
    hidden, keys, scores = patches
    m = visionzip_merge(hidden, keys, scores, 54, 10)
    rest = sorted(set(range(P)) - set(m.dominant))
    step = len(rest) // 10
    assert [c["centroid"] for c in m.clusters] == rest[::step][:10]
    members = sorted(p for c in m.clusters for p in c["members"])
    assert members == rest


def test_cls_attention_is_a_distribution_over_patches_without_cls():
    q, k = torch.randn(4, 8), torch.randn(4, 1 + P, 8)
    scores = cls_attention(q, k, 8**-0.5)
    full = (torch.einsum("hd,hkd->hk", q, k) * 8**-0.5).softmax(-1)
    assert torch.allclose(scores, full[:, 1:].mean(0))
    assert float(scores.sum()) < 1.0
