"""Learning-rate schedules, registered by name (``scheduler:`` in configs).

Every schedule is a per-step multiplier ``f(step) -> factor`` of the base LR with an optional linear
warm-up; ``constant`` without warm-up is the paper's recipe (reference-spec §3: AdamW 8e-5, no schedule).
"""

from __future__ import annotations

import math
from collections.abc import Callable

from ctseg.utils.registry import Registry

# fn(progress, min_ratio, power) -> factor of the step after warm-up, given progress in [0, 1]
ScheduleFn = Callable[[float, float, float], float]
_REGISTRY: Registry[ScheduleFn] = Registry("scheduler")


def register_schedule(name: str) -> Callable[[ScheduleFn], ScheduleFn]:
    """Register ``fn(progress, min_ratio, power) -> factor`` as the ``scheduler:`` value ``name``."""
    return _REGISTRY.register(name)


def list_schedules() -> list[str]:
    return _REGISTRY.names()


@register_schedule("constant")
def _constant(progress: float, min_ratio: float, power: float) -> float:
    return 1.0


@register_schedule("cosine")
def _cosine(progress: float, min_ratio: float, power: float) -> float:
    return min_ratio + (1.0 - min_ratio) * 0.5 * (1.0 + math.cos(math.pi * progress))


@register_schedule("poly")
def _poly(progress: float, min_ratio: float, power: float) -> float:
    return min_ratio + (1.0 - min_ratio) * (1.0 - progress) ** power


def lr_factor(
    name: str, step: int, total_steps: int, warmup_steps: int = 0, min_ratio: float = 0.0, power: float = 0.9
) -> float:
    """LR multiplier at optimizer step ``step`` (0-based) of ``total_steps``.

    Warm-up ramps linearly from ``1/(warmup_steps+1)`` to 1 over ``warmup_steps`` steps; the schedule's
    progress then runs from 0 at the end of warm-up to 1 at ``total_steps``.
    """
    fn = _REGISTRY[name]  # an unknown name is a ConfigError listing the known ones
    if step < warmup_steps:
        return (step + 1) / (warmup_steps + 1)
    span = max(1, total_steps - warmup_steps)
    progress = min(1.0, max(0.0, (step - warmup_steps) / span))
    return fn(progress, min_ratio, power)
