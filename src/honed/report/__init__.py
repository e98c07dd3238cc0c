"""The self-contained HTML report of a run directory: `build_report(RUN_DIR)` writes
RUN_DIR/report.html (inline CSS and SVG charts, no scripts, no network resources)."""

from honed.report.page import build_report

__all__ = ["build_report"]
