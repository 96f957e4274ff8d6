"""Peak memory and seconds per step of onelayer GRPO on a Qwen3 config with random weights.

Same workload as the TRL anchor (../shared/anchors/trl_grpo_memory.py, BENCHMARKS.md): one
prompt of 48 tokens x G = 8 completions x 512 new tokens, beta = 0, two steps, the second
reported. Random weights never emit EOS, so every completion runs to full length (worst case).

    python benchmarks/bench_train_step.py --config 8b --layer 16          # on the GPU machine
    python benchmarks/bench_train_step.py --config tiny --new-tokens 16   # CPU smoke run

Prints one RESULT json line; record it in benchmarks/RESULTS.md with card, date and command.
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from onelayer.config import build_config
from onelayer.model import load_policy
from onelayer.tasks import Task
from onelayer.train import build_objective, memory_gib, rl_step

CONFIGS = {
    # Qwen/Qwen3-8B config.json values
    "8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
               tie_word_embeddings=False),
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=2048, tie_word_embeddings=False),
}


def random_checkpoint(name: str, root: str) -> str:
    path = os.path.join(root, f"qwen3-{name}-random")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Qwen3Config(**CONFIGS[name], dtype="bfloat16")
    with torch.device(device):
        model = Qwen3ForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(path)
    vocab = {f"t{i}": i for i in range(config.vocab_size)}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="t0"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="t0", pad_token="t1",
                            eos_token="t2").save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--layer", default="16")
    ap.add_argument("--frozen-dtype", default=None)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--root", default="/tmp/onelayer-bench")
    a = ap.parse_args()

    path = random_checkpoint(a.config, a.root)
    prompt = " ".join(f"t{(7 * j) % 1000 + 3}" for j in range(48))
    task = Task("random", train=[{"q": prompt}], test=[], prompt=lambda r: r["q"],
                reward=lambda c, r: float(len(c) % 7))
    cfg = build_config({"model": path, "layer": a.layer, "group_size": a.group_size,
                        "prompts_per_step": 1, "max_new_tokens": a.new_tokens,
                        "frozen_dtype": a.frozen_dtype, "lr": 1e-5})
    t0 = time.perf_counter()
    policy = load_policy(path, layer=cfg.layer, frozen_dtype=cfg.frozen_dtype)
    load_s = time.perf_counter() - t0
    objective = build_objective(cfg, policy.device)
    optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
    if policy.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    steps = [rl_step(policy, optimizer, task, [task.train[0]], cfg, objective)
             for _ in range(a.steps)]
    last = steps[-1]
    result = dict(config=a.config, layer=policy.split.layer_index, frozen=policy.frozen_dtype,
                  group=a.group_size, new_tokens=a.new_tokens,
                  completion_len=last["completion_len"], load_s=round(load_s, 1),
                  step_s=[round(s["step_s"], 2) for s in steps],
                  gen_s=round(last["gen_s"], 2), update_s=round(last["update_s"], 2),
                  device=torch.cuda.get_device_name() if policy.device.type == "cuda" else "cpu",
                  torch=torch.__version__, **{k: round(v, 2) for k, v in memory_gib(policy.device).items()})
    if policy.device.type == "cuda":
        result["peak_alloc_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    print("RESULT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
