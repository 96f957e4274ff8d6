"""Single-layer GiGPO on multi-turn environments: the whole step in `gigpo_step`.

One step:  seeds (one task each) -> N episodes per task, played turn by turn with the current
           policy (`rollout.multiturn`) -> per-step rewards -> GiGPO advantage per step
           (episode-level + omega * anchor-state-level, docs/algorithms.md) -> broadcast to that
           step's action tokens -> `optimize` (the same PPO epochs as single-turn GRPO; only
           action tokens carry loss, environment tokens are context).
"""
from __future__ import annotations

import ast
import dataclasses
import random
import time
from collections.abc import Callable

import torch
from torch import Tensor
from tqdm.auto import tqdm

from . import distributed
from .algos import gigpo_advantages_fn
from .config import TrainConfig
from .model import Policy
from .model.vocab import check_encodes
from .offload import optimizer_offloaded
from .rollout import Rollout, SamplingParams, release_decoder
from .rollout.multiturn import Episodes, TurnFormat, hf_actor, run_episodes
from .tasks.envs import TextEnv, load_env
from .errors import UserError
from .reporting import StepSamples
from .resilience import HalveOnOOM
from .update import Job, Objective, optimize, sampling_params, schedule, step_metrics, sync_device

# Token cap of one trajectory (prompt + all turns) unless the model's context is shorter.
MAX_EPISODE_TOKENS = 4096


def parse_env_spec(spec: str) -> tuple[str, dict]:
    """'gridworld?size=3,wall_prob=0' -> ('gridworld', {'size': 3, 'wall_prob': 0}).

    Options after '?' go to the environment's constructor; values are Python literals, or
    strings when they do not parse as one."""
    name, _, options = spec.partition("?")
    kwargs = {}
    for item in filter(None, (o.strip() for o in options.split(","))):
        key, _, value = item.partition("=")
        try:
            kwargs[key.strip()] = ast.literal_eval(value.strip())
        except (ValueError, SyntaxError):
            kwargs[key.strip()] = value.strip()
    return name, kwargs


def make_envs(cfg: TrainConfig, count: int) -> list[TextEnv]:
    """`count` independent instances of cfg.env, each limited to cfg.max_turns steps."""
    name, kwargs = parse_env_spec(cfg.env)
    return [load_env(name, max_turns=cfg.max_turns, **kwargs) for _ in range(count)]


def episode_token_cap(policy: Policy) -> int:
    context = getattr(policy.split.lm.config, "max_position_embeddings", None) or MAX_EPISODE_TOKENS
    return min(MAX_EPISODE_TOKENS, context)


def turn_format(policy: Policy, cfg: TrainConfig) -> TurnFormat:
    return TurnFormat(policy.tokenizer, chat=cfg.chat, template_kwargs=cfg.chat_template_kwargs,
                      stop=tuple(cfg.stop))


def play(policy: Policy, cfg: TrainConfig, seeds: list[int], group_size: int,
         sampling: SamplingParams, generator: torch.Generator | None = None,
         batch: HalveOnOOM | None = None, progress=None) -> Episodes:
    """group_size episodes of each seed's task, in consecutive rows. A task (seed) is one
    episode group, even when `seeds` names it more than once; group id = its first index.
    batch: the episodes that act at once (None: all), halved out of memory. progress: a bar
    counting the episodes that ended."""
    first = {s: i for i, s in reversed(list(enumerate(seeds)))}
    rows = [(first[s], s) for s in seeds for _ in range(group_size)]
    actor = hf_actor(policy.split.lm, policy.tokenizer, sampling, generator, batch)
    return run_episodes(actor, policy.tokenizer, make_envs(cfg, len(rows)), [s for _, s in rows],
                        [g for g, _ in rows], max_new_tokens=cfg.max_new_tokens,
                        max_turns=cfg.max_turns, max_len=episode_token_cap(policy),
                        fmt=turn_format(policy, cfg), history=cfg.history_turns,
                        progress=progress)


def token_advantages(episodes: Episodes, step_advantages: Tensor) -> Tensor:
    """[rows, C] float32: each step's advantage on its action tokens, 0 elsewhere."""
    out = torch.zeros(episodes.rollout.completion_mask.shape, dtype=torch.float32)
    for row, (start, end), adv in zip(episodes.rows.tolist(), episodes.spans.tolist(),
                                      step_advantages.tolist()):
        out[row, start:end] = adv
    return out


def step_advantages(episodes: Episodes, cfg: TrainConfig, device: torch.device) -> Tensor:
    """GiGPO advantage per step [S] (Triton kernel on CUDA, torch reference elsewhere)."""
    fn = gigpo_advantages_fn(cfg.loss_impl, device)
    e = episodes
    return fn(e.step_rewards.to(device), e.traj_ids.to(device), e.step_index.to(device),
              e.episode_group_ids.to(device), e.anchor_ids.to(device), gamma=cfg.gamma,
              omega=cfg.omega, norm=cfg.adv_norm).cpu()


def to_device(rollout: Rollout, device: torch.device) -> Rollout:
    logprobs = None if rollout.logprobs is None else rollout.logprobs.to(device)
    return Rollout(rollout.sequences.to(device), rollout.attention_mask.to(device),
                   rollout.completion_mask.to(device), rollout.prompt_len, rollout.texts,
                   logprobs)


def gigpo_step(policy: Policy, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
               objective: Objective, seeds: list[int],
               generator: torch.Generator | None = None, micro: HalveOnOOM | None = None,
               gen_batch: HalveOnOOM | None = None) -> dict:
    """One GiGPO step on the tasks `seeds`, cfg.group_size episodes each; generator: the run's
    random stream for sampling and minibatch order (None: torch's global one)."""
    t0 = time.perf_counter()
    with optimizer_offloaded(policy.layer, optimizer, cfg.offload_optimizer):
        episodes = play(policy, cfg, seeds, cfg.group_size, sampling_params(cfg), generator, gen_batch)
        release_decoder(policy.split.lm)   # its KV cache is not needed by the update
    sync_device(policy.device)
    t_gen = time.perf_counter()

    advantages = step_advantages(episodes, cfg, policy.device)                # [S]
    rollout = to_device(episodes.rollout, policy.device)
    tokens_adv = token_advantages(episodes, advantages).to(policy.device)     # [B, C]
    stats = optimize(policy, optimizer, rollout, tokens_adv, schedule(cfg), objective, generator,
                     micro)
    sync_device(policy.device)
    t_end = time.perf_counter()

    action_tokens = rollout.completion_mask.sum().item()
    metrics = step_metrics(stats)
    metrics.update(
        reward_mean=episodes.returns.mean().item(), reward_std=episodes.returns.std().item(),
        success_rate=episodes.success.float().mean().item(),
        episode_len=episodes.turns.float().mean().item(),
        valid_actions=episodes.valid.float().mean().item(),
        adv_abs_mean=advantages.abs().mean().item(),
        seq_len=rollout.attention_mask.sum(1).float().mean().item(),
        step_s=t_end - t0, gen_s=t_gen - t0, update_s=t_end - t_gen,
        tokens_per_s=action_tokens / (t_end - t0))
    if cfg.log_completions:   # what was played, for --log-completions (the loop pops it)
        metrics["samples"] = episode_samples(episodes, advantages)
    return metrics


def episode_samples(episodes: Episodes, step_advantages: Tensor) -> StepSamples:
    """One entry per trajectory: its first observation, the text played after it (actions
    and environment turns), its return, and the mean advantage of its steps."""
    e, B = episodes, len(episodes.returns)
    first_obs, groups = [""] * B, [0] * B
    for row, t, obs, group in zip(e.traj_ids.tolist(), e.step_index.tolist(), e.observations,
                                  e.episode_group_ids.tolist()):
        if t == 0:
            first_obs[row], groups[row] = obs, group
    steps = torch.zeros(B).index_add_(0, e.traj_ids, torch.ones(len(e.traj_ids)))
    adv = torch.zeros(B).index_add_(0, e.traj_ids, step_advantages.float().cpu())
    return StepSamples(first_obs, list(e.texts), e.returns.tolist(),
                       (adv / steps.clamp(min=1)).tolist(), groups)


@torch.no_grad()
def success_rate(policy: Policy, cfg: TrainConfig, seeds: list[int], *, greedy: bool = True,
                 generator: torch.Generator | None = None,
                 batch: HalveOnOOM | None = None, progress=None) -> float:
    """Fraction of the tasks `seeds` solved, one episode each (greedy, or sampled as in
    training from `generator`: repeat a seed to average over several sampled episodes)."""
    sampling = sampling_params(cfg, greedy=greedy)
    episodes = play(policy, cfg, seeds, 1, sampling, generator, batch, progress)
    return episodes.success.float().mean().item()


# Held-out tasks are environment seeds from here on; training draws its seeds below it.
HELD_OUT_SEED = 2**31


def check_env(cfg: TrainConfig) -> None:
    """A bad --env spec or option is a UserError before anything heavy is loaded."""
    try:
        make_envs(cfg, 1)[0].reset(0)
    except UserError:
        raise
    except Exception as exc:
        raise UserError(f"--env {cfg.env}: {exc}") from None


def check_playable(policy: Policy, cfg: TrainConfig) -> None:
    """The model's tokenizer writes the environment's text, and a first prompt with one action
    fits an episode: else a one-line UserError."""
    env = make_envs(cfg, 1)[0]
    obs = env.reset(HELD_OUT_SEED)
    check_encodes(policy.tokenizer, f"{env.system_prompt}\n{obs}", model=cfg.model,
                  what=f"the text of --env {cfg.env}")
    first = turn_format(policy, cfg).first(env.system_prompt, obs)
    if len(first) + cfg.max_new_tokens > episode_token_cap(policy):
        raise UserError(f"--env {cfg.env}: the first prompt ({len(first)} tokens) and one action "
                        f"do not fit the episode cap of {episode_token_cap(policy)} tokens "
                        "(the model's context)")


def agentic_job(policy: Policy, optimizer: torch.optim.Optimizer, cfg: TrainConfig,
                objective: Objective, generator: torch.Generator,
                micro: HalveOnOOM | None = None, gen_batch: HalveOnOOM | None = None,
                echo: Callable[[str], None] = print, progress: bool = False) -> Job:
    """GiGPO on cfg.env: each step draws cfg.prompts_per_step fresh tasks (seeds); the score is
    the greedy success rate on cfg.eval_samples held-out tasks, or with --eval-k K the share of
    K sampled episodes a task that succeed (at --eval-temperature, from a generator of its own
    seeded with --seed). generator: the run's random stream, which scoring never draws from."""
    from .evaluate import eval_temperature, held_out_metric

    check_playable(policy, cfg)
    rng = random.Random(cfg.seed)
    held_out = list(range(HELD_OUT_SEED, HELD_OUT_SEED + cfg.eval_samples))
    episodes = [seed for seed in held_out for _ in range(cfg.eval_k)]
    sampled = dataclasses.replace(cfg, temperature=eval_temperature(cfg))
    # A size halved out of memory stays halved for later evals.
    eval_batch = HalveOnOOM("the held-out eval batch", cfg.generation_batch or 64, echo=echo)

    def step() -> dict:
        # Every rank draws the step's global tasks and plays its share (several ranks).
        seeds = distributed.shard([rng.randrange(HELD_OUT_SEED) for _ in range(cfg.prompts_per_step)])
        return gigpo_step(policy, optimizer, cfg, objective, seeds, generator, micro, gen_batch)

    def score(label: str) -> float:
        with tqdm(total=len(episodes), desc=f"eval ({label})", unit="episode",
                  disable=not progress, leave=False) as bar:
            if cfg.eval_k == 1:
                return success_rate(policy, cfg, held_out, batch=eval_batch, progress=bar)
            return success_rate(policy, sampled, episodes, greedy=False, batch=eval_batch,
                                generator=torch.Generator(policy.device).manual_seed(cfg.seed),
                                progress=bar)

    return Job(f"env {cfg.env}", step, score, held_out_metric(cfg)[0], len(held_out),
               state=lambda: {"seeds": rng.getstate()},
               restore=lambda state: rng.setstate(state["seeds"]))
