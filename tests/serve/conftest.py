"""Fixtures for the server tests: one finished run per module (tiny BERT, method head) and a
real `python -m honed serve` process on a free loopback port, always stopped at teardown."""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from helpers import make_texts, write_recipe

HOST = "127.0.0.1"
TOKEN = "test-token-5f2b9c"
STARTUP_SECONDS = 90


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind((HOST, 0))
        return sock.getsockname()[1]


@dataclass
class ServerProcess:
    proc: subprocess.Popen
    url: str
    log: Path
    token: str | None

    def output(self) -> str:
        return self.log.read_text(errors="replace") if self.log.exists() else ""

    def client(self, auth: bool = True, headers: dict | None = None, **kwargs) -> httpx.Client:
        sent = {"Authorization": f"Bearer {self.token}"} if auth and self.token else {}
        sent.update(headers or {})
        # trust_env=False: no proxy from the environment; only 127.0.0.1 is ever contacted
        return httpx.Client(base_url=self.url, headers=sent, trust_env=False, timeout=30.0, **kwargs)


def stop(proc: subprocess.Popen) -> None:
    if proc.poll() is None:
        proc.send_signal(signal.SIGTERM)
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(timeout=10)


@contextlib.contextmanager
def running_server(run_dir: Path, log: Path, token: str | None = None, args: tuple[str, ...] = ()):
    """`python -m honed serve RUN_DIR --port P` until /health answers; killed on exit whatever happens."""
    env = dict(os.environ, TOKENIZERS_PARALLELISM="false", HF_HUB_OFFLINE="1", PYTHONUNBUFFERED="1")
    env.pop("HONED_TOKEN", None)
    if token is not None:
        env["HONED_TOKEN"] = token
    port = free_port()
    with open(log, "wb") as sink:
        proc = subprocess.Popen([sys.executable, "-m", "honed", "serve", str(run_dir), "--host", HOST, "--port", str(port), *args],
                                stdout=sink, stderr=subprocess.STDOUT, env=env)
    server = ServerProcess(proc, f"http://{HOST}:{port}", log, token)
    try:
        deadline = time.monotonic() + STARTUP_SECONDS
        with httpx.Client(trust_env=False, timeout=2.0) as probe:
            while True:
                if proc.poll() is not None:
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{server.output()[-3000:]}")
                try:
                    if probe.get(f"{server.url}/health").status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not answer /health within {STARTUP_SECONDS} s:\n{server.output()[-3000:]}")
                time.sleep(0.1)
        yield server
    finally:
        stop(proc)


@pytest.fixture(scope="module")
def served_run(tmp_path_factory, tiny_bert) -> Path:
    """A finished text-classification run: the tiny BERT, head-only, a few seconds on CPU."""
    import honed

    folder = tmp_path_factory.mktemp("serve-run")
    train = folder / "train.csv"
    make_texts(240, seed=1).to_csv(train, index=False)
    recipe = write_recipe(folder, tiny_bert, train, method="head",
                          **{"train.epochs": 1, "train.head_epochs": 20, "guards.baseline": False})
    return honed.run(str(recipe), show_progress=False).run_dir


@pytest.fixture(scope="module")
def server(served_run, tmp_path_factory):
    with running_server(served_run, tmp_path_factory.mktemp("serve-log") / "server.log", token=TOKEN) as proc:
        yield proc


@pytest.fixture(scope="module")
def start_server():
    """The running_server context manager, for test modules that build their own run."""
    return running_server
