"""Golden runs: the figures of a fixed set of small runs, recorded from the code before the redesign
(tests/golden/README.md), must come out the same from the current code.

Each entry of tests/golden/runs.py GOLDEN_RUNS is run again through the public `honed.run` and its
record (the parts of metrics.json that must not move, and the first rows of predictions.csv) is
compared with tests/golden/<name>.json: strings, statuses and booleans equal, numbers within
rel 1e-6 / abs 1e-9 (CPU fp32 is reproducible bit for bit; the tolerance only absorbs the printing of
floats in JSON). Every mismatch of a run is reported at once, by dotted key, golden and new value.
"""

from __future__ import annotations

import json
import math

import pytest
import torch

from golden import runs

REL, ABS = 1e-6, 1e-9
ABSENT = "<absent>"

pytestmark = pytest.mark.skipif(torch.cuda.is_available(), reason="the goldens were recorded on the CPU; a GPU sums in another order")


@pytest.mark.parametrize("name", list(runs.GOLDEN_RUNS))
def test_golden_run_unchanged(name, golden_run):
    path = runs.golden_path(name)
    assert path.exists(), f"no golden file {path}; record it (tests/golden/README.md)"
    golden = json.loads(path.read_text())
    _, metrics, run_dir, folder = golden_run(name)  # run once per session (conftest.py), shared with test_task_contract
    new = json.loads(runs.dump(runs.golden_record(metrics, run_dir, folder)))  # through JSON, as the golden was
    problems = differences(golden, new)
    assert not problems, (f"golden run {name}: {len(problems)} value(s) differ from {path.name} "
                          f"(key: golden -> new)\n  " + "\n  ".join(problems))


def differences(golden, new, key: str = "") -> list[str]:
    """Every place where `new` differs from `golden`, as 'dotted.key: golden -> new'."""
    if isinstance(golden, dict) and isinstance(new, dict):
        out = []
        for k in sorted(set(golden) | set(new), key=str):
            sub = f"{key}.{k}" if key else str(k)
            if k not in new:
                out.append(f"{sub}: {_show(golden[k])} -> {ABSENT}")
            elif k not in golden:
                out.append(f"{sub}: {ABSENT} -> {_show(new[k])}")
            else:
                out += differences(golden[k], new[k], sub)
        return out
    if isinstance(golden, list) and isinstance(new, list):
        out = [] if len(golden) == len(new) else [f"{key}: {len(golden)} items -> {len(new)} items"]
        for i, (g, n) in enumerate(zip(golden, new)):
            out += differences(g, n, f"{key}[{i}]")
        return out
    return [] if same(golden, new) else [f"{key}: {_show(golden)} -> {_show(new)}"]


def same(golden, new) -> bool:
    if isinstance(golden, bool) or isinstance(new, bool) or golden is None or new is None:
        return type(golden) is type(new) and golden == new
    if _is_number(golden) and _is_number(new):
        return _close(float(golden), float(new))
    if isinstance(golden, str) and isinstance(new, str):
        g, n = _as_float(golden), _as_float(new)  # predictions.csv cells are strings; a figure in one is compared as a number
        return _close(g, n) if g is not None and n is not None else golden == new
    return golden == new


def _close(g: float, n: float) -> bool:
    if math.isnan(g) or math.isnan(n):
        return math.isnan(g) and math.isnan(n)
    return math.isclose(g, n, rel_tol=REL, abs_tol=ABS)


def _is_number(value) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def _as_float(text: str) -> float | None:
    try:
        return float(text)
    except ValueError:
        return None


def _show(value) -> str:
    text = json.dumps(value) if not isinstance(value, float) else repr(value)
    return text if len(text) <= 200 else text[:197] + "..."


def test_differences_name_every_moved_key():
    """The comparison itself: dotted keys, list indices, the tolerance, strings, NaN and missing keys."""
    golden = {"test": {"accuracy": 0.75, "loss": 0.5}, "guards": {"bias": {"status": "ok", "details": {"n": [1, 2]}}},
              "predictions": [{"prob": "0.500001", "label": "pos"}], "nan": float("nan"), "flag": False, "gone": 1}
    new = {"test": {"accuracy": 0.75 * (1 + 1e-9), "loss": 0.51}, "guards": {"bias": {"status": "warn", "details": {"n": [1, 3]}}},
           "predictions": [{"prob": "0.5000010", "label": "neg"}], "nan": float("nan"), "flag": 0, "extra": 2}
    assert differences(golden, new) == [
        "extra: <absent> -> 2",
        "flag: false -> 0",
        "gone: 1 -> <absent>",
        "guards.bias.details.n[1]: 2 -> 3",
        "guards.bias.status: \"ok\" -> \"warn\"",
        "predictions[0].label: \"pos\" -> \"neg\"",
        "test.loss: 0.5 -> 0.51",
    ]
    assert differences([1, 2], [1]) == [": 2 items -> 1 items"]
