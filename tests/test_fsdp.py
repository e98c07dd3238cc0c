"""FSDP2 over two gloo processes on CPU, chat fine-tuning of a tiny Llama: the same result as one
process with the same global batch, each process holding half of the parameters and optimizer
state, a SIGKILL'd run resumed to the uninterrupted result, resumes at another world size, and
the one-line refusals (FSDP in one process, an FSDP checkpoint resumed with another model)."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from chat_helpers import PROBLEMS, PRODUCTS, build_tiny_llama, build_tokenizer, write_chat_recipe
from reliability.harness import final_state
from test_distributed import ENV, finish, kill_after_first_checkpoint, single, torchrun

pytestmark = pytest.mark.slow  # torchrun with 2 processes in most tests

# FSDP is asked for the way an Accelerate config does; the recipe keeps `train.distributed: auto`,
# so the same run directory can be resumed in one process (where fsdp/ddp are refused)
FSDP_ENV = {**ENV, "ACCELERATE_USE_FSDP": "true"}
# Stated tolerance: the reduce-scatter sums the two halves of each gradient in another order than
# one process sums the whole batch; in fp32 without dropout that is float rounding, ~1e-6 after
# these steps; 1e-4 leaves room for the other machines' BLAS kernels
WEIGHT_TOLERANCE = 1e-4
LOSS_TOLERANCE = 1e-4
REPLY = "Restart it and install the latest update from the settings page."


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("fsdp")
    llama = build_tiny_llama(folder / "llama")
    config = json.loads((llama / "config.json").read_text())
    config.update(attention_dropout=0.0)  # each process would draw its own masks
    (llama / "config.json").write_text(json.dumps(config))
    write_support_chats(folder / "train.jsonl", 80)
    # unpacked: packing the rows of each process's share would seat conversations side by side differently
    write_chat_recipe(folder, llama, folder / "train.jsonl", **{"method": "full", "train.epochs": 2, "train.eval_every": 3,
                                                                 "train.threads": 1, "train.lr": 2e-3, "data.packing": False})
    return folder


def write_support_chats(path: Path, n: int) -> Path:
    """Conversations whose assistant turns are one reply: every row scores the same number of tokens, so
    the chat loss (a mean over assistant tokens) weighs the rows of each process's share as one process does."""
    import random

    rng = random.Random(3)
    rows = []
    for _ in range(n):
        user = f"My {rng.choice(PRODUCTS)} {rng.choice(list(PROBLEMS))}."
        system = [{"role": "system", "content": "You are the support assistant of an electronics shop."}] if rng.random() < 0.5 else []
        rows.append({"messages": [*system, {"role": "user", "content": user}, {"role": "assistant", "content": REPLY}]})
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def run_once(setup_dir: Path, name: str, *extra) -> Path:
    out = setup_dir / name
    finish(single("run", setup_dir / "recipe.yaml", "--out", out, *extra))
    return out


@pytest.fixture(scope="module")
def one_process(setup_dir) -> Path:
    return run_once(setup_dir, "single")


@pytest.fixture(scope="module")
def two_processes(setup_dir) -> Path:
    out = setup_dir / "fsdp"
    stdout = finish(torchrun("run", setup_dir / "recipe.yaml", "--out", out, env=FSDP_ENV))
    assert stdout.count("honed verdict") == 1, "only rank 0 prints the verdict"
    return out


def close(a: Path, b: Path) -> None:
    """Two runs' results within the stated tolerances."""
    (m1, w1), (m2, w2) = final_state(a), final_state(b)
    assert m1["run"]["steps"] == m2["run"]["steps"]
    assert m1["guards"]["overfitting"]["details"]["best_step"] == m2["guards"]["overfitting"]["details"]["best_step"]
    assert abs(m1["validation"]["loss"] - m2["validation"]["loss"]) < LOSS_TOLERANCE
    assert abs(m1["test"]["loss"] - m2["test"]["loss"]) < LOSS_TOLERANCE
    assert w1.keys() == w2.keys()
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < WEIGHT_TOLERANCE


def moved(run_dir: Path, to: Path) -> Path:
    """A copy of a run directory at another path (its recipe's `out` follows), to resume it twice."""
    shutil.copytree(run_dir, to)
    recipe = to / "recipe.yaml"
    recipe.write_text(recipe.read_text().replace(str(run_dir), str(to)))
    return to


def test_two_fsdp_processes_match_one_process_and_hold_half_each(one_process, two_processes):
    close(one_process, two_processes)
    h1 = [json.loads(x) for x in (one_process / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (two_processes / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in h1] == [h["step"] for h in h2]
    assert all(abs(a["train_loss"] - b["train_loss"]) < 1e-3 for a, b in zip(h1, h2))
    # the model/ export is a full save_pretrained on rank 0: it loads on its own and gives the same logits
    from transformers import AutoModelForCausalLM

    ids = torch.tensor([build_tokenizer()("My router is very slow.")["input_ids"]])
    with torch.no_grad():
        l1 = AutoModelForCausalLM.from_pretrained(one_process / "model").eval()(input_ids=ids).logits
        l2 = AutoModelForCausalLM.from_pretrained(two_processes / "model").eval()(input_ids=ids).logits
    assert float((l1 - l2).abs().max()) < 1e-3

    shards = json.loads((two_processes / "metrics.json").read_text())["run"]["shards"]
    assert shards["engine"] == "fsdp" and shards["world"] == 2 and shards["blocks"] == 2
    ranks = shards["ranks"]
    assert sum(r["params"] for r in ranks) == shards["params"]  # the shards partition the model
    assert sum(r["optimizer_state"] for r in ranks) == 2 * shards["trainable"]  # AdamW: two moments per weight
    for r in ranks:  # about half each (dim-0 chunks of odd-sized tensors differ by a row)
        assert abs(r["params"] / shards["params"] - 0.5) < 0.02
        assert abs(r["optimizer_state"] / (2 * shards["trainable"]) - 0.5) < 0.02
    assert "shards" not in json.loads((one_process / "metrics.json").read_text())["run"]
    # one writer: the same files as one process's run
    assert sorted(p.name for p in two_processes.iterdir()) == sorted(p.name for p in one_process.iterdir())


@pytest.mark.slow
def test_killed_fsdp_run_resumes_to_the_uninterrupted_result_and_in_one_process(setup_dir, one_process, two_processes):
    run_dir = setup_dir / "killed"
    proc = torchrun("run", setup_dir / "recipe.yaml", "--out", run_dir,
                    env={**FSDP_ENV, "HONED_FAULT": "checkpoint-commit:sleep=1"})
    kill_after_first_checkpoint(proc, run_dir)
    latest = json.loads((run_dir / "checkpoints" / "model.LATEST").read_text())["name"]
    shards = sorted(p.name for p in (run_dir / "checkpoints" / latest / "sharded").iterdir())
    assert shards == [".metadata", "__0_0.distcp", "__1_0.distcp"], "each process writes its own shard"
    elsewhere = moved(run_dir, setup_dir / "killed-then-one-process")

    finish(torchrun("run", setup_dir / "recipe.yaml", "--out", run_dir, "--resume", env=FSDP_ENV))
    (m_ref, w_ref), (m_res, w_res) = final_state(two_processes), final_state(run_dir)
    assert m_ref["validation"] == m_res["validation"] and m_ref["test"] == m_res["test"]
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)

    # 2 -> 1: the sharded checkpoint loads into the unsharded model of one process (DCP reshards)
    finish(single("run", elsewhere / "recipe.yaml", "--out", elsewhere, "--resume"))
    close(one_process, elsewhere)


@pytest.mark.slow
def test_one_process_checkpoint_resumes_under_fsdp(setup_dir, one_process):
    run_dir = setup_dir / "one-then-two"
    proc = single("run", setup_dir / "recipe.yaml", "--out", run_dir, env={**ENV, "HONED_FAULT": "checkpoint-commit:sleep=1"})
    kill_after_first_checkpoint(proc, run_dir)
    # 1 -> 2: the plain checkpoint (weights, optimizer by position, best on disk) is sharded on load
    finish(torchrun("run", setup_dir / "recipe.yaml", "--out", run_dir, "--resume", env=FSDP_ENV))
    close(one_process, run_dir)
    assert json.loads((run_dir / "metrics.json").read_text())["run"]["shards"]["world"] == 2


@pytest.mark.slow
def test_fsdp_checkpoint_resumed_with_another_model_is_refused_before_training(setup_dir, tmp_path):
    from chat_helpers import build_tiny_llama as build
    from transformers import LlamaConfig, LlamaForCausalLM

    from helpers import save_seeded_checkpoint

    model = build(tmp_path / "llama")
    recipe = write_chat_recipe(tmp_path, model, setup_dir / "train.jsonl", **{"method": "full", "train.max_steps": 4,
                                                                             "train.eval_every": 2, "train.threads": 1})
    run_dir = tmp_path / "run"
    # a checkpoint at step 2, then a failing write at step 4: the run stops with its checkpoint on disk
    proc = torchrun("run", recipe, "--out", run_dir, env={**FSDP_ENV, "HONED_FAULT": "checkpoint-write:ENOSPC:after=1"})
    _, err = proc.communicate(timeout=300)
    assert proc.returncode != 0 and (run_dir / "checkpoints" / "model.LATEST").exists(), err[-3000:]
    # the same path now holds a model with another MLP width
    tokenizer = build_tokenizer()
    config = LlamaConfig.from_pretrained(model)
    config.intermediate_size = 48
    shutil.rmtree(model)
    save_seeded_checkpoint(LlamaForCausalLM, config, tokenizer, model)
    resumed = subprocess.run([sys.executable, "-m", "honed", "run", recipe, "--out", run_dir, "--resume"], env=ENV,
                             capture_output=True, text=True, timeout=300)
    assert resumed.returncode == 2, resumed.stderr[-3000:]
    lines = [x for x in resumed.stderr.splitlines() if x.startswith("error:")]
    assert len(lines) == 1 and "Traceback" not in resumed.stderr
    assert "another model" in lines[0] and "mlp.down_proj.weight is [32, 64] there, [32, 48] in this model" in lines[0]
    assert "--overwrite" in lines[0]
    assert not (run_dir / "metrics.json").exists()


@pytest.mark.parametrize("engine", ["fsdp", "ddp"])
def test_fsdp_or_ddp_in_one_process_is_refused_with_how_to_launch(setup_dir, engine):
    out = setup_dir / f"single-{engine}"
    proc = subprocess.run([sys.executable, "-m", "honed", "run", setup_dir / "recipe.yaml", "--out", out,
                           "-s", f"train.distributed={engine}"], env=ENV, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert f"train.distributed: {engine}" in proc.stderr and "torchrun --nproc_per_node" in proc.stderr
    assert "Traceback" not in proc.stderr and len(proc.stderr.strip().splitlines()) == 1
    assert not out.exists()
