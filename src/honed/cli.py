"""The command line. It parses arguments, calls the run (honed.runner) and prints; nothing else."""

from __future__ import annotations

import json
import os
import sys
import traceback
from pathlib import Path
from typing import Optional

import typer
from rich.console import Console
from rich.table import Table

from .errors import HonedError, RecipeError, TrainingInterrupted

app = typer.Typer(add_completion=False, no_args_is_help=True, pretty_exceptions_enable=False,
                  help="honed: fine-tune a pre-trained model to your data, and measure whether to trust it.")
out_console = Console()
err_console = Console(stderr=True, soft_wrap=True)
STATE = {"debug": False}

STATUS_STYLE = {"ok": "green", "warn": "yellow", "fail": "bold red", "skipped": "dim"}


@app.callback()
def _global(debug: bool = typer.Option(False, "--debug", help="Show the full traceback on errors.")):
    STATE["debug"] = debug


def print_verdict(metrics: dict, run_dir: Path) -> None:
    primary = metrics["primary_metric"]
    table = Table(title="honed verdict", show_lines=False)
    table.add_column("guard")
    table.add_column("status")
    table.add_column("summary", overflow="fold")
    for name, guard in metrics["guards"].items():
        style = STATUS_STYLE.get(guard["status"], "")
        table.add_row(name, f"[{style}]{guard['status']}[/{style}]", guard["summary"])
    out_console.print(table)
    test = metrics["test"].get(primary)
    pretrained = metrics.get("pretrained", {})
    probe = pretrained.get(primary)
    majority = metrics.get("majority", {}).get(primary)
    line = f"test {primary}: [bold]{test:.4f}[/bold]"
    if probe is not None:
        line += f"   {pretrained.get('method', 'before fine-tuning')}: {probe:.4f}"
    if majority is not None:
        line += f"   majority class: {majority:.4f}"
    naive = metrics.get("seasonal_naive", {}).get(primary)
    if naive is not None:
        line += f"   seasonal naive: {naive:.4f}"
    out_console.print(line, soft_wrap=True)
    timing = metrics.get("timing", {})
    out_console.print(f"trained in {timing.get('train_seconds', 0):.1f} s ({timing.get('samples_per_second', 0):.1f} samples/s, {timing.get('precision')})")
    out_console.print(f"run directory: [bold]{run_dir}[/bold]  (report: {run_dir / 'report.html'})", soft_wrap=True)
    step = metrics.get("next_step")
    if step and step["set"] and "retry" not in metrics:
        out_console.print(f"{step['sentence']} `honed run --retry-on-fail` runs it.", soft_wrap=True)
    guards_seconds = timing.get("guards", {}).get("total_seconds")
    out_console.print(f"took {timing.get('wall_seconds', 0):.1f} s in all: training {timing.get('train_seconds', 0):.1f} s"
                      + (f", guards {guards_seconds:.1f} s" if guards_seconds is not None else ""))


@app.command()
def run(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key, e.g. -s train.lr=1e-4 (repeatable)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Run directory (default: the recipe's `out`, else runs/<recipe name>)."),
    resume: bool = typer.Option(False, "--resume", help="Continue an interrupted run from its last checkpoint."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace an existing run directory."),
    retry_on_fail: bool = typer.Option(False, "--retry-on-fail", help="When a guard says the run failed, run the next step it names once, in RUN-retry1 (both runs kept)."),
):
    """Fine-tune: writes a run directory and prints a short verdict table.

    Under torchrun or accelerate launch (torchrun --nproc_per_node 4 -m honed run recipe.yaml) the processes train data-parallel and rank 0 writes the run directory.
    """
    from .retry import run as run_honed

    if resume and overwrite:
        raise RecipeError("--resume and --overwrite: choose one (--resume continues the run, --overwrite deletes it and starts again)")
    try:
        result = run_honed(str(recipe), set_, out=out, resume=resume, overwrite=overwrite, retry_on_fail=retry_on_fail)
    except TrainingInterrupted:
        if os.environ.get("RANK", "0") == "0":  # under torchrun, one process says it
            target = f" --out {out}" if out else ""
            sets = "".join(f" -s {s}" for s in set_)
            launcher = "torchrun --nproc_per_node N -m honed" if int(os.environ.get("WORLD_SIZE", "1")) > 1 else "honed"
            err_console.print(f"interrupted: checkpoint saved. Resume with: {launcher} run {recipe}{sets}{target} --resume")
        raise typer.Exit(130)
    if result.metrics:  # empty in the helper processes of a distributed run: rank 0 reports
        print_verdict(result.metrics, result.run_dir)
    if result.retry is not None:
        out_console.print(f"retry with {' '.join('-s ' + s for s in result.metrics['retry']['set'])}:", soft_wrap=True)
        print_verdict(result.retry.metrics, result.retry.run_dir)
        first, second = result.metrics, result.retry.metrics
        primary = first["primary_metric"]
        out_console.print(f"first run: test {primary} {first['test'][primary]:.4f} ({result.run_dir}); "
                          f"retry: test {primary} {second['test'][primary]:.4f} ({result.retry.run_dir})", soft_wrap=True)


@app.command()
def check(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key, e.g. -s data.label=stars."),
):
    """Validate the recipe and audit the data, without loading a model or training."""
    from .session import check_audit, prepare

    resolved, splits = prepare(str(recipe), set_)
    audit = check_audit(resolved, splits)
    table = Table(title=f"data audit: {recipe}")
    table.add_column("split")
    table.add_column("rows", justify="right")
    table.add_column("classes")
    for name, info in audit["splits"].items():
        table.add_row(name, str(info["rows"]), ", ".join(f"{k}: {v}" for k, v in info.get("class_counts", {}).items())[:200])
    out_console.print(table)
    for finding in audit["findings"]:
        style = {"warn": "yellow", "error": "red"}.get(finding["level"], "dim")
        out_console.print(f"[{style}]{finding['level']}[/{style}] {finding['message']}")
    model = resolved.model if isinstance(resolved.model, str) else resolved.model.architecture
    out_console.print(f"recipe ok: task {resolved.task}, model {model}, method {resolved.method}")


@app.command()
def predict(
    run_dir: Path = typer.Argument(..., help="A run directory written by `honed run`."),
    input: Path = typer.Argument(..., help="CSV, JSONL or Parquet with the column the model was trained on."),
    out: Optional[Path] = typer.Option(None, "--out", help="Write predictions here (CSV); default: print to stdout."),
    overwrite: bool = typer.Option(False, "--overwrite", help="Replace --out if it exists."),
):
    """Predict labels for new data with a fine-tuned model."""
    from .inference import predict as run_predict

    if out is not None and out.exists() and not overwrite:
        raise RecipeError(f"--out: {out} already exists; pass --overwrite to replace it or choose another file")
    frame = run_predict(run_dir, input)
    if out is None:
        frame.to_csv(sys.stdout, index=False)
    else:
        frame.to_csv(out, index=False)
        err_console.print(f"wrote {len(frame)} predictions to {out}")


@app.command()
def curve(
    recipe: Path = typer.Argument(..., help="The recipe YAML file."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key, e.g. -s guards.curve_fractions=[0.25,0.5,1.0]."),
    out: Optional[Path] = typer.Option(None, "--out", help="Also write the figures as JSON to this file."),
):
    """Learning curve: fine-tune on growing fractions of the data and say whether more data would pay."""
    from .runner import curve as run_curve

    if out is not None and out.exists():
        raise RecipeError(f"--out: {out} already exists; choose another file")
    guard = run_curve(str(recipe), set_)
    d = guard["details"]
    table = Table(title="learning curve")
    table.add_column("fraction", justify="right")
    table.add_column("rows", justify="right")
    table.add_column(f"validation {d.get('metric', 'score')}", justify="right")
    for fraction, n, score in zip(d["fractions"], d["n"], d["scores"]):
        table.add_row(f"{fraction:.0%}", str(n), f"{score:.4f}")
    out_console.print(table)
    for key in ("expected_at_2x", "expected_at_5x", "n_for_target", "sufficient_fraction", "backtest_error"):
        value = d.get(key)
        out_console.print(f"{key}: {value if not isinstance(value, float) else round(value, 4)}")
    style = STATUS_STYLE.get(guard["status"], "")
    out_console.print(f"[{style}]{guard['status']}[/{style}] {guard['summary']}")
    if out is not None:
        out.write_text(json.dumps(guard, indent=2, default=str))


@app.command()
def export(
    run_dir: Path = typer.Argument(..., help="A finished run directory written by `honed run`."),
    fmt: str = typer.Option("hf", "--format", "-f", help="hf, adapter (PEFT), onnx (classifiers and regressors) or gguf (Llama-family chat models)."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder to write (default: RUN_DIR/export/FORMAT); never overwritten."),
    dtype: str = typer.Option("f16", "--dtype", help="gguf only: f16, bf16 or q8_0."),
):
    """Write the model in a deployable format, loaded back and checked against the run's model on validation inputs first."""
    from .exporting import export_run

    result = export_run(run_dir, fmt, out, dtype)
    figures = result["verification"]
    out_console.print(f"export: {result['path']} ({fmt}; verified with {figures.get('loaded_with', '?')}: max |Δ| "
                      f"{figures['max_abs_diff']:.3g} within {figures['tolerance'] * figures['scale']:.3g})")


@app.command()
def report(run_dir: Path = typer.Argument(..., help="A run directory written by `honed run`.")):
    """Rebuild RUN_DIR/report.html from the run directory's files."""
    from .report import build_report

    if not run_dir.is_dir():
        raise RecipeError(f"RUN_DIR: {run_dir} does not exist or is not a folder; give the folder `honed run` wrote")
    if not (run_dir / "metrics.json").exists():
        raise RecipeError(f"RUN_DIR: {run_dir} has no metrics.json; give a finished run directory")
    path = build_report(run_dir)
    out_console.print(f"report: {path}")


@app.command()
def serve(
    run_dirs: list[Path] = typer.Argument(..., help="One or more finished run directories written by `honed run`; each is a model id (its folder name)."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; the default accepts local connections only."),
    port: int = typer.Option(8000, "--port", min=1, max=65535, help="Port to listen on."),
    token: Optional[str] = typer.Option(None, "--token", envvar="HONED_TOKEN", show_envvar=True,
                                        help="Require 'Authorization: Bearer TOKEN' on every /v1 endpoint (prefer the HONED_TOKEN variable: a command line is visible to other users)."),
    max_body: int = typer.Option(1024 * 1024, "--max-body", min=1, help="Largest request body in bytes (413 beyond)."),
    max_inputs: int = typer.Option(256, "--max-inputs", min=1, help="Most inputs in one request (422 beyond)."),
    max_text: int = typer.Option(100_000, "--max-text", min=1, help="Longest text in characters (422 beyond)."),
    max_generations: int = typer.Option(16, "--max-generations", min=1,
                                        help="Chat requests generating or waiting for the model, streams included (503 beyond)."),
    threads: Optional[int] = typer.Option(None, "--threads", min=1, help="CPU threads for the model (default: all cores but one)."),
):
    """Serve finished runs over HTTP: GET /health, GET /v1/models, POST /v1/predict, POST /v1/chat/completions (streaming too)."""
    from .serve.app import serve as run_server
    from .serve.limits import Limits

    limits = Limits(max_body_bytes=max_body, max_inputs=max_inputs, max_text_chars=max_text, max_generations=max_generations)
    run_server(run_dirs, host=host, port=port, token=token, limits=limits, threads=threads,
               announce=lambda line: err_console.print(line, markup=False, highlight=False))


@app.command()
def ui(
    runs: Path = typer.Option(Path("runs"), "--runs", help="The folder whose run directories the UI shows; new runs go here too."),
    files: Path = typer.Option(Path("."), "--files", help="The folder recipes and data files for new runs are picked from."),
    host: str = typer.Option("127.0.0.1", "--host", help="Address to listen on; the default accepts local connections only."),
    port: int = typer.Option(7860, "--port", min=1, max=65535, help="Port to listen on."),
    token: Optional[str] = typer.Option(None, "--token", envvar="HONED_TOKEN", show_envvar=True,
                                        help="Require this token (a login form keeps it in a cookie; the API takes 'Authorization: Bearer TOKEN')."),
    max_body: int = typer.Option(1024 * 1024, "--max-body", min=1, help="Largest request body in bytes (413 beyond)."),
):
    """A local web app: the runs table, each run's report and live progress, Stop/Resume, compare, new runs."""
    from .serve.limits import Limits

    try:
        from .ui.app import serve_ui
    except ImportError as exc:
        raise HonedError(f"honed ui needs fastapi, uvicorn and jinja2 ({exc.name} is not installed); "
                         "install them with: pip install 'honed[ui]'") from None
    if not files.is_dir():
        raise RecipeError(f"--files: {files} is not a folder; give the folder that holds your recipes and data")
    runs.mkdir(parents=True, exist_ok=True)
    serve_ui(runs, files, host=host, port=port, token=token, limits=Limits(max_body_bytes=max_body),
             announce=lambda line: err_console.print(line, markup=False, highlight=False))


@app.command()
def tune(
    recipe: Path = typer.Argument(..., help="The recipe YAML file (an optional `tune: {space: ...}` section overrides the search space)."),
    trials: Optional[int] = typer.Option(None, "--trials", help="Trials this process runs (several processes on one study add up)."),
    timeout: Optional[float] = typer.Option(None, "--timeout", help="Time budget in seconds: no trial starts after it, a running one stops at its next evaluation."),
    storage: Optional[str] = typer.Option(None, "--storage", help="Optuna storage URL (default: sqlite:///OUT/study.db); e.g. postgresql://user@host/db for many machines."),
    study: Optional[str] = typer.Option(None, "--study", help="Study name (default: the name of OUT); workers on one study share it."),
    out: Optional[Path] = typer.Option(None, "--out", help="Folder for trial-NNNN/, best.yaml, best/ and tune.json (default: the recipe's out + '-tune')."),
    pruner: str = typer.Option("median", "--pruner", help="median | successive-halving | none; fed the validation metric at every evaluation."),
    set_: list[str] = typer.Option([], "--set", "-s", help="Override a recipe key for every trial, e.g. -s method=lora (repeatable)."),
    defaults: bool = typer.Option(True, "--defaults/--no-defaults", help="Run the recipe's own settings as the first trial of a new study."),
):
    """Hyperparameter search (Optuna TPE + pruning); writes OUT/best.yaml and runs it once on the test split."""
    from .tune import summary_tables
    from .tune import tune as run_tune

    result = run_tune(str(recipe), trials=trials, timeout=timeout, storage=storage, study_name=study, out=out,
                      pruner=pruner, overrides=set_, defaults_first=defaults)
    for table in summary_tables(result.summary):
        out_console.print(table)
    if result.summary.get("importances_note"):
        out_console.print(f"parameter importances: not computed ({result.summary['importances_note']})")
    best, primary = result.summary["best"], (result.best_metrics or {}).get("primary_metric", "metric")
    line = f"best trial {best['number']}: validation {primary} [bold]{best['value']:.4f}[/bold]"
    default = result.summary.get("defaults") or {}
    if default.get("value") is not None:
        line += f"  (the recipe's own settings, trial {default['number']}: {default['value']:.4f})"
    if result.best_metrics is not None:
        line += f"  → test {primary} [bold]{result.best_metrics['test'][primary]:.4f}[/bold]"
    out_console.print(line)
    out_console.print(f"best recipe: [bold]{result.out / 'best.yaml'}[/bold]  run: {result.out / 'best'}  all trials: {result.out / 'tune.json'}")


@app.command()
def demo(
    out: Path = typer.Option(Path("runs/demo"), "--out", help="Where the demo's data, recipe and run directory go."),
):
    """Fine-tune WordLlama (real pre-trained weights) to tell Android from iPhone tweets (real data), offline."""
    from .demo import demo_recipe, free_run_dir
    from .runner import run as run_honed

    data_dir = out.with_name(out.name + "-data")
    recipe = demo_recipe(data_dir)
    run_dir = free_run_dir(out)
    out_console.print(f"demo: {recipe}  →  {run_dir}")
    result = run_honed(str(recipe), [], out=run_dir)
    print_verdict(result.metrics, result.run_dir)


def main(argv: list[str] | None = None) -> None:
    """Entry point: one line `error: ...` and the documented exit code for every known failure."""
    try:
        code = app(args=argv, standalone_mode=False, prog_name="honed")
        if isinstance(code, int) and code:  # click returns typer.Exit's code when not standalone
            sys.exit(code)
    except HonedError as exc:
        if STATE["debug"]:
            traceback.print_exc()
        err_console.print(f"error: {exc}", markup=False, highlight=False, soft_wrap=True)
        sys.exit(exc.exit_code)
    except typer.Exit as exc:
        sys.exit(exc.exit_code)
    except OSError as exc:  # a full disk or a failing device while writing outputs
        if STATE["debug"]:
            traceback.print_exc()
        where = f" {exc.filename}" if getattr(exc, "filename", None) else ""
        err_console.print(f"error: could not read or write{where} ({exc.strerror or exc}); fix the cause and resume with --resume",
                          markup=False, highlight=False)
        sys.exit(1)
    except Exception as exc:  # usage errors from (typer's vendored) click, and anything unexpected
        if type(exc).__name__ == "Abort":
            err_console.print("aborted")
            sys.exit(130)
        if hasattr(exc, "show") and isinstance(getattr(exc, "exit_code", None), int):
            message = exc.format_message() if hasattr(exc, "format_message") else str(exc)
            ctx = getattr(exc, "ctx", None)
            where = f"see '{ctx.command_path} --help'" if ctx is not None else "see 'honed --help'"
            if message.strip():  # empty when the help was shown for a bare `honed`
                err_console.print(f"error: {message.rstrip('.')}; {where}", markup=False, highlight=False)
            sys.exit(exc.exit_code)
        if STATE["debug"]:
            traceback.print_exc()
        first = str(exc).splitlines()[0][:300] if str(exc) else ""
        err_console.print(f"error: internal error ({type(exc).__name__}: {first}); rerun with --debug for the traceback and report it",
                          markup=False, highlight=False)
        sys.exit(1)


if __name__ == "__main__":
    main()
