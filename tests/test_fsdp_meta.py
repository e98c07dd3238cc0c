"""The memory-saving load of FSDP2 runs (models/meta_load.py): rank 0 alone reads the weights, the
other process builds the model on the meta device and gets its shards from rank 0; the sharded
model computes what rank 0's unsharded model computes, LoRA adapters and tied embeddings included."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from chat_helpers import build_tiny_llama, write_chat_recipe
from test_distributed import ENV, free_port

pytestmark = pytest.mark.slow  # torchrun with 2 processes

# fp32 on the same inputs: the sharded forward all-gathers the same numbers; only the order of the
# matmuls' sums may differ between an unsharded and a sharded module (float rounding)
TOLERANCE = 1e-5


@pytest.fixture(scope="module")
def loaded(tmp_path_factory) -> dict[int, dict]:
    folder = tmp_path_factory.mktemp("fsdp_meta")
    from transformers import AutoConfig, AutoTokenizer, LlamaForCausalLM

    from helpers import save_seeded_checkpoint

    tiny = build_tiny_llama(folder / "tiny")
    config = AutoConfig.from_pretrained(tiny)
    config.tie_word_embeddings = True  # lm_head is embed_tokens: tied in the checkpoint and on every process
    llama = save_seeded_checkpoint(LlamaForCausalLM, config, AutoTokenizer.from_pretrained(tiny), folder / "llama")
    # what rank 1 is pointed at: the config and tokenizer, and a weights file that fails any attempt to read it
    weightless = folder / "weightless"
    shutil.copytree(llama, weightless, ignore=shutil.ignore_patterns("*.safetensors", "*.bin"))
    (weightless / "model.safetensors").write_bytes(b"rank 1 must not read this file")
    recipe = write_chat_recipe(folder, llama, folder / "train.jsonl", method="lora")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_addr", "127.0.0.1",
           "--master_port", str(free_port()), str(Path(__file__).with_name("fsdp_meta_worker.py")), str(recipe), str(weightless), str(folder)]
    env = {**ENV, "PYTHONPATH": ENV.get("PYTHONPATH", "") + ":" + str(Path(__file__).parent)}
    done = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, done.stderr[-3000:]
    return {rank: json.loads((folder / f"rank{rank}.json").read_text()) for rank in (0, 1)}


def test_only_rank0_reads_the_weights(loaded):
    assert loaded[0]["built_on_meta"] is False
    assert loaded[1]["built_on_meta"] is True  # and its weights file is not safetensors: reading it would have failed


def test_sharded_meta_load_matches_the_unsharded_model(loaded):
    for record in loaded.values():
        assert abs(record["loss"] - record["reference_loss"]) < TOLERANCE
        assert record["logits_max_diff"] < TOLERANCE


def test_rotary_buffers_come_from_rank0_and_each_process_holds_half(loaded):
    assert loaded[0]["inv_freq"] is not None and loaded[0]["inv_freq"] == loaded[1]["inv_freq"]
    for record in loaded.values():
        assert record["local_params"] <= 0.55 * record["full_params"]
