import torch

from model.t2v import attention_probs, fitprune_parts, keep_top, tokens_overlapping


def test_tokens_overlapping_maps_words_to_every_subword():
    offsets = [(0, 4), (5, 8), (8, 11), (12, 13), (0, 0)]
    assert tokens_overlapping(offsets, [(5, 11)]) == [1, 2]
    assert tokens_overlapping(offsets, [(0, 1)]) == [0]


def test_keep_top_returns_best_in_original_order():
    scores = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.0])
    assert keep_top(scores, 3).tolist() == [1, 2, 3]
    assert keep_top(scores, 0).tolist() == []
    assert keep_top(scores, 99).tolist() == [0, 1, 2, 3, 4]


def test_attention_probs_match_a_dense_causal_softmax():
    g = torch.Generator().manual_seed(0)
    heads, kv_heads, length, hd = 4, 2, 12, 8
    q_all = torch.randn(heads, length, hd, generator=g)
    k = torch.randn(kv_heads, length, hd, generator=g)
    rows = torch.tensor([7, 11])
    positions = torch.arange(length)
    probs = attention_probs(q_all[:, rows], k, positions[rows], positions, hd**-0.5)

    k_full = k.repeat_interleave(2, 0)
    logits = q_all @ k_full.transpose(1, 2) * hd**-0.5
    logits = logits.masked_fill(torch.ones(length, length).triu(1).bool(), float("-inf"))
    assert torch.allclose(probs, logits.softmax(-1)[:, rows], atol=1e-6)


def test_attention_probs_respect_causality_with_gapped_positions():
    q, k = torch.randn(1, 1, 4), torch.randn(1, 3, 4)
    probs = attention_probs(q, k, torch.tensor([5]), torch.tensor([2, 5, 9]), 0.5)
    assert probs[0, 0, 2] == 0.0 and torch.isclose(probs.sum(), torch.tensor(1.0))


def test_fitprune_parts_equal_the_official_slices():
    """ywh187/FitPrune modeling_llama.py l.393-398 with the image at rows [s, s + n)."""
    g = torch.Generator().manual_seed(0)
    heads, length, start, n = 3, 14, 4, 6
    attention = torch.rand(heads, length, length, generator=g).tril().softmax(-1)
    head_max = attention.max(dim=0).values
    official_self = (head_max[start:start + n, start:start + n] / n).sum(dim=0)
    official_cross = head_max[start + n:, start:start + n].sum(dim=0)
    self_weight, cross = fitprune_parts(head_max, torch.arange(start, start + n), torch.arange(start + n, length))
    assert torch.allclose(self_weight, official_self) and torch.allclose(cross, official_cross)
    official_deleted = torch.sort(official_cross * official_self).indices[:2]
    assert sorted(set(range(n)) - set(keep_top(cross * self_weight, n - 2).tolist())) == sorted(official_deleted.tolist())


def test_keep_top_breaks_exact_ties_by_the_earlier_token():
    """The rule every keep boundary follows, batched or not: of equal scores the earlier token survives."""
    scores = torch.tensor([0.1, 0.5, 0.3, 0.5, 0.5])
    assert keep_top(scores, 2).tolist() == [1, 3]
    assert keep_top(scores, 3).tolist() == [1, 3, 4]
