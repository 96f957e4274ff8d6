"""Three Triton kernels for the element-wise work of a decoder layer: RMSNorm, the rotary
embedding of queries and keys, and the SiLU-gated product. Forward only, for the rollout decoder.

Why: a decode step of B = 8 rows is a few kilobytes of activations a layer, so each element-wise
op costs a kernel launch, not bandwidth. Counted on CPU (tiny Qwen3, bf16, ops that launch a
kernel): 59 a layer in Hugging Face's forward, of which a Qwen3 layer's four RMSNorms take 32
(two casts, pow, mean, add, rsqrt, two multiplies each), the rotary embedding 10 (two cats,
two negations, four multiplies, two adds) and the MLP's gate 2: 44 launches, 6 with these
kernels. For Qwen3-8B that is 1,375 fewer launches a decode step (36 layers x 38, and 7 for
the final norm).

Each computes what the Hugging Face forward computes, rounding where it rounds (`_round`), so
bf16 results match to the rounding of a sum's order: torch references and oracles in
`onelayer.rollout.fusion` (which swaps them into the model while the decoder runs and checks
them against the model's own modules first).

    rms_norm    x [..., H], weight [H]  ->  weight * (x32 * rsqrt(mean(x32^2) + eps)).to(x.dtype)
    rotary      q [B, Hq, S, D], k [B, Hk, S, D], cos, sin [B or 1, S, D]
                ->  x * cos + rotate_half(x) * sin for both, in one launch
    silu_mul    gate, up [...]  ->  silu(gate) * up
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from onelayer.kernels.nf4_matmul import _round


def _by_bits(device: torch.device) -> bool:
    """Round bf16 on the bits: the interpreter (CPU) truncates fp32 -> bf16 casts."""
    return device.type != "cuda"


@triton.jit
def _rms_norm_kernel(x_ptr, w_ptr, out_ptr, n_rows, n_cols, x_row_stride, out_row_stride, eps,
                     ROWS: tl.constexpr, BLOCK: tl.constexpr, BY_BITS: tl.constexpr):
    """Program i: rows [i * ROWS, (i + 1) * ROWS)."""
    rows = tl.program_id(0).to(tl.int64) * ROWS + tl.arange(0, ROWS)
    cols = tl.arange(0, BLOCK)
    ok = (rows < n_rows)[:, None] & (cols < n_cols)[None, :]
    x = tl.load(x_ptr + rows[:, None] * x_row_stride + cols[None, :], mask=ok, other=0.0).to(tl.float32)
    variance = tl.sum(x * x, axis=1) / n_cols
    normed = _round(x * tl.math.rsqrt(variance + eps)[:, None], x_ptr.dtype.element_ty, BY_BITS).to(tl.float32)
    w = tl.load(w_ptr + cols, mask=cols < n_cols, other=0.0).to(tl.float32)
    tl.store(out_ptr + rows[:, None] * out_row_stride + cols[None, :],
             _round(w[None, :] * normed, out_ptr.dtype.element_ty, BY_BITS), mask=ok)


def rms_norm_triton(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    """weight * RMSNorm(x) over the last axis, in promote(x, weight)'s dtype (as Hugging Face's
    `weight * normed.to(input_dtype)` promotes). Narrow rows (a head's query or key norm) go
    several to a program, up to 4,096 values."""
    n = x.shape[-1]
    rows, weight = x.reshape(-1, n), weight.contiguous()
    if rows.stride(-1) != 1:
        rows = rows.contiguous()
    out = torch.empty(rows.shape, dtype=torch.promote_types(x.dtype, weight.dtype), device=x.device)
    if out.numel() == 0:
        return out.view(*x.shape[:-1], n)
    block = triton.next_power_of_2(n)
    per_program = min(max(1, 4096 // block), triton.next_power_of_2(len(rows)))
    _rms_norm_kernel[(triton.cdiv(len(rows), per_program),)](
        rows, weight, out, len(rows), n, rows.stride(0), out.stride(0), float(eps),
        ROWS=per_program, BLOCK=block, BY_BITS=_by_bits(x.device),
        num_warps=min(16, max(1, per_program * block // 512)))
    return out.view(*x.shape[:-1], n)


@triton.jit
def _rotate(src, dst, batch, pos, token_ok, sb, sh, ss, ob, oh, os, n_heads, cos_at, sin_at, half,
            HEADS: tl.constexpr, BLOCK: tl.constexpr, BY_BITS: tl.constexpr):
    """dst = src * cos + rotate_half(src) * sin for every head of a block of tokens ([TOKENS,
    HEADS, D / 2] halves), each product and the sum rounded to the dtype as torch rounds them."""
    h = tl.arange(0, HEADS)[None, :, None]
    d = tl.arange(0, BLOCK)[None, None, :]
    ok = token_ok & (h < n_heads) & (d < half)
    dtype = src.dtype.element_ty
    at = src + batch * sb + pos * ss + h * sh + d
    out_at = dst + batch * ob + pos * os + h * oh + d
    x1 = tl.load(at, mask=ok, other=0.0).to(tl.float32)
    x2 = tl.load(at + half, mask=ok, other=0.0).to(tl.float32)
    trig_ok = token_ok & (d < half)
    c1 = tl.load(cos_at + d, mask=trig_ok, other=0.0).to(tl.float32)
    c2 = tl.load(cos_at + half + d, mask=trig_ok, other=0.0).to(tl.float32)
    s1 = tl.load(sin_at + d, mask=trig_ok, other=0.0).to(tl.float32)
    s2 = tl.load(sin_at + half + d, mask=trig_ok, other=0.0).to(tl.float32)
    first = _round(x1 * c1, dtype, BY_BITS).to(tl.float32) + _round(-x2 * s1, dtype, BY_BITS).to(tl.float32)
    second = _round(x2 * c2, dtype, BY_BITS).to(tl.float32) + _round(x1 * s2, dtype, BY_BITS).to(tl.float32)
    tl.store(out_at, _round(first, dtype, BY_BITS), mask=ok)
    tl.store(out_at + half, _round(second, dtype, BY_BITS), mask=ok)


@triton.jit
def _rotary_kernel(q_ptr, k_ptr, cos_ptr, sin_ptr, q_out_ptr, k_out_ptr, n_tokens, seq_len, n_q_heads,
                   n_k_heads, half, q_sb, q_sh, q_ss, k_sb, k_sh, k_ss, qo_sb, qo_sh, qo_ss,
                   ko_sb, ko_sh, ko_ss, cos_sb, cos_ss, sin_sb, sin_ss,
                   TOKENS: tl.constexpr, Q_HEADS: tl.constexpr, K_HEADS: tl.constexpr, BLOCK: tl.constexpr,
                   BY_BITS: tl.constexpr):
    """Program i: tokens [i * TOKENS, (i + 1) * TOKENS) of the flattened [B, S], every query
    and key head of each."""
    token = tl.program_id(0).to(tl.int64) * TOKENS + tl.arange(0, TOKENS)[:, None, None]
    token_ok = token < n_tokens
    b, s = token // seq_len, token % seq_len
    cos_at = cos_ptr + b * cos_sb + s * cos_ss
    sin_at = sin_ptr + b * sin_sb + s * sin_ss
    _rotate(q_ptr, q_out_ptr, b, s, token_ok, q_sb, q_sh, q_ss, qo_sb, qo_sh, qo_ss, n_q_heads,
            cos_at, sin_at, half, Q_HEADS, BLOCK, BY_BITS)
    _rotate(k_ptr, k_out_ptr, b, s, token_ok, k_sb, k_sh, k_ss, ko_sb, ko_sh, ko_ss, n_k_heads,
            cos_at, sin_at, half, K_HEADS, BLOCK, BY_BITS)


def rotary_supports(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> bool:
    """Whether `rotary_triton` computes this call: q, k [B, H, S, D] of one dtype with unit
    stride over D (D even), cos and sin [B or 1, S, D] in that dtype."""
    if q.dim() != 4 or k.dim() != 4 or cos.dim() != 3 or sin.shape != cos.shape:
        return False
    B, _, S, D = q.shape
    return (D % 2 == 0 and k.shape[0] == B and k.shape[2:] == (S, D) and cos.shape[1:] == (S, D)
            and cos.shape[0] in (1, B) and q.dtype == k.dtype == cos.dtype == sin.dtype
            and all(t.stride(-1) == 1 for t in (q, k, cos, sin)))


def rotary_triton(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """(q, k) rotated by position, one launch for both; outputs laid out as their inputs."""
    B, n_q, S, D = q.shape
    n_k = k.shape[1]
    q_out, k_out = torch.empty_like(q), torch.empty_like(k)
    if B * S == 0:
        return q_out, k_out
    batch_stride = lambda t: t.stride(0) if t.shape[0] > 1 else 0  # noqa: E731
    half = D // 2
    block, q_heads = triton.next_power_of_2(half), triton.next_power_of_2(n_q)
    # Tokens a program: up to 4,096 query values (a decode step of 8 rows of Qwen3-8B: 4 tokens).
    tokens = min(max(1, 4096 // (q_heads * block)), triton.next_power_of_2(B * S))
    _rotary_kernel[(triton.cdiv(B * S, tokens),)](
        q, k, cos, sin, q_out, k_out, B * S, S, n_q, n_k, half,
        q.stride(0), q.stride(1), q.stride(2), k.stride(0), k.stride(1), k.stride(2),
        q_out.stride(0), q_out.stride(1), q_out.stride(2), k_out.stride(0), k_out.stride(1), k_out.stride(2),
        batch_stride(cos), cos.stride(1), batch_stride(sin), sin.stride(1),
        TOKENS=tokens, Q_HEADS=q_heads, K_HEADS=triton.next_power_of_2(n_k), BLOCK=block,
        BY_BITS=_by_bits(q.device), num_warps=min(8, max(1, tokens * q_heads * block // 512)))
    return q_out, k_out


@triton.jit
def _silu_mul_kernel(gate_ptr, up_ptr, out_ptr, n, BLOCK: tl.constexpr, BY_BITS: tl.constexpr):
    """Program i: elements [i * BLOCK, (i + 1) * BLOCK)."""
    idx = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < n
    gate = tl.load(gate_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + idx, mask=ok, other=0.0).to(tl.float32)
    silu = _round(gate / (1.0 + tl.exp(-gate)), gate_ptr.dtype.element_ty, BY_BITS).to(tl.float32)
    tl.store(out_ptr + idx, _round(silu * up, out_ptr.dtype.element_ty, BY_BITS), mask=ok)


def silu_mul_triton(gate: Tensor, up: Tensor) -> Tensor:
    """silu(gate) * up for two tensors of one shape and dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    if out.numel() == 0:
        return out
    block = 1024
    _silu_mul_kernel[(triton.cdiv(gate.numel(), block),)](
        gate, up, out, gate.numel(), BLOCK=block, BY_BITS=_by_bits(gate.device), num_warps=4)
    return out
