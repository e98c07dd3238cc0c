"""The chat row: instruction fine-tuning of a causal language model on conversations, loss on the
assistant's tokens; forgetting as perplexity and hidden-state drift on reference text."""

from __future__ import annotations

import math
from pathlib import Path

import torch

from ...checks.baseline import scratch_model
from ...checks.forgetting import interpolation_alphas, wise_ft_sweep
from ...data.load import read_table
from ...errors import DataError, RecipeError
from ...guards.forgetting import forgetting_guard, linear_cka
from ...guards.overfit import overfitting_guard
from ...guards.status import guard_result
from ...models.causal_lm import load_causal_lm, load_causal_tokenizer, lora_targets
from ...models.quantise import refuse_unquantised
from ...serve.schemas import ChatRequest
from .. import labelled
from ..base import Reference, Task, mixture_counter, refuse_series_model, saved_columns
from . import data, model


def check_recipe(recipe) -> None:
    refuse_series_model(recipe)
    if not isinstance(recipe.model, str):
        raise RecipeError("model: chat needs a causal language model checkpoint folder, a Hub id or a honed chat run")
    if recipe.replay is not None:
        raise RecipeError("replay: not available for task chat yet; remove the replay section (lora, freeze or interpolate limit forgetting)")
    if recipe.reference is not None and recipe.reference.label is not None:
        raise RecipeError("reference.label: chat measures forgetting as perplexity on reference text; remove reference.label")


def audit(recipe, splits, bundle=None, encoded=None) -> dict:
    if encoded is None:  # token-level figures need the tokenizer: `honed run` reports them
        return {"findings": list(splits.notes), "format": data.format_of(splits),
                "sources": {n["split"]: n["sources"] for n in splits.notes if n.get("code") == "sources"},
                "splits": {name: {"rows": int(len(getattr(splits, name)))} for name in ("train", "validation", "test")}}
    return data.audit_chat(splits, encoded, recipe.data.max_length, recipe.data.packing)


def load_model(recipe, splits):
    bundle = load_causal_lm(recipe.model, recipe)
    if recipe.method == "qlora":
        refuse_unquantised(bundle.model, recipe.model)
    if recipe.lora.target_modules is None:  # resolved like every `auto`: the blocks' projections; lm_head stays out
        recipe.lora.target_modules = lora_targets(bundle.model, bundle.head_name)
    return bundle


def load_reference(recipe, bundle, encoded: dict):
    """Reference text for perplexity and drift; without one, drift on the validation conversations."""
    spec = recipe.reference
    if spec is None:
        return Reference("the validation conversations (no reference set given)", encoded["validation"], None, True), None
    frame = read_table(spec.data, "reference.data")
    if spec.text not in frame.columns:
        raise DataError(f"reference.text: column '{spec.text}' not found in {Path(spec.data).name} (columns: {', '.join(map(str, frame.columns[:30]))})")
    texts = frame[spec.text].fillna("").astype(str).tolist()
    return Reference(Path(spec.data).name, model.encode_texts(bundle.tokenizer, texts, recipe.data.max_length), None, False), None


def perplexity(session, module, split) -> float:
    return model.metrics(session.outputs(module, split))["perplexity"]


def drift_features(session, module, split) -> torch.Tensor:
    return model.hidden_features(module, split, session.bundle.pad_id, session.eval_batch_size, session.precision, session.device)


def before(session, cache) -> dict:
    """What the pre-trained model (untouched: training runs after this) does: perplexity and features on
    the reference, validation/test metrics, and replies to a few validation prompts."""
    module, ref = session.bundle.model, session.reference
    out = {"reference_perplexity": None if ref.on_validation else perplexity(session, module, ref.encoded),
           "reference_features": drift_features(session, module, ref.encoded)}
    for name in ("validation", "test"):
        out[name] = model.metrics(session.outputs(module, session.encoded[name]))
    convs = session.splits.validation["messages"].tolist()[:model.GENERATIONS]
    out["prompts"] = convs
    out["generations"] = model.generations(module, session.bundle.tokenizer, convs, session.device)
    out["summary"] = {**out["test"], "method": "the pre-trained model, before fine-tuning"}
    return out


def forgetting(session, tuner, module, before: dict):
    """Reference perplexity before/after, CKA drift of mean-pooled hidden states, and the WiSE-FT sweep
    (θ_α over every weight: LoRA is already merged) choosing α by validation perplexity within the retention floor."""
    recipe, ref = session.recipe, session.reference
    floor, cka_floor = recipe.guards.forgetting.floor, recipe.guards.forgetting.cka_floor
    ppl_before = before["reference_perplexity"]
    sweep, chosen = None, None
    if recipe.interpolate:
        def score(m):
            val = model.metrics(session.outputs(m, session.encoded["validation"]))
            ppl = None if ppl_before is None else perplexity(session, m, ref.encoded)
            return {"metric": val[model.PRIMARY], "perplexity": val["perplexity"], "retention": None if ppl is None else ppl_before / ppl}

        sweep, chosen, module = wise_ft_sweep(module, tuner.pristine_state(), interpolation_alphas(recipe), score, floor)
    ppl_after = None if ppl_before is None else perplexity(session, module, ref.encoded)
    try:
        cka = linear_cka(before["reference_features"], drift_features(session, module, ref.encoded))
    except ValueError:
        cka = None  # fewer than 2 reference texts, or constant features
    guard = forgetting_guard(reference=ref.name, retention=None, cka=cka, perplexity_before=ppl_before, perplexity_after=ppl_after,
                             interpolation=sweep, chosen_alpha=chosen, retention_floor=floor, cka_floor=cka_floor,
                             measured_on_validation=ref.on_validation)
    return guard, module


def overfitting(session, history, best_step, test_outputs, seeds) -> dict:
    """The overfitting guard on neg_perplexity, with max_gap read as a share of the validation perplexity at the best step."""
    max_gap = session.recipe.guards.overfitting.max_gap
    at_best = next((h for h in history if h["step"] == best_step), None)
    val_ppl = at_best.get("val_perplexity") if at_best else None
    scaled = max_gap * val_ppl if val_ppl and math.isfinite(val_ppl) else max_gap
    guard = overfitting_guard(history, best_step, model.PRIMARY, scaled, None, 0, seeds)
    guard["details"]["max_gap_relative"] = max_gap
    return guard


def baseline(session, tuner, test_metrics: dict, before: dict, train_seconds: float, show_progress: bool) -> dict:
    """Did fine-tuning help over the pre-trained model, and did pre-training help over random init?"""
    pre, tuned = before["test"]["perplexity"], test_metrics["perplexity"]
    details = {"scratch": None, "linear_probe": None, "majority": None, "pretrained": pre, "fine_tuned": tuned, "metric": "perplexity"}
    trained = scratch_model(session, tuner, train_seconds, show_progress)
    if trained is not None:
        details["scratch"] = perplexity(session, trained, session.encoded["test"])
    problems = []
    if not tuned < pre:
        problems.append(f"fine-tuning did not lower the test perplexity ({pre:.2f} before, {tuned:.2f} after)")
    if details["scratch"] is not None and details["scratch"] <= tuned * 1.005:
        problems.append(f"the same model trained from scratch reaches perplexity {details['scratch']:.2f} against {tuned:.2f}: pre-training bought nothing here")
    if problems:
        return guard_result("warn", "; ".join(problems).capitalize() + ".", details)
    text = f"Test perplexity {tuned:.2f} after fine-tuning, {pre:.2f} before"
    if details["scratch"] is not None:
        return guard_result("ok", text + f", {details['scratch']:.2f} from scratch: pre-training and fine-tuning both pay.", details)
    return guard_result("ok", text + " (from-scratch baseline not run: set guards.baseline: true).", details)


def generation_records(before: dict, after: list[str]) -> list[dict]:
    out = []
    for conv, b, a in zip(before["prompts"], before["generations"], after):
        prompt = model.prompt_of(conv)
        expected = next((m["content"] for m in conv if m["role"] == "assistant"), None)
        out.append({"prompt": prompt[-1]["content"] if prompt else "", "before": b, "after": a, "expected": expected})
    return out


def summary(session, module, before, test_outputs, guards) -> dict:
    """Replies to a few validation prompts, greedy, before and after fine-tuning (also shown with the baseline guard)."""
    records = generation_records(before, model.generations(module, session.bundle.tokenizer, before["prompts"], session.device))
    guards["baseline"]["details"]["generations"] = records  # the report renders guard details
    return {"majority": {}, "confusion_matrix": None, "generations": records}


TASK = Task(
    name="chat",
    primary=model.PRIMARY,
    lower_is_better=frozenset({"loss", "perplexity"}),
    default_family="causal-lm",
    methods=("lora", "qlora", "full", "freeze"),
    check_recipe=check_recipe,
    load_splits=lambda recipe: data.load_chat_splits(recipe, recipe.train.seed, mixture_counter(
        recipe, lambda r: model.conversation_token_counter(load_causal_tokenizer(r.model, r)))),
    audit=audit,
    load_model=load_model,
    sequence_length=lambda recipe, module: recipe.data.max_length,
    encode=model.encode,
    subset=model.subset,
    collate=model.collate,
    batches=lambda split, recipe, seed, pad_id: model.batches(split, recipe.train.batch_size, seed, pad_id, recipe.train.group_by_length),
    loss=model.loss,
    predict=model.predict,
    metrics=model.metrics,
    features=None,
    probe=None,
    cached_head=None,
    before=before,
    before_needs_untouched_model=True,
    load_reference=load_reference,
    forgetting=forgetting,
    overfitting=overfitting,
    baseline=baseline,
    bias=None,
    class_counts=labelled.no_classes,
    curve_subsets=labelled.shuffled_subsets,
    write_predictions=lambda path, session, outputs: model.write_predictions(path, session.splits.test, outputs),
    model_meta=lambda recipe, splits: {**saved_columns(recipe), "messages_column": recipe.data.messages},
    summary=summary,
    predict_file=lambda model_dir, meta, input_path, batch_size: model.predict_conversations(model_dir, meta, Path(input_path)),
    request_schema=ChatRequest,
)
