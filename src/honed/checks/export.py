"""The export guard: does RUN_DIR/model, loaded back the way `honed predict` and a user load it,
behave like the model the run trained and measured?

After model/ is written, it is reloaded from disk (`load_saved`: Hugging Face families through
`from_pretrained`, with the tokenizer or preprocessor saved beside the weights), the validation
split is encoded again with the reloaded tokenizer or preprocessor, and a fixed sample of it (the
first EXPORT_ROWS rows) is scored by both models with the task's own `predict`. The guard reports:
whether the re-encoded inputs are the same token ids / features (the tokenizer, chat template or
preprocessing round-trips), the largest output difference, the agreement of predicted classes
(classifiers), and for causal LMs whether greedy replies to two validation prompts are the same.

Tolerance (docs/memory.md has the precisions): the saved weights are the trained fp32 weights, so
the two models run the same arithmetic; the bound only absorbs summation order: max |Δ| ≤ 1e-4 ×
max(1, |output|) when the run evaluates in fp32, 3e-2 × … under bf16 autocast. It runs in the
run's process (a fresh process would add ~10 s of imports to every run); what it checks is what
is on disk, read back by fresh objects.
"""

from __future__ import annotations

import dataclasses

import torch

from ..errors import HonedError
from ..guards.status import guard_result

EXPORT_ROWS = 64
GENERATION_PROMPTS = 2
TOLERANCE = {"fp32": 1e-4, "bf16": 3e-2}


def _tensor_fields(split) -> dict[str, torch.Tensor]:
    if not dataclasses.is_dataclass(split):
        return {}
    return {f.name: getattr(split, f.name) for f in dataclasses.fields(split) if isinstance(getattr(split, f.name), torch.Tensor)}


def _carry_computed(memory, disk) -> None:
    """Fields the run computed after encoding (a preference split's reference log-probabilities, from the
    starting model, not the exported one) are carried to the re-encoded split."""
    if not dataclasses.is_dataclass(disk):
        return
    for f in dataclasses.fields(disk):
        if getattr(disk, f.name) is None and getattr(memory, f.name, None) is not None:
            setattr(disk, f.name, getattr(memory, f.name))


def _same_inputs(memory, disk) -> list[str]:
    """Names of the encoded fields that differ (token ids, masks, features)."""
    ours, theirs = _tensor_fields(memory), _tensor_fields(disk)
    return [name for name, value in ours.items() if name in theirs and theirs[name] is not None
            and (value.shape != theirs[name].shape or not torch.equal(value, theirs[name]))]


def _prompts(frame) -> list[list[dict]]:
    column = "messages" if "messages" in frame.columns else "prompt" if "prompt" in frame.columns else None
    return [] if column is None else [list(m) for m in frame[column].tolist()[:GENERATION_PROMPTS]]


def export_guard(session, model: torch.nn.Module, run_dir) -> dict:
    """The sixth guard (`export`): RUN_DIR/model reloaded and compared with the in-memory model."""
    from ..models.load import load_saved
    from ..tasks.chat.model import generations

    task, recipe = session.task, session.recipe
    try:
        reloaded = load_saved(run_dir / "model")
    except (HonedError, OSError, ValueError, RuntimeError) as exc:
        first = str(exc).splitlines()[0][:240] if str(exc) else type(exc).__name__
        return guard_result("fail", f"RUN_DIR/model does not load back: {first}.", {"loads": False})
    reloaded.model.to(session.device).eval()
    memory_split = session.encoded["validation"]
    disk_split = task.encode(reloaded, session.splits.validation, session.splits.labels, recipe)
    n = min(EXPORT_ROWS, len(memory_split), len(disk_split))
    idx = torch.arange(n)
    memory, disk = task.subset(memory_split, idx), task.subset(disk_split, idx)
    _carry_computed(memory, disk)
    differing_inputs = _same_inputs(memory, disk)
    tolerance = TOLERANCE.get(session.precision, TOLERANCE["bf16"])
    details = {"loads": True, "rows": n, "precision": session.precision, "inputs_match": not differing_inputs,
               "differing_inputs": differing_inputs, "tolerance": tolerance}
    problems = []
    if differing_inputs:
        problems.append(f"the saved tokenizer or preprocessing encodes the validation inputs differently ({', '.join(differing_inputs)} differ)")
    else:
        ours = task.predict(model, memory, session.bundle.pad_id, session.eval_batch_size, session.precision, session.device).float()
        theirs = task.predict(reloaded.model, disk, reloaded.pad_id, session.eval_batch_size, session.precision, session.device).float()
        scale = max(1.0, float(ours.abs().max())) if ours.numel() else 1.0
        diff = float((ours - theirs).abs().max()) if ours.numel() else 0.0
        details.update({"max_abs_diff": diff, "scale": scale})
        if not diff <= tolerance * scale:
            problems.append(f"its outputs differ from the trained model's by up to {diff:.3g} (tolerance {tolerance * scale:.3g})")
        if session.splits.labels and ours.ndim == 2 and ours.shape[1] > 1:
            changed = int((ours.argmax(1) != theirs.argmax(1)).sum())
            details["prediction_agreement"] = 1 - changed / max(1, n)
            if changed:
                problems.append(f"the saved weights give {changed} of {n} different labels")
    prompts = _prompts(session.splits.validation) if reloaded.family == "causal-lm" else []
    if prompts and not differing_inputs:  # raw text (task causal-lm) has no prompts: its outputs above are the check
        ours_text = generations(model, session.bundle.tokenizer, prompts, session.device)
        theirs_text = generations(reloaded.model, reloaded.tokenizer, prompts, session.device)
        details["greedy_agreement"] = sum(a == b for a, b in zip(ours_text, theirs_text)) / max(1, len(prompts))
        if ours_text != theirs_text:
            problems.append(f"greedy replies differ for {sum(a != b for a, b in zip(ours_text, theirs_text))} of {len(prompts)} prompts")
    del reloaded
    if problems:
        return guard_result("fail", "RUN_DIR/model, loaded back, does not behave like the trained model: " + "; ".join(problems) + ".", details)
    figure = f"max |Δ| {details.get('max_abs_diff', 0):.2g}"
    if "prediction_agreement" in details:
        figure += f", predictions agree on {n} of {n}"
    if "greedy_agreement" in details:
        figure += ", the same greedy replies"
    return guard_result("ok", f"RUN_DIR/model, loaded back from disk, matches the trained model on {n} validation rows ({figure}).", details)
