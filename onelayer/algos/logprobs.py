"""Token log-probs through a frozen lm_head without building the [T, V] logits.

`chunked_logprobs` is the torch reference (CPU path, oracle of the Triton kernel
`onelayer.kernels.fused_linear_logprobs`): it walks the tokens a chunk at a time, so only one
chunk's [C, V] logits are alive, and its backward gives the gradient w.r.t. the hidden states
only (lm_head is frozen in onelayer: no [V, H] weight gradient is ever allocated).
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor

# Default chunk: keep one chunk's fp32 logits [C, V] under 32 MiB, C = 32 MiB / (4 B * V).
#   Qwen3 (V = 151,936):   C = 33,554,432 / 607,744 = 55 tokens
#   Llama-2 (V = 32,000):  C = 262 tokens;   V = 32,768: C = 256 tokens
# Peak extra memory is about two such buffers (logits + the exp() temporary of logsumexp in
# forward; logits turned in place into their gradient in backward, plus 1 - tanh^2 for models
# with a logit soft-cap), so ~64 MiB whatever T is,
# against T * V * 4 B for full logits (4096 x 151,936 fp32 = 2.3 GiB). A 55 x 4096 x 151,936
# matmul is still ~68 GFLOP, large enough to keep a GPU or a CPU's BLAS busy.
LOGITS_CHUNK_BYTES = 32 * 2**20


def default_chunk_size(vocab_size: int) -> int:
    return max(1, LOGITS_CHUNK_BYTES // (4 * vocab_size))


class _Logits(NamedTuple):
    """z = softcap(scale * (h W^T + b)) / temperature, softcap(u) = cap * tanh(u / cap):
    the model's own logit scaling and capping (`onelayer.model.split.LogitTransform`), then
    the sampling temperature."""
    scale: float
    softcap: float | None
    temperature: float

    def __call__(self, h: Tensor, weight: Tensor, bias: Tensor | None) -> Tensor:
        """fp32 [C, V] logits; matmul in the hidden dtype."""
        z = h @ weight.T if bias is None else torch.addmm(bias, h, weight.T)
        z = z.float()
        if self.scale != 1.0:
            z.mul_(self.scale)
        if self.softcap is not None:
            z.div_(self.softcap).tanh_().mul_(self.softcap)
        if self.temperature != 1.0:
            z.div_(self.temperature)
        return z

    def softcap_grad(self, z: Tensor) -> Tensor | None:
        """d softcap(u) / du = 1 - tanh^2(u / cap) [C, V] from this transform's output z
        (tanh = z T / cap); None without a cap."""
        if self.softcap is None:
            return None
        tanh = z.mul(self.temperature / self.softcap)
        return tanh.mul_(tanh).neg_().add_(1.0)


class _ChunkedLogprobs(torch.autograd.Function):
    @staticmethod
    def forward(ctx, hidden: Tensor, weight: Tensor, bias: Tensor | None, targets: Tensor,
                logits: _Logits, chunk: int, with_entropy: bool) -> tuple[Tensor, Tensor]:
        t = hidden.shape[0]
        logp = torch.empty(t, dtype=torch.float32, device=hidden.device)
        lse = torch.empty(t, dtype=torch.float32, device=hidden.device)
        entropy = torch.zeros(t, dtype=torch.float32, device=hidden.device)
        for s in range(0, t, chunk):
            z = logits(hidden[s:s + chunk], weight, bias)  # [C, V] fp32
            lse[s:s + chunk] = torch.logsumexp(z, dim=-1)
            logp[s:s + chunk] = z.gather(1, targets[s:s + chunk, None]).squeeze(1) - lse[s:s + chunk]
            if with_entropy:  # H = lse - sum_v p_v z_v
                p = torch.exp(z - lse[s:s + chunk, None])
                entropy[s:s + chunk] = lse[s:s + chunk] - (p * z).sum(-1)
                del p
            del z
        if ctx.needs_input_grad[0]:
            ctx.save_for_backward(hidden, weight, bias, targets, lse)
        ctx.logits, ctx.chunk = logits, chunk
        ctx.mark_non_differentiable(entropy)
        return logp, entropy

    @staticmethod
    def backward(ctx, grad_logp: Tensor, _grad_entropy: Tensor | None):
        # d logp_t / d z_tv = onehot(y_t) - p_tv; through the temperature, the cap and the scale
        # d logp_t / d u_tv = (onehot - p)_tv (1 - tanh^2_tv) scale / T with u = h W^T + b,
        # so d logp_t / d h_t = sum_v g_t (d logp_t / d u_tv) W_v.
        hidden, weight, bias, targets, lse = ctx.saved_tensors
        logits, chunk = ctx.logits, ctx.chunk
        grad_hidden = torch.empty_like(hidden)
        g = grad_logp.float() * (logits.scale / logits.temperature)
        for s in range(0, hidden.shape[0], chunk):
            e = min(s + chunk, hidden.shape[0])
            z = logits(hidden[s:e], weight, bias)                                # [C, V] fp32
            capped = logits.softcap_grad(z)  # a second [C, V] buffer, only with a cap
            gz = z.sub_(lse[s:e, None]).exp_().neg_()                           # -p, in place
            rows = torch.arange(e - s, device=z.device)
            gz[rows, targets[s:e]] += 1.0                                        # onehot - p
            gz.mul_(g[s:e, None])
            if capped is not None:
                gz.mul_(capped)
            grad_hidden[s:e] = gz.to(hidden.dtype) @ weight
            del z, gz, capped
        return grad_hidden, None, None, None, None, None, None


def chunked_logprobs(hidden: Tensor, weight: Tensor, targets: Tensor, bias: Tensor | None = None, *,
                     temperature: float = 1.0, logit_scale: float = 1.0, softcap: float | None = None,
                     chunk_size: int | None = None,
                     with_entropy: bool = False) -> Tensor | tuple[Tensor, Tensor]:
    """log softmax(softcap(logit_scale * (hidden @ weight.T + bias)) / temperature)[targets],
    float32 [T]; softcap(u) = cap * tanh(u / cap), none when softcap is None.

    hidden [T, H] (any float dtype; the matmul runs in it), weight [V, H] frozen lm_head,
    targets [T] int64, bias [V] or None. Gradient flows to `hidden` only. chunk_size: tokens
    per chunk (default: `default_chunk_size(V)`, see LOGITS_CHUNK_BYTES). with_entropy: also
    return the (non-differentiable) entropy [T] of each token's distribution.
    """
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise ValueError(f"hidden {tuple(hidden.shape)} and weight {tuple(weight.shape)} must be [T, H] and [V, H]")
    if targets.shape != hidden.shape[:1]:
        raise ValueError(f"targets {tuple(targets.shape)} must be [T] with T = {hidden.shape[0]}")
    if weight.dtype != hidden.dtype:
        weight = weight.to(hidden.dtype)  # a [V, H] copy: pass matching dtypes to avoid it
    if bias is not None and bias.dtype != hidden.dtype:
        bias = bias.to(hidden.dtype)
    chunk = chunk_size or default_chunk_size(weight.shape[0])
    logits = _Logits(float(logit_scale), None if softcap is None else float(softcap), float(temperature))
    logp, entropy = _ChunkedLogprobs.apply(hidden, weight.detach(), None if bias is None else bias.detach(),
                                           targets.long(), logits, int(chunk), bool(with_entropy))
    return (logp, entropy) if with_entropy else logp
