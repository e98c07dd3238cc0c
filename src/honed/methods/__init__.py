"""Fine-tuning methods, as a literal table.

`stages` says what trains, in order: "head" trains the final linear layer on cached
backbone features; "model" trains the (prepared) model on tokens. `prepare` sets which
parameters train and may wrap the model; `export` turns the trained model back into the
plain architecture that is saved. `adapter` says whether the run also saves the trained adapter
alone (RUN_DIR/adapter, PEFT's format): always for qlora, for lora when `lora.keep_adapter`.
`check` refuses, before anything loads, recipe keys the method cannot honour.
"""

from . import freeze, full, head, lora, qlora

METHODS = {
    "full": {"stages": ("model",), "prepare": full.apply, "export": None, "adapter": None, "check": None},
    "head": {"stages": ("head",), "prepare": head.apply, "export": None, "adapter": None, "check": None},
    "freeze": {"stages": ("model",), "prepare": freeze.apply, "export": None, "adapter": None, "check": None},
    "lora": {"stages": ("model",), "prepare": lora.apply, "export": lora.export, "adapter": lora.keeps_adapter, "check": None},
    "qlora": {"stages": ("model",), "prepare": qlora.apply, "export": qlora.export, "adapter": qlora.keeps_adapter,
              "check": qlora.check_recipe},
    "lp-ft": {"stages": ("head", "model"), "prepare": full.apply, "export": None, "adapter": None, "check": None},
}
