"""Raw text for continued pre-training: documents from a `text` column of any source of
data/sources.py (a file, shards, a glob, a save_to_disk folder, `hf:`, a mixture) or from `.txt`
files (one file, a folder or a glob of them: one document per file), split into
train/validation/test by document, and audited (empty documents dropped and counted, never silent).

Every split is a frame with a `text` column (one document per row) and a `source` column (the
file or source it came from).
"""

from __future__ import annotations

import glob as globbing
from pathlib import Path

import pandas as pd

from ...data.load import decode_text
from ...data.sources import HUB_PREFIX, GLOB_CHARS, Loaded, mix, read_source, source_name, sources_note
from ...errors import DataError
from ..chat.data import carve_missing
from ..text.data import TextSplits

TEXT_SUFFIXES = (".txt",)
TABLE_LIKE = (".csv", ".tsv", ".jsonl", ".json", ".parquet", ".pq")


def text_files(value: str, field: str) -> list[Path] | None:
    """The .txt documents a source names (a .txt file, a folder holding .txt files, a glob matching
    them), or None when the source is a table source for data/sources.py."""
    text = str(value)
    if text.startswith(HUB_PREFIX):
        return None
    if GLOB_CHARS & set(text):
        files = sorted(Path(p) for p in globbing.glob(text, recursive=True) if Path(p).is_file())
        if not files:
            raise DataError(f"{field}: the pattern {text} matches no file; check the folder and the pattern (e.g. docs/**/*.txt)")
        kinds = {p.suffix.lower() in TEXT_SUFFIXES for p in files}
        if kinds == {True}:
            return files
        if True in kinds:
            other = next(p for p in files if p.suffix.lower() not in TEXT_SUFFIXES)
            raise DataError(f"{field}: the pattern {text} matches .txt documents and {other.name}; match one kind "
                            "(.txt documents, or .csv/.jsonl/.parquet shards with a text column)")
        return None
    path = Path(text)
    if path.is_file():
        return [path] if path.suffix.lower() in TEXT_SUFFIXES else None
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and not p.name.startswith("."))
        docs = [p for p in files if p.suffix.lower() in TEXT_SUFFIXES]
        tables = [p for p in files if p.suffix.lower() in TABLE_LIKE]
        if docs and tables:
            raise DataError(f"{field}: {path} holds both .txt documents ({docs[0].name}) and table shards ({tables[0].name}); "
                            "keep one kind per folder, or list them as a mixture")
        if docs:
            return docs
        if not tables and not any((path / name).exists() for name in ("state.json", "dataset_dict.json")):
            raise DataError(f"{field}: {path} is a directory with no .txt documents, no .csv/.jsonl/.parquet shards and no "
                            "save_to_disk files; point it at a folder of .txt files (one document per file) or of shards")
    return None


def _read_text_files(files: list[Path], field: str, given: str) -> pd.DataFrame:
    root = Path(given) if Path(given).is_dir() else None
    names = [str(p.relative_to(root)) if root is not None else p.name for p in files]
    return pd.DataFrame({"text": [decode_text(p, field) for p in files], "source": names})


def _from_table(frame: pd.DataFrame, column: str, column_key: str, given: str) -> pd.DataFrame:
    if column not in frame.columns:
        raise DataError(f"{column_key}: column '{column}' not found in {source_name(given)} "
                        f"(columns: {', '.join(map(str, frame.columns[:30]))}); name the column that holds the text")
    texts = frame[column]
    return pd.DataFrame({"text": texts.where(texts.notna(), "").astype(str).to_numpy(), "source": source_name(given)})


def read_documents(value, field: str, column: str, subset: str | None, split: str | None,
                   column_key: str = "data.text") -> pd.DataFrame:
    """One source's documents as a frame with `text` and `source` (not yet filtered for empty ones);
    `field` and `column_key` name the recipe keys of the source and of its text column in errors."""
    files = text_files(value, field)
    if files is not None:
        return _read_text_files(files, field, str(value))
    return _from_table(read_source(value, field, subset, split), column, column_key, str(value))


def load_documents(value, field: str, column: str, subset: str | None, split: str | None, seed: int,
                   count_tokens=None) -> Loaded:
    """A recipe split (a source, or a mixture of `{path, weight}` entries) as documents; count_tokens: the
    per-document token counter of a mixture weighed by tokens (data.sources.mix)."""
    if not isinstance(value, list):
        frame = read_documents(value, field, column, subset, split)
        return Loaded(frame, [{"source": str(value), "rows": int(len(frame))}])
    frames = [read_documents(e.path, f"{field}[{i}].path", column, e.subset or subset, e.split or split) for i, e in enumerate(value)]
    return mix(frames, [e.weight for e in value], [e.path for e in value], field, seed, count_tokens)


def drop_empty(frame: pd.DataFrame, field: str, given, role: str, notes: list[dict]) -> pd.DataFrame:
    """Documents with no text other than white space are dropped (and counted); none left is an error."""
    empty = frame["text"].str.strip() == ""
    if empty.all():
        raise DataError(f"{field}: every document of {source_name(given)} is empty ({len(frame)} of them); "
                        "there is no text to train on; check the column (data.text) or the files")
    if empty.any():
        where = ", ".join(frame.loc[empty, "source"].astype(str).unique()[:3]) if frame["source"].nunique() > 1 else source_name(given)
        notes.append({"level": "warn", "code": "empty_documents", "split": role,
                      "message": f"{int(empty.sum())} empty document(s) of {source_name(given)} were left out ({where})"})
    return frame.loc[~empty].reset_index(drop=True)


def load_document_splits(recipe, seed: int, count_tokens=None) -> TextSplits:
    """Train (and validation/test when given) as documents; the missing splits carved at random, by document."""
    spec = recipe.data
    notes: list[dict] = []

    def read(role: str) -> pd.DataFrame:
        value = getattr(spec, role)
        loaded = load_documents(value, f"data.{role}", spec.text, spec.subset, spec.split, seed, count_tokens)
        frame = drop_empty(loaded.rows, f"data.{role}", value, role, notes)
        notes.insert(0, sources_note(loaded, role))
        return frame

    train = read("train")
    validation = read("validation") if spec.validation else None
    test = read("test") if spec.test else None
    train, validation, test, carved = carve_missing(spec, train, validation, test, seed, "documents")
    return TextSplits(train, validation, test, [], notes + carved)


def load_reference_documents(spec) -> tuple[str, list[str]]:
    """The recipe's reference section (a table with a text column, or .txt files) as (name, documents)."""
    frame = read_documents(spec.data, "reference.data", spec.text, None, None, column_key="reference.text")
    texts = [t for t in frame["text"].tolist() if t.strip()]
    if not texts:
        raise DataError(f"reference.data: every document of {source_name(spec.data)} is empty; give reference text the model should keep")
    return source_name(spec.data), texts


def audit_documents(splits: TextSplits, encoded: dict | None, max_length: int, packing: bool) -> dict:
    """Documents (`rows`: one per document), characters, duplicates and train/test leakage per split; with the
    encoded splits, tokens, the sequences of max_length tokens they make and how full those are."""
    findings: list[dict] = list(splits.notes)
    frames = {"train": splits.train, "validation": splits.validation, "test": splits.test}
    summary = {}
    train_texts = set(splits.train["text"])
    for name, frame in frames.items():
        dup = int(frame["text"].duplicated().sum())
        summary[name] = {"rows": int(len(frame)), "characters": int(frame["text"].str.len().sum()), "duplicates": dup}
        if dup:
            findings.append({"level": "warn" if dup / len(frame) > 0.05 else "info", "code": "duplicates", "split": name,
                             "message": f"{dup} {name} document(s) repeat an earlier one exactly"})
        if name != "train":
            leaked = int(frame["text"].isin(train_texts).sum())
            summary[name]["in_train"] = leaked
            if leaked:
                findings.append({"level": "warn", "code": "leakage", "split": name,
                                 "message": f"{leaked} {name} document(s) also appear in train; the {name} perplexity is optimistic"})
        enc = (encoded or {}).get(name)
        if enc is not None:
            summary[name].update(enc.stats())
            if enc.truncated:
                findings.append({"level": "warn", "code": "truncated", "split": name,
                                 "message": f"{enc.truncated} {name} document(s) are longer than {enc.document_cap} tokens and were cut there"})
    out = {"task": "causal-lm", "findings": findings, "splits": summary, "max_length": max_length, "packing": packing,
           "sources": {n["split"]: n["sources"] for n in splits.notes if n.get("code") == "sources"}}
    if encoded:
        out["tokenisation"] = {k: {"documents": v.documents, "from_cache": v.from_cache} for k, v in encoded.items()}
    return out
