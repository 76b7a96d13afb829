"""``python -m model lmms-task --out FOLDER``: the synthetic VQA as a local lmms-eval task.

The folder gets ``images/``, ``docs.jsonl`` ({image, question, answer, kind} per line), the task
YAML (``duet_synthetic``, with the documents' absolute path) and its hooks (``task_utils.py``):
``python -m lmms_eval --model duet_llava --include_path FOLDER --tasks duet_synthetic`` then
scores exactly what ``python -m model eval --split S --n N`` scores: the same questions, greedy,
3 new tokens, exact match.
"""

from __future__ import annotations

import argparse
import json
import shutil
from pathlib import Path

from ..eval import items

HERE = Path(__file__).resolve().parent


def write_task(out: Path, split: str = "test", n: int = 100, seed: int = 0) -> Path:
    (out / "images").mkdir(parents=True, exist_ok=True)
    lines = []
    for index, (sample, images) in enumerate(items(split, n, seed, 1)):
        name = f"images/{split}-{index:05d}.png"
        images[0].save(out / name)
        lines.append(json.dumps({"image": name, "question": sample.question, "answer": sample.answer,
                                 "kind": sample.kind}))
    docs = out / "docs.jsonl"
    docs.write_text("\n".join(lines) + "\n")
    yaml = (HERE / "duet_synthetic.yaml").read_text().replace("DOCS", json.dumps(str(docs.resolve())))
    (out / "duet_synthetic.yaml").write_text(yaml)
    shutil.copy(HERE / "task_utils.py", out / "task_utils.py")
    return out


def task_main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m model lmms-task", description=__doc__.split("\n\n")[0])
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--split", default="test")
    parser.add_argument("--n", type=int, default=100)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    print(write_task(args.out, args.split, args.n, args.seed))
    return 0
