"""Chat encoding through the tokenisation cache (issue 17, part 1; tasks/chat/encoding.py): the time to
encode N generated support conversations with the test tokenizer and template (tests/chat_helpers.py),
rendered one by one without a cache (the encoding before the cache, kept here as the reference), then
through the cache cold (first run) and warm (second run), and the `data.mix_by: tokens` count cold and
warm (after an untimed warm-up of the template and of datasets). The cache lives in a fresh temporary HF_DATASETS_CACHE, so the first run is a user's first run.

    python benchmarks/chat_token_cache.py                 # 500 conversations
    python benchmarks/chat_token_cache.py --rows 5000
"""

from __future__ import annotations

import argparse
import os
import random
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "src"), str(ROOT / "tests")]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=500, help="conversations to encode (default 500)")
    parser.add_argument("--max-length", type=int, default=256, help="data.max_length of the encoding (default 256)")
    args = parser.parse_args()
    os.environ["HF_DATASETS_CACHE"] = tempfile.mkdtemp(prefix="honed-chat-cache-")
    import pandas as pd

    from chat_helpers import build_tokenizer, conversation
    from honed.tasks.chat.encoding import conversation_token_counter, encode_conversations, render_with_mask

    tokenizer = build_tokenizer()
    rng = random.Random(0)
    convs = [conversation(rng)["messages"] for _ in range(args.rows)]

    def timed(fn):  # (result, "wall s (CPU s)"): on a shared host the CPU time of this process is the steadier figure
        wall, cpu = time.perf_counter(), time.process_time()
        out = fn()
        return out, f"{time.perf_counter() - wall:.3f} s ({time.process_time() - cpu:.3f} s CPU)"

    # warm-up, not timed: the template's compilation, datasets' import and first map (on other conversations)
    render_with_mask(tokenizer, convs[0])
    encode_conversations(tokenizer, [[{"role": "user", "content": "warm"}, {"role": "assistant", "content": "up"}]], 64, True)
    _, uncached = timed(lambda: [render_with_mask(tokenizer, c) for c in convs])
    first, cold = timed(lambda: encode_conversations(tokenizer, convs, args.max_length, True))
    second, warm = timed(lambda: encode_conversations(tokenizer, convs, args.max_length, True))
    count = conversation_token_counter(tokenizer)
    frame = pd.DataFrame({"messages": convs})
    _, count_cold = timed(lambda: count(frame))
    _, count_warm = timed(lambda: count(frame))
    assert not first.from_cache and second.from_cache and second.batches_tokenised == 0
    print(f"{args.rows} conversations, {int(first.lengths.sum())} tokens, max_length {args.max_length}")
    print(f"  rendered one by one, no cache: {uncached}")
    print(f"  through the cache, first run:  {cold} (from_cache={first.from_cache})")
    print(f"  through the cache, second run: {warm} (from_cache={second.from_cache}, batches tokenised {second.batches_tokenised})")
    print(f"  mix_by tokens count: first {count_cold}, second {count_warm}")


if __name__ == "__main__":
    main()
