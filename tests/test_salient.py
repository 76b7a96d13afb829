"""DUET-VLM's salient-word rule (model/salient.py): the built-in rule on hand-checked questions, the
spaCy rule's logic on a fake pipeline (spaCy is not installed in CI), the override, and that
nothing is ever downloaded."""

from __future__ import annotations

import re
import socket
import sys
import types
from dataclasses import dataclass

import pytest

from model import salient
from model.lab import salient_agreement
from model.lab.salient_agreement import agreement, word_positions
from model.salient import (
    CLOSED_CLASS_WORDS, QUESTION_WORDS, STOPWORDS, builtin_rule_spans, salient_spans, spacy_rule_spans,
)


@dataclass
class FakeToken:
    text: str
    idx: int
    pos_: str


class FakePipeline:
    """Stands in for a loaded spaCy pipeline: splits on whitespace and tags each token with the
    part of speech given for it."""

    meta = {"lang": "en", "name": "fake", "version": "0"}

    def __init__(self, tags: dict[str, list[str]]):
        self.tags = tags

    def __call__(self, question: str) -> list[FakeToken]:
        words = list(re.finditer(r"\S+", question))
        tags = self.tags[question]
        return [FakeToken(m.group(0), m.start(), pos) for m, pos in zip(words, tags, strict=True)]


@pytest.fixture(autouse=True)
def fresh_pipeline_cache():
    salient.load_pipeline.cache_clear()
    yield
    salient.load_pipeline.cache_clear()


@pytest.fixture
def fake_spacy(monkeypatch):
    """Installs a fake ``spacy`` module whose ``load`` returns ``pipeline`` (set by the test) and
    records the names it was asked for."""
    module = types.ModuleType("spacy")
    module.loaded = []
    module.pipeline = None

    def load(name):
        module.loaded.append(name)
        if module.pipeline is None:
            raise OSError(f"[E050] Can't find model '{name}'")
        return module.pipeline

    module.load = load
    monkeypatch.setitem(sys.modules, "spacy", module)
    return module


@pytest.fixture
def no_network(monkeypatch):
    def refuse(*args, **kwargs):
        raise AssertionError("salient-word code tried to open a network connection")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


# ----------------------------------------------------------------------------- stopwords
def test_stopwords_are_nltks_english_list():
    assert len(STOPWORDS) == 198
    assert {"i", "me", "wouldn't", "should've", "that'll", "ma", "i'm", "they've"} <= STOPWORDS
    assert not {"could", "would", "us", "whose", "many", "color"} & STOPWORDS
    assert QUESTION_WORDS - STOPWORDS == {"whose"}  # why the rule lets question words override


def test_closed_class_words_add_to_the_stopwords_without_hiding_question_words():
    assert CLOSED_CLASS_WORDS.isdisjoint(STOPWORDS)
    assert CLOSED_CLASS_WORDS.isdisjoint(QUESTION_WORDS)


# ----------------------------------------------------------------------------- built-in rule
def test_builtin_rule_on_a_synthetic_question():
    assert builtin_rule_spans("What color is the circle ?") == [
        (0, 4, "What"), (5, 10, "color"), (18, 24, "circle"), (25, 26, "?")]


def test_builtin_rule_drops_stopwords_closed_class_words_numbers_and_clitics():
    assert builtin_rule_spans("What's behind the 2 dogs near Mary's car: a bike?") == [
        (0, 4, "What"), (20, 24, "dogs"), (30, 34, "Mary"), (37, 40, "car"), (40, 41, ":"),
        (44, 48, "bike"), (48, 49, "?")]
    assert builtin_rule_spans("Could you please tell me why?") == [
        (17, 21, "tell"), (25, 28, "why"), (28, 29, "?")]
    assert builtin_rule_spans("Why don't cats swim?") == [
        (0, 3, "Why"), (10, 14, "cats"), (15, 19, "swim"), (19, 20, "?")]


def test_builtin_rule_keeps_no_colon_inside_a_time():
    assert builtin_rule_spans("Is it 10:30 or 11:00?") == [(20, 21, "?")]


def test_builtin_rule_marks_every_occurrence():
    assert builtin_rule_spans("Is the red ball red?") == [
        (7, 10, "red"), (11, 15, "ball"), (16, 19, "red"), (19, 20, "?")]


# ----------------------------------------------------------------------------- spaCy rule
def test_spacy_rule_question_words_and_punctuation_override_stopwords_and_pos():
    question = "What : is it near ! ."
    tags = ["DET", "PUNCT", "AUX", "PRON", "ADJ", "PUNCT", "PUNCT"]
    assert spacy_rule_spans(FakePipeline({question: tags})(question)) == [
        (0, 4, "What"), (5, 6, ":"), (13, 17, "near"), (18, 19, "!")]


def test_spacy_rule_filters_stopwords_then_pos_and_selects_every_occurrence_of_a_kept_word():
    question = "how many books are there near one table , one ?"
    tags = ["SCONJ", "ADJ", "NOUN", "AUX", "PRON", "ADP", "NUM", "NOUN", "PUNCT", "PRON", "PUNCT"]
    # "there" is a PRON but a stopword; "near" (ADP) and the first "one" (NUM) fail the POS test,
    # but the second "one" (PRON) puts "one" in the word list, so both of its tokens are selected
    assert spacy_rule_spans(FakePipeline({question: tags})(question)) == [
        (0, 3, "how"), (4, 8, "many"), (9, 14, "books"), (30, 33, "one"), (34, 39, "table"),
        (42, 45, "one"), (46, 47, "?")]


def test_salient_spans_uses_an_installed_pipeline_loaded_once(fake_spacy, no_network):
    question = "is the blue star on the left ?"
    tags = ["AUX", "DET", "ADJ", "NOUN", "ADP", "DET", "NOUN", "PUNCT"]
    fake_spacy.pipeline = FakePipeline({question: tags})
    expected = [(7, 11, "blue"), (12, 16, "star"), (24, 28, "left"), (29, 30, "?")]
    assert salient_spans(question) == (expected, "spacy")
    assert salient_spans(question) == (expected, "spacy")
    assert fake_spacy.loaded == ["en_core_web_sm"]


# ----------------------------------------------------------------------------- no download, override
def test_without_spacy_the_builtin_rule_runs_offline(monkeypatch, no_network):
    monkeypatch.setitem(sys.modules, "spacy", None)  # import spacy -> ImportError
    question = "What shape is the purple object ?"
    assert salient_spans(question) == (builtin_rule_spans(question), "builtin")
    assert [text for _, _, text in salient_spans(question)[0]] == ["What", "shape", "purple", "object", "?"]


def test_without_the_english_pipeline_the_builtin_rule_runs(fake_spacy, no_network):
    spans, rule = salient_spans("how many stars are there ?")
    assert rule == "builtin"
    assert [text for _, _, text in spans] == ["how", "many", "stars", "?"]
    assert fake_spacy.loaded == ["en_core_web_sm"]


def test_given_words_override_the_rule_case_insensitively_without_loading_spacy(fake_spacy):
    spans, rule = salient_spans("What's the colour of the Red star ?", ("red", "what's", "?"))
    assert rule == "given"
    assert spans == [(0, 6, "What's"), (25, 28, "Red"), (34, 35, "?")]
    assert fake_spacy.loaded == []


# ----------------------------------------------------------------------------- agreement
def test_word_positions_are_word_level_tokens_overlapped_by_spans():
    assert word_positions("what's red ?", [(0, 4, "what"), (11, 12, "?")]) == {0, 4}


def test_agreement_scores_the_builtin_rule_against_the_spacy_rule():
    tags = {"is the cat near ?": ["AUX", "DET", "NOUN", "ADJ", "PUNCT"],
            "what color is the star ?": ["DET", "NOUN", "AUX", "DET", "NOUN", "PUNCT"]}
    result = agreement(tags, FakePipeline(tags))
    # spaCy keeps near (ADJ) in the first question, the built-in rule drops it: 6 of 7 positions
    assert (result["positions_builtin"], result["positions_spacy"]) == (6, 7)
    scores = (result["precision"], result["recall"], result["f1"], result["exact_match"])
    assert scores == (1.0, 0.8571, 0.9231, 0.5)
    assert result["disagreements"] == [
        {"question": "is the cat near ?", "builtin_only": [], "spacy_only": ["near"]}]


def test_measurement_says_why_it_cannot_run_without_a_pipeline(fake_spacy, capsys):
    assert salient_agreement.main(["--n", "2"]) == 2
    assert "en_core_web_sm" in capsys.readouterr().err


def test_measurement_prints_agreement_on_synthetic_and_natural_questions(fake_spacy, capsys):
    questions = salient_agreement.synthetic_questions("val", 3, 0) + list(salient_agreement.NATURAL_QUESTIONS)
    fake_spacy.pipeline = FakePipeline({q: ["NOUN"] * len(q.split()) for q in questions})
    assert salient_agreement.main(["--split", "validation", "--n", "3"]) == 0
    out = capsys.readouterr().out
    assert '"split": "val"' in out and '"questions": 3' in out
    assert f'"questions": {len(salient_agreement.NATURAL_QUESTIONS)}' in out
