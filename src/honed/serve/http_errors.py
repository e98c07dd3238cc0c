"""What the server says when a request fails: `{"error": {"message", "type"}}`, a message that
names the field and the rule, never a value, a file path, a stack trace or exception text."""

from __future__ import annotations

from ..errors import HonedError

ERROR_TYPES = {400: "invalid_request_error", 401: "authentication_error", 404: "not_found_error", 405: "invalid_request_error",
               413: "request_too_large", 415: "invalid_request_error", 422: "invalid_request_error", 503: "overloaded_error"}


def missing_extra(name: str | None) -> HonedError:
    """The error for a server dependency that is not installed (the `serve` extra is optional)."""
    return HonedError(f"honed serve needs fastapi and uvicorn ({name} is not installed); "
                      "install them with: pip install 'honed[serve]'")


def error_body(message: str, type_: str) -> dict:
    return {"error": {"message": message, "type": type_}}


class HTTPError(Exception):
    """An error a handler raises on purpose: its message is safe to show."""

    def __init__(self, status: int, message: str, type_: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type = status, message, type_ or ERROR_TYPES.get(status, "invalid_request_error")


def field_path(loc: tuple) -> str:
    """A pydantic error location as a field path: ("body", "inputs", 0, "text") → inputs[0].text."""
    parts = [str(p) for p in loc if p != "body"]
    out = ""
    for p in parts:
        out += f"[{p}]" if p.isdigit() else (f".{p}" if out else p)
    return out or "body"


def validation_message(errors: list[dict]) -> tuple[int, str]:
    """Pydantic's messages name the field and the rule, never the value; JSON syntax errors are 400."""
    if any(e.get("type") == "json_invalid" for e in errors):
        return 400, "the request body is not valid JSON; send a JSON object such as {\"inputs\": [...]}"
    shown = []
    for e in errors[:5]:
        where = field_path(tuple(e.get("loc", ())))
        if e.get("type") == "extra_forbidden":
            shown.append(f"{where}: unknown field")
        else:
            shown.append(f"{where}: {e.get('msg', 'invalid value')}")
    more = f" (and {len(errors) - 5} more)" if len(errors) > 5 else ""
    return 422, "; ".join(shown) + more
