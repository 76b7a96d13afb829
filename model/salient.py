"""The salient words of a question, chosen the way DUET-VLM's authors choose them (T2V, paper §3.2).

Follows ``llava/salient_token_finder.py`` (``salient_tokens_finder``, the whole function) of
github.com/AMD-AGI/DUET-VLM, and the position step of ``llava/eval/model_vqa_loader.py`` lines
86-116 (``greedy_align_and_filter`` of ``llava/aligner.py`` then keeps every prompt token whose
text is in the deduplicated word list). The rule, per spaCy token of the question:

1. a question word (who what where when why how which whom whose) is salient, even though NLTK
   lists most of them as stopwords;
2. ``?``, ``!`` and ``:`` are salient;
3. any other word in NLTK's English stopword list is not;
4. a word that spaCy tags NOUN, PROPN, PRON, VERB, ADJ or ADV is salient.

The word list is deduplicated, but the position step selects every token whose text is in it, so
every occurrence of a salient word ends up salient: ``salient_spans`` returns one span per
occurrence. The official code also matches on decoded subword pieces, so a piece such as ``at``
(from ``What``) can select an unrelated ``at`` elsewhere in the question; we match whole words.

The official code downloads NLTK's stopwords and needs spaCy's ``en_core_web_sm`` pipeline. We
never download anything: ``STOPWORDS`` embeds NLTK's list, and spaCy is used only when it and the
English pipeline are already installed (``requirements-salient.txt``). Otherwise a built-in rule
with no part-of-speech tagger stands in for step 4; see ``builtin_rule_spans`` for how it differs.

``python -m model.lab.salient_agreement --split test --n 1000`` measures how well the built-in rule agrees with
the spaCy rule (it needs spaCy and an English pipeline).
"""

from __future__ import annotations

import functools
import re
from collections.abc import Iterable
from typing import Protocol

Span = tuple[int, int, str]  # (start char, end char, text) in the question

QUESTION_WORDS = frozenset({"who", "what", "where", "when", "why", "how", "which", "whom", "whose"})
SALIENT_PUNCTUATION = frozenset({"?", "!", ":"})
CONTENT_POS = frozenset({"NOUN", "PROPN", "PRON", "VERB", "ADJ", "ADV"})

# NLTK's English stopword list (nltk_data corpora/stopwords/english): the 179 words it held from
# 2017 to 2025, then the 19 pronoun contractions nltk_data added in February 2025 (nltk_data
# PR #228, commit 47111d8), which `nltk.download("stopwords")` has served since.
STOPWORDS = frozenset(
    """
    i me my myself we our ours ourselves you you're you've you'll you'd your yours yourself
    yourselves he him his himself she she's her hers herself it it's its itself they them their
    theirs themselves what which who whom this that that'll these those am is are was were be been
    being have has had having do does did doing a an the and but if or because as until while of
    at by for with about against between into through during before after above below to from up
    down in out on off over under again further then once here there when where why how all any
    both each few more most other some such no nor not only own same so than too very s t can will
    just don don't should should've now d ll m o re ve y ain aren aren't couldn couldn't didn
    didn't doesn doesn't hadn hadn't hasn hasn't haven haven't isn isn't ma mightn mightn't mustn
    mustn't needn needn't shan shan't shouldn shouldn't wasn wasn't weren weren't won won't wouldn
    wouldn't

    he'd he'll he's i'd i'll i'm i've it'd it'll she'd she'll they'd they'll they're they've we'd
    we'll we're we've
    """.split()
)

# Closed-class words that NLTK does not list but that spaCy tags with a part of speech outside
# CONTENT_POS in VQA questions: the built-in rule drops them instead of asking a tagger.
CLOSED_CLASS_WORDS = frozenset(
    """
    another every either neither whatever whichever
    aboard across along alongside amid amidst among amongst around atop behind beneath beside
    besides beyond despite except inside like near onto outside per regarding throughout toward
    towards underneath unlike upon versus via vs within without till unto
    could would may might must shall ought cannot ca wo
    yet plus although though unless whether whereas since lest
    zero two three four five six seven eight nine ten eleven twelve thirteen fourteen fifteen
    sixteen seventeen eighteen nineteen twenty thirty forty fifty sixty seventy eighty ninety
    hundred thousand million billion
    yes yeah ok okay oh hi hello hey please
    """.split()
)

# A word (letters and digits, with inner apostrophes as in "what's"), or ? and !, or a colon that
# does not sit between two digits (spaCy keeps "10:30" as one number token).
QUESTION_UNIT = re.compile(r"[^\W_]+(?:['’][^\W_]+)*|[?!]|(?<!\d):|:(?!\d)")
# The clitic that spaCy's English tokenizer splits off the end of a word ("what|'s", "do|n't").
CLITIC = re.compile(r"(?:n['’]t|['’](?:s|re|ve|ll|d|m))$", re.IGNORECASE)
# Units for measuring agreement: what the shipped word-level tokenizer splits a question into
# (whitespace, then every punctuation character on its own).
WORD_LEVEL_UNIT = re.compile(r"[^\W_]+|\S")

PIPELINE = "en_core_web_sm"


class Token(Protocol):
    """The three attributes of a spaCy token the rule reads."""

    text: str
    idx: int
    pos_: str


@functools.cache
def load_pipeline(name: str = PIPELINE):
    """The installed spaCy pipeline ``name``, or None when spaCy or the pipeline is not installed.

    ``spacy.load`` only reads installed packages and paths (an unknown name raises OSError); it
    never downloads, so nothing here touches the network. Cached: loading takes about a second.
    """
    try:
        import spacy

        return spacy.load(name)
    except (ImportError, OSError):
        return None


def spacy_rule_spans(tokens: Iterable[Token]) -> list[Span]:
    """Spans of the salient words among spaCy ``tokens`` of one question, by the official rule:
    every occurrence of a word text that the rule keeps at least once."""
    tokens = list(tokens)
    kept = {token.text.strip() for token in tokens if _spacy_keeps(token)}
    return [(t.idx, t.idx + len(t.text), t.text) for t in tokens if t.text.strip() in kept]


def _spacy_keeps(token: Token) -> bool:
    text = token.text.strip()
    lower = text.lower()
    if lower in QUESTION_WORDS or text in SALIENT_PUNCTUATION:
        return True
    return lower not in STOPWORDS and token.pos_ in CONTENT_POS


def builtin_rule_spans(question: str) -> list[Span]:
    """Spans of the salient words of ``question`` without a tagger: question words, ``? ! :``,
    and every other word that is neither an NLTK stopword, nor in ``CLOSED_CLASS_WORDS``, nor
    made of digits only.

    It splits words as spaCy does where that matters here (clitics such as ``'s`` and ``n't`` come
    off: the span of "what's" is "what"; a colon inside "10:30" is not punctuation) and differs
    from the spaCy rule where part of speech depends on context:
    - a word that is either open-class or closed-class is always judged by ``CLOSED_CLASS_WORDS``:
      "like", "inside", "around", "yet" are always dropped (spaCy keeps them as VERB or ADV in
      "do you like it", "what is inside", "has it been cut yet"), "one" and "past" are always kept
      (spaCy drops them as NUM or ADP in "one dog or two", "drive past the car");
    - closed-class words missing from both lists are kept (spaCy drops rarer ones such as
      "albeit" and "thru");
    - numbers written in digits are always dropped, where spaCy decides by tagging them (NUM in
      every question we tried).
    """
    spans = []
    for match in QUESTION_UNIT.finditer(question):
        text = CLITIC.sub("", match.group(0))
        if text and _builtin_keeps(text):
            spans.append((match.start(), match.start() + len(text), text))
    return spans


def _builtin_keeps(text: str) -> bool:
    lower = text.lower()
    if lower in QUESTION_WORDS or text in SALIENT_PUNCTUATION:
        return True
    return lower not in STOPWORDS and lower not in CLOSED_CLASS_WORDS and not lower.isdigit()


def given_word_spans(question: str, words: Iterable[str]) -> list[Span]:
    """Spans of the question's words (and ``? ! :``) that equal one of ``words``, ignoring case."""
    chosen = {w.lower() for w in words}
    return [(m.start(), m.end(), m.group(0)) for m in QUESTION_UNIT.finditer(question)
            if m.group(0).lower() in chosen]


def salient_spans(question: str, words: tuple[str, ...] | None = None) -> tuple[list[Span], str]:
    """(spans, rule): the salient words of ``question`` as (start, end, text) character spans, and
    which rule chose them: "given" when ``words`` overrides the rule, "spacy" when spaCy and
    ``en_core_web_sm`` are installed, else "builtin"."""
    if words is not None:
        return given_word_spans(question, words), "given"
    nlp = load_pipeline()
    if nlp is None:
        return builtin_rule_spans(question), "builtin"
    return spacy_rule_spans(nlp(question)), "spacy"


# ----------------------------------------------------------------------------- agreement
# VQA questions in the style of GQA, VQAv2 and TextVQA, written for this measurement.
