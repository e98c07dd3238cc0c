"""Image classification data: a folder with one sub-folder per class, or a table of image paths
and labels. Unreadable images are listed and skipped; above a threshold they are an error."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

import pandas as pd

from ...data.load import read_table
from ...data.split import carve, label_to_str
from ...errors import DataError

IMAGE_SUFFIXES = {".png", ".jpg", ".jpeg", ".bmp", ".gif", ".webp", ".tif", ".tiff"}


@dataclass
class ImageSplits:
    train: pd.DataFrame  # columns: path, label (+ groups)
    validation: pd.DataFrame
    test: pd.DataFrame
    labels: list[str]
    notes: list[dict] = field(default_factory=list)


def _folder_frame(root: Path, field_name: str) -> pd.DataFrame:
    classes = sorted(p for p in root.iterdir() if p.is_dir() and not p.name.startswith("."))
    if not classes:
        raise DataError(f"{field_name}: {root} has no class sub-folders; expected one folder per class holding its images")
    rows = [{"path": str(f), "label": c.name} for c in classes for f in sorted(c.rglob("*")) if f.is_file()]
    if not rows:
        raise DataError(f"{field_name}: the class folders in {root} hold no files")
    return pd.DataFrame(rows)


def _table_frame(path: Path, spec, field_name: str) -> pd.DataFrame:
    frame = read_table(path, field_name)
    for col, key in ((spec.image, "data.image"), (spec.label, "data.label")):
        if col not in frame.columns:
            raise DataError(f"{key}: column '{col}' not found in {path.name} (columns: {', '.join(map(str, frame.columns[:30]))})")
    base = path.parent
    out = pd.DataFrame({"path": [str((base / str(p)).resolve()) if not Path(str(p)).is_absolute() else str(p) for p in frame[spec.image]],
                        "label": frame[spec.label].map(label_to_str)})
    for g in spec.groups:
        if g not in frame.columns:
            raise DataError(f"data.groups: column '{g}' not found in {path.name}")
        out[g] = frame[g].fillna("(missing)").astype(str).to_numpy()
    return out


def read_images(spec_path: str, spec, field_name: str) -> pd.DataFrame:
    path = Path(spec_path)
    if not path.exists():
        raise DataError(f"{field_name}: {path} not found; expected an image folder (one sub-folder per class) or a CSV of paths")
    return _folder_frame(path, field_name) if path.is_dir() else _table_frame(path, spec, field_name)


def check_images(frame: pd.DataFrame, field_name: str, max_bad: float, notes: list[dict]) -> pd.DataFrame:
    """Open every image once; list unreadable ones, skip them, refuse when too many are bad."""
    from PIL import Image

    bad = []
    for path in frame["path"]:
        try:
            with Image.open(path) as img:
                img.verify()
        except Exception as exc:  # PIL raises many types for damaged or non-image files
            bad.append((path, type(exc).__name__))
    if bad:
        share = len(bad) / len(frame)
        listing = ", ".join(f"{Path(p).name} ({why})" for p, why in bad[:10]) + (" …" if len(bad) > 10 else "")
        if share > max_bad:
            raise DataError(f"{field_name}: {len(bad)} of {len(frame)} images cannot be read ({share:.1%} > data.max_bad_images={max_bad:.0%}): {listing}")
        notes.append({"level": "warn", "code": "unreadable_images", "message": f"{len(bad)} unreadable image(s) skipped: {listing}"})
        frame = frame[~frame["path"].isin({p for p, _ in bad})].reset_index(drop=True)
    return frame


def load_image_splits(recipe, seed: int) -> ImageSplits:
    spec = recipe.data
    notes: list[dict] = []
    train = check_images(read_images(spec.train, spec, "data.train"), "data.train", spec.max_bad_images, notes)
    validation = check_images(read_images(spec.validation, spec, "data.validation"), "data.validation", spec.max_bad_images, notes) if spec.validation else None
    test = check_images(read_images(spec.test, spec, "data.test"), "data.test", spec.max_bad_images, notes) if spec.test else None
    classes = train["label"].value_counts()
    if len(classes) < 2:
        raise DataError(f"data.train: a single class ('{classes.index[0]}'); classification needs at least two")
    if test is None:
        train, test, _ = carve(train, spec.test_fraction, "label", seed)
    if validation is None:
        train, validation, _ = carve(train, spec.validation_fraction / (1 - spec.test_fraction), "label", seed + 1)
    labels = sorted(train["label"].unique().tolist())
    for role, frame in (("validation", validation), ("test", test)):
        unseen = sorted(set(frame["label"]) - set(labels))
        if unseen:
            raise DataError(f"data.{role}: labels {unseen[:10]} never occur in training (training labels: {', '.join(labels[:20])})")
    return ImageSplits(train, validation, test, labels, notes)


def audit_images(splits: ImageSplits) -> dict:
    summary = {name: {"rows": int(len(f)), "class_counts": {str(k): int(v) for k, v in f["label"].value_counts().sort_index().items()}}
               for name, f in (("train", splits.train), ("validation", splits.validation), ("test", splits.test))}
    findings = list(splits.notes)
    shared = int(splits.test["path"].isin(set(splits.train["path"])).sum())
    if shared:
        findings.append({"level": "warn", "code": "leakage", "message": f"{shared} test image(s) are also training images"})
    return {"findings": findings, "splits": summary}
