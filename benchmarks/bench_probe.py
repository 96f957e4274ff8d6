"""Time and peak memory of `onelayer probe` on a Qwen3 config with random weights (issue
"Which layer": the probe's cost on the Qwen3-8B config in NF4; its ranking means nothing on
random weights).

    python benchmarks/bench_probe.py --config 8b     # on the GPU machine (NF4 frozen blocks)
    python benchmarks/bench_probe.py --config tiny   # CPU smoke run

The prompts are words of the random checkpoint's vocabulary; a random reward (a plug-in) gives
the groups advantages, so every block's gradient statistics are real work. Prints one RESULT
json line: record it in benchmarks/RESULTS.md with card, date and command.
"""
from __future__ import annotations

import argparse
import json
import os
import random
import tempfile
import time

import torch

from bench_train_step import random_checkpoint
from onelayer.config import build_config
from onelayer.probe import run_probe

REWARD = '''import random

def noise(prompts, completions, **columns):
    """A reward with a spread in every group: advantages, and so gradients, are not zero."""
    rng = random.Random(len(completions))
    return [rng.random() for _ in completions]
'''


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=("8b", "tiny"), default="tiny")
    ap.add_argument("--batches", type=int, default=2)
    ap.add_argument("--prompts", type=int, default=2)
    ap.add_argument("--group-size", type=int, default=4)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--root", default="/tmp/onelayer-bench")
    args = ap.parse_args()

    model = random_checkpoint(args.config, args.root)
    work = tempfile.mkdtemp(dir=args.root)
    rng = random.Random(0)
    vocab = 2048 if args.config == "tiny" else 151936
    with open(os.path.join(work, "prompts.jsonl"), "w") as f:
        for i in range(64):
            words = " ".join(f"t{rng.randrange(3, vocab)}" for _ in range(48))
            f.write(json.dumps({"prompt": words, "answer": "1"}) + "\n")
    with open(os.path.join(work, "bench_reward.py"), "w") as f:
        f.write(REWARD)
    cfg = build_config(dict(model=model, task=os.path.join(work, "prompts.jsonl"), test_size=8,
                            reward=[os.path.join(work, "bench_reward.py") + ":noise"], chat=False,
                            prompts_per_step=args.prompts, group_size=args.group_size,
                            max_new_tokens=args.new_tokens))
    if torch.cuda.is_available():
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    result = run_probe(cfg, batches=args.batches, progress=False)
    seconds = time.perf_counter() - t0
    ranking = sorted(range(len(result.scores)), key=lambda i: -result.scores[i])
    out = {"config": args.config, "batches": args.batches, "rows": args.prompts * args.group_size,
           "new_tokens": args.new_tokens, "seconds": round(seconds, 1), "top5": ranking[:5],
           "device": torch.cuda.get_device_name() if torch.cuda.is_available() else "cpu"}
    if torch.cuda.is_available():
        out.update(peak_reserved_gib=round(torch.cuda.max_memory_reserved() / 2**30, 2),
                   peak_allocated_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2))
    print("RESULT " + json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
