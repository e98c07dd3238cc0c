"""End to end through the CLI entry point: run, check, predict, report, demo."""

from __future__ import annotations

import json
import subprocess
import sys

import pandas as pd
import pytest
import yaml

from helpers import cli


def test_run_check_predict_report(recipe_factory, tmp_path, capsys):
    recipe = recipe_factory()
    code, out, err = cli(["check", recipe], capsys)
    assert code == 0, err
    assert "train" in out and "recipe ok" in out
    assert not (tmp_path / "run").exists(), "check must not create a run directory"

    code, out, err = cli(["run", recipe, "-s", "train.lr=0.004", "-s", "train.epochs=4"], capsys)
    assert code == 0, err
    run_dir = tmp_path / "run"
    assert "verdict" in out and "overfitting" in out and str(run_dir) in out
    resolved = yaml.safe_load((run_dir / "recipe.yaml").read_text())
    assert resolved["train"]["lr"] == 0.004 and resolved["train"]["epochs"] == 4
    assert isinstance(resolved["train"]["batch_size"], int), "every auto is resolved in the saved recipe"
    assert (run_dir / "report.html").read_text().count("<svg") >= 1

    new = tmp_path / "new.csv"
    pd.DataFrame({"text": ["love it, great and fast", "broken and awful refund"], "other": [1, 2]}).to_csv(new, index=False)
    out_file = tmp_path / "preds.csv"
    code, out, err = cli(["predict", run_dir, new, "--out", out_file], capsys)
    assert code == 0, err
    preds = pd.read_csv(out_file)
    assert list(preds["prediction"]) == ["pos", "neg"]
    assert {"prob_pos", "prob_neg", "other"} <= set(preds.columns)

    (run_dir / "report.html").unlink()
    code, out, err = cli(["report", run_dir], capsys)
    assert code == 0 and (run_dir / "report.html").exists()

    # a second run into the same directory is refused, and nothing there changes
    before = {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    code, out, err = cli(["run", recipe], capsys)
    assert code == 2 and "already exists" in err and "--overwrite" in err
    assert before == {p: p.stat().st_mtime_ns for p in run_dir.rglob("*")}
    code, out, err = cli(["run", recipe, "--overwrite"], capsys)
    assert code == 0, err


def test_python_api_accepts_a_dict(tiny_bert, text_csv, tmp_path):
    import honed

    recipe = {"model": str(tiny_bert), "data": {"train": str(text_csv), "max_length": 32}, "method": "head",
              "train": {"precision": "fp32"}, "out": str(tmp_path / "api-run")}
    result = honed.run(recipe, ["train.seed=3"], show_progress=False)
    assert result.run_dir == tmp_path / "api-run"
    assert result.metrics["test"]["accuracy"] == json.loads((result.run_dir / "metrics.json").read_text())["test"]["accuracy"]
    assert yaml.safe_load((result.run_dir / "recipe.yaml").read_text())["train"]["seed"] == 3


def test_every_command_has_help():
    for command in ["run", "check", "predict", "report", "demo"]:
        proc = subprocess.run([sys.executable, "-m", "honed", command, "--help"], capture_output=True, text=True)
        assert proc.returncode == 0 and "Usage" in proc.stdout, command


def test_unknown_option_is_exit_2(capsys, recipe_factory):
    code, _, err = cli(["run", recipe_factory(), "--no-such-flag"], capsys)
    assert code == 2


@pytest.mark.slow
def test_demo_beats_majority_and_linear_probe(tmp_path, capsys, monkeypatch):
    """The real thing: WordLlama's pre-trained embeddings on real tweets, offline."""
    monkeypatch.chdir(tmp_path)
    code, out, err = cli(["demo", "--out", tmp_path / "demo"], capsys)
    assert code == 0, err
    metrics = json.loads((tmp_path / "demo" / "metrics.json").read_text())
    test = metrics["test"]["accuracy"]
    assert test > metrics["majority"]["accuracy"] + 0.2
    assert test > metrics["pretrained"]["accuracy"] + 0.02
    assert all(g["status"] != "fail" for g in metrics["guards"].values())


def test_a_second_demo_never_overwrites_the_first(tmp_path):
    from honed.demo import free_run_dir

    base = tmp_path / "demo"
    assert free_run_dir(base) == base  # missing: the demo's own folder
    base.mkdir()
    assert free_run_dir(base) == base  # empty: nothing to lose
    (base / "metrics.json").write_text("{}")
    assert free_run_dir(base) == tmp_path / "demo-2"
    (tmp_path / "demo-2").mkdir()
    (tmp_path / "demo-2" / "metrics.json").write_text("{}")
    assert free_run_dir(base) == tmp_path / "demo-3"
