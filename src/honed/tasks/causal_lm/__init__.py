"""The causal-lm task: data.py (documents: load, audit), model.py (packing, perplexity, continuations), task.py (the row)."""
