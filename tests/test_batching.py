"""batch_plan: every sample once per epoch, deterministic, tight length groups, descending runs."""

import torch

from honed.data.batching import batch_plan


def _lengths(n: int, seed: int = 0) -> torch.Tensor:
    return torch.randint(8, 129, (n,), generator=torch.Generator().manual_seed(seed))


def test_every_sample_once_and_deterministic():
    lengths = _lengths(517)
    for grouped in (True, False):
        plan = batch_plan(lengths, 16, seed=3, epoch=1, group_by_length=grouped)
        flat = [i for b in plan for i in b]
        assert sorted(flat) == list(range(517))
        assert plan == batch_plan(lengths, 16, seed=3, epoch=1, group_by_length=grouped)
        assert plan != batch_plan(lengths, 16, seed=3, epoch=2, group_by_length=grouped)


def test_grouped_batches_pad_little():
    lengths = _lengths(512)
    real = int(lengths.sum())
    padded = lambda plan: sum(int(lengths[b].max()) * len(b) for b in plan)  # noqa: E731
    grouped = padded(batch_plan(lengths, 16, 0, 0, True))
    shuffled = padded(batch_plan(lengths, 16, 0, 0, False))
    assert grouped < 1.05 * real < shuffled


def test_descending_runs_longest_first():
    lengths = _lengths(2000, seed=1)
    plan = batch_plan(lengths, 16, seed=0, epoch=0, group_by_length=True)
    longest = [int(lengths[b].max()) for b in plan]
    assert longest[0] == int(lengths.max())  # an out-of-memory shows at the first step
    rises = [i for i in range(1, len(longest)) if longest[i] > longest[i - 1]]
    assert 3 <= len(rises) <= len(plan) // 4  # at least four runs, each played longest first
    starts = [0] + rises
    assert [longest[i] for i in starts] == sorted((longest[i] for i in starts), reverse=True)
    # the runs mix lengths: not one sorted epoch
    assert sorted(longest, reverse=True) != longest
