"""DUET-LLaVA: LLaVA with DUET-VLM dual-stage visual token reduction and its baselines."""

from .budget import METHODS, ReductionConfig, plan
from .engine import DuetLlava

__all__ = ["METHODS", "DuetLlava", "ReductionConfig", "plan"]
