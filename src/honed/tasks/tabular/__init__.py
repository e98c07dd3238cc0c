"""The tabular task: data.py (load, audit), model.py (the model's inputs and outputs), task.py (the row)."""
