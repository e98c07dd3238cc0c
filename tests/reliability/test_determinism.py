"""Determinism: the same recipe and seed give the same metrics.json figures and the same weights,
bit for bit, in separate processes; another seed gives other weights.

The thread count is pinned (train.threads: 1), because it decides the order of floating-point
sums. With threads "auto", fp32 keeps the count it started with (the cores of the machine), so
it repeats on the same machine too; bf16 on the CPU re-fits the count to the cores other
processes leave free while it trains (honed.train.precision.fit_threads), and so repeats only
with a pinned count, which is what the bf16 test uses.
"""

from __future__ import annotations

import pytest
import torch

import honed
from reliability.harness import Honed, assert_same_result, figures, final_state


def _run(recipe, out, *sets) -> Honed:
    return Honed("run", recipe, "--out", out, *[a for s in sets for a in ("-s", s)])


@pytest.fixture(scope="module")
def runs(recipe, workspace):
    """Started together, two at a time: a second fp32 run and two bf16 runs, each its own process."""
    out = workspace / "determinism"
    started = {"fp32": _run(recipe, out / "fp32"), "bf16_a": _run(recipe, out / "bf16_a", "train.precision=bf16")}
    for name, proc in started.items():
        assert proc.wait(600) == 0, proc.stderr[-3000:]
    second = _run(recipe, out / "bf16_b", "train.precision=bf16")
    assert second.wait(600) == 0, second.stderr[-3000:]
    return {"fp32": out / "fp32", "bf16_a": out / "bf16_a", "bf16_b": out / "bf16_b"}


@pytest.mark.slow
def test_same_seed_same_metrics_and_weights_fp32(runs, reference):
    assert_same_result(reference.path(), runs["fp32"])
    a, _ = final_state(reference.path())
    b, _ = final_state(runs["fp32"])
    assert figures(a) == figures(b), "every figure in metrics.json but the timings and the run's path"
    assert a["timing"]["precision"] == "fp32"


@pytest.mark.slow
def test_same_seed_same_metrics_and_weights_bf16(runs):
    a, _ = final_state(runs["bf16_a"])
    b, _ = final_state(runs["bf16_b"])
    assert a["timing"]["precision"] == "bf16" == b["timing"]["precision"]
    assert_same_result(runs["bf16_a"], runs["bf16_b"])
    assert figures(a) == figures(b)


@pytest.mark.slow  # two more whole runs: ~65 s
def test_different_seed_different_weights(recipe, reference, tmp_path):
    other = honed.run(str(recipe), ["train.seed=1"], out=tmp_path / "seed1", show_progress=False)
    _, weights_0 = final_state(reference.path())
    _, weights_1 = final_state(other.run_dir)
    differ = [k for k in weights_0 if not torch.equal(weights_0[k], weights_1[k])]
    # the head is new (initialised from the seed) and every trained tensor moves differently
    assert len(differ) == len(weights_0), f"only {len(differ)} of {len(weights_0)} tensors differ"
    assert other.metrics["run"]["seed"] == 1
