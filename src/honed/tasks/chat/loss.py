"""The causal-LM loss over the scored positions only, without the [tokens × vocabulary] logits.

A chat batch scores only the assistant's tokens; the plain path (`model(...).logits`, then
cross-entropy with ignored positions) computes and keeps the full-vocabulary logits of every
position, ~4 bytes × rows × length × vocabulary (1 GB at 16 × 512 × 32 k), and their gradient
again in backward. Here the decoder's last hidden states are gathered at the scored positions
first, and the output layer and the cross-entropy run over them in chunks of CHUNK_BYTES of
logits: each chunk's gradient (softmax − one-hot) is turned into the hidden states' and the
output weights' gradients at once and the chunk is dropped, as Liger's fused linear-cross-entropy
does. Models whose output layer is not a plain linear map (logit soft-capping or scaling, an
adapter on the head, a quantised or FSDP-sharded head) take the plain path.
"""

from __future__ import annotations

import torch
from torch import nn

CHUNK_BYTES = 64 * 1024 * 1024  # fp32 logits of one chunk; the softmax is computed in place
# config fields that make the logits more than hidden @ Wᵀ + b (Gemma 2, Cohere, Granite)
LOGIT_TRANSFORMS = ("final_logit_softcapping", "logit_scale", "logits_scaling")


def split_model(model: nn.Module) -> tuple[nn.Module, nn.Linear] | None:
    """(decoder, output layer) of a Hugging Face causal LM (a PeftModel's too: LoRA sits inside the
    decoder's layers), or None when the logits are not simply the output layer of the decoder's
    last hidden state."""
    try:
        from torch.distributed.fsdp import FSDPModule
    except ImportError:  # pragma: no cover - torch without distributed
        FSDPModule = ()  # noqa: N806
    if isinstance(model, FSDPModule) or not hasattr(model, "get_output_embeddings") or not hasattr(model, "get_decoder"):
        return None
    config = getattr(model, "config", None)
    if any(getattr(config, name, None) not in (None, 1, 1.0) for name in LOGIT_TRANSFORMS):
        return None
    try:
        head, decoder = model.get_output_embeddings(), model.get_decoder()
    except (AttributeError, NotImplementedError, ValueError):
        return None
    if type(head) is not nn.Linear or decoder is None or decoder is model or head.weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        return None
    return decoder, head


def last_hidden(decoder: nn.Module, batch: dict, **kwargs) -> torch.Tensor:
    """The decoder's last hidden states of the batch's rows (no mask: positions restart per conversation);
    kwargs go to the decoder and from it to its attention layers (attention.py's honed_segments)."""
    out = decoder(input_ids=batch["input_ids"], position_ids=batch["position_ids"], attention_mask=None, use_cache=False, **kwargs)
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def chunk_rows(vocab: int) -> int:
    return max(1, CHUNK_BYTES // (4 * max(1, vocab)))


class LinearCrossEntropy(torch.autograd.Function):
    """Σ over rows of −log softmax(h Wᵀ + b)[target], with the gradients computed chunk by chunk in
    forward (backward only scales them): no chunk's logits outlive it."""

    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, step):
        with torch.autocast(hidden.device.type, enabled=False):
            compute = hidden.dtype
            w = weight.to(compute)
            want_h, want_w, want_b = ctx.needs_input_grad[:3]
            grad_h = torch.empty_like(hidden) if want_h else None
            grad_w = torch.zeros(weight.shape, dtype=torch.float32, device=weight.device) if want_w else None
            grad_b = torch.zeros(bias.shape, dtype=torch.float32, device=bias.device) if want_b else None
            total = torch.zeros((), dtype=torch.float32, device=hidden.device)
            for s in range(0, hidden.shape[0], step):
                h, t = hidden[s : s + step], targets[s : s + step]
                logits = (h @ w.T).float()
                if bias is not None:
                    logits += bias.float()
                lse = torch.logsumexp(logits, -1)
                total += (lse - logits.gather(1, t[:, None]).squeeze(1)).sum()
                if not (want_h or want_w or want_b):
                    continue
                probs = logits.sub_(lse[:, None]).exp_()  # softmax, in the logits' memory
                probs[torch.arange(len(t), device=t.device), t] -= 1.0  # d(nll)/d(logits)
                g = probs.to(compute)
                if want_h:
                    grad_h[s : s + step] = g @ w
                if want_w:
                    grad_w.addmm_(probs.T, h.float())
                if want_b:
                    grad_b += probs.sum(0)
        ctx.save_for_backward(*(x for x in (grad_h, grad_w, grad_b) if x is not None))
        ctx.wanted = (want_h, want_w, want_b)
        ctx.dtypes = (hidden.dtype, weight.dtype, None if bias is None else bias.dtype)
        return total

    @staticmethod
    def backward(ctx, grad_total):
        saved = iter(ctx.saved_tensors)
        grads = [next(saved) * grad_total if wanted else None for wanted in ctx.wanted]
        grads = [g if g is None else g.to(dtype) for g, dtype in zip(grads, ctx.dtypes)]
        return grads[0], grads[1], grads[2], None, None


def summed_nll(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, rows: int | None = None) -> torch.Tensor:
    """Σ NLL of `targets` [N] from `hidden` [N, H] through `head`, `rows` positions per chunk (default:
    CHUNK_BYTES of logits); differentiable in hidden and the head's weights."""
    if hidden.shape[0] == 0:
        return hidden.sum() * 0.0
    return LinearCrossEntropy.apply(hidden, head.weight, head.bias, targets, rows or chunk_rows(head.weight.shape[0]))


@torch.no_grad()
def token_scores(hidden: torch.Tensor, head: nn.Linear, targets: torch.Tensor, rows: int | None = None) -> tuple[torch.Tensor, torch.Tensor]:
    """Per row of `hidden` [N, H]: the NLL of its target and whether the target is the top logit (fp32, chunked)."""
    nll = torch.empty(hidden.shape[0], dtype=torch.float32, device=hidden.device)
    correct = torch.empty(hidden.shape[0], dtype=torch.bool, device=hidden.device)
    w = head.weight.to(hidden.dtype)
    step = rows or chunk_rows(head.weight.shape[0])
    for s in range(0, hidden.shape[0], step):
        logits = (hidden[s : s + step] @ w.T).float()
        if head.bias is not None:
            logits += head.bias.float()
        t = targets[s : s + step]
        picked = logits.gather(1, t[:, None]).squeeze(1)
        nll[s : s + step] = torch.logsumexp(logits, -1) - picked
        correct[s : s + step] = logits.argmax(-1) == t
    return nll, correct


def scored_positions(targets: torch.Tensor, ignore: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Where position t predicts token t+1 and that token is scored: the mask over [:, :-1] and the targets there."""
    shifted = targets[:, 1:]
    scored = shifted != ignore
    return scored, shifted[scored]
