"""The overfitting guard's seed spread (train.seeds), scaled to the data.

Each extra seed is a whole second fine-tune. On small data that is cheap and exactly what is
needed (small data is where seeds disagree: Dodge et al. 2020); on a large training split it costs
as much as the run again for a spread that shrinks with the data. So a training split larger
than `guards.seed_rows` (50,000 by default) has every seed of the spread, the run's own seed
included, retrained on one seeded, stratified sample of that many rows: the figures compared are
all from the same data size, and the guard says which sample and why (details.budget). With
`guards.seed_rows: null` the seeds train on every row.
"""

from __future__ import annotations

from ..recipe import main_seed
from ..train.progress import quiet, say


def seed_sample(session):
    """(row indices, budget note) of the sample the spread's seeds train on, or (None, None) for the whole split."""
    n, cap = len(session.encoded["train"]), session.recipe.guards.seed_rows
    if cap is None or n <= cap:
        return None, None
    fraction = cap / n
    idx = session.task.curve_subsets(session.encoded["train"], [fraction], main_seed(session.recipe) + 101)[0]
    note = {"rows": int(len(idx)), "of": n, "fraction": round(len(idx) / n, 4),
            "note": f"every seed of the spread, the run's own included, trained on the same sample of {len(idx)} of the {n} "
                    f"training rows ({len(idx) / n:.1%}; guards.seed_rows caps the seeds at {cap} rows: on more data a second "
                    "fine-tune costs as much as the run and seeds disagree less); set guards.seed_rows: null to train them on every row"}
    return idx, note


def seed_spread(session, tuner, seed: int, test_metrics: dict, show_progress: bool) -> dict:
    """The test metric per seed of train.seeds (small data is unstable); the run's own seed's figure is its
    test metric unless the seeds train on a sample (seed_sample), when it is retrained on that sample too."""
    primary = session.task.primary
    extra = (session.recipe.train.seeds or [])[1:]
    if not extra:
        return {seed: test_metrics[primary]}
    idx, note = seed_sample(session)
    if note is not None:
        if tuner.budget is not None:
            tuner.budget.notes["overfitting"] = note  # note_budget puts it in the guard's details and summary
        say(show_progress, f"seeds: {note['rows']} of {note['of']} training rows per seed (guards.seed_rows)")
    seeds = {}
    for s in ([seed] if idx is not None else []) + list(extra):
        say(show_progress, f"seed {s}: fine-tuning again for the seed spread")
        other, _, _ = tuner.fine_tune(s, train_idx=idx, progress=quiet())
        seeds[s] = session.evaluate(other, "test")[primary]
    if idx is None:
        seeds = {seed: test_metrics[primary], **seeds}
    return seeds
