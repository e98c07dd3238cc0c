"""What a request may be and who may send it (design §6): the Limits, the bearer token, and the
ASGI guard that checks both before a handler runs."""

from __future__ import annotations

import json
import secrets
from dataclasses import dataclass

from ..errors import RecipeError
from .http_errors import ERROR_TYPES, error_body
from .schemas import MAX_INPUTS, MAX_TEXT_CHARS

MIB = 1024 * 1024


@dataclass(frozen=True)
class Limits:
    """What one request may ask for, and how the batcher groups work."""

    max_body_bytes: int = 1 * MIB
    max_inputs: int = MAX_INPUTS  # inputs per request
    max_text_chars: int = MAX_TEXT_CHARS  # characters per text
    batch_texts: int = 64  # the batcher stops collecting at this many texts
    batch_wait_ms: float = 5.0  # ... or after this long
    max_pending_texts: int = 8192  # texts waiting for the model; beyond → 503 (bounded memory)
    max_generations: int = 16  # chat requests generating or waiting for the model (streams included); beyond → 503

    def check(self) -> None:
        for name in ("max_body_bytes", "max_inputs", "max_text_chars", "batch_texts", "max_pending_texts",
                     "max_generations"):
            value = getattr(self, name)
            if not isinstance(value, int) or value < 1:
                raise RecipeError(f"serve limit '{name}' must be a positive integer. Got {value!r} instead.")
        if self.batch_wait_ms < 0:
            raise RecipeError(f"serve limit 'batch_wait_ms' must be >= 0. Got {self.batch_wait_ms!r} instead.")


def check_token(token: str | None) -> str | None:
    if token is None:
        return None
    if not token or any(c.isspace() or not (32 < ord(c) < 127) for c in token):
        raise RecipeError("--token (or HONED_TOKEN): must be non-empty printable ASCII without spaces; "
                          "generate one with: python -c 'import secrets; print(secrets.token_urlsafe(32))'")
    return token


class RequestGuard:
    """Pure ASGI middleware: the bearer token for /v1 paths (before the body is read), then the
    body size from Content-Length and while reading; the body is handed on already read."""

    def __init__(self, app, token: str | None, max_body_bytes: int):
        self.app = app
        self.expected = token.encode() if token else None
        self.max_body = max_body_bytes

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        headers = dict(scope.get("headers") or [])
        path = scope.get("path", "")
        if self.expected is not None and (path == "/v1" or path.startswith("/v1/")):
            given = headers.get(b"authorization", b"")
            scheme, _, credentials = given.strip().partition(b" ")
            # compare_digest takes as long whatever the token given; the scheme is case-insensitive (RFC 9110)
            ok = secrets.compare_digest(credentials.strip(), self.expected) & (scheme.lower() == b"bearer")
            if not ok:
                message = "missing bearer token: send 'Authorization: Bearer <token>'" if not given else "invalid bearer token"
                return await self._reply(send, 401, message, {"www-authenticate": "Bearer"})
        length = headers.get(b"content-length")
        if length is not None:
            if not length.isdigit():
                return await self._reply(send, 400, "invalid Content-Length header")
            if int(length) > self.max_body:
                return await self._reply(send, 413, self._too_large())
        chunks, size = [], 0
        while True:
            message = await receive()
            if message["type"] == "http.disconnect":
                return
            body = message.get("body", b"")
            size += len(body)
            if size > self.max_body:
                return await self._reply(send, 413, self._too_large())
            if body:
                chunks.append(body)
            if not message.get("more_body", False):
                break
        body = b"".join(chunks)
        replayed = False

        async def replay():
            nonlocal replayed
            if not replayed:
                replayed = True
                return {"type": "http.request", "body": body, "more_body": False}
            return await receive()  # waits for the disconnect, as the server's own receive does

        return await self.app(scope, replay, send)

    def _too_large(self) -> str:
        return f"request body larger than the limit of {self.max_body} bytes; send fewer or shorter inputs per request"

    @staticmethod
    async def _reply(send, status: int, message: str, extra: dict | None = None) -> None:
        payload = json.dumps(error_body(message, ERROR_TYPES.get(status, "invalid_request_error"))).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(payload)).encode())]
        if status in (400, 413):
            headers.append((b"connection", b"close"))  # the rest of the body is not read
        headers += [(k.encode(), v.encode()) for k, v in (extra or {}).items()]
        await send({"type": "http.response.start", "status": status, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
