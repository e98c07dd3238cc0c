"""`honed ui`: the FastAPI app (server-rendered pages, a little plain JS, every asset in the
package) and the function that serves it. Routes:

    GET  /                         the runs table            GET /api/runs           its rows (JSON)
    GET  /runs/NAME                a run: report + live      GET /runs/NAME/events   progress (SSE)
    GET  /runs/NAME/report         the report (report/)      GET /api/runs/NAME      progress (JSON)
    POST /runs/NAME/stop           SIGTERM to the run        POST /runs/NAME/resume  honed run --resume
    GET  /compare?run=A&run=B      2-6 runs side by side
    GET  /new   POST /new          start a run               POST /api/check         honed check (JSON)
    GET  /api/columns?file=F       a data file's columns     GET /tune, /tune/NAME   tune studies
    GET  /login POST /login        the token, into an HttpOnly cookie
"""

from __future__ import annotations

import asyncio
import json
import logging
from pathlib import Path
from urllib.parse import parse_qs, quote

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, StreamingResponse
from fastapi.staticfiles import StaticFiles
from jinja2 import Environment, PackageLoader, select_autoescape
from starlette.exceptions import HTTPException as StarletteHTTPException

from ..errors import HonedError
from ..report.page import render_report
from ..report.rundata import load_run
from ..serve.http_errors import error_body
from ..serve.limits import Limits, RequestGuard, check_token
from ..methods import METHODS
from ..tasks import TASKS
from . import launch, views
from .auth import COOKIE, TokenGuard, token_matches
from .runs import GUARDS, STATES, RunsRoot, UnknownRun, all_rows, progress, read_history, read_json, recipe_of, run_row

log = logging.getLogger("honed.ui")
STATIC = Path(__file__).with_name("static")
EVENT_SECONDS = 1.0  # how often a live stream looks at history.jsonl
KEEPALIVE_SECONDS = 15.0  # a comment line on a quiet stream, so no proxy or browser times it out


class PageError(Exception):
    """An error a route raises on purpose: status and a message safe to show."""

    def __init__(self, status: int, message: str):
        super().__init__(message)
        self.status, self.message = status, message


def templates() -> Environment:
    env = Environment(loader=PackageLoader("honed.ui", "templates"), autoescape=select_autoescape(["html"]))
    env.filters["q"] = lambda s: quote(str(s), safe="/")
    env.filters["num"] = lambda v, d=4: "—" if not isinstance(v, (int, float)) or isinstance(v, bool) else f"{v:.0f}" if abs(v) >= 1e4 else f"{v:.{d}f}"
    env.globals["badge"] = views.badge_html
    return env


def create_app(runs: str | Path, files: str | Path | None = None, token: str | None = None, limits: Limits = Limits()):
    """The ASGI app over the run directories under `runs`; new runs' recipes and data are picked from `files`."""
    token = check_token(token)
    limits.check()
    roots = RunsRoot.at(runs)
    workspace = launch.Workspace(roots, Path(files or Path.cwd()).resolve())
    env = templates()

    def page(name: str, status: int = 200, **values) -> HTMLResponse:
        html = env.get_template(name).render(token_required=token is not None, **values)
        return HTMLResponse(html, status_code=status)

    def wants_json(request: Request) -> bool:
        return "application/json" in request.headers.get("accept", "") or request.url.path.startswith("/api/")

    def run_dir(name: str) -> Path:
        try:
            return roots.path(name)
        except UnknownRun:
            raise PageError(404, "no such run under --runs") from None

    app = FastAPI(title="honed ui", docs_url=None, redoc_url=None, openapi_url=None)
    app.state.workspace = workspace
    app.mount("/static", StaticFiles(directory=STATIC), name="static")

    @app.exception_handler(PageError)
    async def _page_error(request: Request, exc: PageError):
        if wants_json(request):
            return JSONResponse(error_body(exc.message, "invalid_request_error"), status_code=exc.status)
        return page("error.html", exc.status, title="error", message=exc.message)

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException):
        message = {404: "no such page", 405: "method not allowed here"}.get(exc.status_code, "request failed")
        return await _page_error(request, PageError(exc.status_code, message))

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        return await _page_error(request, PageError(422, "invalid request parameters"))

    @app.exception_handler(Exception)
    async def _internal(request: Request, exc: Exception):
        log.error("unhandled error in %s %s", request.method, request.url.path, exc_info=exc)
        return await _page_error(request, PageError(500, "internal error; the server's log has the details"))

    # ------------------------------------------------------------------ login

    def login_html(message: str = "") -> str:
        return env.get_template("login.html").render(title="log in", message=message, token_required=True)

    @app.get("/login", response_class=HTMLResponse)
    async def login_form():
        return HTMLResponse(login_html())

    @app.post("/login")
    async def login(request: Request):
        form = parse_form(await request.body())
        if token is None:
            return RedirectResponse("/", status_code=303)
        if not token_matches(form.get("token", ""), token.encode()):
            return HTMLResponse(login_html("That is not the token this UI was started with."), status_code=401)
        response = RedirectResponse("/", status_code=303)
        response.set_cookie(COOKIE, token, httponly=True, samesite="strict", path="/")
        return response

    @app.post("/logout")
    async def logout():
        response = RedirectResponse("/login", status_code=303)
        response.delete_cookie(COOKIE, path="/")
        return response

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    # ------------------------------------------------------------------ the runs table

    @app.get("/", response_class=HTMLResponse)
    async def runs_page():
        return page("runs.html", title="runs", rows=all_rows(roots), guards=GUARDS, states=STATES)

    @app.get("/api/runs")
    async def runs_json():
        return {"runs": all_rows(roots)}

    # ------------------------------------------------------------------ one run (suffix routes first)

    @app.get("/runs/{name:path}/report", response_class=HTMLResponse)
    async def report(name: str):
        path = run_dir(name)
        if not (path / "metrics.json").is_file():
            raise PageError(404, "no report yet: the run has not finished")
        try:
            return HTMLResponse(render_report(load_run(path)))
        except HonedError:
            raise PageError(422, "the run's metrics.json cannot be read; run `honed report` on it for details") from None

    @app.get("/api/runs/{name:path}")
    async def run_json(name: str, start: int = 0):
        path = run_dir(name)
        return {**progress(path, max(0, start)), "row": run_row(roots, name)}

    @app.get("/runs/{name:path}/events")
    async def events(name: str, request: Request):
        path = run_dir(name)
        primary = (read_json(path / "metrics.json") or {}).get("primary_metric") or primary_of(recipe_of(path))

        async def stream():
            seen, last, quiet = 0, None, 0.0
            history: list[dict] = []
            while True:
                now = await asyncio.to_thread(progress, path, seen)
                history += now["records"]
                seen = len(history)
                shown = (now["state"], now["phase"], seen)
                if shown != last:
                    event = {"state": now["state"], "phase": now["phase"], "evaluations": seen,
                             "samples_per_s": now["samples_per_s"] if now["records"] else (history[-1].get("samples_per_s") if history else None),
                             "step": history[-1].get("step") if history else None,
                             "charts": views.live_charts(history, primary)}
                    yield f"data: {json.dumps(event)}\n\n"
                    last, quiet = shown, 0.0
                elif quiet >= KEEPALIVE_SECONDS:
                    yield ": still running\n\n"
                    quiet = 0.0
                if now["state"] != "running" or await request.is_disconnected():
                    return
                await asyncio.sleep(EVENT_SECONDS)
                quiet += EVENT_SECONDS

        return StreamingResponse(stream(), media_type="text/event-stream",
                                 headers={"cache-control": "no-cache", "x-accel-buffering": "no"})

    @app.post("/runs/{name:path}/stop")
    async def stop(name: str, request: Request):
        stopped = launch.stop(run_dir(name))
        if wants_json(request):
            return {"stopped": stopped}
        return RedirectResponse(f"/runs/{quote(name)}", status_code=303)

    @app.post("/runs/{name:path}/resume")
    async def resume(name: str, request: Request):
        try:
            launch.resume(workspace, run_dir(name))
        except launch.LaunchError as exc:
            raise PageError(409, exc.message) from None
        if wants_json(request):
            return {"resumed": True}
        return RedirectResponse(f"/runs/{quote(name)}", status_code=303)

    @app.get("/runs/{name:path}", response_class=HTMLResponse)
    async def run_page(name: str):
        path = run_dir(name)
        row = run_row(roots, name)
        history = read_history(path)
        primary = row["metric"] or primary_of(recipe_of(path))
        return page("run.html", title=name, row=row, guards=GUARDS, has_report=(path / "metrics.json").is_file(),
                    has_recipe=(path / "recipe.yaml").is_file(), evaluations=len(history), last=history[-1] if history else {},
                    charts=views.live_charts(history, primary))

    # ------------------------------------------------------------------ compare

    @app.get("/compare", response_class=HTMLResponse)
    async def compare(request: Request):
        names = request.query_params.getlist("run")
        if not names:
            return page("compare.html", title="compare", data=None, rows=all_rows(roots))
        try:
            data = views.compare(roots, names)
        except ValueError as exc:
            raise PageError(422, str(exc)) from None
        return page("compare.html", title="compare", data=data, rows=all_rows(roots))

    # ------------------------------------------------------------------ new run

    def new_page(status: int = 200, error: str = "", field: str = "", values: dict | None = None) -> HTMLResponse:
        return page("new.html", status, title="new run", tasks=list(TASKS), methods=list(METHODS), recipes=workspace.recipe_files(),
                    data_files=workspace.data_files(), error=error, field=field, values=values or {})

    @app.get("/new", response_class=HTMLResponse)
    async def new_form():
        return new_page()

    @app.get("/api/columns")
    async def columns(file: str):
        try:
            return {"columns": workspace.columns(file)}
        except launch.LaunchError as exc:
            raise PageError(404, exc.message) from None

    @app.post("/api/check")
    async def check(request: Request):
        form = await form_or_json(request)
        try:
            if form.get("source") == "file":
                recipe = workspace.pick(str(form.get("recipe", "")), workspace.recipe_files(), "recipe")
                return await asyncio.to_thread(launch.check, workspace, str(recipe), overrides_of(form))
            return await asyncio.to_thread(launch.check, workspace, launch.form_recipe(workspace, form), overrides_of(form))
        except launch.LaunchError as exc:
            return {"ok": False, "error": exc.message, "field": exc.field}

    @app.post("/new")
    async def new_run(request: Request):
        form = await form_or_json(request)
        name = str(form.get("name", "")).strip()
        try:
            if form.get("source") == "file":
                path = await asyncio.to_thread(launch.launch_file, workspace, name, str(form.get("recipe", "")), overrides_of(form))
            else:
                path = await asyncio.to_thread(launch.launch_form, workspace, name, launch.form_recipe(workspace, form),
                                               overrides_of(form))
        except launch.LaunchError as exc:
            if wants_json(request):
                return JSONResponse({"ok": False, "error": exc.message, "field": exc.field}, status_code=422)
            return new_page(422, exc.message, exc.field, form)
        run_name = path.relative_to(roots.root).as_posix()
        if wants_json(request):
            return {"ok": True, "name": run_name}
        return RedirectResponse(f"/runs/{quote(run_name)}", status_code=303)

    # ------------------------------------------------------------------ honed tune

    @app.get("/tune", response_class=HTMLResponse)
    async def tune_list():
        return page("tune.html", title="tune studies", studies=views.studies(roots), data=None)

    @app.get("/tune/{name:path}", response_class=HTMLResponse)
    async def tune_study(name: str):
        try:
            data = views.study(roots, name)
        except ValueError as exc:
            raise PageError(404, str(exc)) from None
        return page("tune.html", title=f"tune: {name}", studies=views.studies(roots), data=data)

    return RequestGuard(TokenGuard(app, token, login_html), token=None, max_body_bytes=limits.max_body_bytes)


def primary_of(recipe: dict) -> str | None:
    task = TASKS.get(str(recipe.get("task")))
    return task.primary if task is not None else None


def parse_form(body: bytes) -> dict:
    """An urlencoded form body as {field: last value} (no multipart: the forms send no files)."""
    try:
        pairs = parse_qs(body.decode("utf-8"), keep_blank_values=True)
    except UnicodeDecodeError:
        raise PageError(400, "the form is not UTF-8") from None
    return {key: values[-1] for key, values in pairs.items()}


async def form_or_json(request: Request) -> dict:
    body = await request.body()
    if request.headers.get("content-type", "").startswith("application/json"):
        try:
            value = json.loads(body or b"{}")
        except json.JSONDecodeError:
            raise PageError(400, "the request body is not valid JSON") from None
        if not isinstance(value, dict):
            raise PageError(400, "send a JSON object")
        return value
    return parse_form(body)


def overrides_of(form: dict) -> list[str]:
    """The forms' `key=value` lines (as `honed run -s`), one per line."""
    return [line.strip() for line in str(form.get("overrides", "")).splitlines() if line.strip()]


def serve_ui(runs: str | Path, files: str | Path | None = None, host: str = "127.0.0.1", port: int = 7860,
             token: str | None = None, limits: Limits = Limits(), announce=print) -> None:
    """Serve the UI until SIGINT/SIGTERM (`honed ui`)."""
    import uvicorn

    from ..serve.app import bind

    app = create_app(runs, files, token, limits)
    sock = bind(host, port)
    loopback = host in ("127.0.0.1", "localhost", "::1") or host.startswith("127.")
    if not loopback and token is None:
        announce(f"warning: listening on {host} without --token; anyone who can reach port {port} can start and stop runs")
    config = uvicorn.Config(app, log_level="warning", access_log=False, server_header=False, timeout_keep_alive=5)
    server = uvicorn.Server(config)
    shown = f"[{host}]" if ":" in host else host
    announce(f"honed ui on http://{shown}:{port}  (runs: {RunsRoot.at(runs).root}){'  (token required)' if token else ''}")
    try:
        server.run(sockets=[sock])
    finally:
        sock.close()
