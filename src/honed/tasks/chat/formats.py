"""Conversation formats, each turned into one `messages` list per record (and the record's tools):

- messages  `{"messages": [{"role", "content"}, ...]}`, OpenAI style: an assistant turn may carry
            `tool_calls` (its content empty), a `tool` turn answers one, and the record may list
            the functions in `tools`; these render through the chat template's tool support.
- sharegpt  `{"conversations": [{"from": "human"|"gpt"|"system"|"function_call"|"observation", "value"}], "system"?, "tools"?}`
- alpaca    `{"instruction", "input"?, "output", "system"?}`

`data.format: auto` reads the format from the first record's keys; a file whose records are in
two formats is an error naming the first record in the other one.
"""

from __future__ import annotations

import json

import numpy as np
import pandas as pd

from ...errors import DataError

ROLES = ("system", "user", "assistant", "tool")
FORMATS = ("messages", "sharegpt", "alpaca")
# each format's identifying column ("messages" stands for data.messages, the recipe's column name)
KEY_COLUMN = {"messages": "messages", "sharegpt": "conversations", "alpaca": "instruction"}
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "chatgpt": "assistant",
                  "bard": "assistant", "bing": "assistant", "system": "system", "function_call": "assistant",
                  "observation": "tool", "tool": "tool"}


def plain(value):
    """Arrow hands lists back as numpy arrays and absent struct keys as None: plain lists and dicts, None keys dropped."""
    if isinstance(value, np.ndarray):
        return [plain(v) for v in value.tolist()]
    if isinstance(value, (list, tuple)):
        return [plain(v) for v in value]
    if isinstance(value, dict):
        return {k: plain(v) for k, v in value.items() if v is not None}
    return value


def missing(value) -> bool:
    return value is None or (isinstance(value, float) and value != value)


def _json_cell(value, where: str, what: str):
    """A CSV/Parquet cell may hold the list as a JSON string."""
    if isinstance(value, str):
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: '{what}' is a string that is not JSON; expected a list of objects") from None
    return plain(value)


def validate_messages(messages, where: str) -> list[dict]:
    """Check one conversation; `where` names the file and record in errors. Returns plain dicts.

    Rules: a non-empty list of {role, content} objects; roles system/user/assistant/tool; a
    system message only first; content a string, except an assistant turn with `tool_calls`
    (each {"type": "function", "function": {"name", "arguments"}}) whose content may be empty.
    """
    if missing(messages):  # absent in this record (NaN)
        raise DataError(f"{where}: the record has no 'messages'; expected a list of {{\"role\", \"content\"}} objects")
    messages = _json_cell(messages, where, "messages")
    if not isinstance(messages, (list, tuple)) or len(messages) == 0:
        raise DataError(f"{where}: 'messages' must be a non-empty list of {{\"role\", \"content\"}} objects, got {type(messages).__name__}")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: message {i} is a {type(m).__name__}, expected an object with 'role' and 'content'")
        m = plain(m)
        calls = m.get("tool_calls")
        needed = ("role",) if calls else ("role", "content")
        absent = [k for k in needed if k not in m]
        if absent:
            raise DataError(f"{where}: message {i} has no {' or '.join(repr(k) for k in absent)} (keys: {', '.join(map(str, m))})")
        role, content = m["role"], m.get("content", "")
        if role not in ROLES:
            raise DataError(f"{where}: message {i} has role {role!r}; allowed roles are {', '.join(ROLES)}")
        if not isinstance(content, str):
            raise DataError(f"{where}: message {i} ({role}) has content of type {type(content).__name__}; expected a string")
        if role == "system" and i != 0:
            raise DataError(f"{where}: message {i} is a system message; a system message may only come first")
        message = {"role": role, "content": content}
        if calls:
            if role != "assistant":
                raise DataError(f"{where}: message {i} ({role}) has tool_calls; only an assistant message calls tools")
            message["tool_calls"] = [_tool_call(c, f"{where}: message {i}") for c in calls]
        for key in ("tool_call_id", "name"):
            if role == "tool" and isinstance(m.get(key), str):
                message[key] = m[key]
        out.append(message)
    return out


def _tool_call(call, where: str) -> dict:
    """{"type": "function", "function": {"name", "arguments": dict}}; arguments given as a JSON string are parsed
    (chat templates write them with tojson)."""
    function = call.get("function", call) if isinstance(call, dict) else None
    if not isinstance(function, dict) or not isinstance(function.get("name"), str):
        raise DataError(f"{where}: a tool call must be {{\"type\": \"function\", \"function\": {{\"name\", \"arguments\"}}}}, got {call!r:.80}")
    arguments = function.get("arguments", {})
    if isinstance(arguments, str):
        try:
            arguments = json.loads(arguments) if arguments.strip() else {}
        except json.JSONDecodeError:
            raise DataError(f"{where}: the arguments of tool call {function['name']!r} are not JSON") from None
    out = {"type": "function", "function": {"name": function["name"], "arguments": arguments}}
    if isinstance(call.get("id"), str):
        out["id"] = call["id"]
    return out


def row_format(row: dict, messages_column: str) -> str | None:
    """The format one record is in, from the keys that hold a value."""
    for fmt in FORMATS:
        column = messages_column if fmt == "messages" else KEY_COLUMN[fmt]
        if not missing(row.get(column)):
            return fmt
    return None


def detect_format(frame: pd.DataFrame, declared: str, messages_column: str, where: str) -> str:
    """The format of the file: the declared one, or (auto) the first record's; every record must share it."""
    first = declared
    if declared == "auto":
        first = row_format(frame.iloc[0].to_dict(), messages_column)
        if first is None:
            raise DataError(f"{where}: record 1 is in no known chat format (columns: {', '.join(map(str, frame.columns[:30]))}); "
                            f"expected '{messages_column}' (messages), 'conversations' (ShareGPT) or 'instruction'/'output' (Alpaca)"
                            + ("; it holds chosen/rejected pairs: use task: preference" if {"chosen", "rejected"} <= set(frame.columns) else ""))
    column = messages_column if first == "messages" else KEY_COLUMN[first]
    if column not in frame.columns:
        key = "data.messages" if first == "messages" else "data.format"
        raise DataError(f"{key}: column '{column}' not found in {where} (columns: {', '.join(map(str, frame.columns[:30]))}); "
                        f"{first} records need it" + ("; it holds chosen/rejected pairs: use task: preference"
                                                      if {"chosen", "rejected"} <= set(frame.columns) else ""))
    others = [c for fmt, c in ((f, messages_column if f == "messages" else KEY_COLUMN[f]) for f in FORMATS)
              if fmt != first and c in frame.columns]
    if others:  # a JSONL file with records of two formats: some records have only the other key
        own = frame[column].map(missing)
        for c in others:
            other = own & ~frame[c].map(missing)
            if other.any():
                i = int(np.argmax(other.to_numpy()))
                fmt = next(f for f in FORMATS if (messages_column if f == "messages" else KEY_COLUMN[f]) == c)
                raise DataError(f"{where} record {i + 1} is in the {fmt} format ('{c}') but record 1 is in the {first} format; "
                                "keep one format per file (list the files as a mixture in data.train)")
    return first


def to_messages(row: dict, fmt: str, messages_column: str, where: str) -> tuple[list[dict], list | None]:
    """One record as (messages, tools) in the messages format."""
    tools = row.get("tools")
    tools = None if missing(tools) else _json_cell(tools, where, "tools")
    if fmt == "messages":
        return validate_messages(row.get(messages_column), where), tools or None
    if fmt == "alpaca":
        instruction, output = row.get("instruction"), row.get("output")
        if not isinstance(instruction, str) or not isinstance(output, str):
            raise DataError(f"{where}: an Alpaca record needs string 'instruction' and 'output' fields")
        extra = row.get("input")
        prompt = instruction if missing(extra) or not str(extra).strip() else f"{instruction}\n\n{extra}"
        system = row.get("system")
        head = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
        return head + [{"role": "user", "content": prompt}, {"role": "assistant", "content": output}], tools or None
    turns = _json_cell(row.get("conversations"), where, "conversations")
    if not isinstance(turns, list) or not turns:
        raise DataError(f"{where}: 'conversations' must be a non-empty list of {{\"from\", \"value\"}} objects")
    system = row.get("system")
    messages = [{"role": "system", "content": system}] if isinstance(system, str) and system else []
    for i, turn in enumerate(turns):
        if not isinstance(turn, dict) or "from" not in turn or "value" not in turn:
            raise DataError(f"{where}: conversations turn {i} needs 'from' and 'value' (got {turn!r:.80})")
        role = SHAREGPT_ROLES.get(str(turn["from"]).lower())
        if role is None:
            raise DataError(f"{where}: conversations turn {i} has from={turn['from']!r}; allowed: {', '.join(SHAREGPT_ROLES)}")
        if str(turn["from"]).lower() == "function_call":  # LLaMA-Factory's ShareGPT: the value is the call as JSON
            try:
                call = json.loads(turn["value"])
            except (TypeError, json.JSONDecodeError):
                raise DataError(f"{where}: conversations turn {i} (function_call) is not a JSON {{\"name\", \"arguments\"}} object") from None
            calls = call if isinstance(call, list) else [call]
            messages.append({"role": "assistant", "content": "", "tool_calls": [{"type": "function", "function": c} for c in calls]})
        else:
            messages.append({"role": role, "content": turn["value"]})
    return validate_messages(messages, where), tools or None
