"""lmms-eval hooks of the ``duet_synthetic`` task (copied beside its YAML by ``model/lab/lmms_task``):
the image from the task folder, the question as the prompt, exact match as ``python -m model
eval`` scores it."""

from pathlib import Path

from PIL import Image

HERE = Path(__file__).resolve().parent


def doc_to_visual(doc):
    return [Image.open(HERE / doc["image"]).convert("RGB")]


def doc_to_text(doc, lmms_eval_specific_kwargs=None):
    return doc["question"]


def process_results(doc, results):
    return {"accuracy": float(results[0].strip() == doc["answer"])}
