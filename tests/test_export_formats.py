"""honed export: each format is loaded back and matches the run's model within its tolerance before
it is kept; a format a task cannot have is refused naming the ones it can."""

from __future__ import annotations

import json

import pytest

from helpers import cli

pytest.importorskip("onnxruntime")
pytest.importorskip("gguf")


@pytest.mark.parametrize("name", ["text_full", "image_full", "tabular_classification", "tabular_regression"])
def test_onnx_runs_under_onnxruntime_like_the_model(name, golden_run, tmp_path, capsys):
    _, _, run_dir, _ = golden_run(name)
    out = tmp_path / "onnx"
    code, stdout, err = cli(["export", run_dir, "--format", "onnx", "--out", out], capsys)
    assert code == 0, err
    report = json.loads((out / "export.json").read_text())["verification"]
    assert (out / "model.onnx").exists() and report["loaded_with"] == "onnxruntime"
    assert report["max_abs_diff"] <= report["tolerance"] * report["scale"]
    code, _, err = cli(["export", run_dir, "--format", "onnx", "--out", out], capsys)
    assert code == 2 and "already exists" in err  # never overwritten


@pytest.mark.parametrize("dtype", ["f16", "q8_0"])
def test_gguf_loads_back_with_the_chat_template(dtype, golden_run, tmp_path):
    import gguf

    from honed.exporting import export_run

    _, _, run_dir, _ = golden_run("chat_lora")
    report = export_run(run_dir, "gguf", tmp_path / "gguf", dtype)["verification"]
    assert report["max_abs_diff"] <= report["tolerance"] * report["scale"] and report["tokenizer_matches"]
    reader = gguf.GGUFReader(str(tmp_path / "gguf" / f"model-{dtype}.gguf"))
    field = reader.fields["tokenizer.chat_template"]
    template = bytes(field.parts[field.data[0]]).decode()
    saved = json.loads((run_dir / "model" / "tokenizer_config.json").read_text()).get("chat_template")
    if saved is None:
        saved = (run_dir / "model" / "chat_template.jinja").read_text()
    assert template == saved


def test_hf_copy_and_wrong_formats(golden_run, tmp_path, capsys):
    _, _, run_dir, _ = golden_run("forecast_patchtst")
    code, _, err = cli(["export", run_dir, "--format", "gguf", "--out", tmp_path / "g"], capsys)
    assert code == 2 and "a forecasting run exports as hf" in err
    code, _, err = cli(["export", run_dir, "--format", "hf", "--out", tmp_path / "hf"], capsys)
    assert code == 0, err
    assert (tmp_path / "hf" / "config.json").exists()
    _, _, chat_dir, _ = golden_run("chat_lora")
    code, _, err = cli(["export", chat_dir, "--format", "adapter", "--out", tmp_path / "a"], capsys)
    assert code == 2 and "kept no adapter" in err and not (tmp_path / "a").exists()
