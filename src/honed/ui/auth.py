"""Who may use the UI: with `--token`, every path but the login form and the static assets needs
the token, as an `Authorization: Bearer` header or the HttpOnly cookie the login form sets.
Without it: 401 (the login form for a browser, `{"error": ...}` for anything else). A POST whose
Origin is another site is refused whatever the token (a page elsewhere cannot start a run here)."""

from __future__ import annotations

import json
import secrets
from urllib.parse import urlsplit

from ..serve.http_errors import error_body

COOKIE = "honed_ui_token"
OPEN_PATHS = ("/login", "/health", "/static/")  # the login form, its assets, a liveness probe


def token_matches(given: str | bytes, expected: bytes) -> bool:
    """compare_digest takes as long whatever the token given."""
    value = given.encode("latin-1", "replace") if isinstance(given, str) else given
    return secrets.compare_digest(value.strip(), expected)


def cookie_value(header: bytes) -> bytes:
    for part in header.split(b";"):
        key, _, value = part.strip().partition(b"=")
        if key == COOKIE.encode():
            return value
    return b""


class TokenGuard:
    """Pure ASGI middleware in front of the app (SSE streams pass through untouched)."""

    def __init__(self, app, token: str | None, login_page):
        self.app = app
        self.expected = token.encode() if token else None
        self.login_page = login_page  # (message) -> HTML of the login form

    def authorised(self, headers: dict) -> bool:
        if self.expected is None:
            return True
        scheme, _, credentials = headers.get(b"authorization", b"").strip().partition(b" ")
        if scheme.lower() == b"bearer" and token_matches(credentials, self.expected):
            return True
        cookie = cookie_value(headers.get(b"cookie", b""))
        return bool(cookie) and token_matches(cookie, self.expected)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if scope.get("method") == "POST" and not same_origin(headers):
            return await reply(send, 403, "cross-site request refused: use the UI's own pages", json_wanted=True)
        if any(path == p or (p.endswith("/") and path.startswith(p)) for p in OPEN_PATHS) or self.authorised(headers):
            return await self.app(scope, receive, send)
        wants_html = b"text/html" in headers.get(b"accept", b"")
        if wants_html:
            return await reply(send, 401, self.login_page("This UI needs its token (the one `honed ui --token` was given)."))
        return await reply(send, 401, "missing or invalid token: send 'Authorization: Bearer <token>' or log in at /login",
                           json_wanted=True, extra={"www-authenticate": "Bearer"})


def same_origin(headers: dict) -> bool:
    """No Origin header (curl, a test client), or one naming this host."""
    origin = headers.get(b"origin")
    if origin is None:
        return True
    host = headers.get(b"host", b"").decode("latin-1")
    try:
        return urlsplit(origin.decode("latin-1")).netloc == host
    except ValueError:
        return False


async def reply(send, status: int, content: str, json_wanted: bool = False, extra: dict | None = None) -> None:
    if json_wanted:
        payload = json.dumps(error_body(content, "authentication_error" if status == 401 else "invalid_request_error")).encode()
        kind = b"application/json"
    else:
        payload, kind = content.encode(), b"text/html; charset=utf-8"
    headers = [(b"content-type", kind), (b"content-length", str(len(payload)).encode())]
    headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": payload})
