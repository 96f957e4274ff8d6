"""Group advantages in one Triton launch: GRPO, Dr. GRPO, batch-scaled, and GiGPO.

Torch reference and oracle: `onelayer.algos.advantages` (group_advantages_reference,
gigpo_advantages_reference). One program per group; the host sorts the values by group once
(torch.unique + argsort) so each program reads one contiguous segment. Groups are small (G
completions, or the steps meeting one anchor state), so each program loops over its segment
in BLOCK-wide tiles, twice (mean, then squared deviations: no catastrophic cancellation).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl
from torch import Tensor

from onelayer.algos.advantages import discounted_returns, episode_returns

STD_EPS = 1e-6
_MODES = {"grpo": 0, "dr_grpo": 1, "batch": 2, "gigpo": 3}


@triton.jit
def _segment_stats(x_ptr, start, end, BLOCK: tl.constexpr):
    """(mean, unbiased std, flat) of x[start:end] (fp32); flat = one member or all equal."""
    total = tl.zeros((), tl.float32)
    vmax = tl.full((), float("-inf"), tl.float32)
    vmin = tl.full((), float("inf"), tl.float32)
    for i in range(start, end, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        m = idx < end
        x = tl.load(x_ptr + idx, mask=m, other=0.0)
        total += tl.sum(x)
        vmax = tl.maximum(vmax, tl.max(tl.where(m, x, float("-inf"))))
        vmin = tl.minimum(vmin, tl.min(tl.where(m, x, float("inf"))))
    count = (end - start).to(tl.float32)
    mean = total / count
    sq = tl.zeros((), tl.float32)
    for i in range(start, end, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        m = idx < end
        d = tl.where(m, tl.load(x_ptr + idx, mask=m, other=0.0) - mean, 0.0)
        sq += tl.sum(d * d)
    std = tl.sqrt(sq / tl.maximum(count - 1.0, 1.0))
    flat = (vmax == vmin) | (count < 2.0)
    return mean, std, flat


@triton.jit
def _group_advantages_kernel(
    x_ptr,            # [N] fp32 values sorted by group: rewards, or step returns R_t (gigpo)
    order_ptr,        # [N] int64 original position of each sorted value
    offsets_ptr,      # [G + 1] int64 start of each group's segment in x
    out_ptr,          # [N] fp32 advantages, written in the original order
    ep_x_ptr,         # gigpo: [N_traj] fp32 episode returns R(tau) sorted by episode group
    ep_offsets_ptr,   # gigpo: [E + 1] int64 segment starts in ep_x
    group_ep_ptr,     # gigpo: [G] int64 episode group of each anchor group
    step_ep_x_ptr,    # gigpo: [N] fp32 R(tau) of each step's trajectory, in x's sorted order
    n_total,          # N
    omega,            # gigpo step-level weight
    MODE: tl.constexpr,      # 0 grpo, 1 dr_grpo, 2 batch, 3 gigpo
    NORM_STD: tl.constexpr,  # gigpo: F = std + eps (True) or 1 (False)
    EPS: tl.constexpr,
    BLOCK: tl.constexpr,
):
    """One program per group g: advantage of every member of segment offsets[g]:offsets[g+1]."""
    g = tl.program_id(0)
    start = tl.load(offsets_ptr + g)
    end = tl.load(offsets_ptr + g + 1)
    mean, std, flat = _segment_stats(x_ptr, start, end, BLOCK)
    if MODE == 0:
        scale = 1.0 / (std + EPS)
    elif MODE == 1:
        scale = 1.0
    elif MODE == 2:
        # Whole-batch std, recomputed by every program: N is a few thousand at most, and it
        # saves a second launch. The batch mean cancels out of std, the group mean is kept.
        _, bstd, _ = _segment_stats(x_ptr, 0, n_total, BLOCK)
        scale = 1.0 / (bstd + EPS)
    else:
        scale = 1.0 / (std + EPS) if NORM_STD else 1.0
    if MODE == 3:
        e = tl.load(group_ep_ptr + g)
        ep_mean, ep_std, ep_flat = _segment_stats(ep_x_ptr, tl.load(ep_offsets_ptr + e),
                                                  tl.load(ep_offsets_ptr + e + 1), BLOCK)
        ep_scale = 1.0 / (ep_std + EPS) if NORM_STD else 1.0
    for i in range(start, end, BLOCK):
        idx = i + tl.arange(0, BLOCK)
        m = idx < end
        x = tl.load(x_ptr + idx, mask=m, other=0.0)
        adv = tl.where(flat, 0.0, (x - mean) * scale)
        if MODE == 3:
            r_tau = tl.load(step_ep_x_ptr + idx, mask=m, other=0.0)
            adv = tl.where(ep_flat, 0.0, (r_tau - ep_mean) * ep_scale) + omega * adv
        pos = tl.load(order_ptr + idx, mask=m, other=0)
        tl.store(out_ptr + pos, adv, mask=m)


def _segments(ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """(inverse [N], order [N], offsets [G + 1]) of any int64 group ids (host sync: G)."""
    _, inv = torch.unique(ids, return_inverse=True)
    order = torch.argsort(inv, stable=True)
    counts = torch.bincount(inv)
    offsets = torch.zeros(counts.numel() + 1, dtype=torch.int64, device=ids.device)
    offsets[1:] = torch.cumsum(counts, 0)
    return inv, order, offsets


def _block(max_count: int) -> int:
    return min(1024, max(16, triton.next_power_of_2(max_count)))


def group_advantages_forward(values: Tensor, group_ids: Tensor, *, mode: str = "grpo",
                             traj_returns: Tensor | None = None, traj_group_ids: Tensor | None = None,
                             step_traj: Tensor | None = None, omega: float = 1.0,
                             norm: str = "std") -> Tensor:
    """Launcher: sort by group, one program per group; see `group_advantages` for arguments."""
    if mode not in _MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; expected one of {tuple(_MODES)}")
    if values.dim() != 1 or values.shape != group_ids.shape:
        raise ValueError(f"values {tuple(values.shape)} and group ids {tuple(group_ids.shape)} must be equal 1-D")
    n = values.numel()
    out = torch.zeros(n, dtype=torch.float32, device=values.device)
    if n == 0:
        return out
    x = values.detach().float()
    ids = group_ids.long()
    dummy_i = torch.zeros(1, dtype=torch.int64, device=values.device)
    ep_x, ep_offsets, group_ep, step_ep_x = x, dummy_i, dummy_i, x
    if mode == "gigpo":
        if traj_returns is None or traj_group_ids is None or step_traj is None:
            raise ValueError("mode 'gigpo' needs traj_returns, traj_group_ids and step_traj")
        if norm not in ("std", "mean"):
            raise ValueError(f"unknown GiGPO norm {norm!r}; expected 'std' or 'mean'")
        step_traj = step_traj.long()
        ep_inv, ep_order, ep_offsets = _segments(traj_group_ids.long())
        ep_x = traj_returns.detach().float()[ep_order]
        step_ep = ep_inv[step_traj]
        # Anchor groups are scoped to the episode group: (episode group, anchor id) pairs.
        _, ids = torch.unique(torch.stack([step_ep, ids], dim=1), dim=0, return_inverse=True)
    inv, order, offsets = _segments(ids)
    num_groups = offsets.numel() - 1
    if mode == "gigpo":
        group_ep = torch.zeros(num_groups, dtype=torch.int64, device=values.device).scatter_(0, inv, step_ep)
        step_ep_x = traj_returns.detach().float()[step_traj][order]
        max_count = max(int((offsets[1:] - offsets[:-1]).max()), int((ep_offsets[1:] - ep_offsets[:-1]).max()))
    else:
        max_count = int((offsets[1:] - offsets[:-1]).max())
    _group_advantages_kernel[(num_groups,)](
        x[order].contiguous(), order, offsets, out, ep_x.contiguous(), ep_offsets, group_ep,
        step_ep_x.contiguous(), n, float(omega),
        MODE=_MODES[mode], NORM_STD=(norm == "std"), EPS=STD_EPS, BLOCK=_block(max_count))
    return out


def group_advantages(rewards: Tensor, group_ids: Tensor, mode: str = "grpo", *,
                     traj_returns: Tensor | None = None, traj_group_ids: Tensor | None = None,
                     step_traj: Tensor | None = None, omega: float = 1.0, norm: str = "std") -> Tensor:
    """Advantages [N] float32 in one kernel launch (no autograd: advantages are constants).

    mode "grpo" / "dr_grpo" / "batch": rewards [N], group_ids [N] int64 (any values), as
    `group_advantages_reference`.
    mode "gigpo": rewards = discounted step returns R_t [S] (`discounted_returns`),
    group_ids = anchor ids [S] (observation hashes; scoped here to the episode group),
    traj_returns [N_traj] undiscounted R(tau), traj_group_ids [N_traj] episode group of each
    trajectory, step_traj [S] row of each step's trajectory in traj_returns; omega, norm
    ("std" or "mean") as `gigpo_advantages_reference`.
    Singleton or all-equal groups get exactly 0, never NaN.
    """
    return group_advantages_forward(rewards, group_ids, mode=mode, traj_returns=traj_returns,
                                    traj_group_ids=traj_group_ids, step_traj=step_traj, omega=omega,
                                    norm=norm)


def gigpo_advantages(step_rewards: Tensor, traj_ids: Tensor, step_index: Tensor, episode_group_ids: Tensor,
                     anchor_ids: Tensor, *, gamma: float = 0.95, omega: float = 1.0, norm: str = "std") -> Tensor:
    """Same signature and result as `gigpo_advantages_reference`; returns run on the host
    (a Python scan over steps), the grouping and normalisation in the kernel."""
    ret, traj_group, step_traj = episode_returns(step_rewards, traj_ids, episode_group_ids)
    dev = step_rewards.device
    step_ret = discounted_returns(step_rewards, traj_ids, step_index, gamma=gamma)
    return group_advantages(step_ret, anchor_ids.to(dev), "gigpo", traj_returns=ret.to(dev),
                            traj_group_ids=traj_group.to(dev), step_traj=step_traj.to(dev),
                            omega=omega, norm=norm)
