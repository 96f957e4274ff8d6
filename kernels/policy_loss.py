"""Fused lm_head + log-softmax + clipped policy loss, never building the [T, V] logits.

Torch reference and oracle: `onelayer.algos.loss.fused_linear_policy_loss_reference`
(= `chunked_logprobs` + `policy_loss`). Formulas in docs/algorithms.md.

Forward, two launches:
1. `_lse_partial_kernel`, grid (token blocks, vocabulary splits): for each [BLOCK_T, BLOCK_V]
   tile of its split, z = softcap(scale (h W^T + b)) / temperature with fp32 accumulation over
   H tiles (scale and soft-cap: the model's own logit transform, `LogitTransform`); an
   online log-sum-exp keeps, per token, the running max m, sum exp(z - m) and
   sum exp(z - m) z (for the entropy); the target logit is picked as its tile passes.
   Splitting V keeps the GPU busy when T is small (4096 tokens = 64 token blocks < 132 SMs).
2. `_combine_loss_kernel`, one program per BLOCK_R tokens: merges the splits into lse,
   log p and entropy, then the loss epilogue: per-token c_t l_t and c_t dl/dlogp (c_t: the
   aggregation weight of `onelayer.algos.loss.token_weights`), k3 KL and the clip side.
   GSPO's sequence ratios: the combine runs first without the epilogue for the log-probs,
   whose per-sequence mean log-ratio then shifts the old log-probs (`_sequence_old`).
Memory: O(splits x T) fp32 partials; logit tiles live in registers only.

Backward, per chunk of C tokens: `_logit_grad_kernel`, grid (token blocks, vocabulary tiles),
recomputes each logit tile and writes dL/du = g c_t dl/dlogp (onehot - p) (1 - tanh^2) scale /
temperature (u = h W^T + b; the tanh factor only with a soft-cap) into a [C, V] buffer in the
hidden dtype; then grad_h[chunk] = dL/du @ W by cuBLAS (torch.mm).
C keeps that buffer near 128 MiB (see `_grad_chunk`). A fully fused backward would have to
read-modify-write an fp32 [BLOCK_T, H] gradient once per vocabulary tile (~1,200 times for
V = 151,936) or use atomics; the chunk buffer is cheaper and deterministic. Only the hidden
states get a gradient: lm_head is frozen, nothing of size [V, H] is allocated.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from onelayer.algos.loss import sequence_log_ratio, token_weights


class _Config(NamedTuple):
    block_t: int
    block_v: int
    block_h: int
    num_warps: int
    grad_chunk_bytes: int  # budget of the backward's [C, V] dL/dz buffer
    max_splits: int        # vocabulary splits of the forward (an upper bound)
    upcast: bool           # dot operands to fp32 after loading: the interpreter's tl.dot garbles
                           # bf16 (numpy has none); same result, bf16 x bf16 products are exact in fp32


# GPU: a 64 x 128 fp32 logit tile (32 KiB of registers per program) fed by 64-wide H tiles;
# not autotuned yet (benchmarks/bench_policy_loss.py is where to tune). dL/dz chunk: 128 MiB
# of bf16 = 441 tokens at V = 151,936, rounded down to 384 (a multiple of 64); the
# [384, 151,936] x [151,936, 4096] matmul is ~480 GFLOP, plenty for cuBLAS.
# Shared memory (Triton's 3 pipeline stages): 24 KiB a block in bf16, 96 KiB in fp32, under the
# 99 KiB a block may have on RTX 30x0 / 40x0 cards; a larger tile must not pass it
# (tests/test_kernels_compile.py compiles every launch for sm_80, sm_86 and sm_90).
# CPU (TRITON_INTERPRET=1, tests only): the smallest tiles tl.dot accepts and tiny chunks, so
# small test shapes cross tile, split and chunk edges.
_GPU = _Config(block_t=64, block_v=128, block_h=64, num_warps=8, grad_chunk_bytes=128 * 2**20,
               max_splits=64, upcast=False)
_CPU = _Config(block_t=16, block_v=32, block_h=16, num_warps=4, grad_chunk_bytes=4096, max_splits=3,
               upcast=True)


def _config(device: torch.device) -> _Config:
    return _GPU if device.type == "cuda" else _CPU


def _num_splits(cfg: _Config, n_rows: int, n_cols: int, device: torch.device) -> int:
    """Vocabulary splits so that token blocks x splits fills the GPU about twice."""
    token_blocks = triton.cdiv(n_rows, cfg.block_t)
    if device.type == "cuda":
        want = triton.cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, token_blocks)
    else:
        want = cfg.max_splits
    return max(1, min(want, cfg.max_splits, triton.cdiv(n_cols, cfg.block_v)))


def _grad_chunk(cfg: _Config, n_rows: int, n_cols: int, element_size: int) -> int:
    rows = cfg.grad_chunk_bytes // (element_size * n_cols) // cfg.block_t * cfg.block_t
    return min(max(rows, cfg.block_t), n_rows)


@triton.jit
def _tanh(x):
    # tanh from one exp of a non-positive argument (no overflow); tl has no tanh of its own on
    # every backend, and libdevice does not run under the interpreter. Absolute error ~1e-7.
    e = tl.exp(-2.0 * tl.abs(x))
    t = (1.0 - e) / (1.0 + e)
    return tl.where(x < 0, -t, t)


@triton.jit
def _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, col_end, n_hidden,
                stride_ht, stride_hh, stride_wv, stride_wh, logit_scale, softcap,
                HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr):
    """fp32 [BLOCK_T, BLOCK_V] tile of the model's logits softcap(scale (h W^T + b)), before the
    temperature; -inf on columns >= col_end."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), tl.float32)
    # int64 row offsets: V x H passes 2^31 elements for large vocabularies (256k x 8192).
    h_rows = h_ptr + rows.to(tl.int64)[:, None] * stride_ht
    w_rows = w_ptr + cols.to(tl.int64)[:, None] * stride_wv
    for k in range(0, n_hidden, BLOCK_H):
        ks = k + tl.arange(0, BLOCK_H)
        h = tl.load(h_rows + ks[None, :] * stride_hh,
                    mask=(rows[:, None] < n_rows) & (ks[None, :] < n_hidden), other=0.0)
        w = tl.load(w_rows + ks[None, :] * stride_wh,
                    mask=(cols[:, None] < col_end) & (ks[None, :] < n_hidden), other=0.0)
        if UPCAST:
            h, w = h.to(tl.float32), w.to(tl.float32)
        if IEEE:
            acc = tl.dot(h, tl.trans(w), acc, input_precision="ieee")
        else:
            acc = tl.dot(h, tl.trans(w), acc)
    if HAS_BIAS:
        acc += tl.load(b_ptr + cols, mask=cols < col_end, other=0.0).to(tl.float32)[None, :]
    acc = acc * logit_scale
    if SOFTCAP:
        acc = softcap * _tanh(acc / softcap)
    return tl.where(cols[None, :] < col_end, acc, float("-inf"))


@triton.jit
def _lse_partial_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr,   # hidden [T, H], lm_head weight [V, H], bias [V], targets [T] int64
    pmax_ptr, psum_ptr, pzsum_ptr, ptgt_ptr,  # out [S, T] fp32 per split: max z, sum exp(z - max),
                                              # sum exp(z - max) z, target z (0 outside its split)
    n_rows, n_cols, n_hidden, cols_per_split,  # T, V, H, columns per split (multiple of BLOCK_V)
    stride_ht, stride_hh, stride_wv, stride_wh,  # element strides of hidden and weight
    logit_scale, softcap, inv_temp,              # logit transform; softcap read if SOFTCAP
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (i, s): tokens [i * BLOCK_T, (i + 1) * BLOCK_T) over split s of the vocabulary."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    split = tl.program_id(1)
    row_ok = rows < n_rows
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=0)
    col_start = split * cols_per_split
    col_end = tl.minimum(col_start + cols_per_split, n_cols)
    run_max = tl.full((BLOCK_T,), float("-inf"), tl.float32)
    run_sum = tl.zeros((BLOCK_T,), tl.float32)
    run_zsum = tl.zeros((BLOCK_T,), tl.float32)
    tgt_z = tl.zeros((BLOCK_T,), tl.float32)
    for v in range(col_start, col_end, BLOCK_V):
        cols = v + tl.arange(0, BLOCK_V)
        z = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, col_end, n_hidden,
                        stride_ht, stride_hh, stride_wv, stride_wh, logit_scale, softcap,
                        HAS_BIAS, SOFTCAP, IEEE, UPCAST, BLOCK_T, BLOCK_V, BLOCK_H) * inv_temp
        new_max = tl.maximum(run_max, tl.max(z, axis=1))
        alpha = tl.exp(run_max - new_max)
        e = tl.exp(z - new_max[:, None])
        in_split = cols[None, :] < col_end
        run_sum = run_sum * alpha + tl.sum(e, axis=1)
        run_zsum = run_zsum * alpha + tl.sum(e * tl.where(in_split, z, 0.0), axis=1)
        run_max = new_max
        tgt_z += tl.sum(tl.where(in_split & (cols[None, :] == tgt[:, None]), z, 0.0), axis=1)
    out = split * n_rows + rows
    tl.store(pmax_ptr + out, run_max, mask=row_ok)
    tl.store(psum_ptr + out, run_sum, mask=row_ok)
    tl.store(pzsum_ptr + out, run_zsum, mask=row_ok)
    tl.store(ptgt_ptr + out, tgt_z, mask=row_ok)


@triton.jit
def _combine_loss_kernel(
    pmax_ptr, psum_ptr, pzsum_ptr, ptgt_ptr,  # [S, T] fp32 partials of `_lse_partial_kernel`
    old_ptr, adv_ptr, coef_ptr, ref_ptr,      # [T] fp32: old log-probs, advantages, c_t, ref log-probs
    logp_ptr, lse_ptr, ent_ptr,               # out [T] fp32: log p(target), log-sum-exp, entropy
    term_ptr, dlogp_ptr, kl_ptr, clip_ptr,    # out [T] fp32: c_t l_t, c_t dl/dlogp, k3, -1/0/+1 clip side
    n_rows, n_splits,
    eps_low, eps_high, beta,
    COMPUTE_LOSS: tl.constexpr, HAS_REF: tl.constexpr, USE_KL: tl.constexpr,
    SPLITS: tl.constexpr,   # next power of two >= n_splits
    BLOCK_R: tl.constexpr,
):
    """Program i: tokens [i * BLOCK_R, (i + 1) * BLOCK_R)."""
    rows = tl.program_id(0) * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < n_rows
    ss = tl.arange(0, SPLITS)
    ok2 = (ss[:, None] < n_splits) & row_ok[None, :]
    at = ss[:, None] * n_rows + rows[None, :]
    pmax = tl.load(pmax_ptr + at, mask=ok2, other=float("-inf"))
    m = tl.where(row_ok, tl.max(pmax, axis=0), 0.0)
    scale = tl.where(ok2, tl.exp(pmax - m[None, :]), 0.0)
    total = tl.sum(tl.load(psum_ptr + at, mask=ok2, other=0.0) * scale, axis=0)
    zsum = tl.sum(tl.load(pzsum_ptr + at, mask=ok2, other=0.0) * scale, axis=0)
    tgt_z = tl.sum(tl.load(ptgt_ptr + at, mask=ok2, other=0.0), axis=0)
    total = tl.where(row_ok, total, 1.0)
    lse = m + tl.log(total)
    logp = tgt_z - lse
    tl.store(logp_ptr + rows, logp, mask=row_ok)
    tl.store(lse_ptr + rows, lse, mask=row_ok)
    tl.store(ent_ptr + rows, lse - zsum / total, mask=row_ok)
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
def _logit_grad_kernel(
    h_ptr, w_ptr, b_ptr, tgt_ptr,   # a chunk of C tokens: hidden [C, H], weight [V, H], bias [V], targets [C]
    lse_ptr, scale_ptr,             # [C] fp32: log-sum-exp, grad_output * c_t dl/dlogp
    gz_ptr,                         # out [C, V] row-major, weight's dtype: dL/du, u = h W^T + b
    n_rows, n_cols, n_hidden,
    stride_ht, stride_hh, stride_wv, stride_wh,
    logit_scale, softcap, inv_temp,
    HAS_BIAS: tl.constexpr, SOFTCAP: tl.constexpr, IEEE: tl.constexpr, UPCAST: tl.constexpr,
    BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_H: tl.constexpr,
):
    """Program (i, j): the [BLOCK_T, BLOCK_V] tile (i, j) of dL/du."""
    rows = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    cols = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    row_ok = rows < n_rows
    tgt = tl.load(tgt_ptr + rows, mask=row_ok, other=0)
    lse = tl.load(lse_ptr + rows, mask=row_ok, other=0.0)
    g = tl.load(scale_ptr + rows, mask=row_ok, other=0.0) * (logit_scale * inv_temp)
    zc = _logit_tile(h_ptr, w_ptr, b_ptr, rows, cols, n_rows, n_cols, n_hidden,
                     stride_ht, stride_hh, stride_wv, stride_wh, logit_scale, softcap,
                     HAS_BIAS, SOFTCAP, IEEE, UPCAST, BLOCK_T, BLOCK_V, BLOCK_H)
    onehot = tl.where(cols[None, :] == tgt[:, None], 1.0, 0.0)
    gz = g[:, None] * (onehot - tl.exp(zc * inv_temp - lse[:, None]))
    if SOFTCAP:  # d cap tanh(u / cap) / du = 1 - tanh^2, tanh = zc / cap (-inf past V: not stored)
        tanh = tl.where(cols[None, :] < n_cols, zc / softcap, 0.0)
        gz = gz * (1.0 - tanh * tanh)
    tl.store(gz_ptr + rows[:, None] * n_cols + cols[None, :], gz.to(gz_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (cols[None, :] < n_cols))


class _Logits(NamedTuple):
    """z = softcap(logit_scale (h W^T + b)) / temperature; no cap when softcap is None."""
    logit_scale: float = 1.0
    softcap: float | None = None
    temperature: float = 1.0

    def kernel_args(self) -> tuple[float, float, float]:
        """(logit_scale, softcap, 1 / temperature) for the kernels; a dummy cap of 1 when there
        is none (SOFTCAP=False: never read)."""
        return self.logit_scale, 1.0 if self.softcap is None else self.softcap, 1.0 / self.temperature


def _logits(temperature: float, logit_scale: float, softcap: float | None) -> _Logits:
    return _Logits(float(logit_scale), None if softcap is None else float(softcap), float(temperature))


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


class _Sequences(NamedTuple):
    ids: Tensor              # [T] each token's sequence
    count: int | None        # number of sequences (None: max id + 1)


def fused_linear_policy_loss_forward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                                     old: Tensor | None, adv: Tensor | None, coef: Tensor | None,
                                     ref: Tensor | None, *, logits: _Logits, eps_low: float = 0.2,
                                     eps_high: float = 0.2, beta: float = 0.0,
                                     sequences: _Sequences | None = None) -> _ForwardOut:
    """Launchers of the forward; coef None = log-probs only (no loss epilogue).
    sequences: GSPO's sequence ratios (see `_sequence_old`); None: token ratios."""
    partials = _logit_partials(hidden, weight, bias, targets, logits)
    if coef is not None and sequences is not None:
        # The epilogue is cheap next to the matmul: run it once for the log-probs, then again
        # with old log-probs shifted so that each token's ratio is its sequence's.
        logp = _combine(partials, None, None, None, None)[0]
        old = _sequence_old(logp, old, coef, sequences)
    return _combine(partials, old, adv, coef, ref, eps_low=eps_low, eps_high=eps_high, beta=beta)


def _logit_partials(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                    logits: _Logits) -> Tensor:
    """[4, splits, T] fp32: per vocabulary split, the running max, sum exp, sum exp z and the
    target logit (`_lse_partial_kernel`)."""
    t, h = hidden.shape
    v = weight.shape[0]
    dev = hidden.device
    cfg = _config(dev)
    splits = _num_splits(cfg, t, v, dev)
    cols_per_split = triton.cdiv(triton.cdiv(v, splits), cfg.block_v) * cfg.block_v
    splits = triton.cdiv(v, cols_per_split)  # every split non-empty
    partials = torch.empty(4, splits, t, dtype=torch.float32, device=dev)
    targets = targets.long().contiguous()
    bias_arg = weight if bias is None else bias  # dummy pointer when HAS_BIAS is False
    _lse_partial_kernel[(triton.cdiv(t, cfg.block_t), splits)](
        hidden, weight, bias_arg, targets, *partials, t, v, h, cols_per_split,
        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), *logits.kernel_args(),
        HAS_BIAS=bias is not None, SOFTCAP=logits.softcap is not None,
        IEEE=hidden.dtype == torch.float32, UPCAST=cfg.upcast,
        BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, num_warps=cfg.num_warps)
    return partials


def _combine(partials: Tensor, old: Tensor | None, adv: Tensor | None, coef: Tensor | None,
             ref: Tensor | None, *, eps_low: float = 0.2, eps_high: float = 0.2,
             beta: float = 0.0) -> _ForwardOut:
    """`_combine_loss_kernel`: the splits merged, and the loss epilogue when coef is given."""
    _, splits, t = partials.shape
    outs = [torch.zeros(t, dtype=torch.float32, device=partials.device) for _ in range(7)]
    compute_loss = coef is not None
    f32 = lambda x: outs[0] if x is None else x.detach().float().contiguous()  # noqa: E731 (dummy ptr)
    block_r = 128
    _combine_loss_kernel[(triton.cdiv(t, block_r),)](
        *partials, f32(old), f32(adv), f32(coef), f32(ref), *outs, t, splits, eps_low, eps_high, beta,
        COMPUTE_LOSS=compute_loss, HAS_REF=compute_loss and ref is not None,
        USE_KL=compute_loss and ref is not None and beta > 0, SPLITS=triton.next_power_of_2(splits),
        BLOCK_R=block_r, num_warps=4)
    return _ForwardOut(*outs)


def _sequence_old(logp: Tensor, old: Tensor, coef: Tensor, sequences: _Sequences) -> Tensor:
    """log p - log s_i: old log-probs for which the kernel's token ratio exp(log p - old) is GSPO's
    sequence ratio s_i in value, with the gradient s_i grad log p (old is a constant to
    autograd). Tokens outside the loss (c_t = 0) keep theirs."""
    valid = coef > 0
    log_ratio = torch.where(valid, logp - old.float(), torch.zeros_like(logp))
    log_s = sequence_log_ratio(log_ratio, valid, sequences.ids, sequences.count)
    return torch.where(valid, logp - log_s, old.float())


def fused_linear_policy_loss_backward(hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                                      lse: Tensor, scale: Tensor, *, logits: _Logits) -> Tensor:
    """Launchers of the backward: grad w.r.t. hidden [T, H] in hidden's dtype, chunk by chunk."""
    t, h = hidden.shape
    v = weight.shape[0]
    cfg = _config(hidden.device)
    chunk = _grad_chunk(cfg, t, v, hidden.element_size())
    gz = torch.empty(chunk, v, dtype=hidden.dtype, device=hidden.device)  # reused by every chunk
    grad = torch.empty_like(hidden, memory_format=torch.contiguous_format)
    targets = targets.long().contiguous()
    scale = scale.float().contiguous()
    for s in range(0, t, chunk):
        n = min(chunk, t - s)
        part = hidden[s:s + n]
        _logit_grad_kernel[(triton.cdiv(n, cfg.block_t), triton.cdiv(v, cfg.block_v))](
            part, weight, weight if bias is None else bias, targets[s:s + n], lse[s:s + n], scale[s:s + n], gz,
            n, v, h, part.stride(0), part.stride(1), weight.stride(0), weight.stride(1), *logits.kernel_args(),
            HAS_BIAS=bias is not None, SOFTCAP=logits.softcap is not None,
            IEEE=hidden.dtype == torch.float32, UPCAST=cfg.upcast,
            BLOCK_T=cfg.block_t, BLOCK_V=cfg.block_v, BLOCK_H=cfg.block_h, num_warps=cfg.num_warps)
        torch.mm(gz[:n], weight, out=grad[s:s + n])
    return grad


class _LossConfig(NamedTuple):
    logits: _Logits
    eps_low: float
    eps_high: float
    beta: float
    sequences: _Sequences | None


class _FusedLinearPolicyLoss(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden, weight, bias, targets, old, adv, coef, ref, cfg: _LossConfig):
        out = fused_linear_policy_loss_forward(hidden, weight, bias, targets, old, adv, coef, ref,
                                               logits=cfg.logits, eps_low=cfg.eps_low,
                                               eps_high=cfg.eps_high, beta=cfg.beta, sequences=cfg.sequences)
        ctx.save_for_backward(hidden, weight, bias, targets, out.lse, out.dlogp)
        ctx.logits = cfg.logits
        loss = out.term.sum()
        ctx.mark_non_differentiable(out.logp, out.entropy, out.kl, out.clip)
        return loss, out.logp, out.entropy, out.kl, out.clip

    @staticmethod
    def backward(ctx, grad_loss, *_unused):
        hidden, weight, bias, targets, lse, dlogp = ctx.saved_tensors
        # grad_loss stays a device tensor: no host sync.
        grad = fused_linear_policy_loss_backward(hidden, weight, bias, targets, lse, dlogp * grad_loss,
                                                 logits=ctx.logits)
        return grad, None, None, None, None, None, None, None, None


def fused_linear_policy_loss(hidden: Tensor, weight: Tensor, targets: Tensor, old_logprobs: Tensor,
                             advantages: Tensor, mask: Tensor, seq_ids: Tensor, ref_logprobs: Tensor | None = None,
                             bias: Tensor | None = None, *, temperature: float = 1.0, logit_scale: float = 1.0,
                             softcap: float | None = None, eps_low: float = 0.2, eps_high: float = 0.2,
                             beta: float = 0.0, aggregation: str = "token-mean", max_len: int | None = None,
                             num_seqs: int | None = None, num_tokens: Tensor | float | None = None,
                             importance_level: str = "token") -> tuple[Tensor, dict[str, Tensor]]:
    """(loss 0-d, metrics) = policy_loss(log_softmax(z)[targets], ...) with
    z = softcap(logit_scale (hidden @ weight.T + bias)) / temperature, softcap(u) = cap tanh(u / cap),
    without the [T, V] logits; gradient w.r.t. hidden only. Arguments as
    `onelayer.algos.loss.fused_linear_policy_loss_reference`; importance_level "sequence"
    (GSPO) costs no second pass over the vocabulary. CUDA tensors, or CPU tensors
    under TRITON_INTERPRET=1 (slow: tests only).

    metrics (detached 0-d tensors, means over unmasked tokens): clip_low, clip_high,
    clip_ratio, kl (0 without ref_logprobs), ratio_mean, entropy.
    """
    if importance_level not in ("token", "sequence"):
        raise ValueError(f"unknown importance_level {importance_level!r}: token or sequence")
    hidden, weight, bias = _common_args(hidden, weight, bias)
    coef = token_weights(mask, seq_ids, aggregation=aggregation, max_len=max_len, num_seqs=num_seqs,
                         num_tokens=num_tokens)
    sequences = _Sequences(seq_ids, num_seqs) if importance_level == "sequence" else None
    cfg = _LossConfig(_logits(temperature, logit_scale, softcap), float(eps_low), float(eps_high), float(beta),
                      sequences)
    loss, logp, entropy, kl, clip = _FusedLinearPolicyLoss.apply(
        hidden, weight, bias, targets, old_logprobs, advantages, coef, ref_logprobs, cfg)
    with torch.no_grad():
        m = mask.float()
        n = m.sum().clamp_min(1.0)
        low = (clip < 0).float().sum() / n   # clip is already 0 on masked tokens
        high = (clip > 0).float().sum() / n
        log_ratio = torch.where(m > 0, logp - old_logprobs.float(), torch.zeros_like(logp))
        if sequences is not None:
            log_ratio = sequence_log_ratio(log_ratio, m > 0, seq_ids, num_seqs)
        ratio = torch.exp(log_ratio)
        metrics = {"clip_low": low, "clip_high": high, "clip_ratio": low + high, "kl": (kl * m).sum() / n,
                   "ratio_mean": (ratio * m).sum() / n, "entropy": (entropy * m).sum() / n}
    return loss, metrics


def fused_linear_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                          temperature: float = 1.0, logit_scale: float = 1.0,
                          softcap: float | None = None) -> Tensor:
    """log softmax(softcap(logit_scale (hidden @ weight.T + bias)) / temperature)[targets], fp32 [T],
    no grad (old and reference log-prob passes)."""
    hidden, weight, bias = _common_args(hidden, weight, bias)
    with torch.no_grad():
        return fused_linear_policy_loss_forward(hidden.detach(), weight, bias, targets, None, None, None, None,
                                                logits=_logits(temperature, logit_scale, softcap)).logp
