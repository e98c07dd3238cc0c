"""What `honed tune` prints: the trials and the parameter importances, as Rich tables."""

from __future__ import annotations


SHORT_NAMES = {"warmup_ratio": "warmup", "weight_decay": "decay", "batch_size": "batch", "head_lr": "lr",
               "head_epochs": "epochs", "alpha_ratio": "α/r", "fraction": "replay", "layers": "frozen"}


def _header(name: str, names: list[str]) -> str:
    """A parameter's column title: a short form of the last part of its key, unless two keys share it."""
    short = lambda n: SHORT_NAMES.get(n.rsplit(".", 1)[-1], n.rsplit(".", 1)[-1])  # noqa: E731
    return short(name) if sum(short(n) == short(name) for n in names) == 1 else name


def _cell(value) -> str:
    return f"{value:.2g}" if isinstance(value, float) else str(value)


def summary_tables(summary: dict) -> list:
    """Rich tables: every trial with its parameters, then the parameter importances."""
    from rich import box
    from rich.table import Table

    names = list(summary["space"])
    best = (summary.get("best") or {}).get("number")
    table = Table(title=f"honed tune: study {summary['study']}, {summary['objective']} (* best; d: the recipe's own settings)",
                  box=box.SIMPLE_HEAD, caption="exact values in tune.json")
    table.add_column("trial", justify="right", no_wrap=True)
    table.add_column("state", no_wrap=True)
    table.add_column("value", justify="right", no_wrap=True)
    table.add_column("s", justify="right", no_wrap=True)
    for name in names:
        table.add_column(_header(name, names), justify="right", no_wrap=True)
    states = {"COMPLETE": "done", "PRUNED": "pruned", "FAIL": "failed", "RUNNING": "running", "WAITING": "waiting"}
    for t in summary["trials"]:
        if t["state"] == "COMPLETE":
            value = f"{t['value']:.4f}"
        else:  # a pruned or stopped trial: its last validation figure, in brackets
            value = f"({t['last_intermediate']:.4f})" if t["last_intermediate"] is not None else ""
        number = f"{t['number']}{'*' if t['number'] == best else ''}{'d' if t['defaults'] else ''}"
        style = {"COMPLETE": "", "PRUNED": "dim", "FAIL": "red"}.get(t["state"], "yellow")
        state = "stopped" if t.get("stopped") else states.get(t["state"], t["state"].lower())
        table.add_row(number, state, value,
                      f"{t['duration_s']:.0f}" if t["duration_s"] is not None else "",
                      *(_cell(t["params"].get(n, "")) for n in names), style=style)
    tables = [table]
    if summary.get("importances"):
        imp = Table(title="parameter importances (fANOVA over complete trials)", box=box.SIMPLE_HEAD)
        imp.add_column("parameter")
        imp.add_column("importance", justify="right")
        for name, value in summary["importances"].items():
            imp.add_row(name, f"{value:.3f}")
        tables.append(imp)
    return tables
