"""One fine-tune, as an explicit object: the pre-trained weights it starts from, the recipe's
method in stages (a head on cached features, then the model), and the mitigations that change
the training objective (L2-SP, replay). The run fine-tunes once in place; the guards that need
more than one training run (seeds, the learning curve, the from-scratch baseline) ask the same
FineTuner for fresh copies."""

from __future__ import annotations

import copy
from contextlib import contextmanager
import math
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.nn.functional as F

from .checks.budget import GuardBudget
from .data.batching import shuffled_plan
from .hooks import Hooks
from .memory import process_peak_rss_mb
from .methods import METHODS, checkpointing
from .methods.lora import save_adapter
from .models.capture import head_inputs
from .models.load import logits_of, scratch_copy
from .recipe import main_seed
from .session import TRAIN_EVAL_ROWS, Session
from .tasks.base import FeatureSplit
from .train import distributed
from .train.allocator import LANGUAGE_MODEL_OWN_MAPPING_FROM
from .train.checkpoint import Checkpointer, StateOnDisk
from .train.loop import Batches, LoopConfig, Outcome, train
from .train.progress import quiet


@dataclass
class FineTuner:
    """Fine-tunes the session's model with its recipe's method.

    pristine: the pre-trained weights (a state dict, or waiting on disk during a run);
    probe_head: the linear probe's head, where the head stage may start from it.
    """

    session: Session
    pristine: dict | StateOnDisk
    probe_head: dict | None = None
    mitigations: bool = True  # L2-SP and replay, as the recipe says (off for the scratch baseline)
    budget: GuardBudget | None = None  # the extra training the guards may still do (set once the run's fine-tune is done)
    # this process's peak RSS (MB) when the last fine-tune's training ended, before the adapter is saved and the
    # method's export (a merged, dequantised copy for qlora) allocates: what the memory check estimates
    training_peak_rss_mb: float = 0.0

    def pristine_state(self) -> dict[str, torch.Tensor]:
        """The pre-trained weights as a plain state dict (read back from disk during a run)."""
        return self.pristine.load() if isinstance(self.pristine, StateOnDisk) else self.pristine

    def fine_tune(self, seed: int, train_idx: torch.Tensor | None = None, checkpointer: Checkpointer | None = None,
                  progress=None, on_history=None, model: torch.nn.Module | None = None,
                  group: distributed.Group | None = None, method: str | None = None,
                  hooks: Hooks | None = None, adapter_dir: Path | None = None,
                  max_steps: int | None = None) -> tuple[torch.nn.Module, list[Outcome], list[dict]]:
        """Train a model with the recipe's method; returns (model, outcomes, history).

        model: the module to train in place (the run's own fine-tune); without it, a fresh copy of
        the pre-trained model. train_idx restricts training to a subset (the learning curve); the
        validation split is always the same. group: the processes sharing this fine-tune; hooks:
        observers of its training loops (the run passes them for its own fine-tune only). adapter_dir:
        where the trained adapter is saved on its own, when the method keeps one (the run's fine-tune).
        max_steps: at most this many optimizer steps per stage (the guards' budget), besides train.max_steps.
        """
        s = self.session
        recipe, task = s.recipe, s.task
        torch.manual_seed(seed)
        if model is None:
            model = copy.deepcopy(s.bundle.model)
            model.load_state_dict(self.pristine_state())
            for p in model.parameters():  # as loaded: an earlier fine-tune of bundle.model may have frozen some
                p.requires_grad_(True)
        bundle = s.bundle_for(model)
        train_split = s.encoded["train"] if train_idx is None else task.subset(s.encoded["train"], train_idx)
        eval_pool = torch.arange(len(train_split))[:TRAIN_EVAL_ROWS] if train_idx is not None else s.train_eval_idx
        history: list[dict] = []
        outcomes = []
        spec = METHODS[method or recipe.method]
        for stage in spec["stages"]:
            previous = list(history)
            on_eval = (lambda stage_history, previous=previous: on_history(previous + stage_history)) if on_history else None
            if stage == "head" and task.cached_head is not None:
                train_features = s.features["train"] if train_idx is None else s.features["train"][train_idx]
                probe_head = self.probe_head if train_idx is None else None  # fitted on the whole training split
                outcome = self._train_head(bundle, FeatureSplit(train_features, train_split.labels), eval_pool, seed,
                                           checkpointer, progress, on_eval, probe_head, group, hooks)
            elif stage == "head":  # the head trains inside the frozen model (forecasters rescale each window around their head)
                model = METHODS["head"]["prepare"](model, bundle, recipe)
                outcome = self._train_model(bundle, model, train_split, task.subset(train_split, eval_pool), seed, checkpointer,
                                            progress, on_eval, group, hooks, stage="head", lr=recipe.train.head_lr)
            else:
                if recipe.train.gradient_checkpointing is True:  # `auto` was resolved by the memory check (session.setup)
                    checkpointing.enable(model, method or recipe.method)
                model = spec["prepare"](model, bundle, recipe)
                outcome = self._train_model(bundle, model, train_split, task.subset(train_split, eval_pool), seed, checkpointer,
                                            progress, on_eval, group, hooks, max_steps=max_steps)
            history[:] = previous + outcome.history
            outcomes.append(outcome)
        self.training_peak_rss_mb = process_peak_rss_mb()
        if adapter_dir is not None and spec["adapter"] is not None and spec["adapter"](recipe):
            save_adapter(model, adapter_dir)
        if spec["export"] is not None:
            model = spec["export"](model)
        return model, outcomes, history

    def from_scratch(self, max_steps: int | None = None) -> tuple[torch.nn.Module, int]:
        """The same architecture from random initialisation, trained in full with the same data and
        seed (for at most max_steps steps) and without the forgetting mitigations (there is nothing to
        forget); returns the model and the optimizer steps it took."""
        s = self.session
        plain = FineTuner(s, self.pristine, None, mitigations=False)
        trained, outcomes, _ = plain.fine_tune(main_seed(s.recipe), progress=quiet(), model=scratch_copy(s.bundle).to(s.device),
                                               method="full", max_steps=max_steps)
        return trained, sum(o.steps for o in outcomes)

    # ------------------------------------------------------------------ stages

    def _loop_config(self, stage: str, epochs: int, lr: float, n_train: int, batch_size: int, group) -> LoopConfig:
        s = self.session
        t = s.recipe.train
        per_epoch = math.ceil(n_train / batch_size / t.grad_accumulation)
        eval_every = t.eval_every if stage == "model" else max(1, per_epoch)
        return LoopConfig(stage=stage, epochs=epochs, lr=lr, weight_decay=t.weight_decay, warmup_ratio=t.warmup_ratio,
                          grad_clip=t.grad_clip, grad_accumulation=t.grad_accumulation, eval_every=eval_every,
                          patience=t.patience, precision=s.precision, primary=s.task.primary, tie_break=s.task.tie_break,
                          device=s.device, group=group,
                          # checkpointing and FSDP are memory chosen over speed: freed buffers go back at once
                          memory_first=t.gradient_checkpointing is True or (group is not None and group.engine == "fsdp"),
                          own_mapping_from=LANGUAGE_MODEL_OWN_MAPPING_FROM if s.bundle.family == "causal-lm" else None,
                          max_steps=t.max_steps if stage == "model" else None)

    def _train_model(self, bundle, model, train_split, train_eval, seed, checkpointer, progress, on_eval, group, hooks,
                     stage: str = "model", lr: float | None = None, max_steps: int | None = None) -> Outcome:
        s = self.session
        t, task = s.recipe.train, s.task
        val = s.encoded["validation"]

        def evaluate(m):
            out = {}
            for prefix, split in (("val", val), ("train", train_eval)):
                outputs = task.predict(m, split, bundle.pad_id, s.eval_batch_size, s.precision, s.device)
                out.update({f"{prefix}_{k}": v for k, v in task.metrics(outputs, split).items()})
            out.pop("train_loss", None)  # the running training loss is the meaningful one
            return out

        batches = task.batches(train_split, s.recipe, seed, bundle.pad_id)
        regulariser = self._l2sp(model, bundle) if self.mitigations and s.recipe.l2sp else None
        loss_fn = task.loss
        if self.mitigations and s.recipe.replay is not None:
            loss_fn = self._with_replay(bundle, seed)
        cfg = self._loop_config(stage, t.epochs, t.lr if lr is None else lr, len(train_split), t.batch_size, group)
        if max_steps is not None:
            cfg.max_steps = max_steps if cfg.max_steps is None else min(cfg.max_steps, max_steps)
        return train(model, batches, loss_fn, evaluate, cfg, checkpointer, progress, regulariser, on_eval, hooks=hooks)

    def _train_head(self, bundle, train_set: FeatureSplit, eval_pool, seed, checkpointer, progress, on_eval, probe_head,
                    group, hooks) -> Outcome:
        """Train only the final linear layer on cached backbone features: epochs cost almost nothing.

        The head trains on standardised features (so one learning rate suits every backbone's
        feature scale) and the standardisation is then folded into the head's weights, so the
        exported model needs no extra layer. With `probe_head` (the linear probe's logistic
        regression, fitted to convergence) training starts from whichever of it and the model's own
        head scores better on validation: a new head starts where the probe ended (as in LP-FT),
        a source model's head that already fits the task keeps its head start.
        """
        s = self.session
        t, task, spec = s.recipe.train, s.task, s.task.cached_head
        dev = s.device
        head = bundle.model.get_submodule(bundle.head_name)
        train_x, train_y = train_set.features, train_set.labels
        mean = train_x.mean(0)
        std = train_x.std(0).clamp(min=1e-6) if len(train_x) > 1 else torch.ones_like(mean)
        scale = lambda x: (x - mean) / std  # noqa: E731
        work = torch.nn.Linear(head.in_features, head.out_features, bias=True).to(dev)
        with torch.no_grad():  # the same function as the current head, on standardised inputs
            work.weight.copy_(head.weight * std.to(dev))
            bias = head.bias if head.bias is not None else torch.zeros(head.out_features, device=dev)
            work.bias.copy_(bias + head.weight @ mean.to(dev))
        val_scaled, val_y = scale(s.features["validation"]), s.encoded["validation"].labels
        if spec.target_scale is not None:  # the head predicts the standardised target; the model rescales it
            mu, sd = spec.target_scale(bundle)
            train_y, val_y = (train_y - mu) / sd, (val_y - mu) / sd
        eval_x, eval_y = scale(train_x[eval_pool]), train_y[eval_pool]
        squeeze = spec.target_scale is not None

        @torch.no_grad()
        def evaluate(h):
            out = {}
            for prefix, x, yy in (("val", val_scaled, val_y), ("train", eval_x, eval_y)):
                outputs = h(x.to(dev)).float().cpu()
                if squeeze:
                    outputs = outputs.squeeze(-1)
                out.update({f"{prefix}_{k}": v for k, v in task.metrics(outputs, FeatureSplit(x, yy)).items()})
            out.pop("train_loss", None)
            return out

        if probe_head is not None and probe_head["weight"].shape == work.weight.shape:
            own = evaluate(work)[f"val_{task.primary}"]
            kept = {k: v.detach().clone() for k, v in work.state_dict().items()}
            with torch.no_grad():  # the probe's standardisation (population std) in this head's (sample std)
                work.weight.copy_((probe_head["weight"] * (std / probe_head["scale"])).to(dev))
                work.bias.copy_((probe_head["bias"] + probe_head["weight"] @ ((mean - probe_head["mean"]) / probe_head["scale"])).to(dev))
            if evaluate(work)[f"val_{task.primary}"] < own:
                work.load_state_dict(kept)
        batch_size = max(t.batch_size, 64)
        batches = Batches(size=len(train_y), plan=shuffled_plan(len(train_y), batch_size, seed),
                          # standardised batch by batch: a standardised copy of every training row would double the features' memory
                          collate=lambda idx: {"features": scale(train_x[idx]), "labels": train_y[idx]})
        cfg = self._loop_config("head", t.head_epochs, t.head_lr, len(train_y), batch_size, group)
        cfg.precision = "fp32"
        cfg.patience = max(t.patience or 10, 10)
        cfg.checkpoint_evaluations = False  # a head stage takes seconds; redoing it is cheaper than saving it
        with one_thread():
            outcome = train(work, batches, spec.loss, evaluate, cfg, checkpointer, progress, None, on_eval, hooks=hooks)
        with torch.no_grad():
            folded = work.weight / std.to(dev)
            head.weight.copy_(folded)
            if head.bias is not None:
                head.bias.copy_(work.bias - folded @ mean.to(dev))
        return outcome

    # ------------------------------------------------------------------ mitigations

    def _l2sp(self, model, bundle):
        """L2-SP (Li et al. 2018): α/2‖w − w⁰‖² on pre-trained weights + β/2‖w_head‖² on the new head."""
        recipe = self.session.recipe
        alpha, beta = recipe.l2sp.alpha, recipe.l2sp.beta
        head_module = model.get_submodule(bundle.head_name) if bundle.head_name in dict(model.named_modules()) else bundle.head()
        head_params = {id(p) for p in head_module.parameters()}
        anchors = [(p, p.detach().clone()) for p in model.parameters() if p.requires_grad and id(p) not in head_params]
        head = [p for p in head_module.parameters() if p.requires_grad]

        def penalty(m):
            total = sum(((p - p0) ** 2).sum() for p, p0 in anchors) * (alpha / 2)
            if beta:
                total = total + sum((p**2).sum() for p in head) * (beta / 2)
            return total

        return penalty

    def _with_replay(self, bundle, seed: int):
        """Mix reference batches, scored by the original head, into every step (experience replay).

        The replay rows for a step are drawn from a generator seeded by the step's own batch, so a
        resumed run replays exactly what the uninterrupted run would have.
        """
        s = self.session
        ref, spec, task = s.reference, s.recipe.replay, s.task
        original = s.original_head.to(s.device)
        per_step = max(1, round(spec.fraction * s.recipe.train.batch_size))

        def loss_fn(model, batch):
            base = task.loss(model, batch)
            key = next(batch[k] for k in ("input_ids", "pixel_values", "x") if k in batch)  # text, image, tabular
            g = torch.Generator().manual_seed(seed * 7919 + int(key.double().sum() * 1000) % (2**31))
            idx = torch.randint(len(ref.encoded), (per_step,), generator=g)
            replay_batch = {k: v.to(s.device) for k, v in task.collate(ref.encoded, idx, bundle.pad_id).items() if k != "labels"}
            with head_inputs(model, bundle.head_name) as captured:
                logits_of(model, replay_batch)
            replay = F.cross_entropy(original(captured[-1]).float(), ref.labels[idx].to(s.device))
            return base + spec.weight * replay

        return loss_fn


@contextmanager
def one_thread():
    """One intra-op thread for the head stage: its matmuls (a batch × features × classes) are too small to
    split, and on a busy machine a second OpenMP thread waits at every barrier (measured under load 17 on 2
    cores, a 256-feature head step: 170 ms with 2 threads, 9.6 ms with 1). Always one, so the sums are the
    same on any machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def needs_pristine_again(recipe) -> bool:
    """After the main fine-tune, the pre-trained weights are read again only by extra seeds, the
    learning curve, WiSE-FT interpolation and the forgetting guard on a reference set."""
    return bool(recipe.interpolate or (recipe.train.seeds and len(recipe.train.seeds) > 1)
                or recipe.guards.data_curve or recipe.reference is not None)
