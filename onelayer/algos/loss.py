"""Clipped policy loss with k3 KL and the three aggregations of docs/algorithms.md (torch reference).

Flat token layout: T tokens of all completions of a (mini)batch, `seq_ids[T]` in [0, S) says
which sequence each token belongs to, `mask[T]` is 1 on completion (action) tokens.

    rho  = exp(logp - old_logp)
    surr = min(rho * A, clip(rho, 1 - eps_low, 1 + eps_high) * A)
    kl   = exp(d) - d - 1,  d = ref_logp - logp                      (k3)
    l    = -surr + beta * kl

    token-mean               L = sum m l / sum m
    seq-mean-token-mean      L = (1/S) sum_i [ sum_t m l / sum_t m ]
    seq-mean-token-sum-norm  L = sum m l / (S * max_len)

Every aggregation is a weighted token sum L = sum_t c_t l_t; `token_weights` computes c_t
once, and both this reference and the Triton kernel use it. With micro-batching, the tokens of
one minibatch arrive in several calls: `num_seqs` (S) and `num_tokens` (sum m) are then the
minibatch's, so that the micro-batches' losses add up to the minibatch's loss exactly.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
from torch import Tensor

from onelayer.algos.logprobs import chunked_logprobs

AGGREGATIONS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def k3(d: Tensor) -> Tensor:
    """Per-token k3 estimate of KL(q || p) from d = log p - log q at tokens drawn from q:
    unbiased, never negative, and exactly 0 where the two log-probs agree."""
    return torch.exp(d) - d - 1.0


def _token_mean(mask: Tensor, seq_ids: Tensor, num_seqs: int, max_len: int | None,
                num_tokens: Tensor | float | None) -> Tensor:
    total = mask.sum() if num_tokens is None else torch.as_tensor(num_tokens, dtype=mask.dtype,
                                                                  device=mask.device)
    return mask / total.clamp_min(1.0)


def _seq_mean_token_mean(mask: Tensor, seq_ids: Tensor, num_seqs: int, max_len: int | None,
                         num_tokens: Tensor | float | None) -> Tensor:
    per_seq = torch.zeros(num_seqs, dtype=mask.dtype, device=mask.device).index_add_(0, seq_ids, mask)
    # A sequence without unmasked tokens counts in S and adds 0 (its c_t are all 0).
    return mask / (per_seq.clamp_min(1.0)[seq_ids] * num_seqs)


def _seq_mean_token_sum_norm(mask: Tensor, seq_ids: Tensor, num_seqs: int, max_len: int | None,
                             num_tokens: Tensor | float | None) -> Tensor:
    if max_len is None or max_len <= 0:
        raise ValueError("aggregation 'seq-mean-token-sum-norm' needs max_len (max new tokens) > 0")
    return mask / float(num_seqs * max_len)


_WEIGHTS: dict[str, Callable[..., Tensor]] = {
    "token-mean": _token_mean,
    "seq-mean-token-mean": _seq_mean_token_mean,
    "seq-mean-token-sum-norm": _seq_mean_token_sum_norm,
}


def token_weights(mask: Tensor, seq_ids: Tensor, *, aggregation: str = "token-mean",
                  max_len: int | None = None, num_seqs: int | None = None,
                  num_tokens: Tensor | float | None = None) -> Tensor:
    """c_t float32 [T] with L = sum_t c_t l_t for the given aggregation (0 on masked tokens).

    S = num_seqs if given, else max(seq_ids) + 1 (a host sync: pass num_seqs in the hot path).
    num_tokens: token-mean's denominator if given (a minibatch's unmasked tokens), else sum m.
    """
    try:
        weights = _WEIGHTS[aggregation]
    except KeyError:
        raise ValueError(f"unknown aggregation {aggregation!r}; expected one of {AGGREGATIONS}") from None
    if num_seqs is None:
        num_seqs = int(seq_ids.max()) + 1 if seq_ids.numel() else 1
    return weights(mask.float(), seq_ids.long(), max(int(num_seqs), 1), max_len, num_tokens)


def _clip_metrics(ratio: Tensor, adv: Tensor, mask: Tensor, kl: Tensor | None,
                  eps_low: float, eps_high: float) -> dict[str, Tensor]:
    """Detached 0-d tensors: clip shares and means over unmasked tokens (no host sync)."""
    with torch.no_grad():
        n = mask.sum().clamp_min(1.0)
        low = (((ratio < 1.0 - eps_low) & (adv < 0)).float() * mask).sum() / n
        high = (((ratio > 1.0 + eps_high) & (adv > 0)).float() * mask).sum() / n
        metrics = {
            "clip_low": low, "clip_high": high, "clip_ratio": low + high,
            "ratio_mean": (ratio * mask).sum() / n,
            "kl": (kl * mask).sum() / n if kl is not None else torch.zeros((), device=mask.device),
        }
    return metrics


def policy_loss(logprobs: Tensor, old_logprobs: Tensor, advantages: Tensor, mask: Tensor,
                seq_ids: Tensor, ref_logprobs: Tensor | None = None, *, eps_low: float = 0.2,
                eps_high: float = 0.2, beta: float = 0.0, aggregation: str = "token-mean",
                max_len: int | None = None, num_seqs: int | None = None,
                num_tokens: Tensor | float | None = None,
                importance_level: str = "token") -> tuple[Tensor, dict[str, Tensor]]:
    """(loss 0-d, metrics) of the clipped surrogate + beta * k3 KL; all inputs [T].

    importance_level "sequence" (GSPO, in its token form): every token of sequence i has the
    ratio s_i = exp(mean over i's tokens of log(pi / pi_old)), with the gradient of its own
    log-prob, s_i * grad log pi(o_t), instead of its own ratio.
    metrics (detached 0-d tensors): clip_low, clip_high, clip_ratio (shares of unmasked tokens),
    kl (mean k3 over unmasked tokens, 0 without ref_logprobs), ratio_mean.
    The KL term enters the loss only when beta > 0 and ref_logprobs is given.
    """
    if importance_level not in ("token", "sequence"):
        raise ValueError(f"unknown importance_level {importance_level!r}: token or sequence")
    c = token_weights(mask, seq_ids, aggregation=aggregation, max_len=max_len, num_seqs=num_seqs,
                      num_tokens=num_tokens)
    logp = logprobs.float()
    adv = advantages.float()
    # Padding tokens may hold any log-probs (even inf); zero their log-ratios so that neither
    # the loss nor its gradient (0 * inf) can turn NaN.
    valid = mask > 0
    zero = torch.zeros_like(logp)
    log_ratio = torch.where(valid, logp - old_logprobs.float(), zero)
    if importance_level == "sequence":
        log_ratio = sequence_log_ratio(log_ratio, valid, seq_ids, num_seqs) + torch.where(
            valid, logp - logp.detach(), zero)
    ratio = torch.exp(log_ratio)
    surr = torch.minimum(ratio * adv, ratio.clamp(1.0 - eps_low, 1.0 + eps_high) * adv)
    per_token = -surr
    kl = None
    if ref_logprobs is not None:
        d = torch.where(valid, ref_logprobs.float() - logp, zero)
        kl = k3(d)
        if beta > 0:
            per_token = per_token + beta * kl
    loss = (per_token * c).sum()
    return loss, _clip_metrics(ratio.detach(), adv, mask.float(), None if kl is None else kl.detach(),
                               eps_low, eps_high)


def sequence_log_ratio(log_ratio: Tensor, valid: Tensor, seq_ids: Tensor,
                       num_seqs: int | None) -> Tensor:
    """Each token's sequence mean of the log-ratio [T], without gradient: log s_i of GSPO."""
    with torch.no_grad():
        ids = seq_ids.long()
        n = num_seqs if num_seqs is not None else (int(ids.max()) + 1 if ids.numel() else 1)
        sums = log_ratio.new_zeros(n).index_add_(0, ids, log_ratio)
        counts = log_ratio.new_zeros(n).index_add_(0, ids, valid.float()).clamp_min(1.0)
        return (sums / counts)[ids]


def fused_linear_policy_loss_reference(hidden: Tensor, weight: Tensor, targets: Tensor, old_logprobs: Tensor,
                                       advantages: Tensor, mask: Tensor, seq_ids: Tensor,
                                       ref_logprobs: Tensor | None = None, bias: Tensor | None = None, *,
                                       temperature: float = 1.0, logit_scale: float = 1.0,
                                       softcap: float | None = None, eps_low: float = 0.2, eps_high: float = 0.2,
                                       beta: float = 0.0, aggregation: str = "token-mean",
                                       max_len: int | None = None, num_seqs: int | None = None,
                                       num_tokens: Tensor | float | None = None,
                                       chunk_size: int | None = None,
                                       importance_level: str = "token") -> tuple[Tensor, dict[str, Tensor]]:
    """policy_loss(chunked_logprobs(hidden, weight, targets, bias, ...), ...): the CPU path and
    the oracle of `onelayer.kernels.fused_linear_policy_loss`. Gradient w.r.t. hidden only.
    logit_scale, softcap: the model's own logit transform (see `chunked_logprobs`).
    Metrics: those of `policy_loss` plus entropy (mean over unmasked tokens)."""
    logp, entropy = chunked_logprobs(hidden, weight, targets, bias, temperature=temperature,
                                     logit_scale=logit_scale, softcap=softcap, chunk_size=chunk_size,
                                     with_entropy=True)
    return policy_loss_with_entropy(logp, entropy, old_logprobs, advantages, mask, seq_ids, ref_logprobs,
                                    eps_low=eps_low, eps_high=eps_high, beta=beta, aggregation=aggregation,
                                    max_len=max_len, num_seqs=num_seqs, num_tokens=num_tokens,
                                    importance_level=importance_level)


def policy_loss_with_entropy(logp: Tensor, entropy: Tensor, old_logprobs: Tensor, advantages: Tensor,
                             mask: Tensor, seq_ids: Tensor, ref_logprobs: Tensor | None = None,
                             **loss_options) -> tuple[Tensor, dict[str, Tensor]]:
    """`policy_loss` of the log-probs, its metrics plus the mean entropy over unmasked tokens."""
    loss, metrics = policy_loss(logp, old_logprobs, advantages, mask, seq_ids, ref_logprobs, **loss_options)
    m = mask.float()
    metrics["entropy"] = (entropy * m).sum() / m.sum().clamp_min(1.0)
    return loss, metrics
