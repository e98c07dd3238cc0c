"""Test helpers for task chat: a tiny Llama with a byte-level BPE tokenizer trained locally,
a chat template set on it, and generated support conversations."""

from __future__ import annotations

import json
import os
import random
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

TEMPLATE = (
    "{{ bos_token }}{% for m in messages %}<|{{ m['role'] }}|>{{ m['content'] }}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)
SPECIAL = ["<s>", "<|pad|>", "<|system|>", "<|user|>", "<|assistant|>", "<|end|>"]

PRODUCTS = ["router", "phone", "laptop", "printer", "headset"]
PROBLEMS = {
    "will not turn on": "Hold the power button for ten seconds, then plug it in again.",
    "is very slow": "Restart it and install the latest update from the settings page.",
    "arrived broken": "Sorry about that. Reply with your order number and we will send a replacement.",
    "lost its password": "Open the login page and choose forgot password to reset it.",
}
GENERAL = [
    "The river runs through the old town and past the market.",
    "Bread is baked early in the morning before the shops open.",
    "The train to the coast leaves every hour from the north station.",
    "Children play in the park while their parents read the news.",
]


# the test tokenizer's template with tool support, written as Hugging Face templates are: tools listed
# up front, an assistant tool call rendered as <tool_call>{json}</tool_call>, a tool turn as its content
TOOL_TEMPLATE = (
    "{{ bos_token }}{% if tools %}<|system|>tools: {{ tools | tojson }}<|end|>{% endif %}"
    "{% for m in messages %}<|{{ m['role'] }}|>"
    "{% if m.get('tool_calls') %}{% for c in m['tool_calls'] %}<tool_call>{{ c['function'] | tojson }}</tool_call>{% endfor %}"
    "{% else %}{{ m['content'] }}{% endif %}<|end|>{% endfor %}"
    "{% if add_generation_prompt %}<|assistant|>{% endif %}"
)


def conversation(rng: random.Random) -> dict:
    product = rng.choice(PRODUCTS)
    problem = rng.choice(list(PROBLEMS))
    messages = []
    if rng.random() < 0.5:
        messages.append({"role": "system", "content": "You are the support assistant of an electronics shop."})
    messages.append({"role": "user", "content": f"My {product} {problem}."})
    messages.append({"role": "assistant", "content": PROBLEMS[problem]})
    if rng.random() < 0.3:
        messages.append({"role": "user", "content": "Thanks, that helped."})
        messages.append({"role": "assistant", "content": "Glad to help. Anything else?"})
    return {"messages": messages}


def write_conversations(path: Path, n: int, seed: int) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(conversation(rng)) + "\n" for _ in range(n)))
    return path


def write_general(path: Path, n: int = 12) -> Path:
    import pandas as pd

    pd.DataFrame({"text": [GENERAL[i % len(GENERAL)] for i in range(n)]}).to_csv(path, index=False)
    return path


def document(rng: random.Random, marker: str = "") -> str:
    """A raw-text document for task causal-lm: 1 to 6 support notes (a problem and its fix) in a row."""
    notes = []
    for _ in range(rng.randint(1, 6)):
        product, problem = rng.choice(PRODUCTS), rng.choice(list(PROBLEMS))
        notes.append(f"My {product} {problem}. {PROBLEMS[problem]}")
    return " ".join(notes) + (f" {marker}" if marker else "")


def write_documents(folder: Path, n: int, seed: int, marker: str = "") -> Path:
    """A folder of n .txt documents (one document per file); `marker` ends each (texts no cache has seen)."""
    rng = random.Random(seed)
    folder.mkdir(parents=True, exist_ok=True)
    for i in range(n):
        (folder / f"doc{i:03d}.txt").write_text(document(rng, marker))
    return folder


def build_tokenizer(with_template: bool = True):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    rng = random.Random(7)
    corpus = []
    for _ in range(200):
        for m in conversation(rng)["messages"]:
            corpus.append(m["content"])
    corpus += GENERAL
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIAL,
                                                        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="<|end|>", pad_token="<|pad|>",
                                        additional_special_tokens=["<|system|>", "<|user|>", "<|assistant|>"], model_max_length=256)
    if with_template:
        tokenizer.chat_template = TEMPLATE
    return tokenizer


def build_tiny_llama(folder: Path, with_template: bool = True, layers: int = 2) -> Path:
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = build_tokenizer(with_template)
    config = LlamaConfig(hidden_size=32, num_hidden_layers=layers, num_attention_heads=2, num_key_value_heads=2, intermediate_size=64,
                         vocab_size=len(tokenizer), max_position_embeddings=256, bos_token_id=tokenizer.bos_token_id,
                         eos_token_id=tokenizer.eos_token_id, pad_token_id=tokenizer.pad_token_id)
    from helpers import save_seeded_checkpoint

    return save_seeded_checkpoint(LlamaForCausalLM, config, tokenizer, folder)


def write_chat_recipe(folder: Path, model, train: Path, **changes) -> Path:
    from helpers import write_recipe_file

    recipe = {
        "task": "chat",
        "model": str(model),
        "data": {"train": str(train), "max_length": 64},
        "train": {"epochs": 3, "lr": 3e-3, "batch_size": 8, "seed": 0, "precision": "fp32", "eval_every": 4, "patience": None},
        "guards": {"baseline": False},
        "out": str(folder / "run"),
    }
    return write_recipe_file(folder, recipe, changes)


OPENINGS = ("Sorry, ", "Right, ")  # the same length: an apology is the preference, not the length


def preference_pair(rng: random.Random, randomise: bool = False, longer_chosen: bool = False, near: bool = False) -> dict:
    """A support prompt (with an order number, so pairs can be memorised) and two replies that differ
    only in the opening: the apology is chosen. randomise: chosen/rejected swapped at random (no
    preference to learn); longer_chosen: the chosen reply is the longer one and the openings random."""
    product, problem = rng.choice(PRODUCTS), rng.choice(list(PROBLEMS))
    prompt = f"Order {rng.randint(1000, 9999)}: my {product} {problem}."
    fix = PROBLEMS[problem]
    chosen, rejected = OPENINGS[0] + fix, OPENINGS[1] + fix
    if near:  # replies that differ in their last character only: the setting of likelihood displacement (Razin et al. 2024)
        chosen, rejected = fix + " Thanks.", fix + " Thanks!"
    if longer_chosen:
        first, second = rng.sample(OPENINGS, 2)
        chosen, rejected = first + fix + " " + rng.choice(GENERAL), second + fix
    if randomise and rng.random() < 0.5:
        chosen, rejected = rejected, chosen
    return {"prompt": prompt, "chosen": chosen, "rejected": rejected}


def write_preferences(path: Path, n: int, seed: int, **kinds) -> Path:
    rng = random.Random(seed)
    path.write_text("".join(json.dumps(preference_pair(rng, **kinds)) + "\n" for _ in range(n)))
    return path


def write_preference_recipe(folder: Path, model, train: Path, **changes) -> Path:
    from helpers import write_recipe_file

    recipe = {
        "task": "preference",
        "model": str(model),
        "data": {"train": str(train), "max_length": 64},
        "train": {"epochs": 3, "lr": 5e-3, "batch_size": 8, "seed": 0, "precision": "fp32", "eval_every": 5, "patience": None},
        "out": str(folder / "run"),
    }
    return write_recipe_file(folder, recipe, changes)
