"""Fused lm_head + log-softmax + clipped policy loss, never building the [T, V] logits.

Torch reference and oracle: `onelayer.algos.loss.fused_linear_policy_loss_reference`
(= `chunked_logprobs` + `policy_loss`). Formulas in ALGORITHMS.md.

Forward, one program per BLOCK_T tokens: for each vocabulary tile, z = h W^T (+ b) over H
tiles with fp32 accumulation, divided by the temperature; an online log-sum-exp keeps the
running max m, sum exp(z - m) and sum exp(z - m) z (entropy) per token; the target logit is
picked as its tile passes. The epilogue turns log p into the per-token loss term c_t l_t and
its derivative c_t dl/dlogp (c_t: aggregation weight, see `onelayer.algos.loss.token_weights`),
plus k3 KL and clip flags for the metrics. Memory: O(T) outputs, registers of one
[BLOCK_T, BLOCK_V] tile.

Backward, same grid: recompute each [BLOCK_T, BLOCK_V] logit tile, turn it into
dL/dz = g c_t dl/dlogp (onehot - p) / temperature, and add dL/dz @ W_tile into an fp32
[T, H] gradient buffer, one H tile at a time. Each program owns its rows of that buffer, so
no atomics are needed. Only the hidden states get a gradient: lm_head is frozen, nothing of
size [V, H] (or [T, V]) is allocated.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from onelayer.algos.loss import token_weights


class _Blocks(NamedTuple):
    t: int
    v: int
    h: int
    num_warps: int


# GPU tiles: a 64 x 128 fp32 logit tile (32 KiB of registers per program) fed by 64-wide H
# tiles; not autotuned yet (benchmarks/bench_policy_loss.py is where to tune). Under
# TRITON_INTERPRET=1 the smallest tiles tl.dot accepts, so tests cross several tile edges.
_GPU_BLOCKS = _Blocks(t=64, v=128, h=64, num_warps=8)
_CPU_BLOCKS = _Blocks(t=16, v=32, h=16, num_warps=4)


def _blocks(device: torch.device) -> _Blocks:
    return _GPU_BLOCKS if device.type == "cuda" else _CPU_BLOCKS


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, n_cols, n_hidden,
                stride_ht, stride_hh, stride_wv, stride_wh, inv_temp,
                HAS_BIAS: tl.constexpr, IEEE: tl.constexpr, BLOCK_T: tl.constexpr,
                BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """fp32 [BLOCK_T, BLOCK_V] tile of (h W^T + b) / temperature; -inf on columns >= V."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    for k in range(0, n_hidden, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        h = tl.load(h_ptr + rows[:, None] * stride_ht + ks[None, :] * stride_hh,
                    mask=(rows[:, None] < n_rows) & (ks[None, :] < n_hidden), other=0.0)
        w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wh,
                    mask=(cols[:, None] < n_cols) & (ks[None, :] < n_hidden), other=0.0)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)[None, :]
    return tl.where(cols[None, :] < n_cols, acc * inv_temp, float("-inf"))


@triton.jit
def _fused_forward_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr,   # hidden [T, H], lm_head weight [V, H], bias [V], targets [T] int64
    old_ptr, adv_ptr, coef_ptr, ref_ptr,   # [T] fp32: old log-probs, advantages, c_t, ref log-probs
    logp_ptr, lse_ptr, ent_ptr,     # out [T] fp32: log p(target), log-sum-exp, entropy
    term_ptr, dlogp_ptr, kl_ptr, clip_ptr,  # out [T] fp32: c_t l_t, c_t dl/dlogp, k3, -1/0/+1 clip side
    n_rows, n_cols, n_hidden,       # T, V, H
    stride_ht, stride_hh, stride_wv, stride_wh,
    inv_temp, eps_low, eps_high, beta,
    HAS_BIAS: tl.constexpr, COMPUTE_LOSS: tl.constexpr, HAS_REF: tl.constexpr, USE_KL: tl.constexpr,
    IEEE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program i: tokens [i * BLOCK_T, (i + 1) * BLOCK_T). Strides are in elements."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=0)
    run_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_T,), tl.float32)   # sum exp(z - run_max)
    run_zsum = tl.zeros((BLOCK_T,), tl.float32)  # sum exp(z - run_max) * z
    tgt_z = tl.zeros((BLOCK_T,), tl.float32)
    for v in range(0, n_cols, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, n_cols, n_hidden,
                        stride_ht, stride_hh, stride_wv, stride_wh, inv_temp,
                        HAS_BIAS, IEEE, BLOCK_T, BLOCK_V, BLOCK_H)
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        alpha = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max[:, None])
        run_sum = run_sum * alpha + tl.sum(e, axis=1)
        run_zsum = run_zsum * alpha + tl.sum(e * tl.where(cols[None, :] < n_cols, z, 0.0), axis=1)
        run_max = new_max
        tgt_z += tl.sum(tl.where(cols[None, :] == tgt[:, None], z, 0.0), axis=1)
    lse = run_max + tl.log(run_sum)
    logp = tgt_z - lse
    tl.store(logp_ptr + rows, logp, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(ent_ptr + rows, lse - run_zsum / run_sum, mask=row_ok)
    if COMPUTE_LOSS:
        old = tl.load(old_ptr + rows, mask=row_ok, other=0.0)
        adv = tl.load(adv_ptr + rows, mask=row_ok, other=0.0)
        c = tl.load(coef_ptr + rows, mask=row_ok, other=0.0)
        valid = c > 0  # c_t > 0 exactly on unmasked tokens; padding may hold any log-probs
        ratio = tl.exp(tl.where(valid, logp - old, 0.0))
        clipped = tl.minimum(tl.maximum(ratio, 1.0 - eps_low), 1.0 + eps_high)
        surr = tl.minimum(ratio * adv, clipped * adv)
        low = (ratio < 1.0 - eps_low) & (adv < 0.0)
        high = (ratio > 1.0 + eps_high) & (adv > 0.0)
        # min() takes the constant clipped term exactly where the clip is active: grad 0 there.
        term = -surr
        dterm = tl.where(low | high, 0.0, -ratio * adv)
        if HAS_REF:
            d = tl.where(valid, tl.load(ref_ptr + rows, mask=row_ok, other=0.0) - logp, 0.0)
            ed = tl.exp(d)
            kl = ed - d - 1.0
            tl.store(kl_ptr + rows, kl, mask=row_ok)
            if USE_KL:
                term += beta * kl
                dterm += beta * (1.0 - ed)  # d k3 / d logp
        tl.store(term_ptr + rows, tl.where(valid, c * term, 0.0), mask=row_ok)
        tl.store(dlogp_ptr + rows, tl.where(valid, c * dterm, 0.0), mask=row_ok)
        side = tl.where(low, -1.0, tl.where(high, 1.0, 0.0))
        tl.store(clip_ptr + rows, tl.where(valid, side, 0.0), mask=row_ok)


@triton.jit
def _fused_backward_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr,   # as in the forward
    lse_ptr, scale_ptr,             # [T] fp32: log-sum-exp, grad_output * c_t dl/dlogp
    grad_ptr,                       # out [T, H] fp32, zero-initialised, row-major contiguous
    n_rows, n_cols, n_hidden,
    stride_ht, stride_hh, stride_wv, stride_wh,
    inv_temp,
    HAS_BIAS: tl.constexpr, IEEE: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program i: grad rows [i * BLOCK_T, (i + 1) * BLOCK_T) += sum_v dL/dz_v W_v."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    row_ok = rows < n_rows
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    scale = tl.load(scale_ptr + rows, mask=row_ok, other=0.0) * inv_temp
    for v in range(0, n_cols, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, n_cols, n_hidden,
                        stride_ht, stride_hh, stride_wv, stride_wh, inv_temp,
                        HAS_BIAS, IEEE, BLOCK_T, BLOCK_V, BLOCK_H)
        onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
        gz = (scale[:, None] * (onehot - tl.exp(z - lse[:, None]))).to(w_ptr.dtype.element_ty)
        for k in range(0, n_hidden, BLOCK_H):
            ks = k + tl.arange(0, BLOCK_H)
            w = tl.load(w_ptr + cols[:, None] * stride_wv + ks[None, :] * stride_wh,
                        mask=(cols[:, None] < n_cols) & (ks[None, :] < n_hidden), other=0.0)
            g_ptrs = grad_ptr + rows[:, None] * n_hidden + ks[None, :]
            g_mask = row_ok[:, None] & (ks[None, :] < n_hidden)
            if IEEE:
                part = tl.dot(gz, w, input_precision="ieee")
            else:
                part = tl.dot(gz, w)
            tl.store(g_ptrs, tl.load(g_ptrs, mask=g_mask, other=0.0) + part, mask=g_mask)


class _ForwardOut(NamedTuple):
    logp: Tensor      # [T] fp32
    lse: Tensor       # [T] fp32
    entropy: Tensor   # [T] fp32
    term: Tensor      # [T] fp32 c_t l_t (loss = sum)
    dlogp: Tensor     # [T] fp32 c_t dl/dlogp
    kl: Tensor        # [T] fp32 k3 (0 without ref)
    clip: Tensor      # [T] fp32 -1 low clip, +1 high clip, 0 none


def _common_args(hidden: Tensor, weight: Tensor, bias: Tensor | None) -> tuple[Tensor, Tensor, Tensor | None]:
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [T, H] and [V, H]")
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)  # a [V, H] copy: pass matching dtypes to avoid it
    return hidden, weight.detach(), None if bias is None else bias.detach()


def fused_linear_policy_loss_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                                     old: Tensor | None, adv: Tensor | None, coef: Tensor | None,
                                     ref: Tensor | None, *, temperature: float, eps_low: float = 0.2,
                                     eps_high: float = 0.2, beta: float = 0.0) -> _ForwardOut:
    """Launcher of the forward kernel; old/adv/coef None = log-probs only (no loss epilogue)."""
    t, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    outs = [torch.zeros(t, dtype=torch.float32, device=dev) for _ in range(7)]
    compute_loss = coef is not None
    f32 = lambda x: outs[0] if x is None else x.detach().float().contiguous()  # noqa: E731 (dummy ptr)
    bl = _blocks(dev)
    _fused_forward_kernel[(triton.cdiv(t, bl.t),)](
        hidden, weight, weight if bias is None else bias, targets.long().contiguous(),
        f32(old), f32(adv), f32(coef), f32(ref), *outs,
        t, v, h, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
        1.0 / temperature, eps_low, eps_high, beta,
        HAS_BIAS=bias is not None, COMPUTE_LOSS=compute_loss, HAS_REF=compute_loss and ref is not None,
        USE_KL=compute_loss and ref is not None and beta > 0, IEEE=hidden.dtype == torch.float32,
        BLOCK_T=bl.t, BLOCK_V=bl.v, BLOCK_H=bl.h, num_warps=bl.num_warps)
    return _ForwardOut(*outs)


def fused_linear_policy_loss_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                                      lse: Tensor, scale: Tensor, *, temperature: float) -> Tensor:
    """Launcher of the backward kernel: grad w.r.t. hidden [T, H] in hidden's dtype."""
    t, h = hidden.shape
    grad = torch.zeros(t, h, dtype=torch.float32, device=hidden.device)
    bl = _blocks(hidden.device)
    _fused_backward_kernel[(triton.cdiv(t, bl.t),)](
        hidden, weight, weight if bias is None else bias, targets.long().contiguous(), lse,
        scale.float().contiguous(), grad, t, weight.shape[0], h,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), 1.0 / temperature,
        HAS_BIAS=bias is not None, IEEE=hidden.dtype == torch.float32,
        BLOCK_T=bl.t, BLOCK_V=bl.v, BLOCK_H=bl.h, num_warps=bl.num_warps)
    return grad.to(hidden.dtype)


class _LossConfig(NamedTuple):
    temperature: float
    eps_low: float
    eps_high: float
    beta: float


class _FusedLinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old, adv, coef, ref, cfg: _LossConfig):
        out = fused_linear_policy_loss_forward(hidden, weight, bias, targets, old, adv, coef, ref,
                                               temperature=cfg.temperature, eps_low=cfg.eps_low,
                                               eps_high=cfg.eps_high, beta=cfg.beta)
        ctx.save_for_backward(hidden, weight, bias, targets, out.lse, out.dlogp)
        ctx.temperature = cfg.temperature
        loss = out.term.sum()
        ctx.mark_non_differentiable(out.logp, out.entropy, out.kl, out.clip)
        return loss, out.logp, out.entropy, out.kl, out.clip

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        hidden, weight, bias, targets, lse, dlogp = ctx.saved_tensors
        # grad_loss stays a device tensor: no host sync.
        grad = fused_linear_policy_loss_backward(hidden, weight, bias, targets, lse, dlogp * grad_loss,
                                                 temperature=ctx.temperature)
        return grad, None, None, None, None, None, None, None, None


def fused_linear_policy_loss(hidden: Tensor, weight: Tensor, targets: Tensor, old_logprobs: Tensor,
                             advantages: Tensor, mask: Tensor, seq_ids: Tensor, ref_logprobs: Tensor | None = None,
                             bias: Tensor | None = None, *, temperature: float = 1.0, eps_low: float = 0.2,
                             eps_high: float = 0.2, beta: float = 0.0, aggregation: str = "token-mean",
                             max_len: int | None = None, num_seqs: int | None = None
                             ) -> tuple[Tensor, dict[str, Tensor]]:
    """(loss 0-d, metrics) = policy_loss(log_softmax(hidden @ weight.T + bias)[targets], ...)
    without the [T, V] logits; gradient w.r.t. hidden only. Arguments as
    `onelayer.algos.loss.fused_linear_policy_loss_reference`.

    metrics (detached 0-d tensors, means over unmasked tokens): clip_low, clip_high,
    clip_ratio, kl (0 without ref_logprobs), ratio_mean, entropy.
    """
    hidden, weight, bias = _common_args(hidden, weight, bias)
    coef = token_weights(mask, seq_ids, aggregation=aggregation, max_len=max_len, num_seqs=num_seqs)
    cfg = _LossConfig(float(temperature), float(eps_low), float(eps_high), float(beta))
    loss, logp, entropy, kl, clip = _FusedLinearPolicyLoss.apply(
        hidden, weight, bias, targets, old_logprobs, advantages, coef, ref_logprobs, cfg)
    with torch.no_grad():
        m = mask.float()
        n = m.sum().clamp_min(1.0)
        low = (clip < 0).float().sum() / n   # clip is already 0 on masked tokens
        high = (clip > 0).float().sum() / n
        ratio = torch.exp(torch.where(m > 0, logp - old_logprobs.float(), torch.zeros_like(logp)))
        metrics = {"clip_low": low, "clip_high": high, "clip_ratio": low + high, "kl": (kl * m).sum() / n,
                   "ratio_mean": (ratio * m).sum() / n, "entropy": (entropy * m).sum() / n}
    return loss, metrics


def fused_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                          temperature: float = 1.0) -> Tensor:
    """log softmax((hidden @ weight.T + bias) / temperature)[targets], fp32 [T], no grad
    (old and reference log-prob passes)."""
    hidden, weight, bias = _common_args(hidden, weight, bias)
    with torch.no_grad():
        return fused_linear_policy_loss_forward(hidden.detach(), weight, bias, targets, None, None, None, None,
                                                temperature=temperature).logp
