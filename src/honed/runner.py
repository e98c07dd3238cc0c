"""The run: recipe → data → model → fine-tune → evaluate → guards → run directory.

`honed run` and `honed.run()` both call `run()`. This module only sequences named stages; what
differs between tasks is a field of the task's row (tasks/base.py), the fine-tune is a FineTuner
(finetune.py), the run directory's rules are in rundir.py, and the guards' measurements in
checks/ and guards/. Read `run_stages` top to bottom: that is a whole run.
"""

from __future__ import annotations

import time
from contextlib import nullcontext
from dataclasses import dataclass, field
from pathlib import Path

from . import next_step, track
from .checks.budget import GuardBudget, GuardClock, note_budget
from .checks.curve import data_guard, learning_curve
from .checks.export import export_guard
from .checks.seeds import seed_spread
from .data import rows as row_access
from .errors import RecipeError, TrainingInterrupted
from .fileio import write_json_atomic
from .finetune import FineTuner, needs_pristine_again
from .guards import data_curve
from .guards.bias import group_representation
from .guards.status import skipped
from .hooks import Hooks
from .memory import available_mb, process_peak_rss_mb
from .methods import METHODS
from .models.load import save_model
from .models.meta_load import on_meta
from .recipe import Recipe, load_recipe, main_seed
from .phases import Phases
from .rundir import check_run_dir, default_run_dir, prepare_run_dir, write_history, write_pid, write_recipe
from .session import Session, load_data, prepare, prepare_recipe, setup
from .train import distributed
from .train.checkpoint import Checkpointer, StateOnDisk
from .train.precision import set_threads
from .train.progress import TrainingProgress, say


@dataclass
class RunResult:
    """What `honed.run` returns: the run directory and the contents of metrics.json."""

    run_dir: Path
    metrics: dict
    retry: RunResult | None = None  # the run --retry-on-fail made with the next step (honed/retry.py)

    def __getitem__(self, key):
        return self.metrics[key]


@dataclass
class Trained:
    """The main fine-tune's result, as the guards and outputs read it."""

    model: object
    outcomes: list
    history: list[dict]
    peak_rss_mb: float = 0.0  # the largest process's peak RSS up to the end of training (the guards' work comes after)
    rank_peaks_mb: list[float] = field(default_factory=list)  # each process's peak RSS up to then, in rank order

    @property
    def train_seconds(self) -> float:
        return sum(o.train_seconds for o in self.outcomes)


def run(source, overrides: list[str] | None = None, out: str | Path | None = None, resume: bool = False,
        overwrite: bool = False, show_progress: bool = True, on_evaluation=None, cache: dict | None = None,
        hooks: Hooks | None = None) -> RunResult:
    """Fine-tune as the recipe says, measure the guards, and write the run directory.

    on_evaluation(record) is called after every evaluation (honed tune feeds its pruner from it;
    an exception raised there, such as optuna.TrialPruned, stops the run). hooks observe the
    run's phases (benchmarks); cache keeps encoded splits and features between runs (tune).

    Started by `torchrun` or `accelerate launch`, every process runs this function: they share
    the main fine-tune (train/distributed.py); rank 0 alone writes the run directory and measures
    the guards, and the other processes return a RunResult with empty metrics once training ends
    (under FSDP, training ends by gathering the trained weights into rank 0's model).
    """
    started = time.time()
    group = distributed.join()
    trackers: list[dict] = []  # opened once the run directory exists; closed here however the run ends
    status = "FAILED"
    hooks = hooks or Hooks()
    phases = Phases(show_progress and (group is None or group.main), hooks.on_phase)
    try:
        result = run_stages(source, overrides, out, resume, overwrite, show_progress, on_evaluation, cache, hooks,
                            started, group, trackers, phases)
        status = "FINISHED"
        # the helper processes wait for rank 0's guards: gloo aborts a process that leaves the group while a peer is still in it
        distributed.barrier(group)
        return result
    except TrainingInterrupted:
        status = "KILLED"
        raise
    except KeyboardInterrupt:  # outside the training loop (which saves a checkpoint and raises TrainingInterrupted)
        status = "KILLED"
        raise phases.interrupted(rerun_command(source, overrides, out)) from None
    finally:
        track.close_trackers(trackers, status)
        distributed.leave()


def run_stages(source, overrides, out, resume, overwrite, show_progress, on_evaluation, cache, hooks: Hooks,
               started: float, group, trackers: list, phases: Phases) -> RunResult:
    main = group is None or group.main
    show_progress = show_progress and main
    recipe = prepare_recipe(source, overrides)
    distributed.check_launch(recipe.train.distributed, recipe.train.offload, group)
    run_dir = resolve_run_dir(recipe, source, out)
    check_run_dir(run_dir, resume, overwrite)  # before any data is read: refuse what would lose work
    with phases.phase("reading data", lambda: f"{len(splits.train)} training rows"):
        splits = load_data(recipe)
    threads = set_threads(recipe.train.threads)
    if resume:
        resumed_rates(recipe, run_dir)
    session = setup(recipe, splits, cache, hooks, phases=phases)
    choose_engine(session, group)
    with phases.phase("auditing the data"):
        audit = run_audit(session)
    if main:
        open_run_dir(run_dir, recipe, audit, resume, overwrite, session.auto_notes)
        phases.run_dir = run_dir
        if session.lr_range is not None:
            write_json_atomic(run_dir / "lr_range.json", session.lr_range)
    distributed.barrier(group)  # the run directory is ready (and an --overwrite'd one gone) before anyone trains
    if main:
        trackers.extend(track.open_trackers(recipe, run_dir))

    seed = main_seed(recipe)
    task = session.task
    early = task.before_needs_untouched_model or (task.probe is not None and "head" in METHODS[recipe.method]["stages"])
    # a process without the weights (models/meta_load.py) has nothing to score; only rank 0 uses the scores
    early = early and not on_meta(session.bundle.model)
    with phases.phase("scoring the pre-trained model") if early else nullcontext():
        before = task.before(session, cache) if early else None  # otherwise after training, out of the training's memory
    tuner = FineTuner(session, pristine_on_disk(session, run_dir, main), before.get("head") if before else None)
    trained = fine_tune_in_place(session, tuner, run_dir, seed, show_progress, on_evaluation, trackers, group, hooks)
    if not main:
        return RunResult(run_dir, {})
    write_history(run_dir, trained.history)

    tuner.budget = GuardBudget(recipe.guards.budget, sum(o.steps for o in trained.outcomes))
    clock = GuardClock()
    say(show_progress, "phase: forgetting guard, evaluating on validation and test")
    with clock("forgetting"):
        forgetting, model = task.forgetting(session, tuner, trained.model, before)  # may export WiSE-FT weights
    val_metrics = session.evaluate(model, "validation")
    test_outputs = session.outputs(model, session.encoded["test"])  # the test split is touched once, here
    test_metrics = task.metrics(test_outputs, session.encoded["test"])
    write_model(session, model, run_dir, test_outputs)
    say(show_progress, "phase: export guard: reloading model/ from disk")
    with clock("export"):
        export = export_guard(session, model, run_dir)  # model/ read back from disk behaves like `model`
    if before is None:
        before = task.before(session, cache)
    with clock("overfitting"):  # the extra seeds are the overfitting guard's spread
        seeds = seed_spread(session, tuner, seed, test_metrics, show_progress)
        overfitting = task.overfitting(session, trained.history, trained.outcomes[-1].best_step, test_outputs,
                                       seeds if len(seeds) > 1 else None)
    with clock("data"):
        data = data_guard(session, tuner, trained.history, show_progress)
    with clock("bias"):
        bias = task.bias(session, test_outputs, before) if task.bias else skipped("the bias guard covers classification tasks in this version")
    with clock("baseline"):
        baseline = task.baseline(session, tuner, test_metrics, before, trained.train_seconds, show_progress)
    guards = {"overfitting": overfitting, "forgetting": forgetting, "data": data, "bias": bias, "baseline": baseline, "export": export}
    note_budget(guards, tuner.budget)
    step = next_step.for_session(session, trained.history, guards)
    next_step.attach(guards, step)  # the failed guard's verdict line names the change honed would try (--retry-on-fail runs it)
    metrics = assemble_metrics(session, model, trained, before, test_outputs, test_metrics, val_metrics, seeds, guards,
                               run_dir, started, threads)
    metrics["next_step"] = step
    metrics["timing"]["guards"] = clock.seconds(tuner.budget)
    write_json_atomic(run_dir / "metrics.json", metrics)
    if isinstance(tuner.pristine, StateOnDisk):
        tuner.pristine.remove()
    for tracker in trackers:
        tracker["final"](metrics)
    build_report(run_dir)
    return RunResult(run_dir, metrics)


# --------------------------------------------------------------------------- stages

def rerun_command(source, overrides, out) -> str:
    """The command that runs `source` again, for the Ctrl-C message."""
    if not isinstance(source, (str, Path)):
        return "honed.run(...)"
    return f"honed run {source}" + "".join(f" -s {s}" for s in overrides or []) + (f" --out {out}" if out else "")


def choose_engine(session: Session, group) -> None:
    """DDP or FSDP for a distributed run (train.distributed; auto: FSDP when one device cannot hold
    the weights, gradients and optimizer state)."""
    estimate = session.memory_estimate
    needed = estimate.get("weights_mb", 0) + estimate.get("gradients_mb", 0) + estimate.get("optimizer_mb", 0)
    train = session.recipe.train
    distributed.choose_engine(train.distributed, train.offload, group, needed, available_mb(session.device) if group else 0.0)


def resolve_run_dir(recipe: Recipe, source, out) -> Path:
    """--out wins over the recipe's `out`; the absolute path is written back as the resolved `out`."""
    if out is not None:
        recipe.out = str(Path(out).resolve())
    run_dir = default_run_dir(recipe, source).resolve()
    recipe.out = str(run_dir)
    return run_dir


def resumed_rates(recipe: Recipe, run_dir: Path) -> None:
    """--resume: the learning rates and batch size `auto` resolved when the run started (the range test
    runs once per run; the memory free now may differ from then)."""
    try:
        saved = load_recipe(run_dir / "recipe.yaml").train
    except (RecipeError, OSError):
        return  # no readable recipe: write_recipe refuses the resume with its own message
    if recipe.train.batch_size == "auto":
        recipe.train.batch_size, recipe.train.grad_accumulation = saved.batch_size, saved.grad_accumulation
    for key in ("lr", "head_lr"):
        if getattr(recipe.train, key) == "auto":
            setattr(recipe.train, key, getattr(saved, key))


def run_audit(session: Session) -> dict:
    """The task's audit with the model's view (tokens, truncation), plus group representation."""
    recipe, splits = session.recipe, session.splits
    audit = session.task.audit(recipe, splits, session.bundle, session.encoded)
    if recipe.data.groups:
        names = row_access.column_names(splits.train)
        label = "label" if "label" in names else None  # chat and preference have no labels
        needed = list(dict.fromkeys([*recipe.data.groups, *([label] if label else [])]))
        # only the columns it counts (not a million texts); with one missing, no rows but every column, for its error
        rows = (row_access.columns_frame(splits.train, needed) if set(needed) <= set(names)
                else row_access.columns_frame(row_access.take(splits.train, []), names))
        audit["groups"] = group_representation(rows, recipe.data.groups, label, recipe.guards.min_group_size)
    return audit


def open_run_dir(run_dir: Path, recipe: Recipe, audit: dict, resume: bool, overwrite: bool, notes: list[str]) -> None:
    prepare_run_dir(run_dir, resume, overwrite)
    write_recipe(run_dir, recipe, resume, notes)  # on --resume this refuses another recipe: nothing written before it
    write_pid(run_dir)
    write_json_atomic(run_dir / "audit.json", audit)


def pristine_on_disk(session: Session, run_dir: Path, main: bool):
    """The model trains in place, not beside a second copy; the pre-trained weights wait on disk when a guard reads them again."""
    if main and needs_pristine_again(session.recipe):
        return StateOnDisk.write(session.bundle.model.state_dict(), run_dir / "checkpoints" / "pristine.safetensors")
    return {}


def fine_tune_in_place(session: Session, tuner: FineTuner, run_dir: Path, seed: int, show_progress: bool,
                       on_evaluation, trackers: list, group, hooks: Hooks) -> Trained:
    """The run's own fine-tune, checkpointed, shared by every process of a distributed run."""

    def on_history(records: list[dict]) -> None:
        write_history(run_dir, records)
        for tracker in trackers:
            tracker["evaluation"](records[-1])
        if on_evaluation is not None and records:
            on_evaluation(records[-1])

    model, outcomes, history = tuner.fine_tune(seed, checkpointer=Checkpointer(run_dir / "checkpoints"),
                                               progress=TrainingProgress(enabled=show_progress), on_history=on_history,
                                               model=session.bundle.model, group=group, hooks=hooks,
                                               adapter_dir=run_dir / "adapter" if group is None or group.main else None)
    # the memory check estimates the training peak: read when training ended, before the method's export (a
    # merged copy of the weights), evaluation and the guards add theirs
    peaks = distributed.gather(tuner.training_peak_rss_mb, group)
    return Trained(model, outcomes, history, max(peaks), peaks)


def write_model(session: Session, model, run_dir: Path, test_outputs) -> None:
    """model/ (safetensors, with what `honed predict` needs in honed.json) and predictions.csv."""
    recipe = session.recipe
    model.cpu()
    meta = {"task": recipe.task, **session.task.model_meta(recipe, session.splits), "precision": session.precision}
    save_model(session.bundle, model, run_dir / "model", meta)
    session.task.write_predictions(run_dir / "predictions.csv", session, test_outputs)
    model.to(session.device)


def assemble_metrics(session: Session, model, trained: Trained, before: dict, test_outputs, test_metrics: dict,
                     val_metrics: dict, seeds: dict, guards: dict, run_dir: Path, started: float, threads) -> dict:
    """metrics.json (design.md §3): the keys every task writes, then the task's own."""
    recipe, task = session.recipe, session.task
    extra = task.summary(session, model, before, test_outputs, guards)
    samples = sum(o.samples_seen for o in trained.outcomes)
    train_seconds = trained.train_seconds
    metrics = {
        "task": recipe.task,
        "primary_metric": task.primary,
        "lower_is_better": sorted(task.lower_is_better),
        "test": test_metrics,
        "validation": val_metrics,
        "pretrained": before["summary"],
        "majority": extra.pop("majority"),
        "seeds": {str(k): v for k, v in seeds.items()},
        "guards": guards,
        "confusion_matrix": extra.pop("confusion_matrix"),
        "timing": {"train_seconds": round(train_seconds, 2), "samples_per_second": round(samples / max(train_seconds, 1e-9), 2),
                   "wall_seconds": round(time.time() - started, 2), "peak_rss_mb": process_peak_rss_mb(), "training_peak_rss_mb": trained.peak_rss_mb,
                   "training_peak_rss_mb_per_process": trained.rank_peaks_mb,
                   "threads": threads,
                   "memory_estimate_mb": round(session.memory_estimate["total_mb"], 1),
                   "precision": session.precision, "device": str(session.device)},
        "run": {"run_dir": str(run_dir), "method": recipe.method,
                "model": recipe.model if isinstance(recipe.model, str) else recipe.model.model_dump(),
                "steps": sum(o.steps for o in trained.outcomes), "stopped_early": any(o.stopped_early for o in trained.outcomes),
                "seed": main_seed(recipe), **distributed_figures(trained)},
        **extra,
    }
    if guards["overfitting"]["details"].get("seeds"):
        guards["overfitting"]["details"]["seeds"] = {str(k): v for k, v in seeds.items()}
    return metrics


def distributed_figures(trained: Trained) -> dict:
    """FSDP: each process's local parameter and optimizer-state sizes (metrics.json run.shards)."""
    shards = [o.shards for o in trained.outcomes if o.shards is not None]
    return {"shards": shards[-1]} if shards else {}


def build_report(run_dir: Path) -> None:
    from .report import build_report as build  # deferred: the report's modules load only when a report is written

    build(run_dir)


# --------------------------------------------------------------------------- honed curve

def curve(source, overrides: list[str] | None = None, show_progress: bool = True) -> dict:
    """`honed curve`: the learning curve and data-sufficiency verdict, without a run directory."""
    recipe, splits = prepare(source, overrides)
    set_threads(recipe.train.threads)
    session = setup(recipe, splits)
    tuner = FineTuner(session, {k: v.detach() for k, v in session.bundle.model.state_dict().items()})
    details = learning_curve(session, tuner, show_progress)
    return data_curve.data_guard(details, session.task.class_counts(session), recipe.guards.min_per_class)
