"""Data audit: pure checks over the splits, returning findings (nothing here trains or writes)."""

from __future__ import annotations

import pandas as pd

MIN_PER_CLASS = 20


def audit_text_splits(splits, truncated: dict[str, int] | None = None, max_length: int | None = None) -> dict:
    """Class counts, empty texts, duplicates, train/validation/test leakage, truncation.

    Returns {"findings": [{level, code, message}], "splits": {name: {rows, class_counts}}, ...}.
    """
    findings: list[dict] = list(splits.notes)
    frames = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    summary = {
        name: {"rows": int(len(f)), "class_counts": {str(k): int(v) for k, v in f["label"].value_counts().sort_index().items()}}
        for name, f in frames.items()
    }
    train_counts = splits.train["label"].value_counts()
    small = train_counts[train_counts < MIN_PER_CLASS]
    if len(small):
        findings.append({
            "level": "warn", "code": "few_examples_per_class",
            "message": f"{len(small)} class(es) have fewer than {MIN_PER_CLASS} training examples: "
            + ", ".join(f"{k} ({v})" for k, v in small.items()),
        })
    majority_share = float(train_counts.max() / train_counts.sum())
    if majority_share > 0.9:
        findings.append({"level": "warn", "code": "imbalanced", "message": f"the largest class is {majority_share:.0%} of training rows; accuracy will look high even for a useless model"})

    dup_mask = splits.train.duplicated(subset=["text"], keep="first")
    conflicting = splits.train.groupby("text")["label"].nunique()
    conflicting = int((conflicting > 1).sum())
    if dup_mask.any():
        findings.append({"level": "warn" if dup_mask.mean() > 0.05 else "info", "code": "duplicates",
                         "message": f"{int(dup_mask.sum())} training row(s) repeat an earlier text exactly"
                         + (f"; {conflicting} text(s) appear with different labels" if conflicting else "")})

    train_texts = set(splits.train["text"])
    leakage = {}
    for name in ("validation", "test"):
        shared = int(frames[name]["text"].isin(train_texts).sum())
        leakage[name] = shared
        if shared:
            findings.append({"level": "warn", "code": "leakage",
                             "message": f"{shared} {name} row(s) have a text identical to a training text; their scores overstate how the model does on new data"})
    if truncated:
        total = sum(truncated.values())
        if total:
            rows = sum(len(f) for f in frames.values())
            findings.append({"level": "warn" if total / rows > 0.05 else "info", "code": "truncated",
                             "message": f"{total} of {rows} texts are longer than data.max_length={max_length} tokens and were truncated"})
    return {
        "findings": findings,
        "splits": summary,
        "duplicates_in_train": int(dup_mask.sum()),
        "conflicting_labels": conflicting,
        "leakage": leakage,
        "truncated": truncated or {},
        "majority_share": majority_share,
    }


def errors_in(audit: dict) -> list[dict]:
    return [f for f in audit["findings"] if f["level"] == "error"]


def class_counts(frame: pd.DataFrame) -> dict[str, int]:
    return {str(k): int(v) for k, v in frame["label"].value_counts().items()}
