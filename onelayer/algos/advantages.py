"""Advantages: GRPO, Dr. GRPO, batch-scaled GRPO and GiGPO (formulas in docs/algorithms.md).

These are the torch references: the CPU path of the trainer and the oracle of the Triton
kernel `onelayer.kernels.group_advantages`. Everything is computed in float64 and returned as
float32; the sizes involved (a few thousand rewards or steps) make that free.

Group conventions shared by every function here:
- group ids are any int64 values (not necessarily contiguous or sorted);
- a group whose values are all equal, or that has one member, gets advantage exactly 0;
- std is the unbiased (sample) standard deviation, as `torch.std` computes it.
"""
from __future__ import annotations

import hashlib
from collections.abc import Iterable

import torch
from torch import Tensor

STD_EPS = 1e-6
GROUP_MODES = ("grpo", "dr_grpo", "batch")


def _group_stats(values: Tensor, group_ids: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Per-element (group mean, group unbiased std, flat) of float64 `values` [N].

    `flat` is True where the element's group has one member or all-equal values; its
    advantage must be exactly 0, whatever rounding the mean suffered.
    """
    _, inv = torch.unique(group_ids, return_inverse=True)
    num_groups = int(inv.max()) + 1 if inv.numel() else 0
    count = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inv, torch.ones_like(values))
    mean = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inv, values) / count
    dev = values - mean[inv]
    sq = torch.zeros(num_groups, dtype=torch.float64).index_add_(0, inv, dev * dev)
    std = (sq / (count - 1).clamp_min(1)).sqrt()
    vmax = torch.full((num_groups,), -torch.inf, dtype=torch.float64).scatter_reduce_(0, inv, values, "amax")
    vmin = torch.full((num_groups,), torch.inf, dtype=torch.float64).scatter_reduce_(0, inv, values, "amin")
    flat = (vmax == vmin) | (count < 2)
    return mean[inv], std[inv], flat[inv]


def group_advantages_reference(rewards: Tensor, group_ids: Tensor, mode: str = "grpo") -> Tensor:
    """Advantage per completion [N] float32 from its reward [N] and group id [N] (int64).

    mode "grpo":    (r - group mean) / (group std + 1e-6)
         "dr_grpo": r - group mean
         "batch":   (r - group mean) / (std of all N rewards + 1e-6)
    """
    if mode not in GROUP_MODES:
        raise ValueError(f"unknown advantage mode {mode!r}; expected one of {GROUP_MODES}")
    if rewards.shape != group_ids.shape or rewards.dim() != 1:
        raise ValueError(f"rewards {tuple(rewards.shape)} and group_ids {tuple(group_ids.shape)} must be equal 1-D")
    r = rewards.detach().to(torch.float64).cpu()
    if r.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=rewards.device)
    mean, std, flat = _group_stats(r, group_ids.detach().cpu())
    adv = r - mean
    if mode == "grpo":
        adv = adv / (std + STD_EPS)
    elif mode == "batch":
        batch_std = r.std() if r.numel() > 1 else torch.zeros((), dtype=torch.float64)
        adv = adv / (batch_std + STD_EPS)
    adv = adv.masked_fill(flat, 0.0)
    return adv.to(torch.float32).to(rewards.device)


# ---------------------------------------------------------------------------------------------
# GiGPO
# ---------------------------------------------------------------------------------------------

def hash_observation(text: str) -> int:
    """Stable int64 anchor id of an observation text: first 8 bytes of blake2b, signed.

    Stable across processes and Python versions (unlike `hash(str)`, which is salted).
    """
    digest = hashlib.blake2b(text.encode("utf-8"), digest_size=8).digest()
    return int.from_bytes(digest, "little", signed=True)


def anchor_ids(observations: Iterable[str]) -> Tensor:
    """int64 [S] anchor ids of the observation texts s_t of S steps (see `hash_observation`)."""
    return torch.tensor([hash_observation(o) for o in observations], dtype=torch.int64)


def discounted_returns(step_rewards: Tensor, traj_ids: Tensor, step_index: Tensor, *,
                       gamma: float = 0.95) -> Tensor:
    """R_t = sum_{k >= t} gamma^(k - t) r_k within each trajectory; float32 [S].

    step_rewards [S] float, traj_ids [S] int64 (globally unique trajectory ids), step_index [S]
    int64 (the step number t inside its trajectory). Steps may come in any order; the exponent
    uses the step numbers, so R_t = r_t + gamma^(t' - t) R_t' with t' the next step present.
    """
    s = step_rewards.numel()
    r = step_rewards.detach().to(torch.float64).cpu().tolist()
    traj = traj_ids.detach().cpu().tolist()
    idx = step_index.detach().cpu().tolist()
    order = sorted(range(s), key=lambda i: (traj[i], idx[i]))
    out = [0.0] * s
    nxt_ret, nxt_traj, nxt_idx = 0.0, None, 0
    for i in reversed(order):  # backwards through each trajectory: one running sum
        if traj[i] != nxt_traj:
            ret = r[i]
        else:
            ret = r[i] + gamma ** (nxt_idx - idx[i]) * nxt_ret
        out[i] = ret
        nxt_ret, nxt_traj, nxt_idx = ret, traj[i], idx[i]
    return torch.tensor(out, dtype=torch.float32, device=step_rewards.device)


def episode_returns(step_rewards: Tensor, traj_ids: Tensor, episode_group_ids: Tensor
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """Undiscounted R(tau) per trajectory, from flat steps.

    Returns (returns [N] float64, trajectory group ids [N] int64, step -> trajectory row [S]
    int64), with trajectories numbered 0..N-1 in sorted traj_id order. Raises if the steps
    of one trajectory disagree on their episode group.
    """
    uniq, step_traj = torch.unique(traj_ids.detach().cpu(), return_inverse=True)
    n = uniq.numel()
    ret = torch.zeros(n, dtype=torch.float64).index_add_(0, step_traj, step_rewards.detach().cpu().to(torch.float64))
    egid = episode_group_ids.detach().cpu()
    traj_group = torch.empty(n, dtype=torch.int64).scatter_(0, step_traj, egid)
    if not torch.equal(traj_group[step_traj], egid):
        raise ValueError("all steps of a trajectory must share one episode group id")
    return ret, traj_group, step_traj


def gigpo_advantages_reference(step_rewards: Tensor, traj_ids: Tensor, step_index: Tensor,
                               episode_group_ids: Tensor, anchor_ids: Tensor, *,
                               gamma: float = 0.95, omega: float = 1.0, norm: str = "std") -> Tensor:
    """GiGPO advantage per step, float32 [S]; broadcast it to the tokens of that step's action.

    Flat per-step inputs, one row per step (s_t, a_t, r_t) of any trajectory, in any order:
      step_rewards      [S] float  r_t
      traj_ids          [S] int64  trajectory of the step (unique across the batch)
      step_index        [S] int64  t, the step number inside its trajectory
      episode_group_ids [S] int64  episode group (same task + initial state) of the trajectory
      anchor_ids        [S] int64  hash of the observation text s_t (`hash_observation`); anchor
                                   groups are scoped to the episode group, so equal hashes in
                                   different episode groups are different anchor states
    A = A^E(tau) + omega * A^S(a_t), with
      A^E = (R(tau) - mean over the episode group) / F,   R(tau) = sum of the step rewards
      A^S = (R_t - mean over the anchor group) / F,       R_t discounted by gamma
      F   = std + 1e-6 (norm="std") or 1 (norm="mean").
    Singleton or all-equal groups (episode or anchor) contribute exactly 0.
    """
    if norm not in ("std", "mean"):
        raise ValueError(f"unknown GiGPO norm {norm!r}; expected 'std' or 'mean'")
    mode = "grpo" if norm == "std" else "dr_grpo"
    if step_rewards.numel() == 0:
        return torch.zeros(0, dtype=torch.float32, device=step_rewards.device)
    ret, traj_group, step_traj = episode_returns(step_rewards, traj_ids, episode_group_ids)
    adv_episode = group_advantages_reference(ret, traj_group, mode).to(torch.float64)[step_traj]
    step_ret = discounted_returns(step_rewards, traj_ids, step_index, gamma=gamma).cpu()
    # Anchor group = (episode group, observation hash) pair, renumbered to one int64 id.
    pairs = torch.stack([episode_group_ids.detach().cpu(), anchor_ids.detach().cpu()], dim=1)
    _, anchor_group = torch.unique(pairs, dim=0, return_inverse=True)
    adv_step = group_advantages_reference(step_ret, anchor_group, mode).to(torch.float64)
    adv = adv_episode + omega * adv_step
    return adv.to(torch.float32).to(step_rewards.device)
