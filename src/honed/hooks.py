"""Observers a caller passes to `honed.run` (benchmarks, a UI): each is called at a fixed point
and none changes what is computed. The loop's hooks observe the run's own fine-tune (not the
extra fine-tunes of seeds, the learning curve or the scratch baseline); on_features sees every
pass over the pre-trained or fine-tuned features."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable


@dataclass
class Hooks:
    on_train_start: Callable[[str], None] | None = None  # (stage) a training stage starts (before its optimizer is built)
    on_collate: Callable[[], None] | None = None  # a training batch is about to be collated
    on_step: Callable[[int], None] | None = None  # (step) an optimizer step was taken, before any evaluation at it
    on_threads: Callable[[int], None] | None = None  # the intra-op thread count a step trains with
    on_evaluated: Callable[[float, dict], None] | None = None  # (time.perf_counter() when the evaluation began, its metrics)
    on_features: Callable[[int, float], None] | None = None  # (rows, seconds) of each pass computing the head's input features
    on_phase: Callable[[str, float], None] | None = None  # (name, seconds) of each start-up phase (phases.py), as it ends
