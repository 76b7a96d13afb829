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

``python -m model.salient --split test --n 1000`` measures how well the built-in rule agrees with
the spaCy rule (it needs spaCy and an English pipeline).
"""

from __future__ import annotations

import argparse
import functools
import json
import re
import sys
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
NATURAL_QUESTIONS = (
    "What is the name of the restaurant on the sign?",
    "What color is the car parked next to the fire hydrant?",
    "Is the man wearing a hat?",
    "How many people are sitting on the bench?",
    "What brand is the laptop on the desk?",
    "Which side of the picture is the lamp on?",
    "What number is on the player's jersey?",
    "Who is holding the umbrella?",
    "What time does the clock show?",
    "Are there any cars behind the bus?",
    "What is written on the white board?",
    "Where is the cat sleeping?",
    "What kind of animal is standing near the fence?",
    "Is the table made of wood or metal?",
    "What is the woman to the left of the dog holding?",
    "Why is the street wet?",
    "What does the red sign say?",
    "Which vegetable is on the plate, broccoli or carrots?",
    "How old is the boy in the blue shirt?",
    "What is the price of the coffee?",
    "Does the giraffe look happy?",
    "What sport is being played?",
    "Whose phone is lying on the counter?",
    "What year was this coin made?",
    "Is there a stop sign in this image?",
    "What is the title of the book on the left?",
    "When was this photo taken: day or night?",
    "What is inside the glass bowl?",
    "Can you see the mountains in the background?",
    "What letter comes after the A on the license plate?",
    "Which one of the two bikes is bigger?",
    "What's the flavor of the ice cream?",
    "Can you tell me what this is?",
    "What is the man on the right about to do?",
    "Is this a good place to go swimming?",
    "What does the text at the bottom of the poster read?",
    "How much does the sandwich cost?",
    "What is the date printed on the receipt?",
    "Could this be a bakery?",
    "Are the lights on or off?",
    "What is the dog doing in the water?",
    "What kind of flowers are in the vase near the window?",
    "Is anyone riding the horse?",
    "Which animal is closest to the camera?",
    "What is the website address shown on the truck?",
    "Would you eat this food?",
    "Why are the people wearing helmets?",
    "What are the first three digits of the phone number?",
    "What is on top of the refrigerator?",
    "Has the pizza been cut yet?",
)


def word_positions(question: str, spans: list[Span]) -> set[int]:
    """Indices of the question's word-level units (see ``WORD_LEVEL_UNIT``) that any span overlaps:
    with the shipped word-level tokenizer, the token positions the spans select."""
    units = [m.span() for m in WORD_LEVEL_UNIT.finditer(question)]
    return {i for i, (a, b) in enumerate(units) if any(a < end and start < b for start, end, _ in spans)}


def agreement(questions: Iterable[str], nlp, examples: int = 10) -> dict:
    """Micro precision / recall / F1 of the built-in rule's word positions against the spaCy
    rule's (the reference), the share of questions where both choose the same positions, and the
    first ``examples`` disagreements."""
    both = builtin_total = spacy_total = same = count = 0
    disagreements = []
    for question in questions:
        builtin = word_positions(question, builtin_rule_spans(question))
        reference = word_positions(question, spacy_rule_spans(nlp(question)))
        both += len(builtin & reference)
        builtin_total += len(builtin)
        spacy_total += len(reference)
        same += builtin == reference
        count += 1
        if builtin != reference and len(disagreements) < examples:
            disagreements.append(_disagreement(question, builtin, reference))
    precision = both / builtin_total if builtin_total else 1.0
    recall = both / spacy_total if spacy_total else 1.0
    f1 = 2 * precision * recall / (precision + recall) if precision + recall else 0.0
    return {"questions": count, "positions_builtin": builtin_total, "positions_spacy": spacy_total,
            "precision": round(precision, 4), "recall": round(recall, 4), "f1": round(f1, 4),
            "exact_match": round(same / count, 4) if count else 1.0, "disagreements": disagreements}


def _disagreement(question: str, builtin: set[int], reference: set[int]) -> dict:
    units = [m.group(0) for m in WORD_LEVEL_UNIT.finditer(question)]
    return {"question": question,
            "builtin_only": [units[i] for i in sorted(builtin - reference)],
            "spacy_only": [units[i] for i in sorted(reference - builtin)]}


def synthetic_questions(split: str, n: int, seed: int) -> list[str]:
    """The questions of samples 0..n-1 of a split of the synthetic scenes data."""
    from . import data

    return [data.sample(seed, split, index).question for index in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.salient",
        description="Agreement of the built-in salient-word rule with the spaCy rule.")
    parser.add_argument("--split", default="test", choices=("train", "val", "validation", "test"))
    parser.add_argument("--n", type=int, default=1000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--pipeline", default=PIPELINE,
                        help="installed spaCy pipeline: a package name or a path")
    args = parser.parse_args(argv)
    nlp = load_pipeline(args.pipeline)
    if nlp is None:
        print(f"cannot measure: spaCy or its pipeline {args.pipeline!r} is not installed "
              "(pip install -r requirements-salient.txt; python -m spacy download en_core_web_sm)",
              file=sys.stderr)
        return 2
    split = "val" if args.split == "validation" else args.split
    result = {"split": split, "n": args.n, "seed": args.seed,
              "pipeline": f"{nlp.meta['lang']}_{nlp.meta['name']} {nlp.meta['version']}",
              "synthetic": agreement(synthetic_questions(split, args.n, args.seed), nlp),
              "natural": agreement(NATURAL_QUESTIONS, nlp)}
    print(json.dumps(result, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
