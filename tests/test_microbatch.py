"""Micro-batching is exact: the same optimizer steps, metrics and weights as the whole minibatch."""
import pytest
import torch

from onelayer.algos import AGGREGATIONS, policy_loss, token_weights
from onelayer.config import build_config
from onelayer.model import load_policy
from onelayer.update import Schedule, build_objective, micro_batches, optimize
from test_engine_paths import REWARDS, hand_rollout

LAYER = 2


@pytest.fixture(scope="module")
def policy(tiny_models):
    return load_policy(tiny_models["qwen3"], layer=LAYER, frozen_dtype="fp32", device="cpu",
                       keep_reference=True)


def run(policy, rollout, plan, cfg, seed=0):
    """Layer weights and metrics after `optimize` from the original weights. Plain SGD with no
    clipping: the step is the gradient itself, so any error in its scale shows."""
    with torch.no_grad():
        for name, p in policy.layer.master.items():
            p.copy_(policy.layer.reference[name])
    policy.layer.refresh_compute_copy()
    objective = build_objective(cfg, policy.device)
    optimizer = torch.optim.SGD(policy.layer.parameters(), lr=0.5)
    advantages = objective.advantages_fn(REWARDS, torch.arange(6) // 3, mode=objective.advantage_mode)
    token_adv = advantages[:, None].expand_as(rollout.completion_mask)
    stats = optimize(policy, optimizer, rollout, token_adv, plan, objective,
                     generator=torch.Generator().manual_seed(seed))
    return {n: p.detach().clone() for n, p in policy.layer.master.items()}, stats


# The Triton kernel (interpreter on CPU: slow) runs with beta > 0 only, which covers the
# beta = 0 path of the same code plus the KL term.
CASES = [("torch", aggregation, beta) for aggregation in AGGREGATIONS for beta in (0.0, 0.1)] + \
        [("triton", aggregation, 0.1) for aggregation in AGGREGATIONS]


@pytest.mark.parametrize("impl, aggregation, beta", CASES)
def test_micro_batches_give_the_same_update(policy, impl, aggregation, beta):
    rollout = hand_rollout(policy.tokenizer)
    cfg = build_config({"model": "x", "loss_agg": aggregation, "beta": beta, "loss_impl": impl,
                        "max_new_tokens": rollout.completion_mask.shape[1], "temperature": 0.8})
    # Two minibatches (4 + 2 rows) over two epochs: the second step sees moved weights, so the
    # clip and (with beta > 0) the KL term are live.
    whole, whole_stats = run(policy, rollout, Schedule(epochs=2, minibatch=4, max_grad_norm=1e9), cfg)
    moved = max((whole[n] - policy.layer.reference[n]).abs().max() for n in whole)
    assert moved > 1e-3
    for micro in (1, 3) if impl == "torch" else (3,):   # 4 = 3 + 1 and 2 = 2: uneven pieces
        split, stats = run(policy, rollout, Schedule(epochs=2, minibatch=4, micro_batch=micro,
                                                     max_grad_norm=1e9), cfg)
        for name in whole:
            torch.testing.assert_close(split[name], whole[name], atol=2e-6, rtol=1e-5)
        assert len(stats) == len(whole_stats) == 4
        for got, want in zip(stats, whole_stats):
            assert got.keys() == want.keys()
            for key in want:
                assert got[key] == pytest.approx(want[key], rel=1e-4, abs=1e-6), key
    if beta:
        assert max(s["kl"] for s in whole_stats) > 0


def test_sequence_ratios_on_the_kernel_give_the_torch_update(policy):
    """--importance-level sequence (GSPO): the Triton path, in micro-batches of 3, makes the
    optimizer steps of the torch path on the whole minibatch; the later steps are off-policy."""
    rollout = hand_rollout(policy.tokenizer)
    options = {"model": "x", "loss_agg": "seq-mean-token-mean", "importance_level": "sequence",
               "max_new_tokens": rollout.completion_mask.shape[1], "temperature": 0.8}
    schedule = Schedule(epochs=2, minibatch=4, max_grad_norm=1e9)
    want, want_stats = run(policy, rollout, schedule, build_config({**options, "loss_impl": "torch"}))
    got, stats = run(policy, rollout, Schedule(epochs=2, minibatch=4, micro_batch=3, max_grad_norm=1e9),
                     build_config({**options, "loss_impl": "triton"}))
    for name in want:
        torch.testing.assert_close(got[name], want[name], atol=2e-6, rtol=1e-5)
    for got_step, want_step in zip(stats, want_stats, strict=True):
        for key in want_step:
            assert got_step[key] == pytest.approx(want_step[key], rel=1e-4, abs=1e-6), key
    assert any(abs(s["ratio_mean"] - 1) > 1e-3 for s in want_stats)


def test_normalisers_of_the_minibatch_split_the_loss_exactly():
    # The pieces' losses with the minibatch's S and token count add up to the whole loss.
    gen = torch.Generator().manual_seed(3)
    seq_ids = torch.tensor([0, 0, 0, 1, 2, 2, 3, 3, 3, 3, 4])
    mask = torch.tensor([1, 1, 0, 1, 1, 1, 0, 0, 1, 1, 1.0])
    logp = torch.randn(11, generator=gen) - 2
    old = logp + 0.3 * torch.randn(11, generator=gen)
    adv = torch.randn(11, generator=gen)
    for aggregation in AGGREGATIONS:
        kw = dict(aggregation=aggregation, max_len=5, eps_high=0.28)
        whole, _ = policy_loss(logp, old, adv, mask, seq_ids, **kw, num_seqs=5)
        pieces = 0.0
        for seqs in ([0, 1], [2, 3], [4]):
            sel = torch.isin(seq_ids, torch.tensor(seqs))
            local_ids = torch.unique(seq_ids[sel], return_inverse=True)[1]
            part, _ = policy_loss(logp[sel], old[sel], adv[sel], mask[sel], local_ids, **kw,
                                  num_seqs=5, num_tokens=mask.sum())
            pieces = pieces + part
        torch.testing.assert_close(pieces, whole, atol=1e-7, rtol=1e-6)
    # Without the override, token-mean divides by the piece's own tokens.
    assert token_weights(mask[:3], seq_ids[:3], num_seqs=1).sum() == 1.0
    assert token_weights(mask[:3], seq_ids[:3], num_seqs=1, num_tokens=8.0).sum() == 0.25


def test_micro_batches_cover_the_rows_in_order():
    rows = torch.tensor([5, 2, 7, 1, 0])
    assert [p.tolist() for p in micro_batches(rows, 2)] == [[5, 2], [7, 1], [0]]
    assert [p.tolist() for p in micro_batches(rows, 0)] == [[5, 2, 7, 1, 0]]


def test_max_memory_chooses_batches_before_loading():
    from onelayer.errors import UserError
    from onelayer.train import fit_batches

    lines = []
    cfg = fit_batches(build_config({"max_memory": "2GiB", "device": "cpu"}), lines.append)
    assert cfg.micro_batch >= 1 and cfg.generation_batch >= 1 and "micro-batch" in lines[0]
    kept = fit_batches(build_config({"max_memory": "2GiB", "device": "cpu", "micro_batch": 3,
                                     "generation_batch": 5}), lines.append)
    assert (kept.micro_batch, kept.generation_batch) == (3, 5)   # the user's choice stands
    with pytest.raises(UserError, match="needed"):
        fit_batches(build_config({"max_memory": "1MiB", "device": "cpu"}), lines.append)


def test_generation_batch_keeps_groups_whole(tiny_models):
    from onelayer.tasks import load_task
    from onelayer.single_turn import sample_and_score

    policy = load_policy(tiny_models["qwen3"], layer=1, frozen_dtype="fp32", device="cpu")
    task = load_task("arithmetic")
    rows = task.train[:3]
    cfg = build_config({"model": "x", "group_size": 4, "generation_batch": 8, "max_new_tokens": 4})
    batch = sample_and_score(policy, task, rows, cfg, generator=torch.Generator().manual_seed(0))
    rollout = batch.rollout
    assert rollout.sequences.shape[0] == 12 and len(batch.rewards) == 12
    prompts = rollout.sequences[:, :rollout.prompt_len] * rollout.attention_mask[:, :rollout.prompt_len]
    for g in range(3):   # each group's rows hold the same prompt, and groups differ
        assert (prompts[4 * g:4 * g + 4] == prompts[4 * g]).all()
    assert not torch.equal(prompts[0], prompts[4])
