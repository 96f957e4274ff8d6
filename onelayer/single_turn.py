"""Single-turn RL on a task: the whole step in `rl_step`, and the task's `Job` for the run.

One step:  prompts -> G completions each (current policy) -> rewards -> group advantages
           -> prefix once (h_L cached) -> old (and reference) log-probs from h_L, no grad
           -> for each epoch and minibatch: layer L + suffix from h_L with grad, policy loss,
              backward into layer L's fp32 master weights, AdamW step, refresh compute copy.

agentic.py is the same for multi-turn environments (GiGPO); train.py runs either job.
"""
from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .algos.advantages import STD_EPS
from .config import TrainConfig
from .errors import UserError
from .evaluate import HeldOut, check_prompts_encode, eval_temperature, held_out_metric
from .model import Policy
from .offload import optimizer_offloaded
from .prompting import PromptStyle, prompt_fits, render_prompt
from .reporting import StepSamples, prompt_texts
from .resilience import HalveOnOOM
from .rollout import (Rollout, concat_rollouts, generate_completions, release_decoder,
                      select_rollout)
from .tasks import Task
from .tasks.stream import TrainingRows
from .update import (Job, Objective, optimize, sampling_params, schedule, step_metrics,
                     sync_device)


def prompt_style(cfg: TrainConfig) -> PromptStyle:
    return PromptStyle(cfg.chat, cfg.chat_template_kwargs)


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
                     more_rows: Callable[[int], list[dict]] | None = None, *,
                     generator: torch.Generator | None = None,
                     gen_batch: HalveOnOOM | None = None) -> ScoredBatch:
    """Sample G completions for each row and score them. With dynamic sampling, groups whose
    rewards are all equal (no learning signal) are dropped and `more_rows` refills the batch
    (on several ranks, each rank its own share, from its own rows: no collective in here, so
    ranks that need different numbers of rounds never wait for each other).
    generator: the run's random stream (None: torch's global one). gen_batch: rows per
    generate call, halved when the device runs out of memory (None: --generation-batch)."""
    G = cfg.group_size
    tokenizer = policy.tokenizer
    gen_batch = gen_batch or HalveOnOOM("--generation-batch", cfg.generation_batch, unit=G)
    kept, kept_rewards, sampled, wanted, groups_kept = [], [], 0, len(rows), 0
    for round_ in range(MAX_SAMPLING_ROUNDS if cfg.dynamic_sampling and more_rows else 1):
        if round_:
            rows = more_rows(wanted - groups_kept)
        prompts = [render_prompt(tokenizer, task, r, prompt_style(cfg)) for r in rows]
        rollout = gen_batch.run(lambda size: sample_groups(policy, prompts, cfg, size, generator),
                                len(prompts) * G)
        rewards = torch.tensor(task.rewards(rollout.texts, [r for r in rows for _ in range(G)]),
                               dtype=torch.float32)
        if cfg.overlong_buffer:
            rewards = rewards + overlong_penalty(rollout, cfg.max_new_tokens, cfg.overlong_buffer)
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
    # The decoder's KV cache (at 8 x 8K tokens of an 8B model, the largest thing on the card)
    # is freed before the update; the next step allocates it (and captures its graph) again.
    release_decoder(policy.split.lm)
    rewards = torch.cat(kept_rewards)
    rollout = concat_rollouts(kept, tokenizer.pad_token_id) if len(kept) > 1 else kept[0]
    group_ids = torch.arange(groups_kept).repeat_interleave(G)
    return ScoredBatch(rollout, rewards, group_ids, sampled)


def overlong_penalty(rollout: Rollout, max_new_tokens: int, buffer: int) -> Tensor:
    """DAPO's soft overlong punishment [B]: 0 for a completion of up to max_new_tokens - buffer
    tokens, then falling linearly with each token to -1 at max_new_tokens."""
    length = rollout.completion_mask.sum(1).float().cpu()
    return ((max_new_tokens - buffer - length) / buffer).clamp(-1.0, 0.0)


def first_groups(batch: ScoredBatch, groups: int, G: int) -> ScoredBatch:
    """The batch's first `groups` groups (all of them when it has no more)."""
    if groups * G >= len(batch.rewards):
        return batch
    rows = torch.arange(groups * G)
    return ScoredBatch(select_rollout(batch.rollout, rows), batch.rewards[rows],
                       batch.group_ids[rows], batch.groups_sampled)


def sample_groups(policy: Policy, prompts: list[str], cfg: TrainConfig, rows_per_call: int,
                  generator: torch.Generator | None) -> Rollout:
    """G completions of each prompt, whole groups per generate call of at most
    `rows_per_call` rows."""
    G, tokenizer = cfg.group_size, policy.tokenizer
    per_call = max(1, rows_per_call // G)
    parts = [generate_completions(policy.split.lm, tokenizer, prompts[i:i + per_call],
                                  sampling_params(cfg), repeat=G, generator=generator)
             for i in range(0, len(prompts), per_call)]
    return concat_rollouts(parts, tokenizer.pad_token_id) if len(parts) > 1 else parts[0]


def without_truncated(rollout: Rollout) -> Rollout:
    """The rollout with no loss on completions cut at max_new_tokens (DAPO's overlong
    filtering); they stay in the batch, and their rewards in their group's statistics."""
    keep = (~rollout.truncated).long()[:, None]
    return dataclasses.replace(rollout, completion_mask=rollout.completion_mask * keep)


def rl_step(policy: Policy, optimizer: torch.optim.Optimizer, task: Task, rows: list[dict],
            cfg: TrainConfig, objective: Objective,
            more_rows: Callable[[int], list[dict]] | None = None, *,
            generator: torch.Generator | None = None, gen_batch: HalveOnOOM | None = None,
            micro: HalveOnOOM | None = None) -> dict:
    t0 = time.perf_counter()
    with optimizer_offloaded(policy.layer, optimizer, cfg.offload_optimizer):
        batch = sample_and_score(policy, task, rows, cfg, more_rows, generator=generator,
                                 gen_batch=gen_batch)
    if cfg.dynamic_sampling and distributed.world_size() > 1:
        # A rank whose rounds ran out before its share was full: every rank trains on as many
        # groups as the one that found fewest, so that they take the same number of optimizer
        # steps (and collectives). One exchange, after the sampling rounds, never inside them.
        found = distributed.every_rank([len(batch.rewards) // cfg.group_size],
                                       "counting the groups kept")
        batch = first_groups(batch, int(min(n for n, in found)), cfg.group_size)
    sync_device(policy.device)
    t_gen = time.perf_counter()

    rollout, rewards = batch.rollout, batch.rewards
    trained = without_truncated(rollout) if cfg.mask_truncated else rollout
    stats, advantages = [], torch.zeros(len(rewards))
    if distributed.any_rank(bool(trained.completion_mask.any()), "agreeing on an update"):
        advantages = group_advantages(objective, rewards.to(policy.device),
                                      batch.group_ids.to(policy.device))
        # One advantage per sequence, on every one of its tokens.
        token_advantages = advantages[:, None].expand_as(trained.completion_mask)
        stats = optimize(policy, optimizer, trained, token_advantages, schedule(cfg), objective,
                         generator, micro)
    sync_device(policy.device)
    t_end = time.perf_counter()

    completion_len = rollout.completion_mask.sum(1).float()
    metrics = step_metrics(stats) if stats else {
        "loss": 0.0, "kl": 0.0, "clip_ratio": 0.0, "skipped_updates": 0}
    metrics.update(
        reward_mean=rewards.mean().item() if len(rewards) else 0.0,
        reward_std=distributed.global_std(rewards),
        completion_len=completion_len.mean().item() if len(rewards) else 0.0,
        truncated=rollout.truncated.float().mean().item() if len(rewards) else 0.0,
        step_s=t_end - t0, gen_s=t_gen - t0, update_s=t_end - t_gen,
        tokens_per_s=completion_len.sum().item() / (t_end - t0))
    if cfg.dynamic_sampling:
        metrics.update(groups_sampled=batch.groups_sampled, groups_kept=len(rewards) // cfg.group_size)
    if cfg.overlong_buffer:   # already in the rewards: its mean, to tell it from the task's
        metrics["overlong_penalty"] = (overlong_penalty(rollout, cfg.max_new_tokens,
                                                        cfg.overlong_buffer).mean().item()
                                       if len(rewards) else 0.0)
    if cfg.log_completions:   # what was sampled, for --log-completions (the loop pops it)
        metrics["samples"] = StepSamples(
            prompt_texts(policy.tokenizer, rollout), list(rollout.texts), rewards.tolist(),
            advantages.tolist(), batch.group_ids.tolist())
    return metrics


def group_advantages(objective: Objective, rewards: Tensor, group_ids: Tensor) -> Tensor:
    """Advantages [B] of this rank's groups. On several ranks `--scale-rewards batch` divides
    by the std of every rank's rewards: (r - group mean) / (global std + eps)."""
    if objective.advantage_mode != "batch" or distributed.world_size() == 1:
        return objective.advantages_fn(rewards, group_ids, mode=objective.advantage_mode)
    centred = objective.advantages_fn(rewards, group_ids, mode="dr_grpo")
    return centred / (distributed.global_std(rewards) + STD_EPS)


def load_training_task(cfg: TrainConfig) -> Task:
    """cfg.task with the user's options and --reward plug-ins; a UserError for a task with
    nothing to train on (a test set such as amc23: refused by name, before any download)."""
    from .config import reward_options, task_options
    from .tasks import BENCHMARK_NAMES, load_task

    if cfg.task in BENCHMARK_NAMES:
        raise UserError(f"task {cfg.task} is a test set with nothing to train on: train on another "
                        f"task and score it with --eval-task {cfg.task}")
    task = load_task(cfg.task, **task_options(cfg), **reward_options(cfg))
    if not task.train:
        raise UserError(f"task {cfg.task}: no training rows")
    return task


def task_job(task: Task, policy: Policy, optimizer, cfg: TrainConfig, objective: Objective,
             generator: torch.Generator, progress: bool, gen_batch: HalveOnOOM | None = None,
             micro: HalveOnOOM | None = None, echo: Callable[[str], None] = print,
             eval_tasks: list[Task] | None = None) -> Job:
    """Single-turn GRPO on a task's rows; greedy accuracy (or mean@k, --eval-k) on the held-out
    rows of eval_tasks (evaluate.held_out_tasks; None: the task's own), their mean when there
    are several."""
    style = prompt_style(cfg)
    # A tokenizer without the task's characters: one line, before any step.
    check_prompts_encode(policy.tokenizer, task, task.train, style, cfg.model)
    fits = prompt_fits(policy.tokenizer, task, style, cfg.max_prompt_tokens)
    if not any(fits(row) for row in task.train):
        raise UserError(f"no training prompt of task {task.name} fits --max-prompt-tokens "
                        f"{cfg.max_prompt_tokens}")
    held_out = HeldOut.build(policy.tokenizer, eval_tasks or [task], style, cfg.eval_samples,
                             cfg.max_prompt_tokens, cfg.model)
    rows = TrainingRows(task.train, cfg.seed, fits)
    # Problems per generation call, --eval-k sequences each; a size halved out of memory stays
    # halved for later evals.
    eval_batch = HalveOnOOM("the held-out eval batch",
                            max(1, (cfg.generation_batch or 64) // cfg.eval_k), echo=echo)
    metric, _ = held_out_metric(cfg)

    def step() -> dict:
        dropped = rows.dropped
        # Every rank draws the step's global prompts (one data position) and keeps its share;
        # dynamic sampling refills each rank's share from its own lane of the rows after them.
        mine = distributed.shard(rows.take(cfg.prompts_per_step))
        lane = rows.lane()
        metrics = rl_step(policy, optimizer, task, mine, cfg, objective, lane.take,
                          generator=generator, gen_batch=gen_batch, micro=micro)
        if cfg.dynamic_sampling:
            rows.settle(lane)
        return {**metrics, "prompts_dropped": rows.dropped - dropped, **task.reward_metrics()}

    def score(label: str) -> float:
        mine = sum(len(distributed.shard(rows)) for _, rows in held_out.sets)
        with tqdm(total=mine, desc=f"eval ({label})", disable=not progress, leave=False) as bar:
            return held_out.score(policy.split.lm, policy.tokenizer,
                                  max_new_tokens=cfg.max_new_tokens, seed=cfg.seed, style=style,
                                  stop=tuple(cfg.stop), batch_size=eval_batch, k=cfg.eval_k,
                                  temperature=eval_temperature(cfg), progress=bar)

    def restore(state: dict) -> None:
        rows.drawn, rows.dropped = state["drawn"], state["dropped"]

    return Job(task.name, step, score, metric, held_out.problems, held_out.dropped,
               breakdown=lambda: dict(held_out.last) if len(held_out.sets) > 1 else {},
               state=lambda: {"drawn": rows.drawn, "dropped": rows.dropped}, restore=restore)
