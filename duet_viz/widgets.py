"""Gradio components that hand inputs to the model's own checks, and how an input error reaches
the visitor."""

from __future__ import annotations

import math
from contextlib import contextmanager

import gradio as gr

from model.inputs import InputError, number_list, whole_number


class UploadedImage(gr.Image):
    """gr.Image that hands the upload over unopened (as a file path): gr.Image would open it
    with PIL first (a ``data:`` URL it even decodes in full, whatever its size) and fail on a bad
    file with a generic error, while model.inputs.load_image checks bytes, geometry and format
    before decoding and says what is wrong. A ``data:`` URL never gets here as such: the guard
    (:mod:`duet_viz.limits`) stores it as an upload first, and the queue only accepts paths in the
    upload folder."""

    is_template = True  # rendered by the stock image component

    def preprocess(self, payload):
        return None if payload is None else payload.path


class WholeNumber(gr.Number):
    """gr.Number (precision 0) that refuses NaN, infinities and fractions in words: gr.Number's
    own preprocess fails on the first with Python's "cannot convert float NaN to integer" and
    rounds a fraction (1.5 became 2) before the app could say numbers must be whole."""

    is_template = True  # rendered by the stock number component

    def preprocess(self, payload):
        if isinstance(payload, float) and (not math.isfinite(payload) or payload != int(payload)):
            raise gr.Error(f"“{self.label}” must be a whole number (got {payload}).")
        return super().preprocess(payload)


@contextmanager
def shown_to_user():
    """An InputError raised inside becomes a gr.Error: Gradio shows its message as it is."""
    try:
        yield
    except InputError as error:
        raise gr.Error(str(error)) from None


def _ints(text, label: str) -> tuple[int, ...] | None:
    return number_list(text, label, int)


def _floats(text, label: str) -> tuple[float, ...] | None:
    return number_list(text, label, float)


def _optional_int(value, label: str, high: int) -> int | None:
    return None if value in (None, "") else whole_number(value, label, 0, high)
