"""Untrusted files: loading someone else's model folder or recipe must never run their code.

- pickle weights (`pytorch_model.bin`) are refused unless the recipe says `allow_pickle: true`,
  and even then they are read with torch.load(weights_only=True) first, by honed itself, so a
  crafted pickle is refused before transformers sees it;
- `trust_remote_code` stays off unless the recipe turns it on: a model folder whose config.json
  points (`auto_map`) at a local modeling file never imports it;
- recipe YAML is read with yaml.safe_load: tags that construct Python objects are refused (also
  in the bad-input corpus: recipe_python_tag and override_python_tag in
  tests/bad_inputs/test_bad_inputs.py, for a file and for a -s override);
- relative paths in a recipe, `..` included, resolve against the recipe file's folder, never the
  current one. honed is a local tool: recipes are files the user runs, there is no API through
  which a recipe is submitted remotely, and `honed serve` takes texts, not paths.

Every crafted payload would create a sentinel file; a positive control shows it really does when
loaded the unsafe way, and every test asserts that it never appears the honed way.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import yaml
from safetensors.torch import load_file

from honed.cli import main
from honed.errors import RecipeError
from honed.models.load import load_pretrained
from honed.recipe import load_recipe
from helpers import write_recipe

LABELS = ["neg", "pos"]


class Payload:
    """Unpickling this calls `call(*args)`: the shape of every pickle exploit."""

    def __init__(self, call, args):
        self.call, self.args = call, args

    def __reduce__(self):
        return self.call, self.args


PAYLOADS = {
    "os.system": lambda sentinel: Payload(os.system, (f"touch {sentinel}",)),
    "open": lambda sentinel: Payload(open, (str(sentinel), "w")),
}


def model_folder(tiny_bert: Path, dest: Path, weights: bool = True) -> Path:
    """A copy of the tiny BERT: config.json, tokenizer, and its safetensors weights unless told not to."""
    dest.mkdir(parents=True)
    for item in tiny_bert.iterdir():
        if weights or item.suffix != ".safetensors":
            shutil.copy(item, dest / item.name)
    return dest


def crafted_pickle(tiny_bert: Path, dest: Path, payload: str, sentinel: Path) -> Path:
    """Pickle weights only; one 'tensor' is an object whose unpickling creates `sentinel`."""
    folder = model_folder(tiny_bert, dest, weights=False)
    state = load_file(str(tiny_bert / "model.safetensors"))
    state[next(iter(state))] = PAYLOADS[payload](sentinel)
    torch.save(state, folder / "pytorch_model.bin")
    return folder


def invoke(argv, capsys) -> tuple[int, str]:
    capsys.readouterr()
    try:
        main([str(a) for a in argv])
        code = 0
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    out, err = capsys.readouterr()
    assert "Traceback" not in out + err
    lines = [line for line in err.splitlines() if line.strip()]
    return code, (lines[-1] if lines else "")


# --------------------------------------------------------------------------- pickle

@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_crafted_pickle_really_runs_code_when_loaded_unsafely(payload, tmp_path, tiny_bert):
    """The positive control: without weights_only, this file does create its sentinel."""
    sentinel = tmp_path / "CONTROL"
    folder = crafted_pickle(tiny_bert, tmp_path / "evil", payload, sentinel)
    torch.load(folder / "pytorch_model.bin", weights_only=False)
    assert sentinel.exists()


@pytest.mark.parametrize("allow_pickle", [False, True], ids=["refused", "allow_pickle"])
@pytest.mark.parametrize("payload", list(PAYLOADS))
def test_crafted_pickle_never_runs(payload, allow_pickle, tmp_path, tiny_bert, text_csv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sentinel = tmp_path / "SENTINEL"
    folder = crafted_pickle(tiny_bert, tmp_path / "evil", payload, sentinel)
    recipe = write_recipe(tmp_path, folder, text_csv, **({"allow_pickle": True} if allow_pickle else {}))
    code, line = invoke(["run", recipe], capsys)
    assert code == 2 and line.startswith("error: model:"), line
    assert "allow_pickle" in line
    if allow_pickle:
        assert "weights_only=True" in line and "pytorch_model.bin" in line and "run code" in line, line
    else:
        assert "only pickle weights" in line, line
    assert not sentinel.exists()
    assert not (tmp_path / "run").exists()


def test_allow_pickle_still_loads_plain_pickle_weights(tmp_path, tiny_bert):
    folder = model_folder(tiny_bert, tmp_path / "plain", weights=False)
    state = load_file(str(tiny_bert / "model.safetensors"))
    torch.save(state, folder / "pytorch_model.bin")
    with pytest.raises(RecipeError, match="allow_pickle"):
        load_pretrained(str(folder), LABELS, SimpleNamespace(trust_remote_code=False, allow_pickle=False))
    bundle = load_pretrained(str(folder), LABELS, SimpleNamespace(trust_remote_code=False, allow_pickle=True))
    loaded = bundle.model.state_dict()
    key = "bert.embeddings.word_embeddings.weight"
    assert torch.equal(loaded[key], state[key])


# --------------------------------------------------------------------------- trust_remote_code

MODELING = """from pathlib import Path
Path({sentinel!r}).touch()
from transformers import BertConfig, BertForSequenceClassification
class EvilConfig(BertConfig):
    model_type = {model_type!r}
class EvilModel(BertForSequenceClassification):
    config_class = EvilConfig
"""


def remote_code_folder(tiny_bert: Path, dest: Path, sentinel: Path, model_type: str) -> Path:
    folder = model_folder(tiny_bert, dest)
    config = json.loads((folder / "config.json").read_text())
    config["model_type"] = model_type
    config["auto_map"] = {"AutoConfig": "modeling_evil.EvilConfig",
                          "AutoModelForSequenceClassification": "modeling_evil.EvilModel"}
    (folder / "config.json").write_text(json.dumps(config))
    (folder / "modeling_evil.py").write_text(MODELING.format(sentinel=str(sentinel), model_type=model_type))
    return folder


def test_remote_code_of_an_unknown_model_type_is_refused(tmp_path, tiny_bert, text_csv, capsys, monkeypatch):
    monkeypatch.chdir(tmp_path)
    sentinel = tmp_path / "SENTINEL"
    folder = remote_code_folder(tiny_bert, tmp_path / "remote", sentinel, "honed-evil")
    recipe = write_recipe(tmp_path, folder, text_csv)
    code, line = invoke(["run", recipe], capsys)
    assert code == 2 and line.startswith("error: model:") and "trust_remote_code: true" in line, line
    assert not sentinel.exists()


def test_remote_code_beside_a_known_model_type_is_ignored(tmp_path, tiny_bert):
    sentinel = tmp_path / "SENTINEL"
    folder = remote_code_folder(tiny_bert, tmp_path / "remote", sentinel, "bert")
    bundle = load_pretrained(str(folder), LABELS, SimpleNamespace(trust_remote_code=False, allow_pickle=False))
    assert type(bundle.model).__name__ == "BertForSequenceClassification"
    assert not sentinel.exists()


def test_trust_remote_code_true_does_run_it(tmp_path, tiny_bert, monkeypatch):
    """The positive control: the same folder with trust_remote_code: true imports the file."""
    import transformers.dynamic_module_utils as dynamic

    monkeypatch.setattr(dynamic, "HF_MODULES_CACHE", str(tmp_path / "hf_modules"))  # not ~/.cache
    monkeypatch.setattr(sys, "path", list(sys.path))
    sentinel = tmp_path / "SENTINEL"
    folder = remote_code_folder(tiny_bert, tmp_path / "remote", sentinel, "honed-evil")
    try:
        load_pretrained(str(folder), LABELS, SimpleNamespace(trust_remote_code=True, allow_pickle=False))
    except RecipeError:
        pass  # whether the custom class then loads is not the point
    finally:
        for name in [m for m in sys.modules if m.startswith("transformers_modules")]:
            del sys.modules[name]
    assert sentinel.exists()


# --------------------------------------------------------------------------- recipes

def test_yaml_tags_that_build_python_objects_are_refused(tmp_path):
    sentinel = tmp_path / "SENTINEL"
    path = tmp_path / "recipe.yaml"
    path.write_text(f'task: text-classification\nmodel: !!python/object/apply:os.system ["touch {sentinel}"]\n'
                    "data: {train: train.csv}\n")
    with pytest.raises(RecipeError, match="python/object/apply"):
        load_recipe(path)
    assert not sentinel.exists()


def test_dotdot_paths_resolve_against_the_recipe_file(tmp_path, tiny_bert, text_csv, capsys, monkeypatch):
    project = tmp_path / "project"
    (project / "data").mkdir(parents=True)
    shutil.copy(text_csv, project / "data" / "train.csv")
    shutil.copytree(tiny_bert, project / "models" / "bert")
    recipe_dir = project / "recipes" / "team"
    recipe_dir.mkdir(parents=True)
    recipe = recipe_dir / "recipe.yaml"
    recipe.write_text(yaml.safe_dump({"task": "text-classification", "model": "../../models/bert",
                                      "data": {"train": "../../data/train.csv", "text": "text", "label": "label"},
                                      "out": "../../runs/first"}))
    elsewhere = tmp_path / "elsewhere" / "deeper"
    elsewhere.mkdir(parents=True)
    monkeypatch.chdir(elsewhere)  # `..` from here would mean tmp_path/elsewhere: it must not

    resolved = load_recipe(recipe)
    assert resolved.data.train == str(project / "data" / "train.csv")
    assert resolved.model == str(project / "models" / "bert")
    assert resolved.out == str(project / "runs" / "first")
    code, _ = invoke(["check", recipe], capsys)
    assert code == 0
    assert list(elsewhere.iterdir()) == [] and [p.name for p in (tmp_path / "elsewhere").iterdir()] == ["deeper"]
