"""The guards' measurements that need the engine (more fine-tunes, a weight sweep, a scratch
model); the verdicts themselves are pure functions in honed.guards."""
