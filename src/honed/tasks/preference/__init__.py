"""The preference task (DPO, IPO, SimPO): data.py (load, audit), model.py (pairs, objectives, metrics), task.py (the row)."""
