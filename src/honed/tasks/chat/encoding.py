"""Conversations rendered with the chat template and tokenised with their assistant-token mask, once:
through the `Dataset.map` cache of data/tokens.py, so a second run on the same conversations with the
same tokenizer and template reads the ids and masks back instead of rendering anything again.

The cache holds each conversation whole (ids and mask as the template renders them); cutting to
data.max_length, and counting what the cut drops, happens after reading, so one cache entry serves
every max_length. Its fingerprint covers each conversation's JSON (messages and tools), the
tokenizer (vocabulary and rules, special tokens, chat template), the transformers version (its Jinja
environment renders the template), the masking rule (every assistant turn, or only the final reply) and,
for a template that prints the date (transformers' `strftime_now`, as Llama 3's does), what it prints now.
"""

from __future__ import annotations

import hashlib
import json
import re
from dataclasses import dataclass
from datetime import datetime

import numpy as np
import pandas as pd
import torch

from ...data import ragged, tokens
from ...errors import RecipeError

CACHE_TAG = "+chat-mask1"  # what this module adds to the tokenizer's cache key: the rendering and masking rules, version 1
COUNT_CAP = 1 << 30  # tokens a conversation is counted to (data.mix_by: tokens): in effect uncut
PARALLEL_FROM = 20_000  # conversations from which rendering runs on several processes (Jinja renders in Python)
DATE_CALL = re.compile(r"strftime_now\s*\(")
DATE_FORMAT = re.compile(r"""strftime_now\s*\(\s*(?:"([^"\\]*)"|'([^'\\]*)')\s*\)""")  # a call with a literal format


@dataclass
class EncodedChat:
    """Token ids and assistant masks of every conversation, stored flat with offsets."""

    flat: torch.Tensor  # token ids
    mask: torch.Tensor  # bool, True where the token is a training target
    offsets: torch.Tensor
    lengths: torch.Tensor
    truncated: int = 0
    dropped_tokens: int = 0
    dropped_assistant_tokens: int = 0
    no_target: int = 0
    max_length: int = 128
    packing: bool = True
    from_cache: bool = False  # the ids and masks were read back from the tokenisation cache: nothing was rendered
    batches_tokenised: int = 0

    def __len__(self) -> int:
        return len(self.lengths)

    def item(self, i: int) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = int(self.offsets[i]), int(self.offsets[i + 1])
        return self.flat[a:b], self.mask[a:b]


def template_text(tokenizer) -> str:
    """The tokenizer's chat template as one string (a dict of named templates as JSON)."""
    template = tokenizer.chat_template
    return template if isinstance(template, str) else json.dumps(template)


def render_with_mask(tokenizer, messages: list[dict], tools: list | None = None) -> tuple[list[int], list[bool]]:
    """Token ids of the rendered conversation, and True for each token of an assistant reply
    (its content and the template's end-of-turn marker, not the role header), tool-call turns
    included; `tools` (the functions the conversation may call) go to the template's tool support.

    With `{% generation %}` markers in the template, transformers' own assistant mask is used;
    otherwise the assistant spans are found by rendering prefixes: the text before reply i is
    the conversation up to i with the generation prompt, the text through reply i is the
    conversation up to and including it; both must be prefixes of the full rendering.
    """
    template = template_text(tokenizer)
    if "generation %}" in template:
        enc = tokenizer.apply_chat_template(messages, tools=tools, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        return list(enc["input_ids"]), [bool(x) for x in enc["assistant_masks"]]
    text = tokenizer.apply_chat_template(messages, tools=tools, tokenize=False)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        before = tokenizer.apply_chat_template(messages[:i], tools=tools, tokenize=False, add_generation_prompt=True) if i else ""
        through = tokenizer.apply_chat_template(messages[: i + 1], tools=tools, tokenize=False)
        if not (text.startswith(before) and text.startswith(through) and len(through) >= len(before)):
            raise RecipeError("data.chat_template: the template does not render a conversation prefix by prefix, so the assistant "
                              "tokens cannot be located; use a template with {% generation %} markers around assistant replies")
        spans.append((len(before), len(through)))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    mask = [any(a <= start < b for a, b in spans) and end > start for start, end in enc["offset_mapping"]]
    return ids, mask


def final_reply_mask(mask: list[bool]) -> list[bool]:
    """Only the last contiguous run of assistant tokens: the reply being judged, not earlier assistant turns."""
    out = [False] * len(mask)
    i = len(mask) - 1
    while i >= 0 and not mask[i]:
        i -= 1
    while i >= 0 and mask[i]:
        out[i] = True
        i -= 1
    return out


def records(conversations: list[list[dict]], tools: list | None = None) -> list[str]:
    """Each conversation (and its tools) as one JSON text: the map's input and what the cache's fingerprint hashes."""
    tools = tools if tools is not None else [None] * len(conversations)
    return [json.dumps({"messages": m, "tools": t} if t is not None else {"messages": m}, ensure_ascii=False)
            for m, t in zip(conversations, tools)]


def printed_dates(template: str, now: datetime | None = None) -> list[str]:
    """What the template's `strftime_now(format)` calls print at `now` (default: this moment; transformers
    formats datetime.now() the same way): a template that prints today's date renders every conversation
    anew tomorrow, so the date belongs in the cache key. Date formats keep an entry for the day, formats with
    the time for as long as the time they print. A call whose format is not a literal string is keyed on the
    moment itself (to the microsecond: never reused). [] for a template that never calls it."""
    calls = len(DATE_CALL.findall(template))
    if not calls:
        return []
    now = now or datetime.now()
    formats = [a or b for a, b in DATE_FORMAT.findall(template)]
    if len(formats) < calls:
        return [now.isoformat()]
    return [now.strftime(f) for f in formats]


def cache_key(tokenizer, final_reply: bool, now: datetime | None = None) -> str:
    """What decides a conversation's ids and mask besides its JSON: the tokenizer's vocabulary and rules, its
    special tokens (templates print them), its chat template, the transformers version, the masking rule and
    what the template's strftime_now calls print at `now` (default: this moment; see printed_dates)."""
    import transformers

    template = tokenizer.chat_template
    sources = "\n".join(map(str, template.values())) if isinstance(template, dict) else str(template)  # unescaped, for the dates
    rendering = json.dumps([template_text(tokenizer), tokenizer.special_tokens_map, transformers.__version__, printed_dates(sources, now)],
                           sort_keys=True, default=str)
    digest = hashlib.blake2b(rendering.encode(), digest_size=16).hexdigest()
    return tokens.tokenizer_key(tokenizer, "chat") + f"|{digest}" + CACHE_TAG + ("+final-reply" if final_reply else "")


def conversation_encoder(tokenizer, final_reply: bool = False):
    """encode(json_texts) -> (ids, masks) for data/tokens.py's tokenise_masked: each record rendered by
    render_with_mask, its mask kept to the final reply when `final_reply`."""
    def encode(texts: list[str]) -> tuple[list[list[int]], list[list[bool]]]:
        ids, masks = [], []
        for text in texts:
            record = json.loads(text)
            x, m = render_with_mask(tokenizer, record["messages"], record.get("tools"))
            ids.append(x)
            masks.append(final_reply_mask(m) if final_reply else m)
        return ids, masks

    return encode


def encode_whole(tokenizer, conversations: list[list[dict]], tools: list | None = None, final_reply: bool = False) -> tokens.Tokenised:
    """Every conversation's ids and mask, whole, through the cache (an empty rendering is one pad token)."""
    return tokens.tokenise_masked(records(conversations, tools), conversation_encoder(tokenizer, final_reply),
                                  cache_key(tokenizer, final_reply), tokenizer.pad_token_id, PARALLEL_FROM)


def row_sums(values: np.ndarray, offsets: np.ndarray, starts: np.ndarray | None = None) -> np.ndarray:
    """Per row, the sum of `values` from starts[i] (default: the row's start) to the row's end."""
    running = np.zeros(len(values) + 1, dtype=np.int64)
    np.cumsum(values, out=running[1:])
    return running[offsets[1:]] - running[offsets[:-1] if starts is None else starts]


def check_tool_support(tokenizer, conversations: list[list[dict]]) -> None:
    if "tool" not in template_text(tokenizer) and any(m.get("tool_calls") or m["role"] == "tool" for c in conversations for m in c):
        raise RecipeError("data.chat_template: the conversations call tools but the chat template has no tool support (it never "
                          "mentions tools); give data.chat_template a template that renders tool_calls and the tool role")


def encode_conversations(tokenizer, conversations: list[list[dict]], max_length: int, packing: bool,
                         tools: list | None = None) -> EncodedChat:
    """Render and tokenise once (and, through the cache, once across runs); conversations longer than
    max_length are cut and counted. tools: per conversation, the functions it may call (None: none)."""
    check_tool_support(tokenizer, conversations)
    whole = encode_whole(tokenizer, conversations, tools)
    offsets, lengths = whole.offsets.numpy(), whole.lengths.numpy()
    keep = np.minimum(lengths, max_length)
    cut = lengths > max_length
    mask = whole.mask.numpy()
    dropped_assistant = int(row_sums(mask, offsets, offsets[:-1] + keep).sum())
    at = ragged.spans(offsets[:-1], keep)
    kept_offsets = ragged.offsets_of(torch.from_numpy(keep))
    kept_mask = torch.from_numpy(mask[at].copy())
    kept_mask[kept_offsets[:-1]] = False  # the first token has nothing before it to be predicted from
    no_target = int((row_sums(kept_mask.numpy(), kept_offsets.numpy()) == 0).sum())
    return EncodedChat(whole.flat[torch.from_numpy(at)], kept_mask, kept_offsets, torch.from_numpy(keep), int(cut.sum()),
                       int((lengths - keep).sum()), dropped_assistant, no_target, max_length, packing,
                       whole.from_cache, whole.batches_tokenised)


def conversation_token_counter(tokenizer):
    """count(frame) -> the tokens of each conversation (its `messages`, and `tools` when present) as the
    chat template renders them, uncut: what `data.mix_by: tokens` weighs a mixture with. Counted through
    the cache as well (the plain rendering, no mask: as cheap as counting without it), so a second run on
    the same sources renders nothing to count them. (An empty rendering, a template that prints nothing,
    counts as its one pad token.)"""
    key = cache_key(tokenizer, False) + "+count"

    def encode(texts: list[str], limit: int) -> list[list[int]]:
        parsed = [json.loads(text) for text in texts]
        rendered = [tokenizer.apply_chat_template(r["messages"], tools=r.get("tools"), tokenize=False) for r in parsed]
        return tokenizer(rendered, add_special_tokens=False)["input_ids"] if rendered else []

    def count(frame: pd.DataFrame) -> list[int]:
        tools = frame["tools"].tolist() if "tools" in frame else None
        return tokens.tokenise(records(frame["messages"].tolist(), tools), encode, key, COUNT_CAP, tokenizer.pad_token_id).lengths.tolist()

    return count
