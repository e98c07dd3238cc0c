"""API tests of `honed ui` with Starlette's TestClient (httpx): every route, the token, the
limits, path safety, and that no error body shows a path or a traceback."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytest.importorskip("fastapi")
from fastapi.testclient import TestClient  # noqa: E402

from honed.serve.limits import Limits  # noqa: E402
from honed.ui.app import create_app  # noqa: E402
from honed.ui.runs import RunsRoot, UnknownRun, run_state  # noqa: E402

JSON = {"accept": "application/json"}


@pytest.fixture
def client(runs_root, ui_files):
    return TestClient(create_app(runs_root, ui_files))


def assert_clean(body: str, *roots: Path) -> None:
    """No absolute path of the test's folders and no traceback in what the server says."""
    assert "Traceback" not in body and 'File "' not in body
    for root in roots:
        assert str(root) not in body
        assert str(Path(root).resolve()) not in body


def metrics_of(root: Path, name: str) -> dict:
    return json.loads((root / name / "metrics.json").read_text())


# --------------------------------------------------------------------------- the runs table

def test_runs_table_lists_every_run_with_its_guards(client, runs_root):
    rows = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
    assert {"mlp-a", "mlp-b", "study-tune/trial-0000", "study-tune/trial-0001"} <= set(rows)
    for name in ("mlp-a", "mlp-b"):
        metrics = metrics_of(runs_root, name)
        row = rows[name]
        assert row["state"] == "finished" and row["task"] == "tabular-classification" and row["model"] == "mlp"
        assert row["method"] == metrics["run"]["method"] and row["metric"] == "accuracy"
        assert row["test"] == metrics["test"]["accuracy"]
        assert row["guards"] == {g: metrics["guards"][g]["status"] for g in row["guards"]}
        assert row["train_seconds"] == metrics["timing"]["train_seconds"]
    page = client.get("/")
    assert page.status_code == 200 and 'href="/runs/mlp-a"' in page.text and "/static/ui.js" in page.text
    assert 'data-status="ok"' in page.text and "✓" in page.text  # a badge says it in a symbol and a word


def test_states_come_from_the_run_directory(client, runs_root):
    interrupted = runs_root / "stopped"
    interrupted.mkdir()
    (interrupted / "recipe.yaml").write_text((runs_root / "mlp-a" / "recipe.yaml").read_text())
    (interrupted / "checkpoints").mkdir()
    (interrupted / "checkpoints" / "model.LATEST").write_text('{"name": "model-00000004-1"}')
    failed = runs_root / "broken"
    failed.mkdir()
    (failed / "run.log").write_text("launched: honed run\nerror: data.label: column 'x' not found in all.csv\n")
    sleeper = subprocess.Popen([sys.executable, "-c", "import time; time.sleep(60)", "honed-ui-test"])
    try:
        running = runs_root / "busy"
        running.mkdir()
        (running / "run.pid").write_text(f"{sleeper.pid}\n")
        (running / "run.log").write_text("launched: honed run\ntraining (model): 40 steps\n")
        rows = {r["name"]: r for r in client.get("/api/runs").json()["runs"]}
        assert rows["stopped"]["state"] == "interrupted"
        assert rows["broken"]["state"] == "failed" and rows["broken"]["phase"] == "failed"
        assert rows["busy"]["state"] == "running" and rows["busy"]["phase"] == "training (model)"
        # Stop sends SIGTERM to the pid in run.pid
        assert client.post("/runs/busy/stop", headers=JSON).json() == {"stopped": True}
        assert sleeper.wait(timeout=10) == -signal.SIGTERM
        assert run_state(running) == "failed"  # no checkpoint, no metrics: nothing to resume
        assert client.post("/runs/busy/stop", headers=JSON).json() == {"stopped": False}
    finally:
        sleeper.kill()
        sleeper.wait()


def test_a_pid_of_another_program_is_not_a_running_run(runs_root):
    run = runs_root / "mlp-a"
    other = subprocess.Popen(["sleep", "30"])  # alive, but not honed: a pid reused after the run ended
    try:
        (run / "run.pid").write_text(f"{other.pid}\n")
        assert run_state(run) == "finished"
    finally:
        other.kill()
        other.wait()
    (run / "run.pid").write_text(f"{other.pid}\n")  # gone (and reaped)
    assert run_state(run) == "finished"


# --------------------------------------------------------------------------- one run

def test_run_page_report_and_progress(client, runs_root):
    page = client.get("/runs/mlp-a")
    assert page.status_code == 200
    assert 'id="report-frame"' in page.text and 'data-events="/runs/mlp-a/events"' in page.text
    assert 'id="stop" disabled' in page.text and 'id="resume" disabled' in page.text
    report = client.get("/runs/mlp-a/report")
    assert report.status_code == 200 and '<section id="verdict">' in report.text and '<section id="training">' in report.text
    history = [json.loads(line) for line in (runs_root / "mlp-a" / "history.jsonl").read_text().splitlines()]
    progress = client.get("/api/runs/mlp-a").json()
    assert progress["state"] == "finished" and progress["records"] == history
    assert client.get("/api/runs/mlp-a", params={"start": 2}).json()["records"] == history[2:]


def test_events_stream_ends_with_the_state_of_a_finished_run(client):
    with client.stream("GET", "/runs/mlp-b/events") as stream:
        assert stream.headers["content-type"].startswith("text/event-stream")
        events = [json.loads(line[5:]) for line in stream.iter_lines() if line.startswith("data:")]
    assert len(events) == 1 and events[0]["state"] == "finished" and events[0]["evaluations"] > 0
    assert "<svg" in events[0]["charts"] and "Validation metric" in events[0]["charts"]


def test_resume_refuses_a_finished_run(client, runs_root):
    response = client.post("/runs/mlp-a/resume", headers=JSON)
    assert response.status_code == 409 and "finished" in response.json()["error"]["message"]
    assert_clean(response.text, runs_root)


# --------------------------------------------------------------------------- compare

def test_compare_shows_only_the_recipe_keys_that_differ(client):
    page = client.get("/compare", params=[("run", "mlp-a"), ("run", "mlp-b")])
    assert page.status_code == 200
    table = page.text.split('id="differences"')[1].split("</table>")[0]
    keys = {line.split("<code>")[1].split("</code>")[0] for line in table.split("<tr>") if "<code>" in line}
    assert keys == {"model.hidden", "train.lr"}
    assert page.text.count('<div class="verdict-card">') == 2 and "Validation curves" in page.text
    assert client.get("/compare").status_code == 200  # the picker alone


@pytest.mark.parametrize("names", [["mlp-a"], ["mlp-a"] * 3, ["mlp-a", "nope"], ["mlp-a", "mlp-b", "mlp-a/../mlp-b"]])
def test_compare_needs_two_to_six_existing_runs(client, names, runs_root):
    response = client.get("/compare", params=[("run", n) for n in names])
    assert response.status_code == 422
    assert_clean(response.text, runs_root)


# --------------------------------------------------------------------------- new run

def test_new_run_form_lists_files_and_columns(client):
    page = client.get("/new")
    assert page.status_code == 200 and "<option >all.csv</option>" in page.text.replace("<option>", "<option >")
    assert "recipe.yaml" in page.text
    assert client.get("/api/columns", params={"file": "all.csv"}).json()["columns"][:2] == ["mean_radius", "mean_texture"]
    assert client.get("/api/columns", params={"file": "../all.csv"}).status_code == 404


def test_check_is_honed_check_and_names_the_field(client, ui_files):
    form = {"source": "form", "task": "tabular-classification", "model": "mlp", "train": "all.csv",
            "features": "mean_radius,mean_texture", "label": "diagnosis"}
    answer = client.post("/api/check", json=form).json()
    assert answer["ok"] is False and answer["field"] == "data.label"
    assert answer["error"].startswith("data.label: column 'diagnosis' not found in all.csv")
    assert_clean(json.dumps(answer), ui_files)
    assert client.post("/api/check", json={**form, "label": "target"}).json()["ok"] is True
    recipe = client.post("/api/check", json={"source": "file", "recipe": "recipe.yaml", "overrides": "train.nope=1"}).json()
    assert recipe["ok"] is False and recipe["field"].startswith("train"), recipe
    assert client.post("/api/check", json={"source": "file", "recipe": "/etc/passwd"}).json()["field"] == "recipe"


def test_new_run_refuses_before_starting_anything(client, runs_root):
    base = {"source": "form", "task": "tabular-classification", "model": "mlp", "train": "all.csv",
            "features": "mean_radius", "label": "target"}
    for name, field in (("../escape", "name"), ("mlp-a", "name"), ("fresh", "data.label")):
        form = {**base, "name": name, **({"label": "nope"} if name == "fresh" else {})}
        response = client.post("/new", data=form)
        assert response.status_code == 422, name
        assert f'data-for="{field}" role="alert">{field}: ' in response.text, name
        assert_clean(response.text, runs_root)
    assert not (runs_root / "fresh").exists() and not (runs_root.parent / "escape").exists()


def test_new_run_from_a_recipe_file_starts_honed_run_and_stop_ends_it(client, runs_root):
    response = client.post("/new", data={"source": "file", "name": "from-file", "recipe": "recipe.yaml",
                                         "overrides": "train.epochs=2"}, follow_redirects=False)
    assert response.status_code == 303 and response.headers["location"] == "/runs/from-file"
    run = runs_root / "from-file"
    pid = int((run / "run.pid").read_text())
    try:
        assert (run / "run.log").read_text().startswith("launched: honed run")
        row = client.get("/api/runs/from-file").json()["row"]
        assert row["state"] == "running" and row["phase"].startswith("starting")
        assert client.post("/runs/from-file/resume", headers=JSON).status_code == 409  # not while it runs
        assert client.post("/runs/from-file/stop", headers=JSON).json() == {"stopped": True}
        deadline = time.time() + 60
        while client.get("/api/runs/from-file").json()["state"] == "running" and time.time() < deadline:
            time.sleep(0.2)
        assert client.get("/api/runs/from-file").json()["state"] in ("failed", "interrupted")
    finally:
        try:
            os.kill(pid, signal.SIGKILL)
        except ProcessLookupError:
            pass


# --------------------------------------------------------------------------- tune

def test_tune_study_marks_the_best_trial(client, runs_root):
    assert 'href="/tune/study-tune"' in client.get("/tune").text
    page = client.get("/tune/study-tune")
    summary = json.loads((runs_root / "study-tune" / "tune.json").read_text())
    assert page.status_code == 200 and page.text.count("<tr") == 1 + len(summary["trials"])
    best_row = page.text.split('class="best"')[1].split("</tr>")[0]
    assert f"<td>{summary['best']['number']} " in best_row and "best" in best_row
    assert client.get("/tune/mlp-a").status_code == 404


# --------------------------------------------------------------------------- path safety

@pytest.mark.parametrize("name", ["../outside", "..%2Foutside", "%2e%2e/outside", "mlp-a/../../outside", "mlp-a%2F..%2F..%2Foutside",
                                  "//etc", "/etc/passwd", "link", "mlp-a/model"])
def test_a_run_name_cannot_leave_the_runs_folder(client, runs_root, name):
    outside = runs_root.parent / "outside"
    outside.mkdir(exist_ok=True)
    (outside / "metrics.json").write_text(json.dumps({"task": "secret", "primary_metric": "accuracy", "test": {}}))
    (outside / "recipe.yaml").write_text("task: secret\n")
    if not (runs_root / "link").exists():
        (runs_root / "link").symlink_to(outside, target_is_directory=True)
    for path in (f"/runs/{name}", f"/runs/{name}/report", f"/api/runs/{name}", f"/runs/{name}/events"):
        response = client.get(path, headers=JSON)
        assert response.status_code == 404, path
        assert "secret" not in response.text
        assert_clean(response.text, runs_root)
    assert client.post(f"/runs/{name}/stop", headers=JSON).status_code in (404, 405)
    assert "link" not in [r["name"] for r in client.get("/api/runs").json()["runs"]]


def test_runs_root_path_refuses_what_is_not_a_run_below_it(runs_root):
    roots = RunsRoot.at(runs_root)
    assert roots.path("mlp-a") == (runs_root / "mlp-a").resolve()
    for name in ("..", ".", "", "/", str(runs_root / "mlp-a"), "mlp-a\\..", "mlp-a/checkpoints", "a\x00b", "x/../mlp-a", "mlp-a/.."):
        with pytest.raises(UnknownRun):
            roots.path(name)


# --------------------------------------------------------------------------- token, limits, errors

def test_token_cookie_and_bearer(runs_root, ui_files):
    client = TestClient(create_app(runs_root, ui_files, token="s3cret-token"))
    assert 'name="token"' in client.get("/login").text
    page = client.get("/", headers={"accept": "text/html"})
    assert page.status_code == 401 and 'action="/login"' in page.text
    api = client.get("/api/runs")
    assert api.status_code == 401 and api.json()["error"]["type"] == "authentication_error"
    assert client.get("/runs/mlp-a/report").status_code == 401
    assert client.get("/api/runs", headers={"authorization": "Bearer wrong"}).status_code == 401
    assert client.get("/api/runs", headers={"authorization": "Bearer s3cret-token"}).status_code == 200
    assert client.get("/static/ui.css").status_code == 200  # assets of the login page
    assert client.get("/health").status_code == 200 and client.get("/healthz").status_code == 401
    assert client.post("/login", data={"token": "nope"}).status_code == 401
    login = client.post("/login", data={"token": "s3cret-token"}, follow_redirects=False)
    assert login.status_code == 303
    cookie = login.headers["set-cookie"].lower()
    assert "httponly" in cookie and "samesite=strict" in cookie
    assert client.get("/api/runs").status_code == 200  # the cookie now
    client.post("/logout")
    assert client.get("/api/runs").status_code == 401


def test_cross_site_posts_and_large_bodies_are_refused(runs_root, ui_files):
    client = TestClient(create_app(runs_root, ui_files, limits=Limits(max_body_bytes=2048)))
    response = client.post("/runs/mlp-a/stop", headers={"origin": "http://evil.example"})
    assert response.status_code == 403
    big = client.post("/api/check", json={"source": "form", "model": "x" * 5000})
    assert big.status_code == 413
    assert_clean(big.text, runs_root, ui_files)
    assert client.post("/runs/mlp-a/stop", headers={"origin": "http://testserver", **JSON}).json() == {"stopped": False}


def test_error_bodies_show_no_paths(client, runs_root):
    bad = runs_root / "bad-metrics"
    bad.mkdir()
    (bad / "metrics.json").write_text("{not json")
    for path in ("/runs/bad-metrics/report", "/runs/nope", "/nope", "/api/columns?file=%2Fetc%2Fpasswd", "/tune/nope",
                 "/api/runs/nope", "/static/nope.js"):
        response = client.get(path, headers=JSON)
        assert response.status_code in (404, 422), path
        assert_clean(response.text, runs_root)
    assert client.get("/health").json() == {"status": "ok"}


def test_cli_help_lists_the_ui_options(capsys):
    from helpers import cli

    code, out, _ = cli(["ui", "--help"], capsys)
    assert code == 0 and "--runs" in out and "--token" in out and "7860" in out
