"""Advantage references against values worked out by hand from docs/algorithms.md."""
import math

import pytest
import torch

from onelayer.algos import (
    advantages_fn,
    anchor_ids,
    discounted_returns,
    gigpo_advantages_reference,
    group_advantages_reference,
    hash_observation,
)

# Group 7: {1, 0, 0, 1}, group 3: {2, 2, 2} (zero std), group 9: {5} (singleton).
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 2.0, 2.0, 2.0, 5.0])
GROUPS = torch.tensor([7, 7, 7, 7, 3, 3, 3, 9])
SIGN = torch.tensor([1.0, -1.0, -1.0, 1.0, 0, 0, 0, 0])


def test_grpo_hand_values():
    std7 = math.sqrt(4 * 0.25 / 3)  # unbiased: sum (r - 0.5)^2 / (n - 1)
    adv = group_advantages_reference(REWARDS, GROUPS, "grpo")
    assert adv.dtype == torch.float32
    torch.testing.assert_close(adv, SIGN * 0.5 / (std7 + 1e-6))


def test_dr_grpo_hand_values():
    torch.testing.assert_close(group_advantages_reference(REWARDS, GROUPS, "dr_grpo"), SIGN * 0.5)


def test_batch_std_hand_values():
    # batch mean 13/8 = 1.625; sum of squared deviations 17.875 over n - 1 = 7.
    batch_std = math.sqrt(17.875 / 7)
    adv = group_advantages_reference(REWARDS, GROUPS, "batch")
    torch.testing.assert_close(adv, SIGN * 0.5 / (batch_std + 1e-6))


@pytest.mark.parametrize("mode", ["grpo", "dr_grpo", "batch"])
def test_equal_rewards_give_exact_zero(mode):
    # 0.1 * 3 / 3 != 0.1 in floating point: the zero must not come from r - mean.
    r = torch.tensor([0.1, 0.1, 0.1, 0.7, 0.7])
    adv = group_advantages_reference(r, torch.tensor([4, 4, 4, -2, -2]), mode)
    assert torch.equal(adv, torch.zeros(5))
    assert torch.equal(group_advantages_reference(torch.tensor([3.0]), torch.tensor([0]), mode), torch.zeros(1))


def test_group_order_does_not_matter():
    perm = torch.randperm(8, generator=torch.Generator().manual_seed(0))
    adv = group_advantages_reference(REWARDS, GROUPS, "grpo")
    torch.testing.assert_close(group_advantages_reference(REWARDS[perm], GROUPS[perm] * 1000 - 5, "grpo"), adv[perm])


def test_empty_and_bad_mode():
    assert group_advantages_reference(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0
    with pytest.raises(ValueError):
        group_advantages_reference(REWARDS, GROUPS, "ppo")


def test_dispatch_torch_on_cpu():
    fn = advantages_fn("auto", "cpu")
    assert fn is group_advantages_reference


def test_discounted_returns_any_order():
    # trajectory 5: rewards 1, 2, 4 at t = 0, 1, 2 (given shuffled); trajectory 6: one step.
    r = torch.tensor([4.0, 7.0, 1.0, 2.0])
    traj = torch.tensor([5, 6, 5, 5])
    t = torch.tensor([2, 0, 0, 1])
    out = discounted_returns(r, traj, t, gamma=0.5)
    torch.testing.assert_close(out, torch.tensor([4.0, 7.0, 1 + 0.5 * 2 + 0.25 * 4, 2 + 0.5 * 4]))


def test_hash_observation_is_stable_int64():
    h = hash_observation("You are in the kitchen.")
    assert h == hash_observation("You are in the kitchen.") and -2**63 <= h < 2**63
    assert h != hash_observation("You are in the kitchen!")
    assert h == 0x6E07F568DAC76A55  # pinned: anchor ids must not change between runs/versions
    ids = anchor_ids(["a", "b", "a"])
    assert ids.dtype == torch.int64 and ids[0] == ids[2] and ids[0] != ids[1]


def _gigpo_example():
    """Episode group 1: trajectories A (id 10) and B (id 11); episode group 2: trajectory C.

    A: obs s0, s1  rewards 0, 1      R(A) = 1; gamma 0.5: R_0 = 0.5, R_1 = 1
    B: obs s0, s2, s1 rewards 0,0,0  R(B) = 0; all step returns 0
    C (group 2): obs s0 reward 3     alone in its episode group and its anchor group
    """
    obs = ["s0", "s1", "s0", "s2", "s1", "s0"]
    rows = dict(step_rewards=torch.tensor([0.0, 1.0, 0.0, 0.0, 0.0, 3.0]),
                traj_ids=torch.tensor([10, 10, 11, 11, 11, 20]),
                step_index=torch.tensor([0, 1, 0, 1, 2, 0]),
                episode_group_ids=torch.tensor([1, 1, 1, 1, 1, 2]),
                anchor_ids=anchor_ids(obs))
    return rows


def test_gigpo_hand_values_std_norm():
    # Episode: R = {1, 0}, mean 0.5, std sqrt(0.5) -> A^E = +-0.5 / 0.70711 = +-0.70711.
    # Anchor s0 (group 1) {0.5, 0}: +-0.25 / 0.35355 = +-0.70711; s1 {1, 0}: +-0.70711; s2 alone: 0.
    a = 0.5 / (math.sqrt(0.5) + 1e-6)
    s0 = 0.25 / (math.sqrt(0.125) + 1e-6)
    s1 = 0.5 / (math.sqrt(0.5) + 1e-6)
    want = torch.tensor([a + s0, a + s1, -a - s0, -a + 0.0, -a - s1, 0.0])
    got = gigpo_advantages_reference(**_gigpo_example(), gamma=0.5, omega=1.0, norm="std")
    torch.testing.assert_close(got, want)


def test_gigpo_hand_values_mean_norm_and_omega():
    # F = 1: A^E = +-0.5; A^S: s0 +-0.25, s1 +-0.5; omega = 2.
    want = torch.tensor([0.5 + 0.5, 0.5 + 1.0, -0.5 - 0.5, -0.5, -0.5 - 1.0, 0.0])
    got = gigpo_advantages_reference(**_gigpo_example(), gamma=0.5, omega=2.0, norm="mean")
    torch.testing.assert_close(got, want)


def test_gigpo_rejects_split_trajectory():
    rows = _gigpo_example()
    rows["episode_group_ids"] = torch.tensor([1, 2, 1, 1, 1, 2])
    with pytest.raises(ValueError):
        gigpo_advantages_reference(**rows)
