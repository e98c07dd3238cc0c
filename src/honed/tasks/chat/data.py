"""Chat data: JSONL conversations (`messages`: a list of {role, content}), validated record by
record, split into train/validation/test, and audited (truncation and packing counted, never silent)."""

from __future__ import annotations

import json
from pathlib import Path

import pandas as pd

from ...data.load import read_table
from ...errors import DataError
from ..text.data import TextSplits

ROLES = ("system", "user", "assistant")


def validate_messages(messages, where: str) -> list[dict]:
    """Check one conversation; `where` names the file and record in errors. Returns plain dicts.

    Rules: a non-empty list of {role, content} objects; roles system/user/assistant; a system
    message only first; content a string; at least one assistant message (there is nothing to learn otherwise).
    """
    if messages is None or (isinstance(messages, float) and messages != messages):  # absent in this record (NaN)
        raise DataError(f"{where}: the record has no 'messages'; expected a list of {{\"role\", \"content\"}} objects")
    if isinstance(messages, str):  # a CSV/Parquet cell holding JSON
        try:
            messages = json.loads(messages)
        except json.JSONDecodeError:
            raise DataError(f"{where}: 'messages' is a string that is not JSON; expected a list of {{\"role\", \"content\"}} objects") from None
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is a {type(m).__name__}, expected an object with 'role' and 'content'")
        missing = [k for k in ("role", "content") if k not in m]
        if missing:
            raise DataError(f"{where}: message {i} has no {' or '.join(repr(k) for k in missing)} (keys: {', '.join(map(str, m))})")
        role, content = m["role"], m["content"]
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; allowed roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) has content of type {type(content).__name__}; expected a string")
        if role == "system" and i != 0:
            raise DataError(f"{where}: message {i} is a system message; a system message may only come first")
        out.append({"role": role, "content": content})
    return out


def _read(path: str, field: str, column: str) -> pd.DataFrame:
    frame = read_table(path, field)
    if column not in frame.columns:
        hint = ("; it holds chosen/rejected pairs: use task: preference" if {"chosen", "rejected"} <= set(frame.columns)
                else "; each record needs a list of {\"role\", \"content\"} messages")
        raise DataError(f"data.messages: column '{column}' not found in {Path(path).name} (columns: {', '.join(map(str, frame.columns[:30]))})"
                        + hint)
    rows = []
    for i, value in enumerate(frame[column].tolist(), start=1):
        where = f"{field}: {Path(path).name} record {i}"
        messages = validate_messages(value, where)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{where}: the conversation has no assistant message; there is nothing to learn from it (add the assistant's reply or remove the record)")
        rows.append(messages)
    return pd.DataFrame({"messages": rows})


def _carve(frame: pd.DataFrame, fraction: float, seed: int) -> tuple[pd.DataFrame, pd.DataFrame]:
    n = max(1, int(round(len(frame) * fraction)))
    carved = frame.sample(n=n, random_state=seed)
    return frame.drop(carved.index).reset_index(drop=True), carved.reset_index(drop=True)


def carve_missing(spec, train: pd.DataFrame, validation, test, seed: int, unit: str):
    """(train, validation, test, notes): the splits the recipe did not give, carved from train at random
    (test first, then validation); `unit` names the rows in messages ("conversations", "pairs")."""
    notes: list[dict] = []
    needed = (validation is None) + (test is None)
    if needed and len(train) < 3 * needed:
        raise DataError(f"data.train: {Path(spec.train).name} has {len(train)} {unit}; too few to carve validation and test splits; "
                        f"give data.validation and data.test, or more {unit}")
    if test is None:
        train, test = _carve(train, spec.test_fraction, seed)
        notes.append({"level": "info", "code": "split", "message": f"test split carved from train ({len(test)} {unit}, random, seed {seed})"})
    if validation is None:
        fraction = spec.validation_fraction / (1 - spec.test_fraction) if not spec.test else spec.validation_fraction
        train, validation = _carve(train, fraction, seed + 1)
        notes.append({"level": "info", "code": "split",
                      "message": f"validation split carved from train ({len(validation)} {unit}, random, seed {seed + 1})"})
    return train, validation, test, notes


def load_chat_splits(recipe, seed: int) -> TextSplits:
    """Train (and validation/test when given) as frames with one `messages` column; missing splits carved at random."""
    spec = recipe.data
    train = _read(spec.train, "data.train", spec.messages)
    validation = _read(spec.validation, "data.validation", spec.messages) if spec.validation else None
    test = _read(spec.test, "data.test", spec.messages) if spec.test else None
    train, validation, test, notes = carve_missing(spec, train, validation, test, seed, "conversations")
    return TextSplits(train, validation, test, [], notes)


def audit_chat(splits: TextSplits, encoded: dict, max_length: int, packing: bool) -> dict:
    """Rows, turns, duplicates, train/test leakage, truncation and packing, per split."""
    findings: list[dict] = list(splits.notes)
    frames = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    keys = {name: [json.dumps(m, sort_keys=True) for m in f["messages"]] for name, f in frames.items()}
    summary = {}
    for name, frame in frames.items():
        enc = encoded.get(name)
        summary[name] = {
            "rows": int(len(frame)),
            "turns": {role: int(sum(m["role"] == role for conv in frame["messages"] for m in conv)) for role in ROLES},
            "duplicates": int(len(keys[name]) - len(set(keys[name]))),
        }
        if enc is not None:
            summary[name].update({
                "tokens": int(enc.lengths.sum()), "assistant_tokens": int(enc.mask.sum()),
                "truncated": int(enc.truncated), "dropped_tokens": int(enc.dropped_tokens),
                "dropped_assistant_tokens": int(enc.dropped_assistant_tokens), "no_target": int(enc.no_target),
            })
            if enc.truncated:
                findings.append({
                    "level": "warn", "code": "truncated", "split": name,
                    "message": f"{enc.truncated} of {len(enc)} {name} conversation(s) are longer than data.max_length={max_length} tokens and were cut "
                               f"({enc.dropped_tokens} tokens dropped, {enc.dropped_assistant_tokens} of them assistant tokens); raise data.max_length to keep them",
                })
            if enc.no_target:
                findings.append({
                    "level": "warn", "code": "no_assistant_tokens", "split": name,
                    "message": f"{enc.no_target} {name} conversation(s) have no assistant token left after truncation; they add nothing to the loss",
                })
    for name in ("validation", "test"):
        leaked = len(set(keys["train"]) & set(keys[name]))
        if leaked:
            findings.append({"level": "warn", "code": "leakage", "split": name,
                             "message": f"{leaked} {name} conversation(s) also appear in train; the {name} figures are optimistic"})
    for name, info in summary.items():
        if info["duplicates"]:
            findings.append({"level": "info", "code": "duplicates", "split": name, "message": f"{info['duplicates']} duplicate conversation(s) in {name}"})
    out = {"task": "chat", "findings": findings, "splits": summary, "max_length": max_length, "packing": packing}
    train = encoded.get("train")
    if train is not None and packing:
        rows = pack_rows(train.lengths.tolist(), max_length)
        filled = int(train.lengths.sum())
        out["packing_stats"] = {"conversations": len(train), "sequences": len(rows),
                                "fill": round(filled / max(1, len(rows) * max_length), 3)}
    return out


def pack_rows(lengths: list[int], max_length: int) -> list[list[int]]:
    """Next-fit packing: positions into `lengths`, in order, grouped into rows of at most max_length tokens."""
    rows, current, used = [], [], 0
    for i, n in enumerate(lengths):
        if current and used + n > max_length:
            rows.append(current)
            current, used = [], 0
        current.append(i)
        used += n
    if current:
        rows.append(current)
    return rows
