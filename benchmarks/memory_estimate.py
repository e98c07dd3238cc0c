"""The memory estimate against the measured peak, for three configurations, each in a fresh process.

    python benchmarks/memory_estimate.py

Peak RSS is the whole process (Python, torch, tokenizer, data, the feature cache); the estimate
covers weights, gradients, optimizer state and activations plus a fixed runtime allowance.
"""

from __future__ import annotations

import json
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))


def build(kind: str, folder: Path) -> dict:
    from helpers import make_texts

    data = folder / "train.csv"
    make_texts(1200, seed=1).to_csv(data, index=False)
    if kind == "wordllama":
        model = "wordllama"
    else:
        from tokenizers import Tokenizer, models, normalizers, pre_tokenizers, processors, trainers
        from transformers import BertConfig, BertForSequenceClassification, BertTokenizerFast

        tok = Tokenizer(models.WordPiece(unk_token="[UNK]"))
        tok.normalizer = normalizers.BertNormalizer(lowercase=True)
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.train_from_iterator(make_texts(400, 3)["text"], trainers.WordPieceTrainer(vocab_size=200, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]))
        tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
        wide = kind == "bert-base-size"
        config = BertConfig(vocab_size=30522 if wide else 200, hidden_size=768 if wide else 128, num_hidden_layers=6 if wide else 2,
                            num_attention_heads=12 if wide else 2, intermediate_size=3072 if wide else 256)
        BertForSequenceClassification(config).save_pretrained(folder / "model")
        BertTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]", cls_token="[CLS]", sep_token="[SEP]",
                          mask_token="[MASK]").save_pretrained(folder / "model")
        model = str(folder / "model")
    return {"model": model, "data": {"train": str(data), "max_length": 64}, "method": "full",
            "train": {"epochs": 1, "batch_size": 32, "precision": "fp32", "lr": 1e-4},
            "guards": {"baseline": False}, "out": str(folder / "run")}


def one(kind: str) -> None:
    import honed

    with tempfile.TemporaryDirectory() as tmp:
        timing = honed.run(build(kind, Path(tmp)), show_progress=False).metrics["timing"]
    print(json.dumps({"config": kind, "estimate_mb": timing["memory_estimate_mb"], "peak_rss_mb": timing["peak_rss_mb"]}))


def main() -> None:
    if len(sys.argv) > 2 and sys.argv[1] == "--one":
        one(sys.argv[2])
        return
    print(f"{'configuration':<22} {'estimate MB':>12} {'peak RSS MB':>12} {'ratio':>7}")
    for kind in ("bert-small", "wordllama", "bert-base-size"):
        out = subprocess.run([sys.executable, __file__, "--one", kind], capture_output=True, text=True, check=True)
        row = json.loads(out.stdout.strip().splitlines()[-1])
        print(f"{kind:<22} {row['estimate_mb']:>12,.0f} {row['peak_rss_mb']:>12,.0f} {row['estimate_mb'] / row['peak_rss_mb']:>7.2f}")


if __name__ == "__main__":
    main()
