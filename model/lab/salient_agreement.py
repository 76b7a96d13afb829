"""How well the built-in salient-word rule agrees with the spaCy rule it stands in for
(``model.salient``): ``python -m model.lab.salient_agreement [--split test --n 1000]`` on the
synthetic questions and on hand-written natural ones."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Iterable

from ..salient import PIPELINE, WORD_LEVEL_UNIT, Span, builtin_rule_spans, load_pipeline, spacy_rule_spans
from . import scenes

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
    return [scenes.sample(seed, split, index).question for index in range(n)]


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m model.lab.salient_agreement",
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
