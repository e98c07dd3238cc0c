"""The best weights: held on disk in the checkpoints (hard-linked forward) when the loop checkpoints
every evaluation, in memory otherwise; either way the model ends holding the best evaluation's weights."""

from __future__ import annotations

import torch
from torch import nn

from honed.train.checkpoint import Checkpointer
from honed.train.loop import Batches, LoopConfig, train

SCRIPTED = [0.1, 0.5, 0.3, 0.2, 0.4]  # validation metric per evaluation: the second is the best


def run(checkpointer, batch_norm: bool = False):
    torch.manual_seed(0)
    model = nn.Sequential(nn.BatchNorm1d(4), nn.Linear(4, 2)) if batch_norm else nn.Linear(4, 2)
    x, y = torch.randn(40, 4), torch.randint(0, 2, (40,))
    batches = Batches(size=40, plan=lambda epoch: [list(range(i, i + 8)) for i in range(0, 40, 8)],
                      collate=lambda idx: {"x": x[idx], "labels": y[idx]})
    seen = []

    def evaluate(m):
        seen.append({k: v.detach().clone() for k, v in m.state_dict().items()})
        return {"val_accuracy": SCRIPTED[len(seen) - 1]}

    cfg = LoopConfig(stage="model", epochs=1, lr=0.1, eval_every=1, patience=None, warmup_ratio=0.0)
    outcome = train(model, batches, lambda m, b: nn.functional.cross_entropy(m(b["x"]), b["labels"]), evaluate, cfg, checkpointer)
    return model, outcome, seen


def test_best_weights_from_disk_equal_the_in_memory_ones(tmp_path):
    on_disk, outcome, seen = run(Checkpointer(tmp_path / "checkpoints"))
    in_memory, _, _ = run(None)
    assert outcome.best_step == 2
    for name, value in on_disk.state_dict().items():
        assert torch.equal(value, seen[1][name]), name  # the second evaluation's weights
        assert torch.equal(value, in_memory.state_dict()[name])
    # the last checkpoint carries the best weights as a file of its own; earlier folders are swept
    folders = [p for p in (tmp_path / "checkpoints").iterdir() if p.is_dir()]
    assert len(folders) == 1 and (folders[0] / "best.safetensors").exists()


def test_batch_norm_statistics_come_from_the_best_step_too(tmp_path):
    """The best weights were evaluated with that step's running statistics: both are what the model ends with."""
    for checkpointer in (Checkpointer(tmp_path / "checkpoints"), None):
        model, outcome, seen = run(checkpointer, batch_norm=True)
        assert outcome.best_step == 2
        assert not torch.equal(seen[1]["0.running_mean"], seen[-1]["0.running_mean"]), "the statistics moved after the best step"
        for name, value in model.state_dict().items():
            assert torch.equal(value, seen[1][name]), name
