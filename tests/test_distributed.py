"""Two DDP processes (gloo, CPU) under torchrun and accelerate launch: the same result as one process
with the same global batch, and a killed distributed run resumes to the uninterrupted result.
(FSDP2: tests/test_fsdp.py.)"""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from helpers import build_tiny_bert, make_texts, write_recipe
from reliability.harness import final_state

pytestmark = pytest.mark.slow  # torchrun with 2 processes in every test

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "PYTHONUNBUFFERED": "1", "OMP_NUM_THREADS": "1"}
# Stated tolerance: DDP's all-reduce sums the gradient halves in another order than one process
# sums the whole batch; in fp32 without dropout that moves weights by float rounding only.
WEIGHT_TOLERANCE = 1e-3
LOSS_TOLERANCE = 1e-4


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def torchrun(*args, env=None) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), "-m", "honed", *map(str, args)]
    return subprocess.Popen(cmd, env=env or ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def accelerate_launch(*args) -> subprocess.Popen:
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--multi_gpu", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", str(free_port()), "-m", "honed", *map(str, args)]
    return subprocess.Popen(cmd, env=ENV, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)


def kill_job(proc: subprocess.Popen) -> None:
    """SIGKILL the launcher and every worker at once, as a machine failure would. (torchrun starts each
    worker in a session of its own, so killing the launcher's process group would leave them running.)"""
    import psutil

    workers = psutil.Process(proc.pid).children(recursive=True)
    for p in [*workers, psutil.Process(proc.pid)]:
        try:
            p.kill()
        except psutil.NoSuchProcess:
            pass
    proc.wait(30)
    psutil.wait_procs(workers, timeout=30)
    assert not any(w.is_running() and w.status() != psutil.STATUS_ZOMBIE for w in workers), "a worker survived the kill"


def kill_after_first_checkpoint(proc: subprocess.Popen, run_dir: Path) -> None:
    """Wait for the run's first committed checkpoint, then SIGKILL every process of the job."""
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "model.LATEST").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    kill_job(proc)
    assert not (run_dir / "metrics.json").exists(), "the kill must land before training finished"


def single(*args, env=None) -> subprocess.Popen:
    return subprocess.Popen([sys.executable, "-m", "honed", *map(str, args)], env=env or ENV, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)


def finish(proc: subprocess.Popen, timeout: float = 300) -> str:
    out, err = proc.communicate(timeout=timeout)
    assert proc.returncode == 0, err[-3000:]
    return out


@pytest.fixture(scope="module")
def setup_dir(tmp_path_factory) -> Path:
    folder = tmp_path_factory.mktemp("distributed")
    bert = build_tiny_bert(folder / "bert")
    config = json.loads((bert / "config.json").read_text())
    # no dropout: each process draws its own masks, which one process would draw differently
    config.update(hidden_dropout_prob=0.0, attention_probs_dropout_prob=0.0)
    (bert / "config.json").write_text(json.dumps(config))
    make_texts(240, seed=1).to_csv(folder / "train.csv", index=False)
    write_recipe(folder, bert, folder / "train.csv", **{"train.epochs": 4, "train.eval_every": 4, "train.threads": 1,
                                                        "guards.baseline": False})
    return folder


@pytest.fixture(scope="module")
def one_process(setup_dir) -> Path:
    out = setup_dir / "single"
    finish(single("run", setup_dir / "recipe.yaml", "--out", out))
    return out


@pytest.fixture(scope="module")
def two_processes(setup_dir) -> Path:
    out = setup_dir / "torchrun"
    stdout = finish(torchrun("run", setup_dir / "recipe.yaml", "--out", out))
    assert stdout.count("honed verdict") == 1, "only rank 0 prints the verdict"
    return out


def test_two_processes_match_one_process_with_the_same_global_batch(one_process, two_processes):
    m1, w1 = final_state(one_process)
    m2, w2 = final_state(two_processes)
    assert m1["run"]["steps"] == m2["run"]["steps"]
    assert m1["guards"]["overfitting"]["details"]["best_step"] == m2["guards"]["overfitting"]["details"]["best_step"]
    assert m1["test"]["accuracy"] == m2["test"]["accuracy"]
    assert abs(m1["validation"]["loss"] - m2["validation"]["loss"]) < LOSS_TOLERANCE
    assert abs(m1["test"]["loss"] - m2["test"]["loss"]) < LOSS_TOLERANCE
    assert max(float((w1[k] - w2[k]).abs().max()) for k in w1) < WEIGHT_TOLERANCE
    # the loss logged in history is the global batch's, not one process's half
    h1 = [json.loads(x) for x in (one_process / "history.jsonl").read_text().splitlines()]
    h2 = [json.loads(x) for x in (two_processes / "history.jsonl").read_text().splitlines()]
    assert [h["step"] for h in h1] == [h["step"] for h in h2]
    assert all(abs(a["train_loss"] - b["train_loss"]) < 1e-3 for a, b in zip(h1, h2))
    # one writer: no files from a second process, a single checkpoint series
    assert sorted(p.name for p in two_processes.iterdir()) == sorted(p.name for p in one_process.iterdir())


def test_accelerate_launch_gives_the_torchrun_result(setup_dir, two_processes):
    out = setup_dir / "accelerate"
    finish(accelerate_launch("run", setup_dir / "recipe.yaml", "--out", out))
    (_, w_torchrun), (_, w_accelerate) = final_state(two_processes), final_state(out)
    assert all(torch.equal(w_torchrun[k], w_accelerate[k]) for k in w_torchrun)


def test_killed_distributed_run_resumes_to_the_uninterrupted_result(setup_dir, two_processes):
    run_dir = setup_dir / "killed"
    # rank 0 sleeps after each checkpoint commit: a window for the kill, mid-training
    proc = torchrun("run", setup_dir / "recipe.yaml", "--out", run_dir,
                    env={**ENV, "HONED_FAULT": "checkpoint-commit:sleep=1"})
    kill_after_first_checkpoint(proc, run_dir)
    finish(torchrun("run", setup_dir / "recipe.yaml", "--out", run_dir, "--resume"))
    (m_ref, w_ref), (m_res, w_res) = final_state(two_processes), final_state(run_dir)
    assert m_ref["validation"] == m_res["validation"] and m_ref["test"] == m_res["test"]
    assert all(torch.equal(w_ref[k], w_res[k]) for k in w_ref)


def test_sigterm_stops_every_process_at_the_same_step_and_resume_finishes(setup_dir):
    run_dir = setup_dir / "terminated"
    proc = torchrun("run", setup_dir / "recipe.yaml", "--out", run_dir, env={**ENV, "HONED_FAULT": "checkpoint-commit:sleep=1"})
    deadline = time.time() + 240
    while not (run_dir / "checkpoints" / "model.LATEST").exists():
        assert proc.poll() is None, proc.stderr.read()[-3000:]
        assert time.time() < deadline, "no checkpoint appeared"
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGTERM)  # what a scheduler's preemption sends to the whole job
    _, err = proc.communicate(timeout=120)
    assert proc.returncode != 0
    assert err.count("Resume with: torchrun") == 1, err[-3000:]
    assert not (run_dir / "metrics.json").exists()
    finish(torchrun("run", setup_dir / "recipe.yaml", "--out", run_dir, "--resume"))
    assert json.loads((run_dir / "metrics.json").read_text())["test"]["accuracy"] > 0.9


def test_deepspeed_accelerate_configs_are_refused_naming_fsdp(setup_dir):
    proc = subprocess.run([sys.executable, "-m", "honed", "run", setup_dir / "recipe.yaml", "--out", setup_dir / "deepspeed"],
                          env={**ENV, "ACCELERATE_USE_DEEPSPEED": "true", "WORLD_SIZE": "2"}, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    assert "DeepSpeed" in proc.stderr and "train.distributed: fsdp" in proc.stderr and "Traceback" not in proc.stderr
    assert len(proc.stderr.strip().splitlines()) == 1
    assert not (setup_dir / "deepspeed").exists()
