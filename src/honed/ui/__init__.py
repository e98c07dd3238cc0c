"""`honed ui`: a local web app over a folder of run directories: the runs table, a run's report
and live progress, Stop and Resume, comparing runs, starting new ones, tune studies.
Server-rendered pages and a little plain JS; every asset ships in this package (offline).

Needs fastapi and uvicorn (the `ui` extra); importing `honed.ui.app` without them fails."""
