"""Fine-tuning methods, as a literal table.

`stages` says what trains, in order: "head" trains the final linear layer on cached
backbone features; "model" trains the (prepared) model on tokens. `prepare` sets which
parameters train and may wrap the model; `export` turns the trained model back into the
plain architecture that is saved.
"""

from . import freeze, full, head, lora

METHODS = {
    "full": {"stages": ("model",), "prepare": full.apply, "export": None},
    "head": {"stages": ("head",), "prepare": head.apply, "export": None},
    "freeze": {"stages": ("model",), "prepare": freeze.apply, "export": None},
    "lora": {"stages": ("model",), "prepare": lora.apply, "export": lora.export},
    "lp-ft": {"stages": ("head", "model"), "prepare": full.apply, "export": None},
}
