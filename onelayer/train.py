"""Single-layer GRPO: the whole RL step in `rl_step`, the run around it in `train`.

One step:  prompts -> G completions each (current policy) -> rewards -> group advantages
           -> prefix once (h_L cached) -> old (and reference) log-probs from h_L, no grad
           -> for each epoch and minibatch: layer L + suffix from h_L with grad, policy loss,
              backward into layer L's fp32 master weights, AdamW step, refresh compute copy.
"""
from __future__ import annotations

import json
import random
import resource
import time
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from .checkpoint import CONFIG_FILE, LAYER_FILE, save_layer
from .config import TrainConfig, config_json, task_options
from .errors import UserError
from .evaluate import evaluate as score_task, render_prompt
from .model import Policy, load_policy
from .rollout import Rollout, SamplingParams, concat_rollouts, generate_completions, select_rollout
from .tasks import Task, load_task
from .update import Job, Objective, build_objective, optimize, schedule, sync_device

@dataclass
class TrainResult:
    accuracy_before: float
    accuracy_after: float
    steps: int
    seconds: float
    output: Path


# ---------------------------------------------------------------------------------------------
# One RL step
# ---------------------------------------------------------------------------------------------

# DAPO dynamic sampling draws at most this many batches of prompts per step to find groups
# whose rewards differ; what it found by then is trained on.
MAX_SAMPLING_ROUNDS = 4


@dataclass
class ScoredBatch:
    """G completions per prompt, their rewards [B] and group ids [B] (consecutive rows)."""
    rollout: Rollout
    rewards: Tensor
    group_ids: Tensor
    groups_sampled: int


def sample_and_score(policy: Policy, task: Task, rows: list[dict], cfg: TrainConfig,
                     more_rows: Callable[[int], list[dict]] | None = None) -> ScoredBatch:
    """Sample G completions for each row and score them. With dynamic sampling, groups whose
    rewards are all equal (no learning signal) are dropped and `more_rows` refills the batch."""
    G = cfg.group_size
    tokenizer, lm = policy.tokenizer, policy.split.lm
    sampling = SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k)
    kept, kept_rewards, sampled, wanted, groups_kept = [], [], 0, len(rows), 0
    for round_ in range(MAX_SAMPLING_ROUNDS if cfg.dynamic_sampling and more_rows else 1):
        if round_:
            rows = more_rows(wanted - groups_kept)
        prompts = [render_prompt(tokenizer, task, r) for r in rows]
        rollout = generate_completions(lm, tokenizer, prompts, sampling, repeat=G)
        rewards = torch.tensor(task.rewards(rollout.texts, [r for r in rows for _ in range(G)]),
                               dtype=torch.float32)
        sampled += len(rows)
        if cfg.dynamic_sampling:
            informative = rewards.view(-1, G).std(1) > 0
            keep = informative.repeat_interleave(G).nonzero().squeeze(1)
            rollout, rewards = select_rollout(rollout, keep), rewards[keep]
        kept.append(rollout)
        kept_rewards.append(rewards)
        groups_kept += len(rewards) // G
        if groups_kept >= wanted:
            break
    rewards = torch.cat(kept_rewards)
    rollout = concat_rollouts(kept, tokenizer.pad_token_id) if len(kept) > 1 else kept[0]
    group_ids = torch.arange(groups_kept).repeat_interleave(G)
    return ScoredBatch(rollout, rewards, group_ids, sampled)


def rl_step(policy: Policy, optimizer: torch.optim.Optimizer, task: Task, rows: list[dict],
            cfg: TrainConfig, objective: Objective,
            more_rows: Callable[[int], list[dict]] | None = None) -> dict:
    t0 = time.perf_counter()
    batch = sample_and_score(policy, task, rows, cfg, more_rows)
    sync_device(policy.device)
    t_gen = time.perf_counter()

    rollout, rewards = batch.rollout, batch.rewards
    stats = []
    if len(rewards):
        advantages = objective.advantages_fn(rewards.to(policy.device),
                                             batch.group_ids.to(policy.device),
                                             mode=objective.advantage_mode)
        # One advantage per sequence, on every one of its tokens.
        token_advantages = advantages[:, None].expand_as(rollout.completion_mask)
        stats = optimize(policy, optimizer, rollout, token_advantages, schedule(cfg), objective)
    sync_device(policy.device)
    t_end = time.perf_counter()

    completion_len = rollout.completion_mask.sum(1).float()
    metrics = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0]} if stats else {
        "loss": 0.0, "kl": 0.0, "clip_ratio": 0.0}
    metrics.update(
        reward_mean=rewards.mean().item() if len(rewards) else 0.0,
        reward_std=rewards.std().item() if len(rewards) > 1 else 0.0,
        completion_len=completion_len.mean().item() if len(rewards) else 0.0,
        step_s=t_end - t0, gen_s=t_gen - t0, update_s=t_end - t_gen,
        tokens_per_s=completion_len.sum().item() / (t_end - t0))
    if cfg.dynamic_sampling:
        metrics.update(groups_sampled=batch.groups_sampled, groups_kept=len(rewards) // cfg.group_size)
    return metrics


# ---------------------------------------------------------------------------------------------
# The run
# ---------------------------------------------------------------------------------------------

def output_dir(cfg: TrainConfig, policy: Policy) -> Path:
    if cfg.output:
        path = Path(cfg.output)
    else:
        name = Path(cfg.model).name if cfg.model != "demo" else "demo"
        stamp = datetime.now().strftime("%Y%m%d-%H%M%S")
        path = Path("runs") / f"{name}-L{policy.split.layer_index}-{stamp}"
    if path.exists() and not path.is_dir():
        raise UserError(f"--output {path} exists and is not a directory")
    if any((path / f).exists() for f in (LAYER_FILE, CONFIG_FILE)):
        raise UserError(f"--output {path} already holds a trained layer; choose another directory")
    return path


def memory_gib(device: torch.device) -> dict:
    if device.type == "cuda":
        return {"peak_mem_gib": torch.cuda.max_memory_reserved(device) / 2**30}
    return {"rss_gib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 2**20}  # KiB on Linux


def task_job(task: Task, policy: Policy, optimizer, cfg: TrainConfig, objective: Objective,
             progress: bool) -> Job:
    """Single-turn GRPO on a task's rows; greedy accuracy on its held-out rows."""
    test_rows = list(task.test[:cfg.eval_samples])
    order = random.Random(cfg.seed).sample(range(len(task.train)), len(task.train))
    drawn = 0

    def next_rows(n: int) -> list[dict]:
        """The next n training rows of a seeded shuffle, cycling."""
        nonlocal drawn
        picks = [task.train[order[(drawn + i) % len(order)]] for i in range(n)]
        drawn += n
        return picks

    def score(label: str) -> float:
        with tqdm(total=len(test_rows), desc=f"eval ({label})", disable=not progress,
                  leave=False) as bar:
            return score_task(policy.split.lm, policy.tokenizer, task, test_rows,
                              max_new_tokens=cfg.max_new_tokens, progress=bar).score

    return Job(task.name, lambda: rl_step(policy, optimizer, task, next_rows(cfg.prompts_per_step),
                                          cfg, objective, next_rows),
               score, "accuracy", len(test_rows))


def train(cfg: TrainConfig, *, progress: bool = True, echo: Callable[[str], None] = print) -> TrainResult:
    """Run single-layer RL as `cfg` says. All input is checked before anything is written."""
    from .agentic import agentic_job, check_env

    t_start = time.perf_counter()
    random.seed(cfg.seed)
    torch.manual_seed(cfg.seed)
    if cfg.env:
        check_env(cfg)
    else:
        task = load_task(cfg.task, **task_options(cfg))
        if not task.train:
            raise UserError(f"task {cfg.task}: no training rows")
    policy = load_policy(cfg.model, layer=cfg.layer, frozen_dtype=cfg.frozen_dtype,
                         device=cfg.device, attn=cfg.attn, keep_reference=cfg.beta > 0)
    out = output_dir(cfg, policy)
    objective = build_objective(cfg, policy.device)
    optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay)
    job = (agentic_job(policy, optimizer, cfg, objective) if cfg.env else
           task_job(task, policy, optimizer, cfg, objective, progress))
    echo(f"onelayer: {cfg.model} ({policy.split.num_layers} layers), training layer "
         f"{policy.split.layer_index} with {cfg.algo} on {job.name}; frozen {policy.frozen_dtype}, "
         f"{policy.device.type}; output {out}")
    before = job.score("before")
    echo(f"held-out {job.metric} before: {before:.1%} ({job.held_out} held out, greedy)")

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = Path(cfg.metrics) if cfg.metrics else out / "metrics.jsonl"
    metrics_path.parent.mkdir(parents=True, exist_ok=True)
    history = []
    with open(metrics_path, "w") as metrics_file, \
            tqdm(range(1, cfg.steps + 1), desc="train", disable=not progress) as bar:
        for step in bar:
            row = {"step": step, **job.step(), **memory_gib(policy.device)}
            if cfg.eval_every and step % cfg.eval_every == 0 and step != cfg.steps:
                row[f"eval_{job.metric.replace(' ', '_')}"] = job.score(f"step {step}")
            history.append(row)
            metrics_file.write(json.dumps(row) + "\n")
            metrics_file.flush()
            bar.set_postfix(reward=f"{row['reward_mean']:.3f}", kl=f"{row['kl']:.4f}")

    after = job.score("after")
    echo(f"held-out {job.metric} after:  {after:.1%} ({job.held_out} held out, greedy; "
         f"{after - before:+.1%})")
    save_layer(out, policy.layer.state_dict(), layer_index=policy.split.layer_index,
               base_model=cfg.model, run_config=json.loads(config_json(cfg)), step=cfg.steps)
    if history:
        plot_rewards(history, before, after, job.metric, out / "reward.png")
    seconds = time.perf_counter() - t_start
    echo(f"saved layer {policy.split.layer_index} to {out / LAYER_FILE} ({seconds:.0f} s in all)")
    return TrainResult(before, after, cfg.steps, seconds, out)


def plot_rewards(history: list[dict], before: float, after: float, metric: str, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    steps = [r["step"] for r in history]
    rewards = [r["reward_mean"] for r in history]
    window = max(1, len(rewards) // 10)
    smooth = [sum(rewards[max(0, i - window + 1):i + 1]) / len(rewards[max(0, i - window + 1):i + 1])
              for i in range(len(rewards))]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    ax.plot(steps, rewards, alpha=0.35, label="reward (sampled)")
    ax.plot(steps, smooth, label=f"moving mean ({window} steps)")
    ax.axhline(before, color="grey", ls="--", lw=1, label=f"held-out {metric} before {before:.0%}")
    ax.axhline(after, color="green", ls="--", lw=1, label=f"held-out {metric} after {after:.0%}")
    ax.set_xlabel("step")
    ax.set_ylabel("mean reward")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
