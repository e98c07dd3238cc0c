"""keep_freed_memory: freed CPU tensors stay in the heap while a loop trains, and go back after."""

import pytest
import torch

from honed.train import allocator

pytestmark = pytest.mark.skipif(allocator._glibc() is None, reason="glibc's malloc only")
MB = 2**20


def _rss_mb() -> float:
    with open("/proc/self/statm") as fh:
        return int(fh.read().split()[1]) * 4096 / MB


def _touch_and_free(size_mb: int) -> float:
    """Resident memory after a `size_mb` tensor was written and freed, relative to before."""
    before = _rss_mb()
    block = torch.empty(size_mb * MB, dtype=torch.uint8)
    block.fill_(1)
    del block
    return _rss_mb() - before


def test_freed_blocks_kept_inside_and_returned_after():
    allocator.release_free_memory()  # earlier tests' free heap pages: reusing them must show as growth
    with allocator.keep_freed_memory(torch.device("cpu")):
        start = _rss_mb()
        assert _touch_and_free(96) > 80  # kept in the heap for the next step
        # ... and reused by the next, shorter batches' buffers, not faulted in again beside it
        assert max(_touch_and_free(size) for size in (80, 64, 48, 32)) < 16
        held = _rss_mb() - start
    assert held > 80
    released = _rss_mb() - start
    assert released < held - 80  # handed back when the block ended


def test_not_on_gpus():
    calls = []

    class Spy:
        def mallopt(self, *a):
            calls.append(a)

        def malloc_trim(self, *a):
            calls.append(a)

    real = allocator._glibc
    allocator._glibc = lambda: Spy()
    try:
        with allocator.keep_freed_memory(torch.device("cuda")):
            pass
    finally:
        allocator._glibc = real
    assert calls == []


def test_optimizer_state_allocated_up_front_changes_nothing():
    """make_optimizer's early state (a step at lr 0 on zero gradients) leaves training bit-for-bit as it was."""
    from honed.train.loop import LoopConfig, make_optimizer

    def trained(early: bool) -> list[torch.Tensor]:
        torch.manual_seed(0)
        model = torch.nn.Sequential(torch.nn.Linear(8, 16), torch.nn.LayerNorm(16), torch.nn.Linear(16, 3))
        if early:
            opt = make_optimizer(model, LoopConfig(stage="t", epochs=1, lr=1e-2))
            assert all(s["exp_avg"].abs().sum() == 0 and float(s["step"]) == 0 for s in opt.state.values())
        else:
            decay = [p for p in model.parameters() if p.ndim >= 2]
            no_decay = [p for p in model.parameters() if p.ndim < 2]
            opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.01}, {"params": no_decay, "weight_decay": 0.0}],
                                    lr=1e-2, fused=True)
        for step in range(3):
            x = torch.randn(4, 8, generator=torch.Generator().manual_seed(step))
            model(x).square().mean().backward()
            opt.step()
            opt.zero_grad(set_to_none=True)
        return [p.detach().clone() for p in model.parameters()]

    for a, b in zip(trained(True), trained(False)):
        assert torch.equal(a, b)




PIN_SCRIPT = """
import sys, torch
from honed.train import allocator
MB = 2**20
def rss():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / MB
def freed_under_a_pin(size_mb):
    # a freed buffer under a live one (as a checkpointed backward's are): heap memory cannot shrink there
    before = rss()
    block = torch.empty(size_mb * MB, dtype=torch.uint8)
    block.fill_(1)
    pin = torch.ones(MB // 4, dtype=torch.uint8)
    del block
    grown = rss() - before
    del pin
    return grown
torch.ones(24 * MB, dtype=torch.uint8)  # freed at once: glibc raises its dynamic mmap threshold to 24 MB
if sys.argv[1] == "return":
    allocator.return_freed_memory(torch.device("cpu"))
if sys.argv[1] in ("keep", "keep-small"):
    own = 4 * MB if sys.argv[1] == "keep-small" else None
    with allocator.keep_freed_memory(torch.device("cpu"), own_mapping_from=own):
        print(freed_under_a_pin(20), freed_under_a_pin(2))
elif sys.argv[1] == "loading":
    with allocator.mapped_while_loading():
        inside = freed_under_a_pin(20)
    print(inside, freed_under_a_pin(20))
else:
    print(freed_under_a_pin(20))
"""


def grown(mode: str) -> list[float]:
    """PIN_SCRIPT's RSS growths in a fresh process (the heap's state is the process's)."""
    import subprocess
    import sys

    out = subprocess.run([sys.executable, "-c", PIN_SCRIPT, mode], capture_output=True, text=True, check=True).stdout
    return [float(x) for x in out.split()]


def test_return_freed_memory_gives_freed_blocks_back_at_once():
    """Gradient checkpointing's mode, in a fresh process (the heap's state is the process's): a freed
    20 MB buffer under a live one leaves RSS at once; with glibc's dynamic threshold it stays."""
    assert grown("dynamic")[0] > 16
    assert grown("return")[0] < 8


def test_language_model_steps_keep_only_the_small_blocks():
    """own_mapping_from: a freed block above it leaves RSS at once (its own mapping), one below it stays in
    the heap for the next step; keeping everything keeps the large one too (and the small one reuses its hole)."""
    large, small = grown("keep-small")
    assert large < 8 and small > 1.5
    large, small = grown("keep")
    assert large > 16 and small < 1


def test_a_quantised_load_leaves_no_holes_in_the_heap():
    """mapped_while_loading (models/quantise.py's quantised load): a 20 MB buffer freed under a live one leaves
    RSS at once inside the block; after it the threshold is glibc's settled 32 MB again, so the next one stays."""
    inside, after = grown("loading")
    assert inside < 8 and after > 16
