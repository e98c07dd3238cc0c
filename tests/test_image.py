"""Image classification end to end on a tiny ViT (width 32, 2 layers) and generated images."""

from __future__ import annotations

import json

import pytest

import honed
from helpers import build_tiny_vit, stripes
from honed.cli import main


@pytest.fixture(scope="module")
def vit(tmp_path_factory):
    return build_tiny_vit(tmp_path_factory.mktemp("vit"))


@pytest.fixture(scope="module")
def image_folder(tmp_path_factory):
    return stripes(tmp_path_factory.mktemp("images") / "train", 40, seed=1)


@pytest.mark.parametrize("method", ["full", "head"])
def test_image_run_predict_report(method, vit, image_folder, tmp_path, capsys):
    recipe = {"task": "image-classification", "model": str(vit), "data": {"train": str(image_folder)}, "method": method,
              "train": {"epochs": 12, "lr": 3e-3, "batch_size": 16, "precision": "fp32", "patience": None, "eval_every": 8},
              "guards": {"baseline": False}, "out": str(tmp_path / "run")}
    result = honed.run(recipe, show_progress=False)
    metrics = result.metrics
    assert metrics["task"] == "image-classification"
    assert metrics["test"]["accuracy"] >= 0.75, metrics["test"]
    assert metrics["guards"]["forgetting"]["details"]["cka"] is not None
    frame = honed.predict(result.run_dir, image_folder)
    assert len(frame) == 80 and set(frame["prediction"]) <= {"horizontal", "vertical"}
    from transformers import AutoModelForImageClassification

    assert AutoModelForImageClassification.from_pretrained(result.run_dir / "model").config.num_labels == 2


def test_corrupt_images_are_skipped_below_the_threshold_and_refused_above(vit, tmp_path, capsys):
    folder = stripes(tmp_path / "imgs", 20, seed=2)
    (folder / "vertical" / "broken.png").write_bytes(b"not an image at all")
    (folder / "vertical" / "empty.png").write_bytes(b"")
    base = {"task": "image-classification", "model": str(vit), "data": {"train": str(folder), "max_bad_images": 0.1},
            "train": {"epochs": 1, "precision": "fp32"}, "guards": {"baseline": False}, "out": str(tmp_path / "ok")}
    result = honed.run(base, show_progress=False)
    audit = json.loads((result.run_dir / "audit.json").read_text())
    assert any("broken.png" in f["message"] and "empty.png" in f["message"] for f in audit["findings"])

    import yaml

    strict = dict(base, out=str(tmp_path / "strict"))
    strict["data"] = dict(base["data"], max_bad_images=0.01)
    path = tmp_path / "strict.yaml"
    path.write_text(yaml.safe_dump(strict))
    with pytest.raises(SystemExit) as exc:
        main(["run", str(path)])
    err = capsys.readouterr().err
    assert exc.value.code == 3 and "broken.png" in err and "cannot be read" in err
    assert not (tmp_path / "strict").exists()


def test_missing_image_in_csv_and_non_image_predict_input(vit, image_folder, tmp_path, capsys):
    table = tmp_path / "images.csv"
    rows = [f"{p},{p.parent.name}" for p in sorted(image_folder.rglob("*.png"))]
    rows.append("does/not/exist.png,vertical")
    table.write_text("image,label\n" + "\n".join(rows) + "\n")
    recipe = {"task": "image-classification", "model": str(vit), "data": {"train": str(table), "max_bad_images": 0.05},
              "train": {"epochs": 1, "precision": "fp32"}, "guards": {"baseline": False}, "out": str(tmp_path / "run")}
    result = honed.run(recipe, show_progress=False)
    audit = json.loads((result.run_dir / "audit.json").read_text())
    assert any("exist.png" in f["message"] for f in audit["findings"])
    not_images = tmp_path / "notimages"
    not_images.mkdir()
    (not_images / "a.txt").write_text("hello")
    with pytest.raises(SystemExit) as exc:
        main(["predict", str(result.run_dir), str(not_images)])
    assert exc.value.code == 3 and "no images" in capsys.readouterr().err


def test_replay_on_images_fine_tuning_an_earlier_image_run(vit, image_folder, tmp_path):
    """Replay mixes reference images, scored by the source run's head, into every step (image batches have no input_ids or x)."""
    base = {"task": "image-classification", "train": {"epochs": 1, "precision": "fp32", "batch_size": 16}, "guards": {"baseline": False}}
    source = honed.run(dict(base, model=str(vit), data={"train": str(image_folder)}, out=str(tmp_path / "source")), show_progress=False)
    target = stripes(tmp_path / "target", 20, seed=3)
    for old, new in (("horizontal", "rows"), ("vertical", "columns")):  # other classes: the run gets a new head
        (target / old).rename(target / new)
    reference = tmp_path / "reference.csv"
    reference.write_text("image,label\n" + "\n".join(f"{p},{p.parent.name}" for p in sorted(image_folder.rglob("*.png"))[::4]) + "\n")
    recipe = dict(base, model=str(source.run_dir), data={"train": str(target)}, replay={"fraction": 0.25},
                  reference={"data": str(reference), "text": "image", "label": "label"}, out=str(tmp_path / "target-run"))
    metrics = honed.run(recipe, show_progress=False).metrics
    assert metrics["guards"]["forgetting"]["details"]["retention"] is not None
    assert set(metrics["confusion_matrix"]["labels"]) == {"rows", "columns"}
