"""The bad-input corpus: the ways a user's input can be wrong, run through the real CLI entry point.

Each case is one row: a name, a builder that writes the bad files into the test's folder, the
argv, the exit code, and words the one-line `error: ...` message must contain (the field, file
or column, and what was found). For every failing case the test also checks that no traceback
reaches the user and that nothing at all was written in the test's folder: an existing run
directory is untouched, no run directory is created, the user's own files are intact.

Exit codes (design.md §3): 2 = bad recipe, arguments or model path; 3 = bad data; 0 = must work.
`check` is used wherever the failure comes before a model is loaded; `run` for model paths and
run directories (they fail at model load or at the run-directory check, before training).
"""

from __future__ import annotations

import json
import os
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import pytest

import honed
from bad_inputs.builders import (
    Ctx,
    committed,
    committed_data,
    data_file,
    edit_config,
    good_csv,
    good_rows,
    huge_text_data,
    many_classes,
    mixed_line_endings,
    mkdir,
    model_dir,
    nothing,
    pickle_only,
    recipe_text,
    recipe_with,
    remove,
    rows,
    run_dir,
    steps,
    symlink_loop,
    truncate_weights,
    user_dir,
    vision_model,
    write,
)
from conftest import make_texts, write_recipe
from honed.cli import main


@dataclass
class Case:
    name: str
    build: Callable[[Ctx], None]
    argv: list[str]  # placeholders: {tmp} the test's folder, {recipe} its recipe.yaml, {run} a finished run
    code: int  # 0: must work
    words: tuple[str, ...] = ()  # each must appear in the error line (case-sensitive)
    after: Callable[[Ctx, str], None] | None = None  # extra checks, given the context and stdout
    max_seconds: float | None = None


CHECK = ["check", "{recipe}"]
RUN = ["run", "{recipe}"]
PREDICT = ["predict", "{run}", "{tmp}/new.csv"]
DATA = good_rows(60)  # "text,label" lines of good data



def no_code_ran(ctx: Ctx, out: str) -> None:
    assert not (ctx.tmp / "PWNED").exists()


def bom_column_found(ctx: Ctx, out: str) -> None:
    assert "recipe ok" in out
    audit = honed.check(str(ctx.recipe_path))
    assert sum(s["rows"] for s in audit["splits"].values()) == 30


def mixed_endings_all_rows(ctx: Ctx, out: str) -> None:
    assert "recipe ok" in out
    audit = honed.check(str(ctx.recipe_path))
    assert sum(s["rows"] for s in audit["splits"].values()) == 60


def truncation_reported(ctx: Ctx, out: str) -> None:
    audit = json.loads((ctx.tmp / "run" / "audit.json").read_text())
    assert sum(audit["truncated"].values()) == 1
    finding = next(f for f in audit["findings"] if f["code"] == "truncated")
    assert "max_length=32" in finding["message"]


def user_files_intact(ctx: Ctx, out: str) -> None:
    assert (ctx.tmp / "run" / "notes.txt").read_text() == "do not delete\n"


def predictions_kept(ctx: Ctx, out: str) -> None:
    assert (ctx.tmp / "preds.csv").read_text() == "an earlier result the user wants to keep\n"


FORECAST = "task: forecasting\nmodel: {architecture: patchtst, d_model: 16, layers: 1}\ndata:\n  train: series.csv\n  context_length: 12\n  horizon: 4\n"


def series_rows(n: int = 40, names=("north", "south")) -> list[str]:
    """Good long-format rows: monthly, one row per series and month."""
    return [f"{name},{2015 + i // 12}-{i % 12 + 1:02d}-01,{100 + 10 * (i % 12) + j}" for j, name in enumerate(names) for i in range(n)]


def forecast_case(lines: list[str], recipe: str = FORECAST, header: str = "series,time,target"):
    return steps(write("series.csv", rows(header, lines)), recipe_text(recipe))


SERIES = series_rows()

CASES = [
    # ------------------------------------------------------------------ recipe and arguments (exit 2)
    Case("recipe_unknown_top_key", recipe_with(modle="x"), CHECK, 2, ("modle", "unknown key", "did you mean model?")),
    Case("recipe_unknown_nested_key", recipe_with(**{"train.lrr": 1e-4}), CHECK, 2, ("train.lrr", "unknown key", "did you mean train.lr?")),
    Case("recipe_wrong_type", recipe_with(**{"train.epochs": "many"}), CHECK, 2,
         ("train.epochs: should be a valid integer or 'auto'", "'many'")),
    Case("recipe_bad_choice", recipe_with(method="lorax"), CHECK, 2, ("method", "'lora'", "'lorax'")),
    Case("recipe_out_of_range", recipe_with(**{"data.max_length": 2}), CHECK, 2, ("data.max_length", "greater than or equal to 8", "got 2")),
    Case("recipe_missing_model", recipe_text("task: text-classification\ndata:\n  train: train.csv\n"), CHECK, 2, ("model", "missing")),
    Case("recipe_not_a_mapping", recipe_text("- task: text-classification\n- model: x\n"), CHECK, 2, ("recipe.yaml", "mapping", "list")),
    Case("recipe_empty", recipe_text(""), CHECK, 2, ("recipe.yaml", "empty")),
    Case("recipe_yaml_syntax", recipe_text("task: text-classification\nmodel: [unclosed\ndata:\n  train: x.csv\n"), CHECK, 2,
         ("recipe.yaml", "line 3", "not valid YAML")),
    Case("recipe_python_tag", committed("python_tag.yaml", "recipe.yaml"), CHECK, 2,
         ("recipe.yaml", "line 2", "uses the YAML tag '!!python/object/apply:os.system'"), after=no_code_ran),
    Case("recipe_not_utf8", recipe_text("task: text-classification\nmodel: caf\xe9\n".encode("latin-1")), CHECK, 2, ("recipe.yaml", "UTF-8")),
    Case("recipe_file_missing", nothing, ["check", "{tmp}/nope.yaml"], 2, ("nope.yaml", "not found")),
    Case("recipe_is_directory", mkdir("recipes"), ["check", "{tmp}/recipes"], 2, ("recipes", "is a directory")),
    Case("override_no_equals", recipe_with(), CHECK + ["-s", "train.lr"], 2, ("-s train.lr", "key=value")),
    Case("override_unknown_key", recipe_with(), CHECK + ["-s", "train.lrr=1e-4"], 2, ("train.lrr", "unknown key")),
    Case("override_wrong_type", recipe_with(), CHECK + ["-s", "train.batch_size=big"], 2, ("train.batch_size", "'big'")),
    Case("override_into_a_value", recipe_with(), CHECK + ["-s", "train.lr.x=1"], 2, ("train.lr.x", "'lr' is a value")),
    Case("override_python_tag", recipe_with(), CHECK + ["-s", 'model=!!python/object/apply:os.system ["touch PWNED"]'], 2,
         ("-s model=", "uses the YAML tag '!!python/object/apply:os.system'"), after=no_code_ran),
    Case("cli_unknown_option", recipe_with(), CHECK + ["--frobnicate"], 2, ("--frobnicate", "honed check --help")),
    Case("cli_resume_and_overwrite", recipe_with(), RUN + ["--resume", "--overwrite"], 2, ("--resume", "--overwrite", "choose one")),

    # ------------------------------------------------------------------ data (exit 3)
    Case("data_missing_file", recipe_with(**{"data.train": "nope.csv"}), CHECK, 3, ("data.train", "nope.csv", "not found")),
    Case("data_validation_missing_file", recipe_with(**{"data.validation": "val.csv"}), CHECK, 3,
         ("data.validation", "val.csv", "not found", "files there: train.csv")),
    Case("data_is_directory", steps(mkdir("data"), recipe_with(**{"data.train": "data"})), CHECK, 3, ("data.train", "is a directory")),
    Case("data_empty_file", data_file("train.csv", b""), CHECK, 3, ("data.train", "train.csv", "empty (0 bytes)")),
    Case("data_header_only", data_file("train.csv", "text,label\n"), CHECK, 3, ("data.train", "train.csv", "no data rows")),
    Case("data_ragged_csv", committed_data("ragged.csv"), CHECK, 3, ("data.train", "ragged.csv", "line 9", "saw 3")),
    Case("data_not_utf8", committed_data("latin1.csv"), CHECK, 3, ("data.train", "latin1.csv", "not UTF-8", "0xe9")),
    Case("data_utf8_bom_works", committed_data("bom.csv"), CHECK, 0, after=bom_column_found),
    Case("data_mixed_line_endings_work", data_file("train.csv", mixed_line_endings), CHECK, 0, after=mixed_endings_all_rows),
    Case("data_jsonl_bad_line", committed_data("bad_line.jsonl"), CHECK, 3, ("data.train", "bad_line.jsonl", "line 3", "not valid JSON")),
    Case("data_jsonl_not_objects", data_file("train.jsonl", '{"text": "a", "label": "x"}\n[1, 2]\n'), CHECK, 3,
         ("data.train", "train.jsonl", "record 2", "not a JSON object")),
    Case("data_unknown_suffix", data_file("train.xlsx", b"PK\x03\x04 not really a spreadsheet"), CHECK, 3,
         ("data.train", "train.xlsx", "'.xlsx'", ".csv", "save the sheet as CSV")),
    Case("data_damaged_parquet", data_file("train.parquet", b"PAR1 this is not parquet"), CHECK, 3,
         ("data.train", "train.parquet", "not a readable Parquet file")),
    Case("data_symlink_loop", symlink_loop, CHECK, 3, ("data.train", "loop_a.csv", "symbolic link loop")),
    Case("data_label_column_missing", data_file("train.csv", rows("text,sentiment", DATA)), CHECK, 3,
         ("data.label", "'label'", "train.csv", "columns: text, sentiment")),
    Case("data_text_column_missing", data_file("train.csv", rows("body,label", DATA)), CHECK, 3,
         ("data.text", "'text'", "train.csv", "columns: body, label")),
    Case("data_groups_column_missing", recipe_with(**{"data.groups": ["country"]}), CHECK, 3,
         ("data.groups", "'country'", "columns: text, label, region")),
    Case("data_validation_text_column_missing", data_file("val.csv", rows("body,label", DATA), role="validation"), CHECK, 3,
         ("data.text", "'text'", "val.csv", "columns: body, label")),
    Case("data_single_class", data_file("train.csv", rows("text,label", [f"row {i},pos" for i in range(50)])), CHECK, 3,
         ("data.label", "single class", "'pos'")),
    Case("data_missing_labels", data_file("train.csv", rows("text,label", DATA[:10] + ["no label here,", "nor here,"] + DATA[10:])),
         CHECK, 3, ("data.label", "2 row(s)", "no 'label' value", "file lines 12, 13")),
    Case("data_unseen_validation_labels", data_file("val.csv", rows("text,label", DATA[:20] + ["not sure,maybe"]), role="validation"),
         CHECK, 3, ("data.validation", "'maybe'", "val.csv", "never occur in training")),
    Case("data_float_labels", data_file("train.csv", rows("text,label", [f"row {i},{[0.5, 1.7][i % 2]}" for i in range(60)])), CHECK, 3,
         ("data.label", "fractional", "0.5", "regression")),
    Case("data_nan_inf_labels", data_file("train.csv", rows("text,label", [f"row {i},{['0', '1', 'nan', 'inf'][i % 4]}" for i in range(60)])),
         CHECK, 3, ("data.label", "30 NaN/inf", "inf, nan", "file lines 4, 5")),
    # `run`, not `check`: a data error this plain must come before any model is loaded (see also the test below)
    Case("data_100k_classes", data_file("train.csv", many_classes), RUN, 3, ("data.label", "100000 distinct values", "100000 rows"),
         max_seconds=10),
    Case("data_one_row", data_file("train.csv", "text,label\ngreat phone,pos\n"), CHECK, 3,
         ("data.label", "train.csv", "single class", "1 row(s)")),
    Case("data_too_few_rows_to_split", data_file("train.csv", rows("text,label", DATA[:8])), CHECK, 3, ("data.train", "8 rows", "too few")),
    Case("data_all_texts_empty", data_file("train.csv", rows("text,label", [f",{['pos', 'neg'][i % 2]}" for i in range(40)])), CHECK, 3,
         ("data.text", "every row", "empty")),
    # a 10 MB text is data, not an error: it is truncated to data.max_length, and audit.json says so
    Case("data_10mb_text_truncated", huge_text_data, RUN, 0, after=truncation_reported, max_seconds=60),

    # ------------------------------------------------------------------ forecasting data (exit 3; recipe mistakes exit 2)
    Case("forecast_good_data_works", forecast_case(SERIES), CHECK, 0),
    Case("forecast_target_column_missing", forecast_case([r.rsplit(",", 1)[0] + ",x" for r in SERIES], header="series,time,sales"),
         CHECK, 3, ("data.target", "'target'", "series.csv", "columns: series, time, sales")),
    Case("forecast_duplicate_timestamps", forecast_case(SERIES[:5] + [SERIES[4]] + SERIES[5:]), CHECK, 3,
         ("data.time", "series 'north'", "sharing a timestamp", "2015-05-01", "file lines 6, 7")),
    Case("forecast_unsorted_timestamps", forecast_case(SERIES[:5] + [SERIES[6], SERIES[5]] + SERIES[7:]), CHECK, 3,
         ("data.time", "series 'north'", "goes back in time", "file line 8", "sort the file")),
    Case("forecast_non_numeric_target", forecast_case(SERIES[:9] + ["north,2015-10-01,n/a"] + SERIES[10:]), CHECK, 3,
         ("data.target", "must be numeric", "'n/a'", "file lines 11")),
    Case("forecast_missing_target", forecast_case(SERIES[:9] + ["north,2015-10-01,"] + SERIES[10:]), CHECK, 3,
         ("data.target", "1 row(s)", "no 'target' value", "file lines 11")),
    Case("forecast_bad_timestamp", forecast_case(SERIES[:3] + ["north,someday,5"] + SERIES[4:]), CHECK, 3,
         ("data.time", "not timestamps", "'someday'", "file lines 5")),
    Case("forecast_series_too_short", forecast_case(SERIES + series_rows(20, ("east",))), CHECK, 3,
         ("data.train", "series 'east'", "20 points", "needs 24")),
    Case("forecast_context_shorter_than_season", forecast_case(SERIES, FORECAST.replace("context_length: 12", "context_length: 6")),
         CHECK, 2, ("data.context_length", "shorter than one season (12)")),
    Case("forecast_validation_file_given", forecast_case(SERIES, FORECAST + "  validation: series.csv\n"), CHECK, 2,
         ("data.validation", "end of each series")),
    Case("forecast_mlp_architecture", forecast_case(SERIES, FORECAST.replace("architecture: patchtst, d_model: 16, layers: 1", "architecture: mlp")),
         CHECK, 2, ("model", "'mlp'", "patchtst")),

    # ------------------------------------------------------------------ model paths (exit 2)
    Case("model_path_missing", recipe_with(model="./no-such-model"), RUN, 2, ("model", "no-such-model", "does not exist")),
    Case("model_is_a_file", steps(write("model.bin", b"x"), recipe_with(model="./model.bin")), RUN, 2,
         ("model", "model.bin", "not a directory")),
    Case("model_no_config", model_dir(remove("config.json")), RUN, 2, ("model", "no config.json")),
    Case("model_config_not_json", model_dir(lambda d: (d / "config.json").write_text("{not json")), RUN, 2,
         ("model", "config.json", "not a valid JSON")),
    Case("model_no_weights", model_dir(remove("model.safetensors")), RUN, 2, ("model", "no weights")),
    Case("model_pickle_only", model_dir(pickle_only), RUN, 2, ("model", "only pickle weights", "allow_pickle")),
    Case("model_type_unknown", model_dir(edit_config(model_type="nonexistent")), RUN, 2, ("model", "config.json", "`nonexistent`")),
    Case("model_not_a_text_classifier", vision_model, RUN, 2, ("model", "'vit'", "ViTConfig", "sequence classifier")),
    Case("model_truncated_safetensors", model_dir(truncate_weights), RUN, 2, ("model", "model.safetensors", "damaged or incomplete")),
    Case("model_config_lies_about_shapes", model_dir(edit_config(hidden_size=64, intermediate_size=128)), RUN, 2,
         ("model", "do not match its config.json", "differ in shape", "in the weights", "by config.json")),
    Case("model_no_tokenizer", model_dir(remove("tokenizer.json", "tokenizer_config.json")), RUN, 2, ("model", "tokenizer", "no vocabulary")),

    # ------------------------------------------------------------------ run directories (exit 2)
    Case("run_dir_exists", steps(run_dir(), recipe_with()), RUN, 2, ("out", "already exists", "--resume", "--overwrite")),
    Case("run_dir_exists_via_out_option", steps(run_dir("elsewhere"), recipe_with()), RUN + ["--out", "{tmp}/elsewhere"], 2,
         ("elsewhere", "already exists")),
    Case("run_overwrite_non_run_dir", steps(user_dir("run"), recipe_with()), RUN + ["--overwrite"], 2,
         ("--overwrite", "not a honed run directory"), after=user_files_intact),
    Case("run_resume_non_run_dir", steps(user_dir("run"), recipe_with()), RUN + ["--resume"], 2,
         ("--resume", "not a honed run directory"), after=user_files_intact),
    Case("run_resume_other_recipe", steps(run_dir(), recipe_with()), RUN + ["--resume"], 2, ("--resume", "recipe differs")),
    Case("run_resume_empty_dir", steps(mkdir("run"), recipe_with()), RUN + ["--resume"], 2, ("--resume", "no run to resume")),
    Case("run_resume_missing_dir", recipe_with(), RUN + ["--resume"], 2, ("--resume", "no run to resume")),
    Case("run_out_is_a_file", steps(write("run", "a file the user had\n"), recipe_with()), RUN, 2, ("out", "is a file")),

    # ------------------------------------------------------------------ predict and report
    Case("predict_run_dir_missing", good_csv("new.csv"), ["predict", "{tmp}/no-run", "{tmp}/new.csv"], 2,
         ("RUN_DIR", "no-run", "does not exist")),
    Case("predict_not_a_run_dir", steps(user_dir("mine"), good_csv("new.csv")), ["predict", "{tmp}/mine", "{tmp}/new.csv"], 2,
         ("RUN_DIR", "mine", "honed.json")),
    Case("predict_text_column_missing", write("new.csv", "body\ngreat phone\n"), PREDICT, 3,
         ("INPUT", "'text'", "new.csv", "columns: body")),
    Case("predict_input_missing", nothing, PREDICT, 3, ("INPUT", "new.csv", "not found")),
    Case("predict_input_empty", write("new.csv", b""), PREDICT, 3, ("INPUT", "new.csv", "empty")),
    Case("predict_input_not_utf8", write("new.csv", "text\ncaf\xe9\n".encode("latin-1")), PREDICT, 3, ("INPUT", "new.csv", "not UTF-8")),
    Case("predict_out_exists", steps(write("new.csv", "text\ngreat phone\n"), write("preds.csv", "an earlier result the user wants to keep\n")),
         PREDICT + ["--out", "{tmp}/preds.csv"], 2, ("--out", "preds.csv", "already exists", "--overwrite"), after=predictions_kept),
    Case("report_no_metrics", user_dir("mine"), ["report", "{tmp}/mine"], 2, ("RUN_DIR", "mine", "no metrics.json")),
    Case("report_dir_missing", nothing, ["report", "{tmp}/no-run"], 2, ("RUN_DIR", "no-run", "does not exist")),
]

# data cases run again through `run`: the same exit code, and no run directory appears
RUN_TOO = ["data_missing_file", "data_ragged_csv", "data_not_utf8", "data_label_column_missing", "data_single_class",
           "data_nan_inf_labels", "data_unseen_validation_labels", "data_symlink_loop",
           "forecast_duplicate_timestamps", "forecast_unsorted_timestamps", "forecast_series_too_short"]


@pytest.fixture(scope="module")
def finished_run(tmp_path_factory, tiny_bert) -> Path:
    """One real run (tiny BERT, 1 epoch) for the predict cases."""
    folder = tmp_path_factory.mktemp("finished")
    make_texts(120, seed=3).to_csv(folder / "train.csv", index=False)
    recipe = write_recipe(folder, tiny_bert, folder / "train.csv", **{"train.epochs": 1, "guards.baseline": False})
    return honed.run(str(recipe), show_progress=False).run_dir


def snapshot(*roots: Path) -> dict[str, tuple]:
    """Every path under the roots with its type, size and mtime (symlinks not followed)."""
    seen = {}
    for root in roots:
        for folder, dirs, files in os.walk(root):
            for name in dirs + files:
                st = (Path(folder) / name).lstat()
                seen[os.path.join(folder, name)] = (st.st_mode, st.st_size, st.st_mtime_ns)
    return seen


def invoke(argv: list[str], capsys) -> tuple[int, str, str]:
    try:
        main(argv)
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    out, err = capsys.readouterr()
    return code, out, err


def run_case(case: Case, argv: list[str], tmp_path: Path, tiny_bert: Path, request, capsys, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)  # whatever a command writes relative to the current folder lands in the snapshot
    ctx = Ctx(tmp=tmp_path, model=tiny_bert)
    roots = [tmp_path]
    if any("{run}" in a for a in argv):
        ctx.run = request.getfixturevalue("finished_run")
        roots.append(ctx.run)
    case.build(ctx)
    argv = [a.format(tmp=tmp_path, recipe=ctx.recipe_path, run=ctx.run) for a in argv]
    capsys.readouterr()
    before = snapshot(*roots)
    started = time.perf_counter()
    code, out, err = invoke(argv, capsys)
    elapsed = time.perf_counter() - started

    assert "Traceback" not in err and "Traceback" not in out
    if case.code == 0:
        assert code == 0, f"expected success, got exit {code}: {err}"
    else:
        assert code == case.code, f"expected exit {case.code}, got {code}: {err}"
        lines = err.strip("\n").splitlines()
        assert len(lines) == 1, f"expected one line on stderr, got:\n{err}"
        assert lines[0].startswith("error: "), lines[0]
        missing = [w for w in case.words if w not in lines[0]]
        assert not missing, f"{missing} not in: {lines[0]}"
        assert snapshot(*roots) == before, "a failed command wrote, changed or deleted files"
    if case.after is not None:
        case.after(ctx, out)
    if case.max_seconds is not None:
        assert elapsed < case.max_seconds, f"{case.name} took {elapsed:.1f} s"


@pytest.mark.parametrize("case", CASES, ids=[c.name for c in CASES])
def test_bad_input(case, tmp_path, tiny_bert, request, capsys, monkeypatch):
    run_case(case, case.argv, tmp_path, tiny_bert, request, capsys, monkeypatch)


@pytest.mark.parametrize("name", RUN_TOO)
def test_run_agrees_with_check(name, tmp_path, tiny_bert, request, capsys, monkeypatch):
    case = next(c for c in CASES if c.name == name)
    assert case.argv == CHECK
    run_case(case, RUN, tmp_path, tiny_bert, request, capsys, monkeypatch)


def test_data_is_checked_before_the_model_loads(tmp_path, tiny_bert, capsys, monkeypatch):
    """100k distinct labels fail as bad data without a model ever being loaded."""
    import honed.models.load
    import honed.tasks.text.task

    def no_model(*args, **kwargs):
        raise AssertionError("the model was loaded before the data was validated")

    for module in (honed.tasks.text.task, honed.models.load):
        if hasattr(module, "load_pretrained"):
            monkeypatch.setattr(module, "load_pretrained", no_model)
    monkeypatch.chdir(tmp_path)
    ctx = Ctx(tmp=tmp_path, model=tiny_bert)
    data_file("train.csv", many_classes)(ctx)
    code, out, err = invoke(["run", str(ctx.recipe_path)], capsys)
    assert code == 3 and "100000 distinct values" in err, err
    assert not (tmp_path / "run").exists()


def test_corpus_size():
    assert len(CASES) >= 45
    assert len({c.name for c in CASES}) == len(CASES)
