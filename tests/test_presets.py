"""--algo presets, --scale-rewards and DAPO dynamic sampling, against hand-computed numbers."""
import math

import pytest
import torch

from onelayer.config import build_config
from onelayer.model import load_policy
from onelayer.single_turn import sample_and_score
from onelayer.tasks import Task
from onelayer.update import build_objective

REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 1.0, 1.0, 1.0])
GROUPS = torch.tensor([0, 0, 0, 0, 1, 1, 1, 1])
# Group 0: mean 0.5, unbiased std sqrt(1/3); group 1: all equal. Batch: mean 0.75,
# unbiased variance (2 * 0.75^2 + 6 * 0.25^2) / 7 = 1.5 / 7.
GRPO = 0.5 / (math.sqrt(1 / 3) + 1e-6)
BATCH = 0.5 / (math.sqrt(1.5 / 7) + 1e-6)


@pytest.mark.parametrize("options,aggregation,advantage", [
    ({"algo": "grpo"}, "seq-mean-token-mean", GRPO),
    ({"algo": "dr_grpo"}, "seq-mean-token-sum-norm", 0.5),
    ({"algo": "grpo", "scale_rewards": "batch"}, "seq-mean-token-mean", BATCH),
    ({"algo": "dr_grpo", "scale_rewards": "group", "loss_agg": "token-mean"}, "token-mean", GRPO),
    ({"algo": "grpo", "scale_rewards": "none", "eps_high": 0.28}, "seq-mean-token-mean", 0.5),
])
def test_presets_and_overrides(options, aggregation, advantage):
    cfg = build_config({"model": "M", **options})
    objective = build_objective(cfg, torch.device("cpu"))
    assert objective.aggregation == aggregation
    assert objective.eps_high == options.get("eps_high", 0.2)
    got = objective.advantages_fn(REWARDS, GROUPS, mode=objective.advantage_mode)
    expected = torch.tensor([advantage, -advantage, -advantage, advantage, 0, 0, 0, 0])
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)


def test_gigpo_preset_needs_an_environment():
    assert build_config({"model": "M", "algo": "gigpo", "env": "gridworld"}).aggregation == "token-mean"
    with pytest.raises(Exception, match="gigpo"):
        build_config({"model": "M", "algo": "gigpo"})


def test_dynamic_sampling_drops_uninformative_groups_and_refills(tiny_models):
    # Rows marked "same" reward every completion alike: their groups carry no signal.
    def reward(completion, row):
        return 1.0 if row["kind"] == "same" else float(len(completion) % 2)

    rows = [{"q": f"{i}+1=", "kind": "same" if i % 2 else "varied"} for i in range(40)]
    task = Task("toy", train=rows, test=[], prompt=lambda r: r["q"], reward=reward)
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu")
    cfg = build_config({"model": "M", "group_size": 4, "prompts_per_step": 4, "max_new_tokens": 6,
                        "dynamic_sampling": True, "temperature": 1.5})
    supply = iter(rows[4:])
    requests = []

    def more_rows(n):
        requests.append(n)
        return [next(supply) for _ in range(n)]

    torch.manual_seed(0)
    batch = sample_and_score(policy, task, rows[:4], cfg, more_rows)
    groups = batch.rewards.view(-1, 4)
    assert len(groups) >= 1 and bool((groups.std(1) > 0).all())
    assert requests and requests[0] >= 2        # the two "same" groups of round 1 were refilled
    assert batch.groups_sampled == 4 + sum(requests)
    assert batch.rollout.sequences.shape[0] == len(batch.rewards)
    assert torch.equal(batch.group_ids, torch.arange(len(groups)).repeat_interleave(4))
    # Without dynamic sampling every group is kept, informative or not.
    plain = build_config({"model": "M", "group_size": 4, "prompts_per_step": 4, "max_new_tokens": 6})
    assert len(sample_and_score(policy, task, rows[:4], plain, more_rows).rewards) == 16
