"""Preference tuning of a causal LM: pairs rendered with the chat template, log-probabilities of
the reply tokens only, the DPO / IPO / SimPO objectives, and their metrics.

Layout: each pair is two sequences in one ragged store, 2i the chosen and 2i+1 the rejected
(prompt + reply, the reply's tokens marked as targets). The reference model is the starting
model: its per-token log-probabilities of every reply are computed once, before training, by
`reference_logps` (the task's `features`, so honed tune reuses them and a training step runs one
model, not two, whatever the method), and travel with the split.

Objectives (TRL's DPOTrainer / CPOTrainer formulas, on summed or per-token-mean log-probabilities):
  dpo    (Rafailov et al. 2023)  −(1−ε)·log σ(β·h) − ε·log σ(−β·h),  h = (π_c − π_r) − (ref_c − ref_r), sums
  ipo    (Azar et al. 2023)      (h − 1/(2β))²,  h on per-token means
  simpo  (Meng et al. 2024)      −(1−ε)·log σ(β·(π̄_c − π̄_r) − γ) − ε·log σ(−(…)),  per-token means, no reference
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from ...data import ragged
from ...data.batching import batch_plan
from ...errors import DataError
from ...train.loop import Batches
from ...train.precision import autocast, fit_threads
from ..chat.encoding import encode_whole, row_sums
from ..chat.model import IGNORE

PRIMARY = "preference_accuracy"
KL_PAIRS = 128  # pairs per split whose first-reply-token distribution is kept for the KL (128 × vocab × 2 bytes)
DEFAULT_BETA = {"dpo": 0.1, "ipo": 0.1, "simpo": 2.0}


@dataclass(frozen=True)
class Objective:
    loss: str
    beta: float
    label_smoothing: float
    gamma: float


def objective_of(recipe) -> Objective:
    spec = recipe.preference
    return Objective(spec.loss, spec.beta if spec.beta is not None else DEFAULT_BETA[spec.loss], spec.label_smoothing, spec.simpo_gamma)


@dataclass
class EncodedPairs:
    """Token ids of every pair's two sequences, flat with offsets; `targets` marks the reply tokens."""

    flat: torch.Tensor
    targets: torch.Tensor  # bool, True where the token is a reply token the model is scored on
    offsets: torch.Tensor
    lengths: torch.Tensor  # per sequence (2 per pair)
    kept: torch.Tensor  # the frame rows these pairs came from (pairs truncation made identical are dropped)
    objective: Objective
    reference: torch.Tensor | None = None  # per token: the starting model's log-probability of each target token
    reference_next: torch.Tensor | None = None  # (KL_PAIRS, vocab) fp16: its next-token distribution where the reply starts
    truncated: int = 0
    identical_after_truncation: int = 0
    max_length: int = 256
    from_cache: bool = False  # the ids and masks were read back from the tokenisation cache: nothing was rendered

    def __len__(self) -> int:
        return len(self.lengths) // 2


def encode_pairs(tokenizer, frame, max_length: int, objective: Objective) -> EncodedPairs:
    """Each pair's two sequences (prompt + reply) rendered and tokenised once, and across runs through the
    chat cache (chat/encoding.py), the mask kept to the final reply; sequences longer than max_length are cut
    (and counted); pairs the cut makes identical are dropped (and counted)."""
    wheres = frame["where"].tolist() if "where" in frame.columns else [f"pair {i + 1}" for i in range(len(frame))]
    sequences = [prompt + [{"role": "assistant", "content": reply}]
                 for prompt, chosen, rejected in zip(frame["prompt"], frame["chosen"], frame["rejected"]) for reply in (chosen, rejected)]
    whole = encode_whole(tokenizer, sequences, final_reply=True)
    offsets, lengths, mask = whole.offsets.numpy(), whole.lengths.numpy(), whole.mask.numpy()
    marked = np.append(np.flatnonzero(mask), np.iinfo(np.int64).max)  # reply tokens' positions, then a sentinel
    at_or_after = marked[np.searchsorted(marked, offsets[:-1])]  # each sequence's first reply token, if it is its own
    first = np.where(at_or_after < offsets[1:], at_or_after - offsets[:-1], lengths)  # where the reply starts (none: the length)
    crowded = np.flatnonzero(first >= max_length - 1)
    if len(crowded):
        s = int(crowded[0])
        raise DataError(f"{wheres[s // 2]}: the prompt is {int(first[s])} tokens, leaving no room for the reply within "
                        f"data.max_length={max_length}; raise data.max_length or shorten the prompt")
    keep = np.minimum(lengths, max_length)
    cut_offsets = ragged.offsets_of(torch.from_numpy(keep)).numpy()
    at = ragged.spans(offsets[:-1], keep)
    ids, targets = whole.flat.numpy()[at], mask[at].copy()
    targets[cut_offsets[:-1]] = False  # the first token has nothing before it to be predicted from
    kept = pair_differs(ids, cut_offsets, keep)
    seqs = np.stack([2 * kept, 2 * kept + 1], 1).reshape(-1)
    at = ragged.spans(cut_offsets[:-1][seqs], keep[seqs])
    flat, offsets_t, lengths_t = torch.from_numpy(ids[at]), ragged.offsets_of(torch.from_numpy(keep[seqs])), torch.from_numpy(keep[seqs])
    return EncodedPairs(flat, torch.from_numpy(targets[at]), offsets_t, lengths_t, torch.from_numpy(kept), objective, None, None,
                        int((lengths > max_length).sum()), len(frame) - len(kept), max_length, whole.from_cache)


def pair_differs(ids: np.ndarray, offsets: np.ndarray, lengths: np.ndarray) -> np.ndarray:
    """The pairs (sequences 2i and 2i+1 of the ragged `ids`) whose two sequences differ."""
    chosen, rejected = lengths[0::2], lengths[1::2]
    same_length = np.flatnonzero(chosen == rejected)
    n = chosen[same_length]
    unequal = ids[ragged.spans(offsets[0:-1:2][same_length], n)] != ids[ragged.spans(offsets[1:-1:2][same_length], n)]
    identical = same_length[row_sums(unequal, ragged.offsets_of(torch.from_numpy(n)).numpy()) == 0]
    return np.setdiff1d(np.arange(len(chosen)), identical).astype(np.int64)


def encode(bundle, frame, labels, recipe) -> EncodedPairs:
    return encode_pairs(bundle.tokenizer, frame, recipe.data.max_length, objective_of(recipe))


def _sequences(idx) -> torch.Tensor:
    idx = torch.as_tensor(idx, dtype=torch.long)
    return torch.stack([2 * idx, 2 * idx + 1], 1).reshape(-1)


def subset(split: EncodedPairs, idx) -> EncodedPairs:
    seqs = _sequences(idx)
    flats = (split.flat, split.targets) + ((split.reference,) if split.reference is not None else ())
    offsets, lengths, *taken = ragged.take(split.offsets, split.lengths, seqs, *flats)
    reference = taken[2] if split.reference is not None else None
    idx = torch.as_tensor(idx, dtype=torch.long)
    following = None
    if split.reference_next is not None:
        inside = idx[idx < len(split.reference_next)]
        following = split.reference_next[inside] if len(inside) == len(idx) else None  # only when every pair has one
    return EncodedPairs(taken[0], taken[1], offsets, lengths, split.kept[idx], split.objective, reference, following, 0, 0,
                        split.max_length)


def collate(split: EncodedPairs, indices, pad_id: int) -> dict:
    """Rows chosen₀, rejected₀, chosen₁, …, right-padded; `targets` is the token id at reply tokens, −100 elsewhere;
    `reference` the starting model's summed log-probability of each row's reply (when computed)."""
    seqs = _sequences([int(i) for i in (indices.tolist() if isinstance(indices, torch.Tensor) else indices)]).tolist()
    width = max(int(split.lengths[s]) for s in seqs)
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    targets = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    reference = torch.zeros(len(seqs))
    for r, s in enumerate(seqs):
        a, b = int(split.offsets[s]), int(split.offsets[s + 1])
        ids, mask = split.flat[a:b], split.targets[a:b]
        input_ids[r, : b - a] = ids
        targets[r, : b - a] = torch.where(mask, ids, torch.full_like(ids, IGNORE))
        if split.reference is not None:
            reference[r] = split.reference[a:b][mask].sum()
    batch = {"input_ids": input_ids, "position_ids": torch.arange(width).expand(len(seqs), width).contiguous(),
             "targets": targets, "objective": split.objective}
    if split.reference is not None:
        batch["reference"] = reference
    return batch


def batches(split: EncodedPairs, recipe, seed: int, pad_id: int) -> Batches:
    pair_lengths = split.lengths.view(-1, 2).max(1).values
    plan = lambda epoch: batch_plan(pair_lengths, recipe.train.batch_size, seed, epoch, recipe.train.group_by_length)  # noqa: E731
    return Batches(size=len(split), plan=plan, collate=lambda indices: collate(split, indices, pad_id))


def token_logps(model: nn.Module, batch: dict, keep_logits: bool = False):
    """Per-token log-probability of every target token (0 elsewhere) and the target mask, shape (rows, width);
    with keep_logits, the logits too."""
    logits = model(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None, use_cache=False).logits
    targets = batch["targets"]
    shifted = torch.cat([targets[:, 1:], torch.full_like(targets[:, :1], IGNORE)], dim=1)  # shift targets, not the logits (no copy)
    nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]).float(), shifted.reshape(-1), ignore_index=IGNORE, reduction="none")
    scored = shifted != IGNORE
    logps = (-nll.view(shifted.shape)) * scored
    return (logps, scored, logits) if keep_logits else (logps, scored)


def first_reply_distributions(logits: torch.Tensor, scored: torch.Tensor) -> torch.Tensor:
    """log-softmax of the next-token distribution where each chosen reply starts (the prompt's last position):
    the same context for both replies of a pair, so one distribution per pair, shape (pairs, vocab)."""
    chosen_logits, chosen_scored = logits[0::2], scored[0::2]
    first = chosen_scored.float().argmax(1)  # the first scored position of each row
    return torch.log_softmax(chosen_logits[torch.arange(len(first)), first].float(), dim=-1)


def pair_losses(policy_c, policy_r, ref_c, ref_r, tokens_c, tokens_r, objective: Objective) -> torch.Tensor:
    """The per-pair loss of the objective from summed log-probabilities and reply token counts."""
    beta, eps = objective.beta, objective.label_smoothing
    if objective.loss == "dpo":
        h = (policy_c - policy_r) - (ref_c - ref_r)
        return -(1 - eps) * F.logsigmoid(beta * h) - eps * F.logsigmoid(-beta * h)
    mean_c, mean_r = policy_c / tokens_c.clamp(min=1), policy_r / tokens_r.clamp(min=1)
    if objective.loss == "ipo":
        h = (mean_c - mean_r) - (ref_c / tokens_c.clamp(min=1) - ref_r / tokens_r.clamp(min=1))
        return (h - 1 / (2 * beta)) ** 2
    logits = beta * (mean_c - mean_r) - objective.gamma
    return -(1 - eps) * F.logsigmoid(logits) - eps * F.logsigmoid(-logits)


def loss(model: nn.Module, batch: dict) -> torch.Tensor:
    logps, scored = token_logps(model, batch)
    sums, tokens = logps.sum(1), scored.sum(1).float()
    reference = batch.get("reference")
    if reference is None:  # only SimPO trains without the starting model's log-probabilities
        reference = torch.zeros_like(sums)
    losses = pair_losses(sums[0::2], sums[1::2], reference[0::2].to(sums), reference[1::2].to(sums), tokens[0::2], tokens[1::2],
                         batch["objective"])
    return losses.mean()


def _pair_batches(split: EncodedPairs, pad_id: int, batch_size: int):
    order = torch.argsort(split.lengths.view(-1, 2).max(1).values, descending=True, stable=True)
    for s in range(0, len(order), batch_size):
        idx = order[s : s + batch_size]
        yield idx, collate(split, idx, pad_id)


def eval_pairs(model: nn.Module, split: EncodedPairs, batch_size: int) -> int:
    """Pairs per evaluation batch: their logits (2 rows a pair, held about three times) within 512 MB."""
    out = model.get_output_embeddings() if hasattr(model, "get_output_embeddings") else None
    vocab = getattr(out, "out_features", None) or getattr(getattr(model, "config", None), "vocab_size", None) or 1
    return max(1, min(batch_size, (512 * 1024 * 1024) // (2 * 3 * 4 * max(1, split.max_length) * vocab)))


@torch.no_grad()
def reference_logps(bundle, model: nn.Module, split: EncodedPairs, batch_size: int, precision: str, device) -> torch.Tensor:
    """The starting model's per-token log-probabilities of every reply token, stored on the split (its
    `reference`) with its next-token distribution where the first KL_PAIRS replies start; returned as
    (pairs, 2) sums: the reference of DPO/IPO, and the baseline of the KL and of likelihood displacement."""
    fit_threads(precision, device)
    was_training = model.training
    model.eval()
    flat = torch.zeros(len(split.flat))
    following = None
    try:
        with autocast(precision, device):
            for idx, batch in _pair_batches(split, bundle.pad_id, eval_pairs(model, split, batch_size)):
                logps, scored, logits = token_logps(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()},
                                                    keep_logits=True)
                logps = logps.float().cpu()
                for r, s in enumerate(_sequences(idx).tolist()):
                    a, b = int(split.offsets[s]), int(split.offsets[s + 1])
                    # logps[r, t] scores the token at t + 1 (the targets were shifted left)
                    flat[a + 1 : b] = logps[r, : b - a - 1]
                keep = idx < KL_PAIRS
                if keep.any():
                    dists = first_reply_distributions(logits, scored).cpu().half()
                    if following is None:
                        following = torch.zeros(min(KL_PAIRS, len(split)), dists.shape[1], dtype=torch.float16)
                    following[idx[keep]] = dists[keep]
    finally:
        model.train(was_training)
    split.reference = flat * split.targets
    split.reference_next = following
    sums = torch.stack([split.reference[int(split.offsets[s]) : int(split.offsets[s + 1])].sum() for s in range(len(split.lengths))])
    return sums.view(-1, 2)


OUTPUT_COLUMNS = ("policy_chosen", "policy_rejected", "ref_chosen", "ref_rejected", "tokens_chosen", "tokens_rejected",
                  "kl", "has_kl")


@torch.no_grad()
def predict(model: nn.Module, split: EncodedPairs, pad_id: int, batch_size: int, precision: str, device) -> torch.Tensor:
    """Per pair: the policy's and the reference's summed log-probabilities of both replies, their token
    counts, and KL(policy ‖ reference) of the next-token distributions where the reply starts (exact, over
    the whole vocabulary, for the first KL_PAIRS pairs; has_kl marks them)."""
    if split.reference is None:
        raise RuntimeError("preference: the reference log-probabilities were not computed for this split")
    fit_threads(precision, device)
    was_training = model.training
    model.eval()
    out = torch.zeros(len(split), len(OUTPUT_COLUMNS))
    try:
        with autocast(precision, device):
            for idx, batch in _pair_batches(split, pad_id, eval_pairs(model, split, batch_size)):
                logps, scored, logits = token_logps(model, {k: v.to(device) if torch.is_tensor(v) else v for k, v in batch.items()},
                                                    keep_logits=True)
                policy_next = first_reply_distributions(logits, scored).cpu()
                logps, scored = logps.float().cpu(), scored.cpu()
                sums, tokens = logps.sum(1), scored.sum(1).float()
                ref = torch.zeros_like(logps)
                for r, s in enumerate(_sequences(idx).tolist()):
                    a, b = int(split.offsets[s]), int(split.offsets[s + 1])
                    ref[r, : b - a - 1] = split.reference[a + 1 : b]
                ref_sums = ref.sum(1)
                kl, has_kl = torch.zeros(len(idx)), torch.zeros(len(idx))
                if split.reference_next is not None:
                    keep = idx < len(split.reference_next)
                    ref_next = split.reference_next[idx[keep]].float()
                    kl[keep] = (policy_next[keep].exp() * (policy_next[keep] - ref_next)).sum(1)
                    has_kl[keep] = 1.0
                out[idx] = torch.stack([sums[0::2], sums[1::2], ref_sums[0::2], ref_sums[1::2], tokens[0::2], tokens[1::2], kl, has_kl], 1)
    finally:
        model.train(was_training)
    return out


def rewards(outputs: torch.Tensor, objective: Objective) -> tuple[torch.Tensor, torch.Tensor]:
    """Implicit rewards of the chosen and rejected replies: β·(π − ref) for dpo/ipo, β·π̄ (per token) for simpo."""
    pc, pr, rc, rr, lc, lr = (outputs[:, i] for i in range(6))
    if objective.loss == "simpo":
        return objective.beta * pc / lc.clamp(min=1), objective.beta * pr / lr.clamp(min=1)
    return objective.beta * (pc - rc), objective.beta * (pr - rr)


def _correlation(a: np.ndarray, b: np.ndarray) -> float | None:
    if len(a) < 3 or a.std() == 0 or b.std() == 0:
        return None
    return float(np.corrcoef(a, b)[0, 1])


def metrics(outputs: torch.Tensor, split: EncodedPairs) -> dict:
    """Preference accuracy and margin of the implicit reward, mean log-probability per reply token,
    the KL from the starting model where the replies start, and the length checks of the baseline guard."""
    if len(outputs) == 0:
        return {"loss": float("nan"), PRIMARY: float("nan"), "pairs": 0}
    objective = split.objective
    pc, pr, rc, rr, lc, lr, kl, has_kl = (outputs[:, i] for i in range(8))
    loss_value = float(pair_losses(pc, pr, rc, rr, lc, lr, objective).mean())
    reward_c, reward_r = rewards(outputs, objective)
    margin = reward_c - reward_r
    longer = torch.where(lc == lr, torch.full_like(lc, 0.5), (lc > lr).float())
    ref_ranks = torch.where(rc == rr, torch.full_like(rc, 0.5), (rc > rr).float())
    length_gap = (lc - lr).numpy()
    return {
        "loss": loss_value if math.isfinite(loss_value) else float("nan"),
        PRIMARY: float((margin > 0).float().mean()),
        "reward_margin": float(margin.mean()),
        "chosen_logp": float(pc.sum() / lc.sum().clamp(min=1)),
        "rejected_logp": float(pr.sum() / lr.sum().clamp(min=1)),
        "kl": float(kl.sum() / has_kl.sum()) if has_kl.sum() > 0 else None,
        "length_baseline_accuracy": float(longer.mean()),  # "prefer the longer reply"
        "start_ranking_accuracy": float(ref_ranks.mean()),  # the starting model's log-probability ranking
        "reward_length_correlation": _correlation(margin.numpy(), length_gap),
        "pairs": int(len(outputs)),
    }
