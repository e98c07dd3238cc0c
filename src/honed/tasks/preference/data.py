"""Preference data: JSONL (or CSV/Parquet) rows of a prompt and two replies, the chosen and the
rejected, checked row by row, split, and audited before a model loads.

Accepted forms of one row (TRL's standard and conversational forms):
  {"prompt": "text", "chosen": "reply", "rejected": "reply"}
  {"prompt": [messages], "chosen": [{"role": "assistant", ...}], "rejected": [...]}
  {"chosen": [whole conversation], "rejected": [whole conversation]}   (the shared prefix is the prompt)
Every row becomes (prompt messages, chosen text, rejected text).
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field

import pandas as pd

from ...data.sources import read_frame, source_name
from ...errors import DataError
from ..chat.data import carve_missing, validate_messages

LENGTH_BIAS = 0.8  # the longer reply is the chosen one in more than this share of pairs (or less than 1 − it): flagged


@dataclass
class PreferenceSplits:
    train: pd.DataFrame
    validation: pd.DataFrame
    test: pd.DataFrame
    labels: list[str] | None = None
    notes: list[dict] = field(default_factory=list)


def _parsed(value, where: str, name: str):
    if isinstance(value, str) and value.strip()[:1] in ("[", "{"):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            return value
    if value is None or (isinstance(value, float) and value != value):
        raise DataError(f"{where}: the row has no '{name}'; every row needs a prompt, a chosen and a rejected reply")
    return value


def _prompt(value, where: str) -> list[dict]:
    if isinstance(value, str):
        return [{"role": "user", "content": value}]
    messages = validate_messages(value, f"{where} (prompt)")
    if messages[-1]["role"] == "assistant":
        raise DataError(f"{where}: the prompt ends with an assistant message; the reply to be judged must come in chosen/rejected")
    return messages


def _reply(value, where: str, name: str) -> str:
    """A reply given as a string, an assistant message, or a one-message list."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict):
        value = [value]
    messages = validate_messages(value, f"{where} ({name})")
    if len(messages) != 1 or messages[0]["role"] != "assistant":
        raise DataError(f"{where}: '{name}' must be one assistant reply (a string or [{{\"role\": \"assistant\", ...}}]), "
                        f"got {len(messages)} message(s) with roles {', '.join(m['role'] for m in messages)}")
    return messages[0]["content"]


def _split_conversations(chosen, rejected, where: str) -> tuple[list[dict], str, str]:
    """TRL's conversational form without a prompt: two whole conversations sharing every message but the last."""
    chosen = validate_messages(chosen, f"{where} (chosen)")
    rejected = validate_messages(rejected, f"{where} (rejected)")
    if chosen[:-1] != rejected[:-1] or chosen[-1]["role"] != "assistant" or rejected[-1]["role"] != "assistant":
        raise DataError(f"{where}: without a prompt, chosen and rejected must be whole conversations that share every message "
                        "but a final assistant reply")
    if len(chosen) < 2:
        raise DataError(f"{where}: the conversations have no prompt before the reply")
    return chosen[:-1], chosen[-1]["content"], rejected[-1]["content"]


def read_pairs(path: str, field_name: str, spec) -> pd.DataFrame:
    """One frame of (prompt, chosen, rejected) from a preference file; errors name the file and row."""
    frame = read_frame(path, field_name, spec)
    name = source_name(path)
    columns = ", ".join(map(str, frame.columns[:30]))
    if spec.messages in frame.columns and spec.chosen not in frame.columns:
        raise DataError(f"{field_name}: {name} holds conversations ('{spec.messages}' column) but no '{spec.chosen}'/'{spec.rejected}' "
                        "pairs; task preference needs pairs of replies, use task: chat for conversations")
    for key, column in (("data.chosen", spec.chosen), ("data.rejected", spec.rejected)):
        if column not in frame.columns:
            raise DataError(f"{key}: column '{column}' not found in {name} (columns: {columns}); every row needs a prompt, "
                            "a chosen and a rejected reply")
    missing = [g for g in spec.groups if g not in frame.columns]
    if missing:
        raise DataError(f"data.groups: column '{missing[0]}' not found in {name} (columns: {columns})")
    has_prompt = spec.prompt in frame.columns
    rows = []
    for i, record in enumerate(frame.to_dict("records"), start=1):
        where = f"{field_name}: {name} row {i}"
        chosen = _parsed(record.get(spec.chosen), where, spec.chosen)
        rejected = _parsed(record.get(spec.rejected), where, spec.rejected)
        prompt_value = record.get(spec.prompt) if has_prompt else None
        if has_prompt and not (prompt_value is None or (isinstance(prompt_value, float) and prompt_value != prompt_value)):
            prompt = _prompt(_parsed(prompt_value, where, spec.prompt), where)
            chosen_text, rejected_text = _reply(chosen, where, "chosen"), _reply(rejected, where, "rejected")
        elif isinstance(chosen, list) and isinstance(rejected, list):
            prompt, chosen_text, rejected_text = _split_conversations(chosen, rejected, where)
        else:
            raise DataError(f"{where}: the row has no '{spec.prompt}'; give a prompt, or chosen and rejected as whole conversations")
        extra = {g: record.get(g) for g in spec.groups}
        rows.append({"prompt": prompt, "chosen": chosen_text, "rejected": rejected_text, "where": where, **extra})
    if not rows:
        raise DataError(f"{field_name}: {name} has no rows")
    out = pd.DataFrame(rows)
    if bool((out["chosen"] == out["rejected"]).all()):
        raise DataError(f"{field_name}: in every row of {name} the chosen reply equals the rejected one; there is no preference to learn")
    return out


def load_preference_splits(recipe, seed: int) -> PreferenceSplits:
    """Train (and validation/test when given); missing splits carved at random; identical pairs dropped and counted."""
    spec = recipe.data
    train = read_pairs(spec.train, "data.train", spec)
    validation = read_pairs(spec.validation, "data.validation", spec) if spec.validation else None
    test = read_pairs(spec.test, "data.test", spec) if spec.test else None
    train, validation, test, notes = carve_missing(spec, train, validation, test, seed, "pairs")
    splits = {}
    for name, frame in (("train", train), ("validation", validation), ("test", test)):
        same = frame["chosen"] == frame["rejected"]
        if same.any():
            notes.append({"level": "warn", "code": "identical_pair", "split": name,
                          "message": f"{int(same.sum())} {name} pair(s) have the same chosen and rejected reply; dropped (nothing to prefer)"})
        splits[name] = frame[~same].reset_index(drop=True)
    return PreferenceSplits(splits["train"], splits["validation"], splits["test"], None, notes)


def prompt_key(prompt: list[dict]) -> str:
    return json.dumps(prompt, sort_keys=True)


def audit_pairs(splits: PreferenceSplits, encoded: dict | None, max_length: int) -> dict:
    """Rows, duplicate prompts, empty replies, the chosen-is-longer share, leakage, and (with the
    tokenizer) truncation and pairs that truncation made identical."""
    findings: list[dict] = list(splits.notes)
    summary = {}
    frames = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    for name, frame in frames.items():
        keys = [prompt_key(p) for p in frame["prompt"]]
        chosen_len, rejected_len = frame["chosen"].str.len(), frame["rejected"].str.len()
        differ = chosen_len != rejected_len
        longer = float((chosen_len > rejected_len)[differ].mean()) if differ.any() else 0.5
        info = {"rows": int(len(frame)), "duplicate_prompts": int(len(keys) - len(set(keys))),
                "empty_replies": int((frame["chosen"].str.strip() == "").sum() + (frame["rejected"].str.strip() == "").sum()),
                "chosen_longer_share": round(longer, 3)}
        enc = encoded.get(name) if encoded else None
        if enc is not None:
            info.update({"truncated": int(enc.truncated), "dropped_identical_after_truncation": int(enc.identical_after_truncation)})
            if enc.truncated:
                findings.append({"level": "warn", "code": "truncated", "split": name,
                                 "message": f"{enc.truncated} {name} repl(ies) are cut at data.max_length={max_length} tokens; raise data.max_length to keep them"})
            if enc.identical_after_truncation:
                findings.append({"level": "warn", "code": "identical_after_truncation", "split": name,
                                 "message": f"{enc.identical_after_truncation} {name} pair(s) became identical once cut at data.max_length; dropped"})
        summary[name] = info
        if info["empty_replies"]:
            findings.append({"level": "warn", "code": "empty_reply", "split": name, "message": f"{info['empty_replies']} empty repl(ies) in {name}"})
        if info["duplicate_prompts"]:
            findings.append({"level": "info", "code": "duplicate_prompts", "split": name,
                             "message": f"{info['duplicate_prompts']} prompt(s) repeat in {name} (several pairs per prompt)"})
    share = summary["train"]["chosen_longer_share"]
    if share > LENGTH_BIAS or share < 1 - LENGTH_BIAS:
        side = "longer" if share > 0.5 else "shorter"
        findings.append({"level": "warn", "code": "length_bias", "split": "train",
                         "message": f"the chosen reply is the {side} one in {max(share, 1 - share):.0%} of training pairs; the model can learn "
                                    f"'{side} is better' instead of the preference (the baseline guard scores that shortcut)"})
    train_prompts = {prompt_key(p) for p in splits.train["prompt"]}
    for name in ("validation", "test"):
        leaked = sum(prompt_key(p) in train_prompts for p in frames[name]["prompt"])
        if leaked:
            findings.append({"level": "warn", "code": "leakage", "split": name,
                             "message": f"{leaked} {name} prompt(s) also appear in train; the {name} figures are optimistic"})
    out = {"task": "preference", "findings": findings, "splits": summary, "max_length": max_length}
    if encoded:  # read back from the tokenisation cache (tasks/chat/encoding.py): nothing was rendered or tokenised
        out["tokenisation"] = {k: {"pairs": len(v), "from_cache": v.from_cache} for k, v in encoded.items()}
    return out
