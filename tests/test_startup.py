"""Start-up behaviour (issue 17): the run directory is checked before any data is read, each phase
is timed (hooks.on_phase, and one line on stderr), and Ctrl-C outside the training loop says which
phase it cut short, what was kept and the command that goes on."""

from __future__ import annotations

import pytest

from helpers import make_texts
from honed.errors import RecipeError
from honed.hooks import Hooks
from honed.phases import RunInterrupted
from honed.runner import run


def recipe(train) -> dict:
    return {"task": "text-classification", "model": "wordllama", "method": "head", "data": {"train": str(train)},
            "train": {"head_epochs": 1, "lr": 1e-3, "head_lr": 1e-2, "batch_size": 32},
            "guards": {"baseline": False}}


def test_an_existing_run_directory_is_refused_before_the_data_is_read(tmp_path):
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / "recipe.yaml").write_text("task: text-classification\n")
    # the data file does not exist: reading it would fail with a data error, so the refusal must come first
    with pytest.raises(RecipeError, match=r"^out: run directory .* already exists"):
        run(recipe(tmp_path / "missing.csv"), out=tmp_path / "run", show_progress=False)


def interrupt_at(name: str, seen: list):
    def on_phase(phase: str, seconds: float) -> None:
        seen.append((phase, seconds))
        if phase == name:
            raise KeyboardInterrupt

    return Hooks(on_phase=on_phase)


def test_ctrl_c_before_the_run_directory_exists_says_nothing_was_written(tmp_path, capsys):
    train = tmp_path / "train.csv"
    make_texts(120, seed=1).to_csv(train, index=False)
    seen: list = []
    with pytest.raises(RunInterrupted) as info:
        run(recipe(train), out=tmp_path / "run", hooks=interrupt_at("tokenising", seen))
    assert [p for p, _ in seen] == ["reading data", "loading the model", "tokenising"] and all(s >= 0 for _, s in seen)
    assert str(info.value).startswith("interrupted before training after ")
    assert "nothing was written (no run directory yet)" in str(info.value) and info.value.exit_code == 130
    assert not (tmp_path / "run").exists()
    out = capsys.readouterr().out  # stdout: stderr holds a failing run's one error line only
    assert out.splitlines()[0].startswith("reading data: ") and out.splitlines()[0].endswith(" training rows)")
    assert out.splitlines()[1].startswith("loading the model: ") and out.splitlines()[1].endswith(" s")


def test_ctrl_c_after_the_run_directory_is_written_says_how_to_go_on(tmp_path):
    train = tmp_path / "train.csv"
    make_texts(120, seed=1).to_csv(train, index=False)
    with pytest.raises(RunInterrupted) as info:
        run(recipe(train), out=tmp_path / "run", show_progress=False, hooks=interrupt_at("scoring the pre-trained model", []))
    message = str(info.value)
    assert "holds recipe.yaml and audit.json but no checkpoint; start again with: honed.run(...) --overwrite" in message
    assert (tmp_path / "run" / "audit.json").exists()


def test_the_memory_check_counts_the_data(tmp_path):
    """Token ids (12 bytes a token while the cache is read) and cached features (4 bytes a dimension) for every row."""
    from honed.models.wordllama import load_wordllama
    from honed.session import data_memory_mb, prepare
    from honed.tasks import TASKS

    bundle = load_wordllama(["neg", "pos"])
    figures = []
    for rows in (200, 2000):
        train = tmp_path / f"train-{rows}.csv"
        make_texts(rows, seed=1).to_csv(train, index=False)
        resolved, splits = prepare(recipe(train))
        figures.append(data_memory_mb(resolved, TASKS["text-classification"], bundle, splits))
    assert figures[1] == pytest.approx(10 * figures[0], rel=0.05)
    assert figures[1] > 2000 * 256 * 4 / 2**20  # at least the features: 2,000 rows × 256 dimensions × 4 bytes
