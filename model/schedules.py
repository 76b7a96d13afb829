"""FitPrune schedules fitted for one checkpoint, stored beside its weights as ``fitprune.json``.

``{"method": "fitprune", "budgets": {"64": {"deletions": [...one per LLM layer...], ...}}}``:
written by ``python -m model fit-fitprune`` (``model/fitprune.py``), read by the engine when it
loads the checkpoint; a budget without an entry runs ``budget.fitprune_schedule`` instead, and
the trace's ``plan.schedule`` says which ran.
"""

from __future__ import annotations

import json
from pathlib import Path

SCHEDULE_FILE = "fitprune.json"


def read_schedules(path: Path) -> dict[int, tuple[int, ...]]:
    """budget -> deletions per layer; {} when the file does not exist."""
    if not path.exists():
        return {}
    try:
        budgets = json.loads(path.read_text())["budgets"]
        return {int(b): tuple(int(d) for d in entry["deletions"]) for b, entry in budgets.items()}
    except (ValueError, KeyError, TypeError) as error:
        raise ValueError(f"{path} is not a FitPrune schedule file: {error}") from None


def write_schedules(path: Path, fits: dict[int, dict]) -> None:
    """Merge ``fits`` (budget -> {"deletions": [...], ...}) into the file at ``path``."""
    existing = json.loads(path.read_text())["budgets"] if path.exists() else {}
    existing.update({str(b): fit for b, fit in fits.items()})
    ordered = dict(sorted(existing.items(), key=lambda item: -int(item[0])))
    path.write_text(json.dumps({"method": "fitprune", "budgets": ordered}, indent=1) + "\n")
