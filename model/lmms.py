"""The lmms-eval model ``duet_llava``: any method and budget of this engine on any lmms-eval task.

    python -m lmms_eval --model duet_llava \\
        --model_args pretrained=llava-hf/llava-1.5-7b-hf,method=duet,budget=64 --tasks gqa --batch_size 8
    accelerate launch --multi_gpu --num_processes 8 -m lmms_eval --model duet_llava --model_args ... --tasks ...

lmms-eval finds the model through the ``lmms_eval.models`` entry point in ``pyproject.toml``
(``pip install -r requirements-eval.txt`` installs this project with it). Under ``accelerate
launch`` every process loads the model on its own device and answers its own share of the
documents (the harness shards them by ``rank`` and ``world_size`` and gathers the results): data
parallel, nothing wrapped. Without CUDA the processes run on the CPU and gather over gloo
(``--multi_gpu`` then only makes accelerate start them with torchrun).

Model arguments: ``pretrained`` (folder or hub id; default the shipped model), ``method``
(``budget.METHODS``), ``budget`` (visual tokens; default all of them; on Qwen2.5-VL with DUET or VisionZip the
authors' 540 + 100), ``dominant_share`` / ``contextual_share`` (Qwen2.5-VL: V2V counts as shares of each
image's tokens, the authors' 0.65 / 0.05; every method then matches DUET's average per image), ``traces`` (a folder: one SPEC §4 trace per document, ``TASK-DOC.json``; answers then run
one at a time through ``engine.answer``), ``trace_images`` (``inline``, the default: each frame's
view in the trace as base64 JPEG; ``sidecar``: ``TASK-DOC.f<frame>.jpg`` beside it; see
``model.trace``), ``trace_scores`` (default true). A trace also says which document it answered
(``task``, ``split``, ``doc_id``), the task's ``target`` (its ``doc_to_target``), the ``response``
lmms-eval scored (the answer cut at ``until``) and, with ``trace_scores``, that response's
per-document ``score``: the numeric metrics of the task's own ``process_results`` (before any of
the task's filters, which most generation tasks leave at ``take_first``, so this is the score the
harness logs). Turn it off for a task whose ``process_results`` calls a judge model, which would
then run twice per document. Prompts are built as lmms-eval's own ``llava_hf`` model
builds them (``task_prompt``), so a score of ``method=full`` is ``llava_hf``'s on the same
checkpoint and tokens. Generation is greedy (the engine has no sampling; the
LLaVA tasks ask for temperature 0), ``max_new_tokens`` comes from the task (16 when it sets
none), and the answer is cut at the task's first ``until`` string. The harness's ``--device cpu`` keeps
the model on the CPU; otherwise each process takes its own GPU when there is one. Questions are
batched ``--batch_size`` at a time (``batch.answer_batch``). Tasks scored by log-likelihood are not
supported: the engine only generates.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import torch
from accelerate import Accelerator
from lmms_eval.api.instance import Instance
from lmms_eval.api.model import lmms
from lmms_eval.models.registry_v2 import ModelManifest
from loguru import logger
from PIL import Image

from .batch import answer_batch
from .budget import ReductionConfig
from .engine import DuetLlava
from .inputs import check_question
from .trace import attach_views

IMAGE_MARKERS = ("<image>", "<video>")
TRACE_IMAGES = ("inline", "sidecar")


def manifest() -> ModelManifest:
    """The entry point lmms-eval loads (``pyproject.toml``)."""
    return ModelManifest(model_id="duet_llava", simple_class_path=f"{__name__}.DuetLlavaEval")


def question_text(context: str) -> str:
    """The task's prompt without image markers: the engine places the image tokens itself."""
    for marker in IMAGE_MARKERS:
        context = context.replace(marker, " ")
    return context.strip()


def task_prompt(engine: DuetLlava, context: str, n_images: int) -> str:
    """The prompt lmms-eval's ``llava_hf`` model sends for a task's ``context`` about ``n_images``
    images, by its steps (``lmms_eval/models/simple/llava_hf.py``, ``generate_until``): one
    ``<image>`` per image, space-separated, then a newline, in front of a context that holds none;
    that text as the one user message, a plain string, through the tokenizer's chat template, or
    Vicuna's (with LLaVA-1.5's system prompt) when the tokenizer has none, as llava-hf's LLaVA-1.5
    checkpoints do (their template is the processor's). The context's text is kept as it is:
    newlines, special tokens and role markers are the task's own (``inputs.check_question`` with
    ``task=True``).

    Three cases ``llava_hf`` cannot serve take the engine's own prompt (``engine.prompt_text`` on the
    context without its image markers): Video-LLaVA and Qwen2.5-VL checkpoints, which ``llava_hf``
    does not load (Qwen's: its chat template on [image, text], as lmms-eval's ``qwen2_5_vl`` and
    DUET-VLM's ``eval_benchmarks.py`` build it), and a tokenizer template that reads only list-of-parts messages (this project's checkpoints),
    where ``llava_hf``'s string message would come out without the question."""
    # imported here: lmms-eval's model registry imports this module while it loads its models
    from lmms_eval.models.simple.llava_hf import DEFAULT_IMAGE_TOKEN, VICUNA_CHAT_TEMPLATE

    if engine.backbone.kind in ("video_llava", "qwen2_5_vl"):
        return engine.prompt_text(question_text(context), n_images)
    if DEFAULT_IMAGE_TOKEN not in context:
        context = f"{' '.join([DEFAULT_IMAGE_TOKEN] * n_images)}\n{context}"
    tokenizer = engine.tokenizer
    text = tokenizer.apply_chat_template([{"role": "user", "content": context}], tokenize=False,
                                         add_generation_prompt=True,
                                         chat_template=tokenizer.chat_template or VICUNA_CHAT_TEMPLATE)
    return text if context in text else engine.prompt_text(question_text(context), n_images)


def cut(answer: str, until: list[str]) -> str:
    """``answer`` up to the first of the ``until`` strings."""
    for stop in until:
        if stop and stop in answer:
            answer = answer[: answer.index(stop)]
    return answer.strip()


class DuetLlavaEval(lmms):
    def __init__(self, pretrained: str | None = None, method: str = "full", budget: int | None = None,
                 device: str | None = None, batch_size: int | str = 1, traces: str | None = None,
                 trace_images: str = "inline", trace_scores: bool | str = True,
                 dominant_share: float | None = None, contextual_share: float | None = None,
                 max_batch_size=None) -> None:  # max_batch_size: passed by the harness, unused
        super().__init__()
        cpu = device == "cpu" or not torch.cuda.is_available()
        accelerator = Accelerator(cpu=cpu)  # on the CPU, processes launched together join over gloo
        self.engine = DuetLlava.load(pretrained, device="cpu" if cpu else f"cuda:{accelerator.local_process_index}")
        shares = {k: float(v) for k, v in (("dominant_share", dominant_share), ("contextual_share", contextual_share))
                  if v is not None}
        preset = self.engine.backbone.preset(method, False) if budget is None and not shares else {}
        self.reduction = ReductionConfig(method, **(preset or {"budget": int(budget) if budget is not None
                                                            else self.engine.n_patches}), **shares)
        self.engine.plan(self.reduction)  # refuses an unknown method or budget before any document runs
        self.batch_size = int(batch_size) if self.engine.backbone.batches else 1
        if int(batch_size) != self.batch_size:
            logger.warning(f"duet_llava: {self.engine.backbone.kind} answers one document at a time")
        self.traces = Path(traces) if traces else None
        if self.traces:
            self.traces.mkdir(parents=True, exist_ok=True)
        if trace_images not in TRACE_IMAGES:
            raise ValueError(f"trace_images must be one of {', '.join(TRACE_IMAGES)}, not {trace_images!r}")
        self.sidecar_views = trace_images == "sidecar"
        self.trace_scores = str(trace_scores).lower() not in ("false", "0", "no")
        self.accelerator = accelerator  # the harness gathers the processes' results through it
        self._rank, self._world_size = accelerator.process_index, accelerator.num_processes
        if torch.distributed.is_initialized():  # the harness's own Accelerator set up the group first
            self._rank, self._world_size = torch.distributed.get_rank(), torch.distributed.get_world_size()
        logger.info(f"duet_llava: {self.engine.name} on {self.engine.device}, {method} {self.reduction.budget}, "
                    f"process {self._rank + 1} of {self._world_size}")

    @property
    def device(self) -> torch.device:
        return self.engine.device

    def _inputs(self, request: Instance) -> tuple[list[Image.Image], str, str, int, list[str]]:
        """(frames, question, prompt text, max_new_tokens, until) of one request."""
        context, gen_kwargs, doc_to_visual, doc_id, task, split = request.args
        visuals = doc_to_visual(self.task_dict[task][split][doc_id])
        frames = [v.convert("RGB") for v in visuals if isinstance(v, Image.Image)]
        if not frames:
            raise ValueError(f"{task} document {doc_id}: duet_llava answers questions about images only")
        context = check_question(context, task=True)
        until = gen_kwargs.get("until") or []
        return (frames, question_text(context), task_prompt(self.engine, context, len(frames)),
                gen_kwargs.get("max_new_tokens", 16), [until] if isinstance(until, str) else list(until))

    def generate_until(self, requests: list[Instance]) -> list[str]:
        answers = []
        for first in range(0, len(requests), self.batch_size):
            chunk = requests[first:first + self.batch_size]
            inputs = [self._inputs(r) for r in chunk]
            limits = {limit for *_, limit, _ in inputs}
            if len(limits) == 1 and self.traces is None:
                records = answer_batch(self.engine, [(f, q) for f, q, *_ in inputs], self.reduction,
                                       max_new_tokens=limits.pop(), texts=[t for _, _, t, *_ in inputs])
            else:
                records = [self._traced(r, f, q, t, limit, until) for r, (f, q, t, limit, until) in zip(chunk, inputs)]
            for request, record in zip(chunk, records):
                for warning in record["warnings"]:
                    logger.warning(f"duet_llava: {request.args[4]} document {request.args[3]}: {warning}")
            answers += [cut(record["answer"], until) for record, (*_, until) in zip(records, inputs)]
        return answers

    def _traced(self, request: Instance, frames, question: str, text: str, max_new_tokens: int,
                until: list[str]) -> dict:
        trace = self.engine.answer(frames, question, self.reduction, max_new_tokens=max_new_tokens, text=text)
        if self.traces:
            _, _, doc_to_visual, doc_id, task, split = request.args
            path, response = self.traces / f"{task}-{doc_id}.json", cut(trace["answer"], until)
            document = {"task": task, "split": split, "doc_id": doc_id, "response": response,
                        **self._judged(doc_to_visual, self.task_dict[task][split][doc_id], response)}
            written = attach_views({**trace, **document}, frames, path if self.sidecar_views else None)
            path.write_text(json.dumps(written, default=str))
        return trace

    def _judged(self, doc_to_visual, doc, response: str) -> dict:
        """The task's ``target`` for ``doc`` and the ``score`` of ``response`` (module docstring),
        from the task object whose ``doc_to_visual`` the request carries; nothing the task does
        not give."""
        task = getattr(doc_to_visual, "__self__", None)
        out = {}
        if hasattr(task, "doc_to_target"):
            out["target"] = task.doc_to_target(doc)
        if self.trace_scores and hasattr(task, "process_results"):
            try:
                metrics = task.process_results(doc, [response])
            except Exception as error:  # a task's own scoring code: the trace goes without a score
                logger.warning(f"duet_llava: no per-document score ({type(error).__name__}: {error})")
                return out
            score = {name: float(value) for name, value in (metrics or {}).items()
                     if isinstance(value, (bool, int, float)) and math.isfinite(value)}
            if score:
                out["score"] = score
        return out

    def loglikelihood(self, requests):
        raise NotImplementedError("duet_llava only generates: tasks scored by log-likelihood are not supported")

    def generate_until_multi_round(self, requests):
        raise NotImplementedError("duet_llava answers single-round questions")
