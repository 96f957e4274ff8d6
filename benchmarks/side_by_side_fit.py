"""The longest completion that fits a memory budget at G = 8: predicted by the planner, then
verified by ONE measured step at that length. Part of benchmarks/side_by_side.sh.

    python benchmarks/side_by_side_fit.py --config 8b --layer 16 --micro-batch 1   # GPU machine
    python benchmarks/side_by_side_fit.py --config tiny --layer 1 --budget-gib 0.05  # CPU smoke run

Prediction: onelayer.memory.largest_fit (what `onelayer plan` reports as the longest completion)
for the workload of benchmarks/bench_train_step.py (1 prompt of 48 tokens x G, layer, NF4 on
CUDA), the budget taken as peak *reserved* memory (the target of BENCHMARKS.md: "under 24 GiB
reserved"; `onelayer plan --gpu-memory 24GiB` also takes 0.5 GiB off for the CUDA context, and
that figure is printed too).

Verification (CUDA): torch.cuda.set_per_process_memory_fraction(budget / card) before anything
is allocated, so the caching allocator can never reserve more than the budget (it frees its
cache and retries before it raises out-of-memory); then one rl_step at the predicted length with
every completion at full length (random weights never emit EOS). The AdamW state is created
before the step (a zero-learning-rate step on zero gradients), so the step holds what a
steady-state step holds. Prints a PLAN line (before any weight is loaded: a step killed by a
timeout still leaves the prediction) and a FIT line.
"""
from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import time

import torch

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))
from bench_train_step import random_checkpoint  # noqa: E402  (the same random checkpoint)

from onelayer.config import build_config  # noqa: E402
from onelayer.memory import GiB, ModelDims, largest_fit, plan_onelayer, read_model_config, workload_from_config  # noqa: E402
from onelayer.memory.report import CUDA_CONTEXT  # noqa: E402
from onelayer.model import load_policy  # noqa: E402
from onelayer.tasks import Task  # noqa: E402
from onelayer.single_turn import rl_step  # noqa: E402
from onelayer.update import build_objective  # noqa: E402

PROMPT = " ".join(f"t{(7 * j) % 1000 + 3}" for j in range(48))   # bench_train_step's prompt


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", default="tiny")
    ap.add_argument("--layer", default="16")
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--micro-batch", type=int, default=1,
                    help="sequences per forward/backward in the update (0: the whole group)")
    ap.add_argument("--generation-batch", type=int, default=0, help="rows per generate call (0: all G)")
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--budget-gib", type=float, default=24.0, help="peak reserved memory allowed")
    ap.add_argument("--new-tokens", type=int, default=0, help="verify at this length (0: the prediction)")
    ap.add_argument("--max-new-tokens", type=int, default=0, help="cap on the verified length (0: none)")
    ap.add_argument("--root", default="/tmp/onelayer-bench")
    ap.add_argument("--no-step", action="store_true", help="predict only")
    a = ap.parse_args()

    cuda = torch.cuda.is_available()
    budget = int(a.budget_gib * GiB)
    cap = None
    if cuda:  # before any allocation: nothing may be reserved beyond the budget
        total = torch.cuda.get_device_properties(0).total_memory
        torch.cuda.set_per_process_memory_fraction(min(1.0, budget / total))
        cap = "torch.cuda.set_per_process_memory_fraction"
    path = random_checkpoint(a.config, a.root)
    options = {"model": path, "layer": a.layer, "group_size": a.group_size, "prompts_per_step": 1,
               "max_new_tokens": 512, "micro_batch": a.micro_batch, "generation_batch": a.generation_batch,
               "lr": 1e-5, "beta": a.beta}
    cfg = build_config(options)
    from transformers import AutoTokenizer
    prompt_tokens = len(AutoTokenizer.from_pretrained(path)(PROMPT)["input_ids"])
    dims = ModelDims.from_config(read_model_config(path), path)
    w = workload_from_config(cfg, dims, prompt_tokens=prompt_tokens)
    limit = dims.max_positions - prompt_tokens
    predicted = largest_fit(dims, w, budget, "new_tokens", limit)
    whole = largest_fit(dims, dataclasses.replace(w, micro_batch=0), budget, "new_tokens", limit)
    card = largest_fit(dims, w, budget - CUDA_CONTEXT, "new_tokens", limit) if budget > CUDA_CONTEXT else 0
    at = lambda n: plan_onelayer(dims, dataclasses.replace(w, new_tokens=n))  # noqa: E731
    plan = dict(config=a.config, group=a.group_size, prompt_tokens=prompt_tokens, layer=w.layer,
                frozen=w.frozen, micro_batch=a.micro_batch, generation_batch=a.generation_batch,
                beta=a.beta, budget_gib=a.budget_gib, predicted_new_tokens=predicted,
                predicted_reserved_gib=round(at(predicted).reserved / GiB, 2) if predicted else None,
                predicted_peak_phase=at(predicted).peak.name if predicted else None,
                predicted_whole_batch_new_tokens=whole, predicted_card_new_tokens=card,
                predicted_reserved_gib_at_8192=round(at(8192).reserved / GiB, 2) if limit >= 8192 else None)
    print("PLAN " + json.dumps(plan), flush=True)
    if a.no_step:
        return

    new_tokens = a.new_tokens or predicted
    if a.max_new_tokens:
        new_tokens = min(new_tokens, a.max_new_tokens)
    cfg = build_config({**options, "max_new_tokens": new_tokens})
    task = Task("random", train=[{"q": PROMPT}], test=[], prompt=lambda r: r["q"],
                reward=lambda c, r: float(len(c) % 7))
    result = dict(config=a.config, group=a.group_size, new_tokens=new_tokens, micro_batch=a.micro_batch,
                  generation_batch=a.generation_batch, beta=a.beta, budget_gib=a.budget_gib, cap=cap,
                  predicted_new_tokens=predicted,
                  predicted_reserved_gib=round(at(new_tokens).reserved / GiB, 2),
                  device=torch.cuda.get_device_name() if cuda else "cpu")
    t0 = time.perf_counter()
    try:
        policy = load_policy(path, layer=cfg.layer, frozen_dtype=cfg.frozen_dtype, keep_reference=cfg.beta > 0)
        objective = build_objective(cfg, policy.device)
        optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
        # The AdamW state (fp32 exp_avg, exp_avg_sq) resident before the step, as in every step but
        # the first: a step at learning rate 0 on zero gradients changes no weight.
        for p in policy.layer.parameters():
            p.grad = torch.zeros_like(p)
        for group in optimizer.param_groups:
            group["lr"] = 0.0
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        for group in optimizer.param_groups:
            group["lr"] = cfg.lr
        result["load_s"] = round(time.perf_counter() - t0, 1)
        if cuda:
            torch.cuda.synchronize()
            torch.cuda.reset_peak_memory_stats()
        step = rl_step(policy, optimizer, task, [task.train[0]], cfg, objective)
        result.update(status="ok", completion_len=step["completion_len"], step_s=round(step["step_s"], 1),
                      gen_s=round(step["gen_s"], 1), update_s=round(step["update_s"], 1))
    except torch.OutOfMemoryError as exc:
        result.update(status="oom", error=str(exc).splitlines()[0][:300])
    if cuda:
        result.update(peak_reserved_gib=round(torch.cuda.max_memory_reserved() / GiB, 2),
                      peak_alloc_gib=round(torch.cuda.max_memory_allocated() / GiB, 2))
    print("FIT " + json.dumps(result), flush=True)


if __name__ == "__main__":
    main()
