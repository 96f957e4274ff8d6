"""The PPO update over one rollout batch, shared by single-turn (train.py) and multi-turn
(agentic.py) steps; neither of them is imported here.

    rollout [B, P + C] -> h_L cache [B, S, H] (prefix, micro-batch by micro-batch, no grad)
        -> old (and reference) log-probs [B, C] from h_L, micro-batch by micro-batch, no grad
        -> for each epoch and minibatch: for each micro-batch, layer L + suffix from h_L with
           grad, fused policy loss, backward (gradients accumulate on the fp32 master)
           -> clip, one AdamW step, refresh the compute copy

Micro-batching is exact: the aggregation's normaliser (the minibatch's sequence count S and,
for token-mean, its unmasked token count) is the minibatch's, handed to every micro-batch, so
the micro-batches' losses and gradients add up to those of the whole minibatch. On several
ranks (onelayer.distributed) the normalisers are the global minibatch's, and the ranks'
gradients are summed before the clip (onelayer.data_parallel, during the last micro-batch's
backward): the same step as one process on the whole minibatch.

The sampler's own log-probs (`Rollout.logprobs`), where they describe the loss's distribution,
are compared with the recomputed old log-probs once per batch: `sampler_logprob_gap` and
`sampler_kl` measure how far the rollout path (static-cache decoder, CUDA graph, NF4 decode
kernels) drifts from the training path (cached prefix, bitsandbytes), i.e. how off-policy the
"old" policy of the ratio really is.

Several trained layers take the same path (h_L is the input of the first of them); `--layer
all` caches nothing (h_L is the token ids) and its loss also gives lm_head a gradient.
"""
from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch
from torch import Tensor
from torch.utils.checkpoint import checkpoint

from . import distributed
from .algos import advantages_fn, default_chunk_size, k3, select_loss_impl
from .algos.loss import policy_loss_with_entropy
from .config import TrainConfig
from .data_parallel import gradient_sync
from .errors import UserError
from .model import Policy, common_prefix, full_parameter
from .resilience import HalveOnOOM
from .rollout import Rollout, SamplingParams

# --scale-rewards -> the advantage estimator's mode (docs/algorithms.md): divide by the
# group's std, the batch's std, or nothing (Dr. GRPO).
ADVANTAGE_MODE = {"group": "grpo", "batch": "batch", "none": "dr_grpo"}


@dataclass(frozen=True)
class Objective:
    """Everything about the loss that is fixed when the run is built."""
    loss_fn: Callable
    logprobs_fn: Callable
    advantages_fn: Callable
    advantage_mode: str
    aggregation: str
    temperature: float
    eps_low: float
    eps_high: float
    beta: float
    max_len: int
    trains_head: bool = False   # loss_fn gives lm_head's weight a gradient (--layer all)
    # Top-k / top-p renormalise what the sampler's log-probs describe: compare them only without.
    sampler_unfiltered: bool = False
    tis_cap: float = 0.0        # truncated importance sampling's cap on pi_old / pi_sampler; 0: off
    importance_level: str = "token"   # "sequence": GSPO's sequence ratio


@dataclass(frozen=True)
class Schedule:
    """How one rollout batch is cut up for the update."""
    epochs: int = 1
    minibatch: int = 0         # sequences per optimizer step; 0: the whole batch
    micro_batch: int = 0       # sequences per forward/backward; 0: the whole minibatch
    max_grad_norm: float = 1.0


@dataclass
class Job:
    """What a run trains on, chosen once: one RL step, and a held-out score."""
    name: str
    step: Callable[[], dict]           # one RL step -> metrics
    score: Callable[[str], float]      # progress-bar label -> held-out score in [0, 1]
    metric: str                        # what the score is ("accuracy", "success rate")
    held_out: int                      # problems / tasks scored
    held_out_dropped: int = 0          # held-out prompts longer than --max-prompt-tokens
    breakdown: Callable[[], dict] = field(default=dict)  # the latest score per set, if several
    state: Callable[[], dict] = field(default=dict)      # where the job is in its data
    restore: Callable[[dict], None] = field(default=lambda state: None)


def build_objective(cfg: TrainConfig, device: torch.device) -> Objective:
    trains_head = full_parameter(cfg.layer)
    if trains_head:
        # The fused losses (torch reference and Triton kernel) give the hidden states alone a
        # gradient: lm_head is frozen in single-layer training. Full-parameter RL needs its
        # weight gradient too, which `head_trained_loss` gives (torch, chunked).
        if cfg.loss_impl == "triton":
            raise UserError("--layer all trains lm_head, which the Triton loss cannot: use --loss-impl "
                            "torch or auto")
        loss_fn, logprobs_fn = head_trained_loss, select_loss_impl("torch", device)[1]
    else:
        loss_fn, logprobs_fn = select_loss_impl(cfg.loss_impl, device)
    return Objective(loss_fn, logprobs_fn, advantages_fn(cfg.loss_impl, device),
                     ADVANTAGE_MODE[cfg.reward_scaling], cfg.aggregation, cfg.temperature, cfg.eps_low,
                     cfg.eps_high, cfg.beta, cfg.max_new_tokens, trains_head,
                     sampler_unfiltered=cfg.top_k == 0 and cfg.top_p == 1.0, tis_cap=cfg.tis_cap,
                     importance_level=cfg.importance_level)


def schedule(cfg: TrainConfig) -> Schedule:
    # --minibatch counts the sequences of every rank; each rank takes its share of them.
    return Schedule(cfg.epochs, cfg.minibatch // distributed.world_size(), cfg.micro_batch,
                    cfg.max_grad_norm)


def sampling_params(cfg: TrainConfig, *, greedy: bool = False) -> SamplingParams:
    return SamplingParams(cfg.max_new_tokens, cfg.temperature, cfg.top_p, cfg.top_k,
                          greedy=greedy, stop=tuple(cfg.stop))


def micro_batches(rows: Tensor, size: int) -> Iterator[Tensor]:
    """`rows` in consecutive pieces of at most `size` (0: one piece)."""
    size = size or len(rows)
    for start in range(0, len(rows), size):
        yield rows[start:start + size]


# ---------------------------------------------------------------------------------------------
# h_L and log-probs from it
# ---------------------------------------------------------------------------------------------

def prefix_cache(policy: Policy, rollout: Rollout, micro_batch: int) -> Tensor:
    """h_L [B, S, H] in the compute dtype: the prefix run once, micro-batch by micro-batch, into
    one preallocated tensor (an ordinary tensor: layer L may save it for backward). With every
    parameter trained there is no prefix: the token ids [B, S]."""
    split = policy.split
    if split.full:
        return rollout.sequences
    batch, length = rollout.sequences.shape
    h = torch.empty(batch, length, split.embed.embedding_dim, dtype=policy.compute_dtype,
                    device=rollout.sequences.device)
    for rows in micro_batches(torch.arange(batch), micro_batch):
        part = slice(int(rows[0]), int(rows[-1]) + 1)
        shared = common_prefix_of(policy, rollout, rows)
        if shared is None:
            ctx = split.context(rollout.attention_mask[part], policy.compute_dtype)
            h[part] = split.prefix(rollout.sequences[part], ctx)
            continue
        h[part].zero_()   # padding columns (masked as keys, no loss read there)
        shared.scatter(*split.prefix_shared(*shared.gather(rollout.sequences[part]), shared.rest_mask,
                                            policy.compute_dtype), h[part])
    return h


def completion_tokens(rollout: Rollout, rows: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """For rollout rows `rows`: (token mask [b, C] bool, targets [T], seq_ids [T]) of the
    completion tokens, T = number of unmasked tokens, in row-major order."""
    mask = rollout.completion_mask[rows].bool()
    targets = rollout.completion_ids[rows][mask]
    seq_ids = torch.arange(len(rows), device=mask.device)[:, None].expand_as(mask)[mask]
    return mask, targets, seq_ids


def completion_hidden(policy: Policy, h: Tensor, rollout: Rollout, rows: Tensor,
                      params: dict | None) -> Tensor:
    """Final hidden states [T, H] that predict the completion tokens of rows `rows`.

    The state at column j predicts the token at column j + 1, so completion token c (column
    P + c) is predicted from column P + c - 1. Rows that begin with the same tokens run them
    once (`common_prefix`) where the model allows it."""
    split = policy.split
    mask = rollout.completion_mask[rows].bool()
    shared = common_prefix_of(policy, rollout, rows)
    if shared is None:
        ctx = split.context(rollout.attention_mask[rows], policy.compute_dtype)
        final = split.from_layer(h[rows], ctx, params)
        return final[:, rollout.prompt_len - 1:-1][mask]
    h_prefix, h_rest = shared.gather(h[rows])
    final = split.from_layer_shared(h_prefix, h_rest, shared.rest_mask, params)
    row, c = mask.nonzero(as_tuple=True)   # row-major, the order of final[mask] above
    return final[row, shared.rest_column(row, rollout.prompt_len - 1 + c)]


def common_prefix_of(policy: Policy, rollout: Rollout, rows: Tensor) -> common_prefix.CommonPrefix | None:
    """The tokens rows `rows` all begin with, up to the shortest prompt but its last token (the
    one that predicts the first completion token), when the split can share them."""
    if not policy.split.shares_prefixes:
        return None
    attention = rollout.attention_mask[rows]
    shortest_prompt = int(attention[:, :rollout.prompt_len].sum(1).min())
    return common_prefix.find(rollout.sequences[rows], attention, shortest_prompt - 1)


@torch.no_grad()
def frozen_logprobs(policy: Policy, h: Tensor, rollout: Rollout, objective: Objective,
                    params: dict | None, micro_batch: int = 0) -> Tensor:
    """Per-token log-probs [B, C] (0 on padding) with the given layer weights, no grad."""
    (weight, bias), logits = policy.split.head(params), policy.split.logits
    out = torch.zeros(rollout.completion_mask.shape, dtype=torch.float32, device=h.device)
    for rows in micro_batches(torch.arange(len(out), device=h.device), micro_batch):
        mask, targets, _ = completion_tokens(rollout, rows)
        hidden = completion_hidden(policy, h, rollout, rows, params)
        part = torch.zeros(mask.shape, dtype=torch.float32, device=h.device)
        part[mask] = objective.logprobs_fn(hidden, weight, targets, bias,
                                           temperature=objective.temperature,
                                           logit_scale=logits.scale, softcap=logits.softcap)
        out[rows] = part
    return out


def sampler_mismatch(rollout: Rollout, old_logprobs: Tensor) -> dict[str, float]:
    """The sampler's log-probs against the recomputed ones over the tokens that carry loss:
    mean |difference| and the mean k3 estimate of KL(sampler || trainer), over every rank's
    tokens."""
    mask = rollout.completion_mask.bool()
    d = old_logprobs[mask] - rollout.logprobs[mask]
    sums = torch.stack([d.abs().sum(), k3(d).sum()]).tolist()   # one host sync
    gap, kl = distributed.token_means(sums, len(d), "measuring the sampler mismatch")
    # k3 >= 0 term by term; rounding can leave a sum of near-zero terms a hair below 0.
    return {"sampler_logprob_gap": gap, "sampler_kl": max(kl, 0.0)}


# ---------------------------------------------------------------------------------------------
# Truncated importance sampling
# ---------------------------------------------------------------------------------------------

def tis_weights(rollout: Rollout, old_logprobs: Tensor, cap: float) -> Tensor:
    """min(pi_old / pi_sampler, cap) per token [B, C]: 1 where no loss is carried. The clipped
    surrogate is linear in the advantage for a weight >= 0, so weighing the token's loss is
    scaling its advantage: min(w r A, w clip(r) A) = w min(r A, clip(r) A)."""
    mask = rollout.completion_mask.bool()
    weights = torch.ones_like(old_logprobs)
    weights[mask] = (old_logprobs[mask] - rollout.logprobs[mask]).exp().clamp(max=cap)
    return weights


def tis_metrics(rollout: Rollout, weights: Tensor, cap: float) -> dict[str, float]:
    """Over the tokens that carry loss (every rank's): the mean weight and the share held at
    the cap."""
    w = weights[rollout.completion_mask.bool()]
    sums = torch.stack([w.sum(), (w >= cap).sum()]).tolist()
    mean, capped = distributed.token_means(sums, len(w), "measuring the importance weights")
    return {"tis_weight_mean": mean, "tis_capped": capped}


# ---------------------------------------------------------------------------------------------
# Epochs, minibatches, micro-batches
# ---------------------------------------------------------------------------------------------

def optimize(policy: Policy, optimizer, rollout: Rollout, token_advantages: Tensor,
             plan: Schedule, objective: Objective,
             generator: torch.Generator | None = None,
             micro: HalveOnOOM | None = None) -> list[dict]:
    """PPO epochs and minibatches over one rollout batch; token_advantages [B, C]. Returns one
    metrics dict per optimizer step (each with the batch's `sampler_mismatch` when the
    rollout has the sampler's log-probs and the objective says they are comparable).

    A rollout's completion_mask marks the tokens that carry loss (the policy's own), its
    attention_mask every token of context. generator draws the minibatch order (None:
    torch's global stream). micro: the micro-batch size that halves when the device runs out
    of memory (None: plan.micro_batch, fixed). Each phase below is retried whole, which is
    exact: an update starts by zeroing the gradient and ends with its optimizer step."""
    micro = micro or HalveOnOOM("--micro-batch", plan.micro_batch)
    if objective.trains_head != policy.split.full:
        raise ValueError("the objective was built for another --layer than the policy's "
                         "(full-parameter training needs the lm_head gradient)")
    batch = rollout.sequences.shape[0]
    h = micro.run(lambda size: prefix_cache(policy, rollout, size), batch)  # once per batch
    old_logprobs = micro.run(
        lambda size: frozen_logprobs(policy, h, rollout, objective, None, size), batch)
    ref_logprobs = (micro.run(lambda size: frozen_logprobs(
        policy, h, rollout, objective, policy.layer.reference, size), batch)
        if objective.beta > 0 else None)
    mismatch = (sampler_mismatch(rollout, old_logprobs)
                if objective.sampler_unfiltered and rollout.logprobs is not None else {})
    if objective.tis_cap and rollout.logprobs is not None:
        weights = tis_weights(rollout, old_logprobs, objective.tis_cap)
        token_advantages = token_advantages * weights
        mismatch.update(tis_metrics(rollout, weights, objective.tis_cap))
    minibatch = plan.minibatch or batch
    stats = []
    for _ in range(plan.epochs):
        order = torch.randperm(batch, device=h.device, generator=generator)
        for start in range(0, batch, minibatch):
            rows = order[start:start + minibatch]
            # Outside the retry: a collective with several ranks (the identity on one).
            counts = distributed.global_counts(len(rows), rollout.completion_mask[rows].sum())
            stats.append({**micro.run(lambda size: update(
                policy, optimizer, h, rollout, rows, token_advantages, old_logprobs,
                ref_logprobs, objective, dataclasses.replace(plan, micro_batch=size), counts),
                len(rows)), **mismatch})
    return stats


def update(policy: Policy, optimizer, h: Tensor, rollout: Rollout, rows: Tensor,
           token_advantages: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor | None,
           objective: Objective, plan: Schedule, counts: tuple[int, Tensor] | None = None) -> dict:
    """One optimizer step on the minibatch `rows`, its gradient accumulated micro-batch by
    micro-batch. counts: the normalisers (sequences, tokens) of the whole minibatch when `rows`
    is one rank's share of it (None: `rows` is all of it)."""
    # The minibatch's normalisers (no sync on one rank).
    num_seqs, num_tokens = counts or (len(rows), rollout.completion_mask[rows].sum())
    # Several ranks: each gradient is its rank's share of the global minibatch's, summed over
    # the ranks while the last micro-batch's backward runs (nothing to do on one rank).
    sync = gradient_sync(optimizer, policy.layer)
    optimizer.zero_grad(set_to_none=True)
    parts = list(micro_batches(rows, plan.micro_batch))
    loss, weighted = 0.0, {}
    with sync:
        for i, part in enumerate(parts):
            last = i == len(parts) - 1
            params = policy.layer.policy_params()
            part_loss, metrics = micro_batch_loss(policy, h, rollout, part, token_advantages,
                                                  old_logprobs, ref_logprobs, objective,
                                                  num_seqs=num_seqs, num_tokens=num_tokens,
                                                  params=params)
            if last:   # each bucket of the gradient is sent as soon as it is final
                sync.arm(part_loss, params)
            part_loss.backward()
            loss += part_loss.detach()
            # Metrics are means over a micro-batch's tokens: weigh them by its share of the tokens.
            share = rollout.completion_mask[part].sum() / num_tokens.clamp_min(1)
            for k, v in metrics.items():
                weighted[k] = weighted.get(k, 0.0) + v * share
        loss, weighted = sync.finish(loss, weighted)
        grad_norm = sync.clip_(plan.max_grad_norm)   # the norm of the whole summed gradient
        # A NaN or Inf loss or gradient would poison AdamW's moments for good: skip the step
        # (on every rank alike: the loss and the norm are the same everywhere).
        finite = bool(torch.isfinite(grad_norm) and torch.isfinite(loss))
        if finite:
            optimizer.step()
    # Free the gradient now: the fp32 copy of the layer (0.72 GiB at 8B) would otherwise live
    # through the next rollout, the phase that long completions fill.
    optimizer.zero_grad(set_to_none=True)
    policy.layer.refresh_compute_copy()
    return {"loss": float(loss), "grad_norm": grad_norm.item(), "skipped": float(not finite),
            **{k: float(v) for k, v in weighted.items()}}


def micro_batch_loss(policy: Policy, h: Tensor, rollout: Rollout, rows: Tensor,
                     token_advantages: Tensor, old_logprobs: Tensor, ref_logprobs: Tensor | None,
                     objective: Objective, *, num_seqs: int, num_tokens: Tensor,
                     params: dict | None = None) -> tuple[Tensor, dict]:
    """The loss of rows `rows` as their share of the minibatch's loss (its normalisers).
    params: the trained tensors to use (None: `policy.layer.policy_params()`)."""
    mask, targets, seq_ids = completion_tokens(rollout, rows)
    params = policy.layer.policy_params() if params is None else params
    hidden = completion_hidden(policy, h, rollout, rows, params)
    (weight, bias), logits = policy.split.head(params), policy.split.logits
    return objective.loss_fn(
        hidden, weight, targets, old_logprobs[rows][mask], token_advantages[rows][mask],
        torch.ones_like(targets, dtype=torch.float32), seq_ids,
        None if ref_logprobs is None else ref_logprobs[rows][mask], bias,
        temperature=objective.temperature, logit_scale=logits.scale, softcap=logits.softcap,
        eps_low=objective.eps_low, eps_high=objective.eps_high, beta=objective.beta,
        aggregation=objective.aggregation, max_len=objective.max_len, num_seqs=num_seqs,
        num_tokens=num_tokens, importance_level=objective.importance_level)


def step_metrics(stats: list[dict]) -> dict:
    """One RL step's metrics from its optimizer steps': means, and the count of steps skipped
    for a NaN/Inf loss or gradient."""
    metrics = {k: sum(s[k] for s in stats) / len(stats) for k in stats[0] if k != "skipped"}
    return {**metrics, "skipped_updates": int(sum(s["skipped"] for s in stats))}


def head_trained_loss(hidden: Tensor, weight: Tensor, targets: Tensor, old_logprobs: Tensor,
                      advantages: Tensor, mask: Tensor, seq_ids: Tensor, ref_logprobs: Tensor | None = None,
                      bias: Tensor | None = None, *, temperature: float = 1.0, logit_scale: float = 1.0,
                      softcap: float | None = None, eps_low: float = 0.2, eps_high: float = 0.2,
                      beta: float = 0.0, aggregation: str = "token-mean", max_len: int | None = None,
                      num_seqs: int | None = None, num_tokens: Tensor | float | None = None,
                      chunk_size: int | None = None,
                      importance_level: str = "token") -> tuple[Tensor, dict[str, Tensor]]:
    """`fused_linear_policy_loss_reference` with gradients into `weight` and `bias` too (the
    trained lm_head of `--layer all`). Chunked like `chunked_logprobs`, each chunk
    checkpointed: one chunk's [C, V] logits (and their autograd temporaries, a few more [C, V]
    buffers) alive at a time, recomputed in backward; never the [T, V] logits."""
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    transform = (float(logit_scale), None if softcap is None else float(softcap), float(temperature))
    parts = [checkpoint(_chunk_logprobs, hidden[s:s + chunk], weight, bias, targets[s:s + chunk], transform,
                        use_reentrant=False) for s in range(0, hidden.shape[0], chunk)]
    logp = torch.cat([p[0] for p in parts]) if parts else hidden.new_zeros(0, dtype=torch.float32)
    entropy = torch.cat([p[1] for p in parts]) if parts else logp.detach()
    return policy_loss_with_entropy(logp, entropy, old_logprobs, advantages, mask, seq_ids, ref_logprobs,
                                    eps_low=eps_low, eps_high=eps_high, beta=beta, aggregation=aggregation,
                                    max_len=max_len, num_seqs=num_seqs, num_tokens=num_tokens,
                                    importance_level=importance_level)


def _chunk_logprobs(h: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                    transform: tuple) -> tuple[Tensor, Tensor]:
    """(log p(targets) [C], entropy [C], no grad) of softcap(scale * (h W^T + b)) / T."""
    scale, cap, temperature = transform
    z = (h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)).float()   # [C, V]
    if scale != 1.0:
        z = z * scale
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    if temperature != 1.0:
        z = z / temperature
    lse = torch.logsumexp(z, dim=-1)
    logp = z.gather(1, targets[:, None].long())[:, 0] - lse
    with torch.no_grad():
        entropy = lse - (torch.softmax(z, dim=-1) * z).sum(-1)
    return logp, entropy


def sync_device(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
