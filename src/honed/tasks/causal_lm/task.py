"""The causal-lm row: continued pre-training of a causal language model on raw text (documents packed
into rows of max_length tokens, the loss on every token), validation perplexity as the metric,
forgetting as perplexity and hidden-state drift on reference text (general English shipped with
honed unless the recipe names its own), continuations of validation openings before and after."""

from __future__ import annotations

from pathlib import Path

from ...checks.forgetting import interpolation_alphas, wise_ft_sweep
from ...errors import RecipeError
from ...guards.forgetting import forgetting_guard, linear_cka
from ...models.causal_lm import load_causal_lm, load_causal_tokenizer, lora_targets
from ...models.quantise import refuse_unquantised
from .. import labelled
from ..base import Reference, Task, mixture_counter, refuse_series_model, saved_columns
from ..chat.task import baseline as chat_baseline
from ..chat.task import overfitting as chat_overfitting
from . import data, model

GENERAL_ENGLISH = Path(__file__).with_name("general_english.txt")  # the default reference: general prose, one paragraph a document
DEFAULT_REFERENCE = "general English shipped with honed (32 paragraphs)"


def check_recipe(recipe) -> None:
    refuse_series_model(recipe)
    if not isinstance(recipe.model, str):
        raise RecipeError("model: causal-lm needs a causal language model checkpoint folder, a Hub id or an earlier honed run")
    if recipe.replay is not None:
        raise RecipeError("replay: not available for task causal-lm yet; remove the replay section (lora, freeze or interpolate limit forgetting)")
    if recipe.reference is not None and recipe.reference.label is not None:
        raise RecipeError("reference.label: causal-lm measures forgetting as perplexity on reference text; remove reference.label")
    if recipe.data.groups:
        raise RecipeError("data.groups: causal-lm has no labels to compare groups on (the bias guard covers classification); remove data.groups")


def audit(recipe, splits, bundle=None, encoded=None) -> dict:
    return data.audit_documents(splits, encoded, recipe.data.max_length, recipe.data.packing)


def load_model(recipe, splits):
    bundle = load_causal_lm(recipe.model, recipe, chat=False)
    model.eos_id_of(bundle.tokenizer, recipe.model)
    context = getattr(bundle.model.config, "max_position_embeddings", None)
    if context is not None and recipe.data.max_length > context:
        raise RecipeError(f"data.max_length: {recipe.data.max_length} tokens per row, but {recipe.model} reads at most {context} "
                          f"(max_position_embeddings); set data.max_length to {context} or less")
    if recipe.method == "qlora":
        refuse_unquantised(bundle.model, recipe.model)
    if recipe.lora.target_modules is None:  # resolved like every `auto`: the blocks' projections; lm_head stays out
        recipe.lora.target_modules = lora_targets(bundle.model, bundle.head_name)
    return bundle


def load_reference(recipe, bundle, encoded: dict):
    """The recipe's reference text, else the general English shipped with honed; one document per row
    (long ones in rows of max_length), so the drift compares as many rows as there are documents."""
    if recipe.reference is None:
        name, texts = DEFAULT_REFERENCE, [p.strip() for p in GENERAL_ENGLISH.read_text(encoding="utf-8").split("\n\n") if p.strip()]
    else:
        name, texts = data.load_reference_documents(recipe.reference)
    split = model.encode_texts(bundle.tokenizer, bundle.family, texts, recipe.data.max_length, packing=False)
    return Reference(name, split, None, False), None


def perplexity(session, module, split) -> float:
    return model.metrics(session.outputs(module, split))["perplexity"]


def drift_features(session, module, split):
    return model.hidden_features(module, split, session.bundle.pad_id, session.eval_batch_size, session.precision, session.device)


def before(session, cache) -> dict:
    """What the pre-trained model (untouched: training runs after this) does: perplexity and features on
    the reference, validation/test metrics, and continuations of a few validation openings."""
    module, ref = session.bundle.model, session.reference
    out = {"reference_perplexity": perplexity(session, module, ref.encoded), "reference_features": drift_features(session, module, ref.encoded)}
    for name in ("validation", "test"):
        out[name] = model.metrics(session.outputs(module, session.encoded[name]))
    out["openings"] = model.openings(session.bundle.tokenizer, session.splits.validation["text"].tolist()[:model.CONTINUATIONS])
    out["continuations"] = model.continuations(module, session.bundle.tokenizer, out["openings"], session.device)
    out["summary"] = {**out["test"], "method": "the pre-trained model, before fine-tuning"}
    return out


def forgetting(session, tuner, module, before: dict):
    """Reference perplexity before/after (retention = before ÷ after), CKA drift of mean-pooled hidden states,
    and with `interpolate` the WiSE-FT sweep choosing α by validation perplexity within the retention floor."""
    recipe, ref = session.recipe, session.reference
    floor, cka_floor = recipe.guards.forgetting.floor, recipe.guards.forgetting.cka_floor
    ppl_before = before["reference_perplexity"]
    sweep, chosen = None, None
    if recipe.interpolate:
        def score(m):
            val = model.metrics(session.outputs(m, session.encoded["validation"]))
            return {"metric": val[model.PRIMARY], "perplexity": val["perplexity"], "retention": ppl_before / perplexity(session, m, ref.encoded)}

        sweep, chosen, module = wise_ft_sweep(module, tuner.pristine_state(), interpolation_alphas(recipe), score, floor)
    ppl_after = perplexity(session, module, ref.encoded)
    try:
        cka = linear_cka(before["reference_features"], drift_features(session, module, ref.encoded))
    except ValueError:
        cka = None  # fewer than 2 reference rows, or constant features
    guard = forgetting_guard(reference=ref.name, retention=None, cka=cka, perplexity_before=ppl_before, perplexity_after=ppl_after,
                             interpolation=sweep, chosen_alpha=chosen, retention_floor=floor, cka_floor=cka_floor,
                             measured_on_validation=False)
    guard["details"]["reference_documents"] = ref.encoded.documents
    return guard, module


def summary(session, module, before, test_outputs, guards) -> dict:
    """Greedy continuations of a few validation openings before and after (shown with the baseline guard)."""
    after = model.continuations(module, session.bundle.tokenizer, before["openings"], session.device)
    records = [{"prompt": o, "before": b, "after": a} for o, b, a in zip(before["openings"], before["continuations"], after)]
    guards["baseline"]["details"]["generations"] = records  # the report renders guard details
    return {"majority": {}, "confusion_matrix": None, "generations": records}


TASK = Task(
    name="causal-lm",
    primary=model.PRIMARY,
    lower_is_better=frozenset({"loss", "perplexity"}),
    default_family="causal-lm",
    methods=("lora", "qlora", "full", "freeze"),
    check_recipe=check_recipe,
    load_splits=lambda recipe: data.load_document_splits(recipe, recipe.train.seed, mixture_counter(
        recipe, lambda r: model.document_token_counter(load_causal_tokenizer(r.model, r, chat=False)))),
    audit=audit,
    load_model=load_model,
    sequence_length=lambda recipe, module: recipe.data.max_length,
    encode=model.encode,
    subset=model.subset,
    collate=model.collate,
    batches=lambda split, recipe, seed, pad_id: model.batches(split, recipe.train.batch_size, seed, pad_id),
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
    overfitting=chat_overfitting,  # the gap in perplexity, read as a share of the validation perplexity
    baseline=chat_baseline,  # before vs after fine-tuning, and from scratch with guards.baseline
    bias=None,
    class_counts=labelled.no_classes,
    curve_subsets=labelled.shuffled_subsets,
    write_predictions=lambda path, session, outputs: model.write_predictions(path, session.splits.test, outputs),
    model_meta=lambda recipe, splits: saved_columns(recipe),
    summary=summary,
    predict_file=lambda model_dir, meta, input_path, batch_size: model.predict_documents(model_dir, meta, Path(input_path), batch_size),
)
