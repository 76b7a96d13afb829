"""Stage B of DUET-VLM (T2V) and the LLM-side scoring shared with FastV and PyramidDrop.

Pure functions: which prompt tokens are salient, how much attention a set of query rows pays each
visual token (computed from one layer's q/k, so the model keeps running on SDPA), and which
tokens survive.

Salient text tokens (paper §3.2): the last prompt token plus the tokens of the question's salient
words -- question words, ``? ! :`` and every word that is not a stopword. The official code tags
words with spaCy and filters NLTK stopwords, both of which download data at run time; we use the
built-in stopword list below instead (no POS tagging).
"""

from __future__ import annotations

import re

import torch

QUESTION_WORDS = frozenset(
    "what which where when who whom whose why how many much is are does do can".split()
)
SALIENT_PUNCTUATION = frozenset("?!:")
STOPWORDS = frozenset(
    """
    a about above after again against all am an and any are as at be because been before being
    below between both but by could did do does doing down during each few for from further had
    has have having he her here hers herself him himself his i if in into is it its itself just
    me more most my myself no nor not now of off on once only or other our ours ourselves out
    over own same she should so some such than that the their theirs them themselves then there
    these they this those through to too under until up very was we were while with would you
    your yours yourself yourselves image picture photo please tell describe there's it's
    """.split()
)
WORD = re.compile(r"[A-Za-z0-9']+|[?!:]")


def salient_spans(question: str, words: tuple[str, ...] | None = None) -> list[tuple[int, int, str]]:
    """Character spans (start, end, text) of the salient words of ``question``.

    ``words``, when given, overrides the rule: exactly those words (case-insensitive) are salient.
    """
    chosen = {w.lower() for w in words} if words is not None else None
    spans = []
    for match in WORD.finditer(question):
        text = match.group(0)
        lower = text.lower()
        if chosen is not None:
            keep = lower in chosen
        else:
            keep = lower in QUESTION_WORDS or text in SALIENT_PUNCTUATION or lower not in STOPWORDS
        if keep:
            spans.append((match.start(), match.end(), text))
    return spans


def tokens_overlapping(offsets: list[tuple[int, int]], spans: list[tuple[int, int]]) -> list[int]:
    """Indices of tokens whose character offsets overlap any span."""
    return [
        i for i, (a, b) in enumerate(offsets)
        if b > a and any(a < end and start < b for start, end in spans)
    ]


def attention_probs(
    queries: torch.Tensor,
    keys: torch.Tensor,
    query_positions: torch.Tensor,
    key_positions: torch.Tensor,
    scaling: float,
) -> torch.Tensor:
    """Causal softmax attention of a few query rows over all keys, per head.

    queries: (H, Q, hd) after RoPE; keys: (Hkv, K, hd) after RoPE (GQA heads are shared);
    positions order the causal mask (a query sees keys at positions <= its own).
    Returns (H, Q, K) probabilities.
    """
    n_heads, n_kv = queries.shape[0], keys.shape[0]
    keys = keys.repeat_interleave(n_heads // n_kv, dim=0)
    logits = torch.einsum("hqd,hkd->hqk", queries.float(), keys.float()) * scaling
    causal = key_positions[None, :] <= query_positions[:, None]
    return logits.masked_fill(~causal, float("-inf")).softmax(dim=-1)


def keep_top(scores: torch.Tensor, n_keep: int) -> torch.Tensor:
    """Indices of the ``n_keep`` best scores, returned in their original (ascending) order.
    Ties go to the earlier token, so the choice is deterministic."""
    n_keep = max(0, min(n_keep, scores.shape[0]))
    ranked = torch.sort(scores.float(), descending=True, stable=True).indices
    return ranked[:n_keep].sort().values
