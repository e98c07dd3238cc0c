"""The preference row: DPO-style tuning of a causal LM on (prompt, chosen, rejected) pairs, with
the five guards read for preferences: the train/validation accuracy gap and diverging margins;
the drift from the starting model (KL, likelihood displacement, reference perplexity); the
learning curve over pairs; and the starting model's own ranking and "prefer the longer reply" as
baselines a tuned model must beat."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd
import torch

from ...errors import RecipeError
from ...guards.overfit import overfitting_guard
from ...guards.status import guard_result, skipped
from ...models.causal_lm import load_causal_lm, lora_targets
from ...models.quantise import refuse_unquantised
from ...serve.schemas import ChatRequest
from .. import labelled
from ..base import Reference, Task, refuse_mix_by_tokens, refuse_series_model, saved_columns, saved_device_and_precision
from ..chat import model as chat_model
from ..chat.task import load_reference as chat_reference
from . import data, model

LENGTH_BASELINE_INFORMATIVE = 0.6  # "prefer the longer reply" is a shortcut worth checking only when it scores this much


def sentence(problems: list[str]) -> str:
    """Problems joined into one sentence, its first letter raised (names such as KL keep their case)."""
    text = "; ".join(problems)
    return text[:1].upper() + text[1:] + "."


def check_recipe(recipe) -> None:
    refuse_series_model(recipe)
    refuse_mix_by_tokens(recipe)
    if not isinstance(recipe.model, str):
        raise RecipeError("model: preference needs a causal language model checkpoint folder, a Hub id or a honed chat run")
    for key, asked in (("replay", recipe.replay is not None), ("interpolate", bool(recipe.interpolate)), ("l2sp", recipe.l2sp is not None)):
        if asked:
            raise RecipeError(f"{key}: not available for task preference; the objective's β already keeps the policy near the "
                              "starting model (raise preference.beta to stay closer)")
    if recipe.reference is not None and recipe.reference.label is not None:
        raise RecipeError("reference.label: preference measures forgetting as perplexity on reference text; remove reference.label")


def load_model(recipe, splits):
    bundle = load_causal_lm(recipe.model, recipe)
    if recipe.method == "qlora":
        refuse_unquantised(bundle.model, recipe.model)
    if recipe.lora.target_modules is None:
        recipe.lora.target_modules = lora_targets(bundle.model, bundle.head_name)
    return bundle


def audit(recipe, splits, bundle=None, encoded=None) -> dict:
    return data.audit_pairs(splits, encoded, recipe.data.max_length)


def load_reference(recipe, bundle, encoded: dict):
    """Reference text for perplexity when the recipe gives one; otherwise the validation pairs (KL, displacement)."""
    if recipe.reference is None:
        return Reference("the validation pairs (no reference set given)", encoded["validation"], None, True), None
    return chat_reference(recipe, bundle, encoded)


def _reference_perplexity(session, module) -> float | None:
    ref = session.reference
    if ref.on_validation:
        return None
    return chat_model.metrics(chat_model.predict(module, ref.encoded, session.bundle.pad_id, session.eval_batch_size,
                                                 session.precision, session.device))["perplexity"]


def _starting_outputs(split) -> torch.Tensor:
    """The starting model's outputs, from the cached reference alone: the policy is the reference, its KL 0."""
    sums = torch.stack([split.reference[int(split.offsets[s]) : int(split.offsets[s + 1])].sum() for s in range(len(split.lengths))])
    tokens = torch.stack([split.targets[int(split.offsets[s]) : int(split.offsets[s + 1])].sum() for s in range(len(split.lengths))]).float()
    sums, tokens = sums.view(-1, 2), tokens.view(-1, 2)
    has_kl = (torch.arange(len(sums)) < (len(split.reference_next) if split.reference_next is not None else 0)).float()
    return torch.stack([sums[:, 0], sums[:, 1], sums[:, 0], sums[:, 1], tokens[:, 0], tokens[:, 1], torch.zeros(len(sums)), has_kl], 1)


def before(session, cache) -> dict:
    """The starting model: its metrics (zero implicit reward; its ranking of chosen over rejected), and
    the reference-text perplexity (run before training: the model trains in place)."""
    out = {"reference_perplexity": _reference_perplexity(session, session.bundle.model)}
    for name in ("validation", "test"):
        split = session.encoded[name]
        out[name] = model.metrics(_starting_outputs(split), split)
    out["summary"] = {**out["test"], "method": "the starting model, before preference tuning"}
    return out


def forgetting(session, tuner, module, before: dict):
    """KL from the starting model, likelihood displacement, and reference perplexity before/after."""
    recipe = session.recipe
    val = session.evaluate(module, "validation")
    start = before["validation"]
    drop = start["chosen_logp"] - val["chosen_logp"]
    # the implicit reward starts at zero for every reply (a tie): the preference was learnt when the margin is positive
    learnt = val["reward_margin"] > 0 and val[model.PRIMARY] > 0.5
    ppl_before, ppl_after = before["reference_perplexity"], _reference_perplexity(session, module)
    retention = ppl_before / ppl_after if ppl_before and ppl_after else None
    details = {"kl": val["kl"], "chosen_logp_before": start["chosen_logp"], "chosen_logp_after": val["chosen_logp"],
               "rejected_logp_before": start["rejected_logp"], "rejected_logp_after": val["rejected_logp"],
               "displacement": drop, "displacement_threshold": recipe.preference.displacement, "max_kl": recipe.preference.max_kl,
               "reference": session.reference.name, "perplexity_before": ppl_before, "perplexity_after": ppl_after,
               "retention": retention, "retention_floor": recipe.guards.forgetting.floor}
    problems = []
    if drop > recipe.preference.displacement and learnt:
        problems.append(f"likelihood displacement: the chosen replies' log-probability fell by {drop:.2f} nats per token "
                        f"({start['chosen_logp']:.2f} → {val['chosen_logp']:.2f}) while the preference accuracy rose; the model "
                        "learned to push both replies down (lower the learning rate, raise preference.beta or use fewer epochs)")
    if val["kl"] is not None and val["kl"] > recipe.preference.max_kl:
        problems.append(f"the policy drifted far from the starting model: KL {val['kl']:.2f} nats where the validation replies start "
                        f"(preference.max_kl {recipe.preference.max_kl:g}); raise preference.beta or lower the learning rate")
    floor = recipe.guards.forgetting.floor
    if retention is not None and floor is not None and retention < floor:
        problems.append(f"perplexity on {session.reference.name} rose from {ppl_before:.2f} to {ppl_after:.2f} "
                        f"(retention {retention:.2f} below the floor {floor:.2f})")
    if problems:
        return guard_result("warn", sentence(problems), details), module
    kl = "not measured" if val["kl"] is None else f"{val['kl']:.3f} nats"
    text = (f"The policy stays near the starting model: KL {kl} where the validation replies start; the chosen "
            f"replies' log-probability moved {-drop:+.2f} nats per token")
    if retention is not None:
        text += f"; reference perplexity {ppl_before:.2f} → {ppl_after:.2f}"
    return guard_result("ok", text + ".", details), module


def overfitting(session, history, best_step, test_outputs, seeds) -> dict:
    """The train/validation preference-accuracy gap, and validation margins falling while training margins rise."""
    guard = overfitting_guard(history, best_step, model.PRIMARY, session.recipe.guards.overfitting.max_gap, None, 0, seeds)
    model_history = [h for h in history if h.get("val_reward_margin") is not None and h.get("train_reward_margin") is not None]
    diverging = False
    if len(model_history) >= 3:
        peak = max(range(len(model_history)), key=lambda i: model_history[i]["val_reward_margin"])
        last = model_history[-1]
        diverging = (peak < len(model_history) - 1 and last["val_reward_margin"] < model_history[peak]["val_reward_margin"]
                     and last["train_reward_margin"] > model_history[peak]["train_reward_margin"])
    guard["details"]["margins_diverge"] = diverging
    if diverging:
        sentence = ("The validation reward margin fell after its peak while the training margin kept rising: the model "
                    "memorises the training pairs.")
        guard["status"] = "fail" if guard["status"] == "fail" else "warn"
        guard["summary"] = sentence if guard["status"] == "warn" and "stay within" in guard["summary"] else guard["summary"] + " " + sentence
    return guard


def baseline(session, tuner, test_metrics: dict, before: dict, train_seconds: float, show_progress: bool) -> dict:
    """The tuned model against the starting model's own ranking and against "prefer the longer reply"."""
    tuned = test_metrics[model.PRIMARY]
    start, length = test_metrics["start_ranking_accuracy"], test_metrics["length_baseline_accuracy"]
    correlation = test_metrics["reward_length_correlation"]
    details = {"metric": model.PRIMARY, "fine_tuned": tuned, "starting_model_ranking": start, "length_baseline": length,
               "reward_length_correlation": correlation, "scratch": None, "linear_probe": None, "majority": None}
    problems = []
    if tuned < start or (tuned == start and start < 1.0):  # a start that ranks every pair right cannot be beaten
        problems.append(f"the tuned model prefers the chosen reply in {tuned:.0%} of test pairs, no more than the starting "
                        f"model's own log-probabilities did ({start:.0%})")
    if length >= LENGTH_BASELINE_INFORMATIVE and tuned <= length:
        problems.append(f"'prefer the longer reply' scores {length:.0%} on the test pairs and the tuned model {tuned:.0%}: it "
                        "has learned no more than length")
    if correlation is not None and abs(correlation) >= 0.5 and length >= LENGTH_BASELINE_INFORMATIVE:
        problems.append(f"the implicit reward margin follows the length difference (correlation {correlation:+.2f})")
    if problems:
        return guard_result("warn", sentence(problems), details)
    return guard_result("ok", f"The tuned model prefers the chosen reply in {tuned:.0%} of test pairs, against {start:.0%} for the "
                              f"starting model and {length:.0%} for 'prefer the longer reply'.", details)


def bias(session, test_outputs: torch.Tensor, before: dict) -> dict:
    """Preference accuracy per group of every data.groups column (groups of at least guards.min_group_size test
    pairs); warn when the best and worst group differ by more than guards.bias_threshold."""
    recipe = session.recipe
    if not recipe.data.groups:
        return skipped("No data.groups given; name columns of the pairs file in data.groups to compare groups.")
    split = session.encoded["test"]
    frame = session.splits.test.iloc[split.kept.tolist()].reset_index(drop=True)
    reward_c, reward_r = model.rewards(test_outputs, split.objective)
    correct = pd.Series((reward_c > reward_r).numpy())
    per_column, worst = {}, None
    for column in recipe.data.groups:
        values = frame[column].astype(str)
        sizes = values.value_counts()
        measured = {g: {"pairs": int(n), model.PRIMARY: float(correct[values == g].mean())}
                    for g, n in sizes.items() if n >= recipe.guards.min_group_size}
        per_column[column] = {"groups": measured, "too_small": sorted(str(g) for g, n in sizes.items() if n < recipe.guards.min_group_size)}
        if len(measured) >= 2:
            scores = {g: v[model.PRIMARY] for g, v in measured.items()}
            gap = max(scores.values()) - min(scores.values())
            if worst is None or gap > worst[0]:
                worst = (gap, column, min(scores, key=scores.get), max(scores, key=scores.get))
    details = {"columns": per_column, "max_gap": None if worst is None else worst[0], "threshold": recipe.guards.bias_threshold}
    if worst is None:
        return guard_result("skipped", f"No data.groups column has two groups of at least {recipe.guards.min_group_size} test pairs "
                                       "(guards.min_group_size).", details)
    gap, column, low, high = worst
    if gap > recipe.guards.bias_threshold:
        return guard_result("warn", f"Preference accuracy differs by {gap:.2f} between {column}={low} and {column}={high} "
                                    f"(guards.bias_threshold {recipe.guards.bias_threshold:g}).", details)
    return guard_result("ok", f"Preference accuracy stays within {gap:.2f} across the groups of {', '.join(recipe.data.groups)}.", details)


def write_predictions(path: Path, session, outputs: torch.Tensor) -> None:
    split = session.encoded["test"]
    frame = session.splits.test.iloc[split.kept.tolist()].reset_index(drop=True)
    reward_c, reward_r = model.rewards(outputs, split.objective)
    pd.DataFrame({
        "prompt": [json.dumps(p, ensure_ascii=False) for p in frame["prompt"]],
        "chosen": frame["chosen"], "rejected": frame["rejected"],
        "chosen_logp": outputs[:, 0].tolist(), "rejected_logp": outputs[:, 1].tolist(),
        "reward_chosen": reward_c.tolist(), "reward_rejected": reward_r.tolist(),
        "prefers_chosen": (reward_c > reward_r).tolist(),
    }).to_csv(path, index=False)


def model_meta(recipe, splits) -> dict:
    objective = model.objective_of(recipe)
    return {**saved_columns(recipe), "messages_column": recipe.data.messages, "prompt_column": recipe.data.prompt,
            "chosen_column": recipe.data.chosen, "rejected_column": recipe.data.rejected, "reference_model": recipe.model,
            "objective": {"loss": objective.loss, "beta": objective.beta, "label_smoothing": objective.label_smoothing,
                          "gamma": objective.gamma}}


def predict_file(model_dir, meta, input_path, batch_size):
    """`honed predict` on a preference file: each pair's log-probabilities under the tuned model and, while the
    starting model named in honed.json is still at hand, the implicit rewards and which reply is preferred."""
    from types import SimpleNamespace

    from ...models.load import load_saved

    spec = SimpleNamespace(prompt=meta.get("prompt_column", "prompt"), chosen=meta.get("chosen_column", "chosen"),
                           rejected=meta.get("rejected_column", "rejected"), messages=meta.get("messages_column", "messages"), groups=[])
    frame = data.read_pairs(str(input_path), "INPUT", spec)
    objective = model.Objective(**meta["objective"])
    bundle = load_saved(model_dir)
    dev, precision = saved_device_and_precision(meta)
    split = model.encode_pairs(bundle.tokenizer, frame, int(meta["max_length"]), objective)
    reference_source = meta.get("reference_model")
    if reference_source and Path(reference_source).exists():
        reference = load_causal_lm(reference_source)
        model.reference_logps(reference, reference.model.to(dev), split, batch_size, precision, dev)
    else:  # the starting model is gone (or a Hub id, offline): log-probabilities only
        split.reference = torch.zeros(len(split.flat))
    outputs = model.predict(bundle.model.to(dev), split, bundle.pad_id, batch_size, precision, dev)
    out = frame.iloc[split.kept.tolist()].drop(columns=["where"]).reset_index(drop=True)
    out["prompt"] = [json.dumps(p, ensure_ascii=False) for p in out["prompt"]]
    out["chosen_logp"], out["rejected_logp"] = outputs[:, 0].tolist(), outputs[:, 1].tolist()
    if reference_source and Path(reference_source).exists():
        reward_c, reward_r = model.rewards(outputs, objective)
        out["reward_chosen"], out["reward_rejected"] = reward_c.tolist(), reward_r.tolist()
        out["prediction"] = ["chosen" if c > r else "rejected" for c, r in zip(reward_c.tolist(), reward_r.tolist())]
        out["prediction_basis"] = "implicit reward"
    else:
        per_token_c, per_token_r = outputs[:, 0] / outputs[:, 4].clamp(min=1), outputs[:, 1] / outputs[:, 5].clamp(min=1)
        out["prediction"] = ["chosen" if c > r else "rejected" for c, r in zip(per_token_c.tolist(), per_token_r.tolist())]
        out["prediction_basis"] = "log-probability per token (the starting model was not found, so no implicit reward)"
    return out


def summary(session, module, before, test_outputs, guards) -> dict:
    return {"majority": {}, "confusion_matrix": None}


TASK = Task(
    name="preference",
    primary=model.PRIMARY,
    lower_is_better=frozenset({"loss", "kl"}),  # kl: of the next-token distributions where each reply starts
    default_family="causal-lm",
    methods=("lora", "qlora", "full"),
    check_recipe=check_recipe,
    load_splits=lambda recipe: data.load_preference_splits(recipe, recipe.train.seed),
    audit=audit,
    load_model=load_model,
    sequence_length=lambda recipe, module: recipe.data.max_length,
    encode=model.encode,
    subset=model.subset,
    collate=model.collate,
    batches=model.batches,
    loss=model.loss,
    predict=model.predict,
    metrics=model.metrics,
    features=model.reference_logps,
    probe=None,
    cached_head=None,
    before=before,
    before_needs_untouched_model=True,
    load_reference=load_reference,
    forgetting=forgetting,
    overfitting=overfitting,
    baseline=baseline,
    bias=bias,
    class_counts=labelled.no_classes,
    curve_subsets=labelled.shuffled_subsets,
    write_predictions=write_predictions,
    model_meta=model_meta,
    summary=summary,
    predict_file=predict_file,
    request_schema=ChatRequest,
    tie_break="loss",  # preference accuracy saturates at 1.0 on easy pairs; the loss keeps telling better from worse
)
