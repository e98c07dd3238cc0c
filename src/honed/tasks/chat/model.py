"""Chat (instruction fine-tuning of a causal LM): render conversations with the chat template
(encoding.py, cached across runs), train only on assistant tokens, pack short conversations, score
perplexity, measure forgetting as perplexity and hidden-state drift on reference text, and generate replies.

Layout of a batch: `input_ids`, `position_ids` (restarting at 0 for every conversation in a
packed row) and `targets` (the token id where the token is an assistant token the model must
predict, -100 elsewhere, including the first token of every conversation, so nothing is ever
predicted across a boundary). `attention_mask` is None: with restarting position ids and no
cache, transformers builds a block-diagonal causal mask (one block per packed conversation);
padding sits at the end of a row, so causal attention keeps it away from real tokens.
"""

from __future__ import annotations

import json
import math
import threading
from pathlib import Path

import pandas as pd
import torch
import torch.nn.functional as F
from torch import nn

from ...data import ragged
from ...data.batching import batch_plan, epoch_generator
from ...data.load import read_table
from ...errors import DataError, RecipeError
from ...models.load import ModelBundle, load_saved, run_model_dir
from ...train.loop import Batches
from ...train.precision import autocast, fit_threads
from .attention import flatten, segmented, supports
from .data import pack_rows, validate_messages
# the encoding (and its cache) lives in encoding.py; these names are re-exported for the task table and callers
from .encoding import EncodedChat, conversation_token_counter, encode_conversations, render_with_mask
from .loss import last_hidden, scored_positions, split_model, summed_nll, token_scores

IGNORE = -100
GENERATIONS = 3  # validation prompts shown before/after in metrics.json
GENERATION_TOKENS = 32
PRIMARY = "neg_perplexity"


def encode_texts(tokenizer, texts: list[str], max_length: int) -> EncodedChat:
    """Plain text for language modelling (the reference set): every token after the first is a target."""
    ids = tokenizer(list(texts), truncation=True, max_length=max_length)["input_ids"]
    ids = [x if x else [tokenizer.pad_token_id] for x in ids]
    masks = [[False] + [True] * (len(x) - 1) for x in ids]
    flat, offsets, lengths = ragged.pack([t for x in ids for t in x], [len(x) for x in ids])
    return EncodedChat(flat, torch.tensor([m for x in masks for m in x], dtype=torch.bool), offsets, lengths,
                       max_length=max_length, packing=False)


def encode(bundle, frame, labels, recipe) -> EncodedChat:
    tools = frame["tools"].tolist() if "tools" in frame else None
    return encode_conversations(bundle.tokenizer, frame["messages"].tolist(), recipe.data.max_length, recipe.data.packing, tools)


def subset(split: EncodedChat, idx) -> EncodedChat:
    offsets, lengths, flat, mask = ragged.take(split.offsets, split.lengths, idx, split.flat, split.mask)
    return EncodedChat(flat, mask, offsets, lengths, 0, 0, 0, 0, split.max_length, split.packing)


# --------------------------------------------------------------------------- packing, batches, loss

def collate(split: EncodedChat, indices, pad_id: int, packing: bool | None = None) -> dict:
    """Rows of one conversation each, or (packing) conversations packed next-fit into rows of max_length."""
    indices = [int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]
    packing = split.packing if packing is None else packing
    if packing:
        rows = [[indices[j] for j in row] for row in pack_rows([int(split.lengths[i]) for i in indices], split.max_length)]
    else:
        rows = [[i] for i in indices]
    width = max(sum(int(split.lengths[i]) for i in row) for row in rows)
    input_ids = torch.full((len(rows), width), pad_id, dtype=torch.long)
    targets = torch.full((len(rows), width), IGNORE, dtype=torch.long)
    position_ids = torch.zeros((len(rows), width), dtype=torch.long)
    row_tokens = torch.zeros(len(rows), dtype=torch.long)
    for r, row in enumerate(rows):
        at = 0
        for i in row:
            ids, mask = split.item(i)
            n = len(ids)
            input_ids[r, at : at + n] = ids
            position_ids[r, at : at + n] = torch.arange(n)
            t = torch.where(mask, ids, torch.full_like(ids, IGNORE))
            t[0] = IGNORE  # never predicted from the previous conversation
            targets[r, at : at + n] = t
            at += n
        row_tokens[r] = at
        if at < width:  # padding continues the last conversation's positions (it is never attended to by real tokens)
            start = int(position_ids[r, at - 1]) + 1 if at else 0
            position_ids[r, at:] = torch.arange(start, start + width - at)
    return {"input_ids": input_ids, "position_ids": position_ids, "targets": targets, "row_tokens": row_tokens}


def batches(split: EncodedChat, batch_size: int, seed: int, pad_id: int, group_by_length: bool) -> Batches:
    """With packing, batch_size counts packed rows; an epoch's plan lists the conversations of each batch in packing order."""
    def plan(epoch: int) -> list[list[int]]:
        if not split.packing:
            return batch_plan(split.lengths, batch_size, seed, epoch, group_by_length)
        perm = torch.randperm(len(split), generator=epoch_generator(seed, epoch)).tolist()
        rows = pack_rows([int(split.lengths[i]) for i in perm], split.max_length)
        rows = [[perm[j] for j in row] for row in rows]
        return [[i for row in rows[k : k + batch_size] for i in row] for k in range(0, len(rows), batch_size)]

    # the loss is a mean over assistant tokens: processes sharing a batch weigh their parts by those tokens
    targets = torch.zeros(len(split))
    targets.index_add_(0, torch.repeat_interleave(torch.arange(len(split)), split.lengths), split.mask.float())
    return Batches(size=len(split), plan=plan, collate=lambda indices: collate(split, indices, pad_id),
                   weight=lambda indices: float(targets[torch.as_tensor(indices, dtype=torch.long)].sum()))


def _forward(model: nn.Module, batch: dict, hidden: bool = False):
    return model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None,
                 use_cache=False, output_hidden_states=hidden)


def _token_nll(logits: torch.Tensor, targets: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Per-token negative log-likelihood of position t+1 from position t, and the mask of scored tokens.

    The targets shift left instead of the logits: slicing off the logits' last position would copy
    all batch × length × vocabulary of them (hundreds of MB with a real vocabulary)."""
    shifted = torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], IGNORE)], dim=1)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1), ignore_index=IGNORE, reduction="none")
    return nll.view(shifted.shape)[:, :-1], targets[:, 1:] != IGNORE


def loss(model: nn.Module, batch: dict) -> torch.Tensor:
    """Mean negative log-likelihood over the assistant tokens of the batch: the output layer runs on
    the assistant positions' hidden states only, in chunks (loss.py), where the model allows it."""
    parts = split_model(model)
    if parts is None:
        nll, scored = _token_nll(_forward(model, batch).logits, batch["targets"])
        return (nll * scored).sum() / scored.sum().clamp(min=1)
    decoder, head = parts
    hidden, scored, targets = scored_hidden(model, decoder, batch)
    return summed_nll(hidden, head, targets) / scored.sum().clamp(min=1)


def scored_hidden(model: nn.Module, decoder: nn.Module, batch: dict) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """The decoder's last hidden states at the scored positions [N, H], the scored mask over the layout the decoder
    ran on ([rows, width - 1]) and the N targets. Where the model allows it (attention.py) the batch runs flattened,
    one conversation per attention call, without its padding; otherwise as masked rows."""
    if supports(model):
        flat, segments = flatten(batch)
        scored, targets = scored_positions(flat["targets"], IGNORE)
        with segmented(model):
            hidden = last_hidden(decoder, flat, honed_segments=segments)
        return hidden[:, :-1][scored], scored, targets
    scored, targets = scored_positions(batch["targets"], IGNORE)
    return last_hidden(decoder, batch)[:, :-1][scored], scored, targets


EVAL_LOGITS_BYTES = 512 * 1024 * 1024  # an evaluation batch's logits and their log-softmax stay within this


def eval_rows(model: nn.Module, split: EncodedChat, batch_size: int) -> int:
    """Rows per evaluation batch: batch_size, fewer when the vocabulary makes the logits of that many
    rows large (32 rows × 256 tokens × a 32k vocabulary is 1 GB of fp32 logits, held about three times)."""
    if split_model(model) is not None:  # the logits are computed in chunks over the scored positions
        return batch_size
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(out, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None) or 1
    return max(1, min(batch_size, EVAL_LOGITS_BYTES // (3 * 4 * max(1, split.max_length) * vocab)))


def _eval_batches(split: EncodedChat, pad_id: int, batch_size: int):
    order = torch.argsort(split.lengths, descending=True, stable=True)
    return ((order[s : s + batch_size], collate(split, order[s : s + batch_size], pad_id, packing=False))
            for s in range(0, len(order), batch_size))


@torch.no_grad()
def predict(model: nn.Module, split: EncodedChat, pad_id: int, batch_size: int, precision: str, device) -> torch.Tensor:
    """Per conversation: [summed NLL, scored tokens, correctly predicted tokens], in the split's order."""
    fit_threads(precision, device)
    was_training = model.training
    model.eval()
    out = torch.zeros(len(split), 3)
    try:
        with autocast(precision, device):
            parts = split_model(model)
            for idx, batch in _eval_batches(split, pad_id, eval_rows(model, split, batch_size)):
                batch = {k: v.to(device) for k, v in batch.items()}
                if parts is None:
                    logits = _forward(model, batch).logits
                    nll, scored = _token_nll(logits, batch["targets"])
                    correct = (logits[:, :-1].argmax(-1) == batch["targets"][:, 1:]) & scored
                    out[idx, 0] = (nll * scored).sum(1).float().cpu()
                    out[idx, 1] = scored.sum(1).float().cpu()
                    out[idx, 2] = correct.sum(1).float().cpu()
                    continue
                scored, targets = scored_positions(batch["targets"], IGNORE)
                nll, correct = token_scores(last_hidden(parts[0], batch)[:, :-1][scored], parts[1], targets)
                rows = scored.nonzero()[:, 0]
                per_row = torch.zeros(len(idx), 3, device=nll.device)
                per_row.index_add_(0, rows, torch.stack([nll, torch.ones_like(nll), correct.float()], 1))
                out[idx] = per_row.cpu()
    finally:
        model.train(was_training)
    return out


def metrics(stats: torch.Tensor, split=None) -> dict:
    """Loss and perplexity over the scored (assistant) tokens, token accuracy; the split is not needed."""
    nll, tokens, correct = (float(x) for x in stats.sum(0))
    if tokens == 0:
        return {"loss": float("nan"), "perplexity": float("nan"), PRIMARY: float("-inf"), "token_accuracy": float("nan"), "tokens": 0}
    loss_value = nll / tokens
    ppl = math.exp(min(loss_value, 80.0))
    return {"loss": loss_value, "perplexity": ppl, PRIMARY: -ppl, "token_accuracy": correct / tokens, "tokens": int(tokens)}


@torch.no_grad()
def hidden_features(model: nn.Module, split: EncodedChat, pad_id: int, batch_size: int, precision: str, device) -> torch.Tensor:
    """Mean-pooled last hidden state over each text's tokens (the CKA features), in fp32."""
    fit_threads(precision, device)
    was_training = model.training
    model.eval()
    out = None
    try:
        with autocast(precision, device):
            for idx, batch in _eval_batches(split, pad_id, eval_rows(model, split, batch_size)):
                batch = {k: v.to(device) for k, v in batch.items()}
                hidden = _forward(model, batch, hidden=True).hidden_states[-1].float()
                real = (torch.arange(hidden.shape[1], device=device)[None, :] < split.lengths[idx].to(device)[:, None]).float()
                pooled = (hidden * real[..., None]).sum(1) / real.sum(1, keepdim=True).clamp(min=1)
                if out is None:
                    out = torch.zeros(len(split), pooled.shape[-1])
                out[idx] = pooled.cpu()
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------- generation

def prompt_of(messages: list[dict]) -> list[dict]:
    """The conversation up to (not including) its first assistant reply."""
    first = next((i for i, m in enumerate(messages) if m["role"] == "assistant"), len(messages))
    return messages[:first]


@torch.no_grad()
def generate_reply(model: nn.Module, tokenizer, messages: list[dict], max_tokens: int = GENERATION_TOKENS,
                   temperature: float = 0.0, device=None) -> str:
    """One reply: the chat template with the generation prompt, greedy when temperature is 0."""
    device = device or next(model.parameters()).device
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    ids = tokenizer(text, add_special_tokens=False, return_tensors="pt")["input_ids"].to(device)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    if limit is not None and ids.shape[1] >= limit:
        raise DataError(f"messages: the prompt is {ids.shape[1]} tokens; the model's context is {limit}; shorten the conversation")
    if limit is not None:
        max_tokens = min(max_tokens, limit - ids.shape[1])
    kwargs = {"do_sample": True, "temperature": float(temperature)} if temperature and temperature > 0 else {"do_sample": False}
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), max_new_tokens=int(max_tokens),
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id, **kwargs)
    finally:
        model.train(was_training)
    return tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()


_CACHE: dict[str, object] = {}
_CACHE_LOCK = threading.Lock()


def _bundle_of(run_dir_or_bundle):
    if isinstance(run_dir_or_bundle, ModelBundle):
        return run_dir_or_bundle
    path = Path(run_dir_or_bundle)
    model_dir = run_model_dir(path) if path.exists() else None
    if model_dir is None:
        raise RecipeError(f"RUN_DIR: {path} has no model/ folder with honed.json; give a finished chat run")
    key = str(model_dir.resolve())
    with _CACHE_LOCK:
        if key not in _CACHE:
            bundle = load_saved(model_dir)
            if bundle.family != "causal-lm":
                raise RecipeError(f"RUN_DIR: {path} is a {bundle.family} run, not a chat run")
            bundle.model.eval()
            _CACHE[key] = bundle
        return _CACHE[key]


def generate_chat(run_dir_or_bundle, messages, max_tokens: int = 128, temperature: float = 0.0) -> str:
    """The assistant's reply to `messages` ([{role, content}, ...]) from a chat run directory (loaded once
    and cached) or a loaded ModelBundle. Raises DataError for malformed messages or a prompt longer than the context."""
    bundle = _bundle_of(run_dir_or_bundle)
    messages = validate_messages(messages, "messages")
    if max_tokens < 1:
        raise DataError(f"max_tokens: must be at least 1, got {max_tokens}")
    return generate_reply(bundle.model, bundle.tokenizer, messages, max_tokens, temperature)


def predict_conversations(model_dir: Path, meta: dict, input_path: Path, max_tokens: int = 128):
    """`honed predict` for a chat run: one reply per conversation (a trailing assistant message is the
    one to predict, so it is left out of the prompt and kept as `expected`)."""
    frame = read_table(input_path, "INPUT")
    column = meta.get("messages_column", "messages")
    if column not in frame.columns:
        raise DataError(f"INPUT: column '{column}' not found in {input_path.name} (columns: {', '.join(map(str, frame.columns[:30]))}); "
                        "give a JSONL with a list of {\"role\", \"content\"} messages per record")
    bundle = _bundle_of(model_dir)
    replies, expected = [], []
    for i, value in enumerate(frame[column].tolist(), start=1):
        messages = validate_messages(value, f"INPUT: {input_path.name} record {i}")
        if messages[-1]["role"] == "assistant":
            expected.append(messages[-1]["content"])
            messages = messages[:-1]
        else:
            expected.append(None)
        if not messages:
            raise DataError(f"INPUT: {input_path.name} record {i} has no message before the assistant's reply to prompt with")
        replies.append(generate_reply(bundle.model, bundle.tokenizer, messages, max_tokens, 0.0))
    out = frame.copy()
    out[column] = [json.dumps(v, ensure_ascii=False) if not isinstance(v, str) else v for v in frame[column]]
    if any(e is not None for e in expected):
        out["expected"] = expected
    out["prediction"] = replies
    return out


@torch.no_grad()
def generations(model, tokenizer, conversations: list[list[dict]], device) -> list[str]:
    """Greedy replies to the prompts of a few conversations, decoded together in one left-padded
    batch: one pass over the weights per new token for all of them, not one per prompt (at 478 M
    parameters on a CPU the weights' reads dominate each step)."""
    texts = [tokenizer.apply_chat_template(prompt_of(m), tokenize=False, add_generation_prompt=True) for m in conversations]
    # the chat template already holds the special tokens
    return [r.strip() for r in greedy_continuations(model, tokenizer, texts, device, GENERATION_TOKENS, add_special_tokens=False)]


@torch.no_grad()
def greedy_continuations(model, tokenizer, texts: list[str], device, max_new_tokens: int,
                         add_special_tokens: bool = True) -> list[str]:
    """Greedy continuations of `texts`, decoded together in one left-padded batch, each at most
    `max_new_tokens` and never past the model's context; the model's train/eval mode is restored."""
    if not texts:
        return []
    side = tokenizer.padding_side
    tokenizer.padding_side = "left"  # every prompt ends where generation starts
    try:
        enc = tokenizer(texts, add_special_tokens=add_special_tokens, return_tensors="pt", padding=True)
    finally:
        tokenizer.padding_side = side
    ids, mask = enc["input_ids"].to(device), enc["attention_mask"].to(device)
    limit = getattr(model.config, "max_position_embeddings", None) or getattr(model.config, "n_positions", None)
    new_tokens = max_new_tokens if limit is None else min(max_new_tokens, limit - ids.shape[1])
    if new_tokens <= 0:
        return ["" for _ in texts]
    was_training = model.training
    model.eval()
    try:
        out = model.generate(input_ids=ids, attention_mask=mask, max_new_tokens=int(new_tokens), do_sample=False,
                             pad_token_id=tokenizer.pad_token_id, eos_token_id=tokenizer.eos_token_id)
    finally:
        model.train(was_training)
    return [tokenizer.decode(row[ids.shape[1]:], skip_special_tokens=True) for row in out]


def write_predictions(path: Path, frame, stats: torch.Tensor) -> None:
    """Test-set scores per conversation: scored tokens, loss and perplexity."""
    tokens = stats[:, 1].clamp(min=1)
    loss_values = (stats[:, 0] / tokens).tolist()
    pd.DataFrame({
        "messages": [json.dumps(m, ensure_ascii=False) for m in frame["messages"]],
        "assistant_tokens": stats[:, 1].long().tolist(),
        "loss": [round(v, 6) for v in loss_values],
        "perplexity": [round(math.exp(min(v, 80.0)), 4) for v in loss_values],
    }).to_csv(path, index=False)
