"""Chat data: conversations in any format of formats.py from any source of data/sources.py, validated record by
record, split into train/validation/test, and audited (truncation and packing counted, never silent)."""

from __future__ import annotations

import json

import pandas as pd

from ...data.sources import load_split, source_name, sources_note
from ...errors import DataError
from ..text.data import TextSplits
from .formats import ROLES, detect_format, to_messages, validate_messages

__all__ = ["ROLES", "audit_chat", "carve_missing", "format_of", "load_chat_splits", "pack_rows", "validate_messages"]

def _read(frame: pd.DataFrame, name: str, field: str, spec, formats: list[str]) -> pd.DataFrame:
    """One source's records as `messages` (and `tools`) in the messages format, whatever format they came in."""
    where = f"{field}: {name}"
    fmt = detect_format(frame, spec.format, spec.messages, where)
    formats.append(fmt)
    rows, tools = [], []
    for i, row in enumerate(frame.to_dict("records"), start=1):
        at = f"{where} record {i}"
        messages, row_tools = to_messages(row, fmt, spec.messages, at)
        if not any(m["role"] == "assistant" for m in messages):
            raise DataError(f"{at}: the conversation has no assistant message; there is nothing to learn from it (add the assistant's reply or remove the record)")
        rows.append(messages)
        tools.append(row_tools)
    out = pd.DataFrame({"messages": rows})
    if any(t is not None for t in tools):
        out["tools"] = tools
    return out


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
        raise DataError(f"data.train: {source_name(spec.train)} has {len(train)} {unit}; too few to carve validation and test splits; "
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


def load_chat_splits(recipe, seed: int, count_tokens=None) -> TextSplits:
    """Train (and validation/test when given) as frames with one `messages` column; missing splits carved at random.
    count_tokens: the per-row token counter of a mixture weighed by tokens (data.sources.mix)."""
    spec = recipe.data
    formats: list[str] = []
    read_notes = []

    def read(role: str):
        loaded = load_split(getattr(spec, role), f"data.{role}", spec.subset, spec.split, seed,
                            lambda frame, name: _read(frame, name, f"data.{role}", spec, formats), count_tokens)
        read_notes.append(sources_note(loaded, role))
        return loaded.rows

    train = read("train")
    validation = read("validation") if spec.validation else None
    test = read("test") if spec.test else None
    if "tools" in train or any(s is not None and "tools" in s for s in (validation, test)):
        for frame in (train, validation, test):
            if frame is not None and "tools" not in frame:
                frame["tools"] = None
    train, validation, test, notes = carve_missing(spec, train, validation, test, seed, "conversations")
    formats = sorted(set(formats))
    how = "detected from the first records" if spec.format == "auto" else "data.format"
    notes = read_notes + [{"level": "info", "code": "format", "formats": formats,
                           "message": f"conversation format: {', '.join(formats)} ({how})"}] + notes
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
    out = {"task": "chat", "findings": findings, "splits": summary, "max_length": max_length, "packing": packing,
           "format": format_of(splits),
           "sources": {n["split"]: n["sources"] for n in splits.notes if n.get("code") == "sources"},
           "tool_conversations": {name: int(f["tools"].notna().sum()) if "tools" in f else 0 for name, f in frames.items()}}
    if encoded:  # read back from the tokenisation cache (tasks/chat/encoding.py): nothing was rendered or tokenised
        out["tokenisation"] = {k: {"conversations": len(v), "from_cache": v.from_cache} for k, v in encoded.items()}
    train = encoded.get("train")
    if train is not None and packing:
        rows = pack_rows(train.lengths.tolist(), max_length)
        filled = int(train.lengths.sum())
        out["packing_stats"] = {"conversations": len(train), "sequences": len(rows),
                                "fill": round(filled / max(1, len(rows) * max_length), 3)}
    return out


def format_of(splits) -> str:
    """The conversation format(s) the splits were read in, as audit.json's `format`."""
    return ", ".join(next((n["formats"] for n in splits.notes if n.get("code") == "format"), ["messages"]))


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
