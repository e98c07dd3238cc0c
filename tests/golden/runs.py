"""The golden runs: a fixed set of small honed runs whose metrics must not move across a redesign.

GOLDEN_RUNS maps a name to a function(tmp_folder) -> recipe dict; the caller runs the recipe with
the public API only, `honed.run(recipe, out=tmp_folder / "run", show_progress=False)`. Runs that
need an earlier run (a source model) make it inside the function, with the same public call.

The model and data builders are shared: they are built once per process, lazily, under the folder
given to `use_shared_root` (a temporary folder by default). The data builders and the tiny Llama
come from tests/helpers.py and tests/chat_helpers.py (the tiny BERT has a fixed vocabulary: a
trained one differs between processes). The breast-cancer table is read as test_tabular.py
reads it. The goldens use nothing of honed but its public `run`.

Every recipe pins what a machine could otherwise choose: train.precision fp32, train.threads 1,
train.seed, and guards.baseline true or false (its `auto` looks at the training time).
"""

from __future__ import annotations

import tempfile
from pathlib import Path
from typing import Callable

import pandas as pd

from chat_helpers import build_tiny_llama, write_conversations, write_documents, write_general, write_preferences
from helpers import build_tiny_bert, build_tiny_vit, make_series, make_texts, stripes, topic_texts

# --------------------------------------------------------------------------- shared builders

_ROOT: list[Path] = []
_BUILT: dict[str, Path] = {}


def use_shared_root(folder: Path) -> None:
    """Build the shared models and data under `folder` (test_golden points it at a session tmp folder)."""
    _ROOT[:] = [Path(folder)]
    _BUILT.clear()


def shared(name: str) -> Path:
    """The shared model or data set `name`, built on first use."""
    if name not in _BUILT:
        if not _ROOT:
            _ROOT.append(Path(tempfile.mkdtemp(prefix="honed-golden-")))
        folder = _ROOT[0] / name
        folder.mkdir(parents=True, exist_ok=False)
        _BUILT[name] = BUILDERS[name](folder)
    return _BUILT[name]


def _csv(folder: Path, name: str, frame: pd.DataFrame) -> Path:
    path = folder / name
    frame.to_csv(path, index=False)
    return path


def cancer_csv(folder: Path) -> Path:
    """As tests/test_tabular.py's fixture: scikit-learn's breast-cancer table, spaces out of the names."""
    from sklearn.datasets import load_breast_cancer

    frame = load_breast_cancer(as_frame=True).frame
    frame.columns = [c.replace(" ", "_") for c in frame.columns]
    return _csv(folder, "all.csv", frame)


def cancer_features() -> list[str]:
    return [c for c in pd.read_csv(shared("cancer"), nrows=0).columns if c != "target"]


BUILDERS: dict[str, Callable[[Path], Path]] = {
    "tiny_bert": build_tiny_bert,
    "texts": lambda f: _csv(f, "train.csv", make_texts(240, seed=1)),  # text, label, region
    "sentiment": lambda f: _csv(f, "sentiment.csv", make_texts(240, seed=11)),  # a labelled reference set
    "sentiment_run": lambda f: sentiment_run(f),  # a source model made by honed
    "topics": lambda f: _csv(f, "topics.csv", topic_texts(240, seed=3, region=True)),
    "tiny_vit": build_tiny_vit,
    "images": lambda f: stripes(f / "train", 30, seed=1),
    "cancer": cancer_csv,
    "series": lambda f: _csv(f, "train.csv", make_series(["a", "b", "c"])),
    "series5": lambda f: _csv(f, "all.csv", make_series(["a", "b", "c", "d", "e"], length=72, seed=1)),
    "tiny_llama": build_tiny_llama,
    "conversations": lambda f: write_conversations(f / "train.jsonl", 60, 1),
    "general": lambda f: write_general(f / "general.csv"),
    "preferences": lambda f: write_preferences(f / "pairs.jsonl", 80, 2),
    "documents": lambda f: write_documents(f / "docs", 40, 3),  # .txt files, one document each
}

# --------------------------------------------------------------------------- recipes

PINNED = {"precision": "fp32", "threads": 1, "seed": 0}


def _train(**settings) -> dict:
    return {**PINNED, "patience": None, **settings}


def text_recipe(method: str, **extra) -> dict:
    """As tests/helpers.py write_recipe: the tiny BERT on 240 generated sentences, 6 epochs."""
    recipe = {"task": "text-classification", "model": str(shared("tiny_bert")),
              "data": {"train": str(shared("texts")), "text": "text", "label": "label", "max_length": 32},
              "method": method, "train": _train(epochs=6, lr=3e-3, batch_size=16, eval_every=5),
              "guards": {"baseline": False}}
    for key, value in extra.items():
        recipe[key] = {**recipe[key], **value} if isinstance(value, dict) and isinstance(recipe.get(key), dict) else value
    return recipe


def sentiment_run(folder: Path) -> Path:
    """A source model made by honed (as test_guards_fire.py's source_run): the tiny BERT fine-tuned on sentiment."""
    import honed

    recipe = text_recipe("full", data={"train": str(shared("sentiment"))})
    return honed.run(recipe, out=folder / "run", show_progress=False).run_dir


SENTIMENT_REFERENCE = {"text": "text", "label": "label"}
TOPIC_TRAIN = {"epochs": 8}  # the shift to topics takes 8 epochs at 3e-3 (test accuracy 0.88, retention 0.50)


def text_full(tmp: Path) -> dict:
    return text_recipe("full")


def text_lora(tmp: Path) -> dict:
    return text_recipe("lora")


def text_head(tmp: Path) -> dict:
    """The head alone, started from the linear probe's fit on the cached features."""
    return text_recipe("head", train={"head_epochs": 10})


def text_lpft(tmp: Path) -> dict:
    return text_recipe("lp-ft", train={"head_epochs": 10})


def text_guards(tmp: Path) -> dict:
    """Every optional guard at once: the learning curve, the scratch baseline, a group column, two
    seeds, and the WiSE-FT sweep with forgetting measured on a labelled reference set."""
    return text_recipe("full", data={"groups": ["region"]}, train={"seeds": [0, 1]},
                       guards={"data_curve": True, "curve_fractions": [0.3, 0.6, 1.0], "baseline": True, "min_group_size": 5,
                               "budget": None},
                       interpolate=True, reference={"data": str(shared("sentiment")), **SENTIMENT_REFERENCE})


def text_l2sp(tmp: Path) -> dict:
    """As tests/test_guards_fire.py: the sentiment run fine-tuned to topics, pulled back to its weights."""
    return text_recipe("full", model=str(shared("sentiment_run")), data={"train": str(shared("topics"))}, train=TOPIC_TRAIN,
                       l2sp={"alpha": 0.1, "beta": 0.01}, reference={"data": str(shared("sentiment")), **SENTIMENT_REFERENCE})


def text_replay(tmp: Path) -> dict:
    """As tests/test_guards_fire.py: the sentiment run fine-tuned to topics, replaying the sentiment set."""
    return text_recipe("full", model=str(shared("sentiment_run")), data={"train": str(shared("topics"))}, train=TOPIC_TRAIN,
                       replay={"fraction": 0.25, "weight": 0.3}, reference={"data": str(shared("sentiment")), **SENTIMENT_REFERENCE})


def image_recipe(method: str) -> dict:
    """As tests/test_image.py, fewer images and epochs."""
    return {"task": "image-classification", "model": str(shared("tiny_vit")), "data": {"train": str(shared("images"))},
            "method": method, "train": _train(epochs=8, lr=3e-3, batch_size=16, eval_every=8, head_epochs=10),
            "guards": {"baseline": False}}


def image_full(tmp: Path) -> dict:
    return image_recipe("full")


def image_head(tmp: Path) -> dict:
    return image_recipe("head")


def tabular_recipe(task: str, label: str, features: list[str]) -> dict:
    """As tests/test_tabular.py: an MLP from scratch on the breast-cancer table."""
    return {"task": task, "model": {"architecture": "mlp", "hidden": 32},
            "data": {"train": str(shared("cancer")), "features": features, "label": label},
            "train": _train(epochs=10, lr=3e-3, batch_size=64, eval_every=5), "guards": {"baseline": False}}


def tabular_classification(tmp: Path) -> dict:
    return tabular_recipe("tabular-classification", "target", cancer_features())


def tabular_regression(tmp: Path) -> dict:
    features = [c for c in cancer_features() if c != "mean_radius"]
    return tabular_recipe("tabular-regression", "mean_radius", features)


def forecast_recipe(train: Path, model, **extra) -> dict:
    """As tests/test_forecasting.py spec(): context 12, horizon 4, monthly series."""
    recipe = {"task": "forecasting", "model": model, "data": {"train": str(train), "context_length": 12, "horizon": 4},
              "train": _train(epochs=12, batch_size=16, lr=3e-3, eval_every=8), "guards": {"baseline": False}}
    recipe.update(extra)
    return recipe


PATCHTST = {"architecture": "patchtst", "d_model": 16, "layers": 1, "heads": 2}


def forecast_patchtst(tmp: Path) -> dict:
    return forecast_recipe(shared("series"), PATCHTST, guards={"baseline": True, "budget": None})


def forecast_finetune(tmp: Path) -> dict:
    """As test_fine_tune_an_earlier_run_on_a_held_out_series: four series make the source, the fifth
    is fine-tuned with lp-ft, and forgetting is measured on the four."""
    import honed

    frame = pd.read_csv(shared("series5"))
    source_csv = _csv(tmp, "source.csv", frame[frame["series"] != "e"])
    target_csv = _csv(tmp, "target.csv", frame[frame["series"] == "e"])
    source = honed.run(forecast_recipe(source_csv, PATCHTST), out=tmp / "source", show_progress=False).run_dir
    return forecast_recipe(target_csv, str(source), method="lp-ft", reference={"data": str(source_csv)})


def chat_lora(tmp: Path) -> dict:
    """As tests/test_chat.py's end-to-end run: the tiny Llama, LoRA, a general-text reference set."""
    return {"task": "chat", "model": str(shared("tiny_llama")), "method": "lora",
            "data": {"train": str(shared("conversations")), "max_length": 64},
            "train": _train(epochs=4, lr=1e-2, batch_size=8, eval_every=4),
            "guards": {"baseline": False}, "reference": {"data": str(shared("general")), "text": "text"},
            "interpolate": [0.0, 1.0]}


def preference_lora(tmp: Path) -> dict:
    """DPO with LoRA on the tiny Llama: apologising replies preferred (recorded from the code that added the task)."""
    return {"task": "preference", "model": str(shared("tiny_llama")), "method": "lora",
            "data": {"train": str(shared("preferences")), "max_length": 64},
            "train": _train(epochs=3, lr=5e-3, batch_size=8, eval_every=3)}


def causal_lm_lora(tmp: Path) -> dict:
    """Continued pre-training with LoRA on a folder of .txt documents, forgetting on the shipped general English
    (recorded from the code that added the task)."""
    return {"task": "causal-lm", "model": str(shared("tiny_llama")), "method": "lora",
            "data": {"train": str(shared("documents")), "max_length": 64},
            "train": _train(epochs=3, lr=1e-2, batch_size=8, eval_every=4), "guards": {"baseline": False}}


GOLDEN_RUNS: dict[str, Callable[[Path], dict]] = {
    "text_full": text_full,
    "text_lora": text_lora,
    "text_head": text_head,
    "text_lpft": text_lpft,
    "text_guards": text_guards,
    "text_l2sp": text_l2sp,
    "text_replay": text_replay,
    "image_full": image_full,
    "image_head": image_head,
    "tabular_classification": tabular_classification,
    "tabular_regression": tabular_regression,
    "forecast_patchtst": forecast_patchtst,
    "forecast_finetune": forecast_finetune,
    "chat_lora": chat_lora,
    "preference_lora": preference_lora,
    "causal_lm_lora": causal_lm_lora,
}


# --------------------------------------------------------------------------- running and recording

GOLDEN_DIR = Path(__file__).resolve().parent
PREDICTION_ROWS = 5
PINNED_GUARDS = ("overfitting", "forgetting", "data", "bias", "baseline")
# keys that hold a time, a speed or a place on this machine rather than a figure of the run: never in a golden
MACHINE_KEYS = {"train_seconds", "wall_seconds", "seconds", "samples_per_second", "samples_per_s", "run_dir"}


def execute(name: str, tmp: Path) -> tuple[dict, Path]:
    """Run the golden run `name` in the folder `tmp` through the public API: (metrics, run_dir)."""
    import honed

    tmp = Path(tmp)
    recipe = GOLDEN_RUNS[name](tmp)
    result = honed.run(recipe, out=tmp / "run", show_progress=False)
    return result.metrics, Path(result.run_dir)


def golden_record(metrics: dict, run_dir: Path, tmp: Path) -> dict:
    """The parts of metrics.json that must not move, and the first rows of predictions.csv (as strings).

    A string of metrics.json that names a file under the run's folder `tmp` or the shared root is a
    path on this machine and is dropped; in the prediction rows (image-classification writes each
    image's path) the folder is replaced by <tmp> or <shared>, so the rows still say which file it was."""
    import csv

    roots = {"<tmp>": Path(tmp).resolve(), "<shared>": _ROOT[0].resolve()} if _ROOT else {"<tmp>": Path(tmp).resolve()}
    record = {key: metrics[key] for key in ("task", "primary_metric", "test", "validation", "pretrained", "majority", "seeds")}
    if "seasonal_naive" in metrics:
        record["seasonal_naive"] = metrics["seasonal_naive"]
    # the five guards the goldens pin; the export guard came later and is asserted by tests/test_export_guard.py
    record["guards"] = {name: {"status": guard["status"], "details": guard["details"]} for name, guard in metrics["guards"].items()
                        if name in PINNED_GUARDS}
    record["run"] = {"steps": metrics["run"]["steps"], "stopped_early": metrics["run"]["stopped_early"]}
    record["confusion_matrix"] = metrics.get("confusion_matrix")
    record = _machine_free(record, list(roots.values()))
    with open(Path(run_dir) / "predictions.csv", newline="") as handle:
        rows = [dict(row) for _, row in zip(range(PREDICTION_ROWS), csv.DictReader(handle))]
    record["predictions"] = [{k: _relative(v, roots) for k, v in row.items()} for row in rows]
    return record


def _machine_free(value, roots: list[Path]):
    """`value` without the keys of MACHINE_KEYS and without strings that hold a path under `roots`."""
    if isinstance(value, dict):
        return {k: _machine_free(v, roots) for k, v in value.items() if k not in MACHINE_KEYS and not _is_path(v, roots)}
    if isinstance(value, list):
        return [_machine_free(v, roots) for v in value if not _is_path(v, roots)]
    return value


def _is_path(value, roots: list[Path]) -> bool:
    return isinstance(value, str) and any(str(root) in value for root in roots)


def _relative(value: str, roots: dict[str, Path]) -> str:
    for placeholder, root in roots.items():
        value = value.replace(str(root), placeholder)
    return value


def golden_path(name: str) -> Path:
    return GOLDEN_DIR / f"{name}.json"


def dump(record: dict) -> str:
    import json

    return json.dumps(record, sort_keys=True, indent=1) + "\n"
