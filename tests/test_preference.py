"""task: preference — the objectives against their published formulas, learning a constructed
preference, the length and displacement checks, the cached reference, and bad input."""

from __future__ import annotations

import json
import math

import pytest
import torch

from chat_helpers import build_tiny_llama, write_preference_recipe, write_preferences
from helpers import cli
from honed.session import prepare, setup
from honed.tasks.preference import model as pref


def logsigmoid(x: float) -> float:
    return -math.log1p(math.exp(-x))


# one pair: summed log-probabilities of the policy and the reference, reply token counts
PC, PR, RC, RR, LC, LR = -10.0, -12.5, -11.0, -11.5, 5.0, 8.0


@pytest.mark.parametrize("loss,beta,smoothing,gamma,expected", [
    # DPO (Rafailov et al. 2023, eq. 7; TRL's "sigmoid" loss with label smoothing): h = (π_c − π_r) − (ref_c − ref_r)
    ("dpo", 0.1, 0.0, 0.0, -logsigmoid(0.1 * ((PC - PR) - (RC - RR)))),
    ("dpo", 0.5, 0.2, 0.0, -0.8 * logsigmoid(0.5 * 2.0) - 0.2 * logsigmoid(-0.5 * 2.0)),
    # IPO (Azar et al. 2023, eq. 17; TRL averages the log-probabilities per token): (h − 1/(2β))²
    ("ipo", 0.1, 0.0, 0.0, ((PC / LC - PR / LR) - (RC / LC - RR / LR) - 1 / 0.2) ** 2),
    # SimPO (Meng et al. 2024, eq. 6): −log σ(β/|y_w|·log π(y_w) − β/|y_l|·log π(y_l) − γ)
    ("simpo", 2.0, 0.0, 0.5, -logsigmoid(2.0 * (PC / LC - PR / LR) - 0.5)),
])
def test_objectives_equal_the_published_formulas(loss, beta, smoothing, gamma, expected):
    t = lambda v: torch.tensor([v], dtype=torch.float64)  # noqa: E731
    got = pref.pair_losses(t(PC), t(PR), t(RC), t(RR), t(LC), t(LR), pref.Objective(loss, beta, smoothing, gamma))
    assert abs(float(got) - expected) < 1e-6


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    return build_tiny_llama(tmp_path_factory.mktemp("pref-llama"))


def run(folder, tiny_llama, kinds: dict, **changes):
    import honed

    train = write_preferences(folder / "pairs.jsonl", 80, 2, **kinds)
    result = honed.run(str(write_preference_recipe(folder, tiny_llama, train, **changes)), show_progress=False)
    return result.metrics


def test_learns_the_constructed_preference(golden_run):
    _, metrics, run_dir, _ = golden_run("preference_lora")  # the apology is preferred, lengths matched
    assert metrics["validation"]["preference_accuracy"] >= 0.9 and metrics["test"]["preference_accuracy"] >= 0.9
    assert metrics["test"]["reward_margin"] > 0 and metrics["test"]["kl"] >= 0
    assert metrics["guards"]["baseline"]["status"] == "ok"  # quiet on the length-matched pairs
    assert metrics["guards"]["forgetting"]["status"] == "ok"  # a mild run: no displacement
    report = (run_dir / "report.html").read_text()
    assert '<section id="preference">' in report and "Reward margin" in report and "prefer the longer reply" in report
    history = [json.loads(line) for line in (run_dir / "history.jsonl").read_text().splitlines()]
    assert {"val_reward_margin", "val_chosen_logp", "val_rejected_logp", "val_kl", "train_preference_accuracy"} <= set(history[0])
    best = metrics["guards"]["overfitting"]["details"]["best_step"]
    assert best == min((h for h in history if h["val_preference_accuracy"] == 1.0), key=lambda h: h["val_loss"])["step"]


@pytest.mark.slow
def test_bias_guard_compares_groups(tmp_path, tiny_llama):
    """Team a's pairs carry the apology preference, team b's are randomised: their accuracies differ."""
    import random

    import honed
    from chat_helpers import preference_pair

    rng = random.Random(4)
    rows = [{**preference_pair(rng, randomise=i % 2 == 1), "team": "ab"[i % 2]} for i in range(160)]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    recipe = write_preference_recipe(tmp_path, tiny_llama, path, **{"data.groups": ["team"], "guards.min_group_size": 5,
                                                                   "data.test_fraction": 0.25})
    bias = honed.run(str(recipe), show_progress=False).metrics["guards"]["bias"]
    groups = bias["details"]["columns"]["team"]["groups"]
    assert groups["a"]["preference_accuracy"] > groups["b"]["preference_accuracy"]
    assert bias["status"] == "warn" and "team=b" in bias["summary"]


@pytest.mark.slow  # whole preference runs: 17-35 s
def test_randomised_preference_is_not_learned_and_the_baseline_warns(tmp_path, tiny_llama):
    metrics = run(tmp_path, tiny_llama, {"randomise": True})
    assert metrics["test"]["preference_accuracy"] <= 0.75
    assert metrics["guards"]["baseline"]["status"] == "warn"


@pytest.mark.slow  # whole preference runs: 17-35 s
def test_length_guard_fires_when_the_chosen_reply_is_always_longer(tmp_path, tiny_llama):
    metrics = run(tmp_path, tiny_llama, {"longer_chosen": True}, **{"data.max_length": 128})  # no reply cut to a tie
    baseline = metrics["guards"]["baseline"]
    assert baseline["details"]["length_baseline"] == 1.0
    assert baseline["status"] == "warn" and "longer reply" in baseline["summary"]
    audit = json.loads((tmp_path / "run" / "audit.json").read_text())
    assert any(f["code"] == "length_bias" for f in audit["findings"])


@pytest.mark.slow
def test_likelihood_displacement_fires_on_a_hard_push(tmp_path, tiny_llama):
    """Replies that differ in their last character, full fine-tuning at a high rate for many epochs: the
    model pushes both replies down (Razin et al. 2024) and drifts far from where it started. The mild
    LoRA run of test_learns_the_constructed_preference is the quiet twin."""
    metrics = run(tmp_path, tiny_llama, {"near": True}, **{"method": "full", "train.lr": 1e-2, "train.epochs": 5, "train.eval_every": 10})
    forgetting = metrics["guards"]["forgetting"]
    assert metrics["test"]["preference_accuracy"] >= 0.9
    assert forgetting["details"]["displacement"] > forgetting["details"]["displacement_threshold"]
    assert forgetting["status"] == "warn" and "likelihood displacement" in forgetting["summary"].lower()


def test_cached_reference_equals_the_model_on_the_fly(tmp_path, tiny_llama):
    train = write_preferences(tmp_path / "pairs.jsonl", 40, 0)
    recipe, splits = prepare(str(write_preference_recipe(tmp_path, tiny_llama, train)))
    session = setup(recipe, splits)
    split = session.encoded["train"]
    batch = pref.collate(split, torch.arange(6), session.bundle.pad_id)
    session.bundle.model.eval()
    with torch.no_grad():
        logps, _ = pref.token_logps(session.bundle.model, batch)
    assert torch.allclose(logps.sum(1), batch["reference"], atol=1e-5)
    # the untouched model scored as the policy: the reference's own figures, and no divergence from itself
    outputs = session.outputs(session.bundle.model, session.encoded["validation"])
    assert torch.allclose(outputs[:, 0:2], outputs[:, 2:4], atol=1e-4)
    figures = pref.metrics(outputs, session.encoded["validation"])
    assert abs(figures["kl"]) < 1e-3 and abs(figures["reward_margin"]) < 1e-3


@pytest.mark.parametrize("rows,message", [
    ([{"prompt": "hi", "chosen": "a"}] * 12, "data.rejected: column 'rejected' not found in pairs.jsonl"),
    ([{"prompt": "hi", "chosen": "same", "rejected": "same"}] * 12, "the chosen reply equals the rejected one"),
    ([{"prompt": "hi", "chosen": "a", "rejected": None}] + [{"prompt": "hi", "chosen": "a", "rejected": "b"}] * 11,
     "pairs.jsonl row 1: the row has no 'rejected'"),
    ([{"prompt": "word " * 200, "chosen": "a", "rejected": "b"}] * 12, "leaving no room for the reply within data.max_length=64"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "yo"}]}] * 12, "use task: chat"),
])
def test_bad_preference_files_are_refused_in_one_line(tmp_path, tiny_llama, capsys, rows, message):
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    code, _, err = cli(["run", write_preference_recipe(tmp_path, tiny_llama, path)], capsys)
    assert code in (2, 3) and message in err and len(err.strip().splitlines()) == 1, err
    assert not (tmp_path / "run" / "model").exists()


def test_a_preference_file_given_to_chat_is_refused(tmp_path, tiny_llama, capsys):
    from chat_helpers import write_chat_recipe

    pairs = write_preferences(tmp_path / "pairs.jsonl", 20, 0)
    code, _, err = cli(["check", write_chat_recipe(tmp_path, tiny_llama, pairs)], capsys)
    assert code == 3 and "use task: preference" in err and len(err.strip().splitlines()) == 1


def test_trl_forms_are_read(tmp_path, tiny_llama, capsys):
    """TRL's conversational forms: a messages prompt with assistant-message replies, and whole conversations
    sharing a prefix (the prompt is what they share)."""
    from honed.recipe import load_recipe
    from honed.tasks.preference.data import read_pairs

    user = [{"role": "system", "content": "Be kind."}, {"role": "user", "content": "My phone is slow."}]
    rows = [{"prompt": user, "chosen": [{"role": "assistant", "content": "Sorry, restart it."}],
             "rejected": [{"role": "assistant", "content": "Right, restart it."}]},
            {"chosen": user + [{"role": "assistant", "content": "Sorry, restart it."}],
             "rejected": user + [{"role": "assistant", "content": "Right, restart it."}]}]
    path = tmp_path / "pairs.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    spec = load_recipe(str(write_preference_recipe(tmp_path, tiny_llama, path))).data
    frame = read_pairs(str(path), "data.train", spec)
    assert frame["prompt"].tolist() == [user, user]
    assert frame["chosen"].tolist() == ["Sorry, restart it."] * 2 and frame["rejected"].tolist() == ["Right, restart it."] * 2
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps({"chosen": user + [{"role": "assistant", "content": "a"}],
                               "rejected": [{"role": "user", "content": "other"}, {"role": "assistant", "content": "b"}]}) + "\n")
    with pytest.raises(Exception, match="bad.jsonl row 1: without a prompt, chosen and rejected must be whole conversations"):
        read_pairs(str(bad), "data.train", spec)


@pytest.mark.slow
def test_qlora_preference_run(tmp_path, tiny_llama):
    pytest.importorskip("bitsandbytes")
    metrics = run(tmp_path, tiny_llama, {}, **{"method": "qlora", "train.max_steps": 12, "train.eval_every": 4})
    assert metrics["run"]["method"] == "qlora" and metrics["run"]["steps"] == 12
    assert metrics["test"]["preference_accuracy"] >= 0.9 and metrics["test"]["reward_margin"] > 0
    assert (tmp_path / "run" / "adapter" / "adapter_config.json").exists()
