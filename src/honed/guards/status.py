"""The shape every guard returns, as it appears under ``metrics.json["guards"]``."""

from __future__ import annotations

STATUSES = ("ok", "warn", "fail", "skipped")


def guard_result(status: str, summary: str, details: dict) -> dict:
    """Return ``{"status", "summary", "details"}`` after checking ``status`` is one of STATUSES.

    Raises ValueError for any other status: users gate pipelines on this field, so a typo
    must never reach metrics.json.
    """
    if status not in STATUSES:
        raise ValueError(f"The 'status' of a guard must be one of {list(STATUSES)}. Got {status!r} instead.")
    if not isinstance(summary, str):
        raise ValueError(f"The 'summary' of a guard must be a string. Got {type(summary).__name__} instead.")
    if not isinstance(details, dict):
        raise ValueError(f"The 'details' of a guard must be a dict. Got {type(details).__name__} instead.")
    summary = summary.strip()
    # summaries are sentences a person reads first: start them with a capital
    return {"status": status, "summary": summary[:1].upper() + summary[1:], "details": details}


def skipped(reason: str) -> dict:
    """A guard that did not run: status "skipped", the reason as summary, empty details."""
    return guard_result("skipped", reason, {})
