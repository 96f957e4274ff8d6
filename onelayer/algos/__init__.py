"""Advantages and the policy loss: torch references and the kernel dispatch.

The implementation (Triton kernels or torch) is chosen once when the run is built, with
`select_loss_impl` and `advantages_fn`; the hot path then calls plain functions.
"""
from __future__ import annotations

from collections.abc import Callable
import torch

from onelayer.algos.advantages import (
    anchor_ids,
    discounted_returns,
    episode_returns,
    gigpo_advantages_reference,
    group_advantages_reference,
    hash_observation,
)
from onelayer.algos.logprobs import chunked_logprobs, default_chunk_size
from onelayer.algos.loss import (
    AGGREGATIONS,
    fused_linear_policy_loss_reference,
    k3,
    policy_loss,
    token_weights,
)

__all__ = [
    "AGGREGATIONS", "advantages_fn", "anchor_ids", "chunked_logprobs", "default_chunk_size",
    "discounted_returns", "episode_returns", "fused_linear_policy_loss_reference",
    "gigpo_advantages_fn", "gigpo_advantages_reference", "group_advantages_reference", "hash_observation", "k3", "policy_loss",
    "select_loss_impl", "token_weights",
]

IMPLS = ("auto", "torch", "triton")


def _use_triton(impl: str, device: torch.device | str) -> bool:
    if impl not in IMPLS:
        raise ValueError(f"unknown kernel impl {impl!r}; expected one of {IMPLS}")
    if impl == "auto":
        return torch.device(device).type == "cuda"
    return impl == "triton"  # "triton" on CPU runs under TRITON_INTERPRET=1 (tests only: slow)


def _torch_logprobs(hidden, weight, targets, bias=None, *, temperature: float = 1.0,
                    logit_scale: float = 1.0, softcap: float | None = None):
    with torch.no_grad():
        return chunked_logprobs(hidden, weight, targets, bias, temperature=temperature,
                                logit_scale=logit_scale, softcap=softcap)


def select_loss_impl(impl: str, device: torch.device | str) -> tuple[Callable, Callable]:
    """(loss_fn, logprobs_fn) for impl in {"auto", "torch", "triton"}; auto = triton on CUDA.

    loss_fn has the signature of `fused_linear_policy_loss_reference` (minus chunk_size);
    logprobs_fn(hidden, weight, targets, bias=None, *, temperature, logit_scale, softcap)
    -> [T] float32, no grad (old and reference log-prob passes).
    """
    if _use_triton(impl, device):
        # The kernels match the torch reference under TRITON_INTERPRET=1 and compile for sm_90
        # (tests/test_kernels.py); their GPU speed is measured by benchmarks/bench_policy_loss.py.
        from onelayer.kernels import fused_linear_logprobs, fused_linear_policy_loss
        return fused_linear_policy_loss, fused_linear_logprobs
    return fused_linear_policy_loss_reference, _torch_logprobs


def advantages_fn(impl: str, device: torch.device | str) -> Callable:
    """fn(rewards [N], group_ids [N], mode="grpo") -> advantages [N] float32; auto = triton on CUDA."""
    if _use_triton(impl, device):
        from onelayer.kernels import group_advantages
        return group_advantages
    return group_advantages_reference


def gigpo_advantages_fn(impl: str, device: torch.device | str) -> Callable:
    """fn(step_rewards, traj_ids, step_index, episode_group_ids, anchor_ids, *, gamma, omega,
    norm) -> advantages [S] float32 (`gigpo_advantages_reference`); auto = triton on CUDA."""
    if _use_triton(impl, device):
        from onelayer.kernels import gigpo_advantages
        return gigpo_advantages
    return gigpo_advantages_reference
