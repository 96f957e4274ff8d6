"""onelayer.data_parallel in one process: the gradient hooks of the overlapped all-reduce and
the ZeRO-1 optimizer's state, on a process group of one rank (gloo, in memory). What only
several processes show (2 ranks with zero1 == 2 ranks without, the collectives issued during
the backward) is in tests/test_distributed.py."""
from collections import Counter

import pytest
import torch
import torch.distributed as dist

from onelayer import data_parallel
from onelayer.config import build_config
from onelayer.data_parallel import GradientSync, ZeroAdamW, readiness_order
from onelayer.errors import UserError
from onelayer.model import load_policy
from onelayer.update import build_objective, frozen_logprobs, micro_batch_loss, prefix_cache
from test_engine_paths import REWARDS, hand_rollout

# (layer, frozen dtype): one layer in fp32 (the masters are the compute copy), the same in
# bf16 (compute-dtype leaf copies), every parameter (blocks recomputed under activation
# checkpointing, the embedding tied to lm_head).
CASES = [("2", "fp32"), ("2", "bf16"), ("all", "fp32")]


@pytest.fixture(scope="module")
def one_rank_group():
    dist.init_process_group("gloo", store=dist.HashStore(), rank=0, world_size=1)
    yield
    dist.destroy_process_group()


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    from conftest import make_tiny_model
    return make_tiny_model(tmp_path_factory.mktemp("tied") / "qwen3", "qwen3",
                           tie_word_embeddings=True)


class Step:
    """The pieces of one micro-batch loss on the hand-made rollout (6 rows, 2 groups)."""

    def __init__(self, path, layer, dtype):
        self.policy = load_policy(path, layer=layer, frozen_dtype=dtype, device="cpu")
        self.rollout = hand_rollout(self.policy.tokenizer)
        cfg = build_config({"model": "x", "layer": layer, "loss_impl": "torch",
                            "max_new_tokens": self.rollout.completion_mask.shape[1]})
        self.objective = build_objective(cfg, self.policy.device)
        self.h = prefix_cache(self.policy, self.rollout, 0)
        self.old = frozen_logprobs(self.policy, self.h, self.rollout, self.objective, None)
        self.advantages = (REWARDS - 0.5)[:, None].expand_as(self.rollout.completion_mask)

    def loss(self, rows, params=None):
        loss, _ = micro_batch_loss(self.policy, self.h, self.rollout, rows, self.advantages,
                                   self.old, None, self.objective, num_seqs=6,
                                   num_tokens=self.rollout.completion_mask.sum(), params=params)
        return loss


@pytest.mark.parametrize("layer, dtype", CASES)
def test_each_gradient_is_final_once_and_in_the_predicted_order(tied_model, layer, dtype):
    step = Step(tied_model, layer, dtype)
    leaves = step.policy.layer.policy_params()
    names = {id(t): name for name, t in leaves.items()}
    fired = []
    for t in leaves.values():
        t.register_post_accumulate_grad_hook(lambda t: fired.append(names[id(t)]))
    loss = step.loss(torch.arange(6), leaves)
    predicted = [list(leaves)[i] for i in readiness_order(loss, list(leaves.values()))]
    loss.backward()
    assert Counter(fired) == Counter(list(leaves))   # once per tensor, recomputed blocks too
    assert fired == predicted
    # Progressive: the first tensor finished is the last one the forward used, not all at once
    # at the end (as the masters' casts to bf16 would make it).
    assert fired[0].endswith(("mlp.down_proj.weight", "model.norm.weight"))


@pytest.mark.parametrize("layer, dtype", CASES)
def test_overlapped_sum_is_the_plain_backward(one_rank_group, tied_model, layer, dtype,
                                              monkeypatch):
    """Two micro-batches, the second through the hooks (each tensor its own bucket): the
    gradients are bit for bit those of the plain backward, and buckets went out before the
    backward had finished the last tensor."""
    step = Step(tied_model, layer, dtype)
    params = step.policy.layer.parameters()
    parts = [torch.arange(0, 4), torch.arange(4, 6)]
    for rows in parts:
        step.loss(rows).backward()
    plain = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None

    monkeypatch.setattr(data_parallel, "BUCKET_BYTES", 1)
    sync = GradientSync(step.policy.layer, shard=False)
    sent_before_last = []
    with sync:
        step.loss(parts[0]).backward()
        leaves = step.policy.layer.policy_params()
        loss = step.loss(parts[1], leaves)
        sync.arm(loss, leaves)
        last = list(leaves.values())[readiness_order(loss, list(leaves.values()))[-1]]
        last.register_hook(lambda grad: sent_before_last.append(sync._next))
        loss.backward()
        assert sync.issued and sync._next == len(params)   # every bucket sent by the backward
        sync.finish(torch.tensor(0.0), {})
    assert sent_before_last == [len(params) - 1]
    for p, want in zip(params, plain):
        assert torch.equal(p.grad, want)


def test_zero_adamw_steps_and_saves_as_adamw(one_rank_group, tiny_models):
    """ZeroAdamW (one rank: its slices are whole tensors) takes AdamW's steps, and its
    full_state_dict is AdamW's state_dict, which it loads back to continue the same."""
    policy = load_policy(tiny_models["qwen3"], layer=2, frozen_dtype="fp32", device="cpu")
    layer = policy.layer
    start = {n: p.detach().clone() for n, p in layer.master.items()}
    grads = [[torch.randn_like(p) for p in layer.parameters()] for _ in range(4)]

    def run(make, steps, state=None):
        with torch.no_grad():
            for name, p in layer.master.items():
                p.copy_(start[name])
        optimizer = make()
        if state is not None:
            optimizer.load_state_dict(state)
        for g in steps:
            with data_parallel.gradient_sync(optimizer, layer) as sync:
                for p, gp in zip(layer.parameters(), g):
                    p.grad = gp.clone()
                sync.finish(torch.tensor(0.0), {})
                sync.clip_(1.0)
                optimizer.step()
            optimizer.zero_grad()
        state = data_parallel.full_state_dict(optimizer)
        return [p.detach().clone() for p in layer.parameters()], state

    adamw = lambda: torch.optim.AdamW(layer.parameters(), lr=1e-2, weight_decay=0.1)  # noqa: E731
    zero = lambda: ZeroAdamW(layer, lr=1e-2, weight_decay=0.1)  # noqa: E731
    want, want_state = run(adamw, grads[:3])
    got, got_state = run(zero, grads[:3])
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)
    assert got_state["param_groups"] == want_state["param_groups"]
    assert got_state["state"].keys() == want_state["state"].keys()
    for i, entry in want_state["state"].items():
        assert list(got_state["state"][i]) == list(entry)        # step, exp_avg, exp_avg_sq
        for key, value in entry.items():
            torch.testing.assert_close(got_state["state"][i][key], value, rtol=0, atol=1e-6)
    with pytest.raises(RuntimeError, match="full_state_dict"):
        ZeroAdamW(layer, lr=1e-2, weight_decay=0.1).state_dict()
    # Each loads AdamW's state after 3 steps and takes a fourth: the same step.
    continued, _ = run(zero, grads[3:], want_state)
    reference, _ = run(adamw, grads[3:], want_state)
    assert max((a - b).abs().max() for a, b in zip(reference, want)) > 1e-4   # it moved
    for a, b in zip(continued, reference):
        torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_out_of_memory_after_a_bucket_went_out_is_not_retried(one_rank_group, tied_model,
                                                               monkeypatch):
    """Out of memory in the last backward before any bucket was sent: the ordinary error, which
    the micro-batch backoff retries. After one was sent (the other ranks wait for the rest): a
    stop, since a retry would send it twice."""
    step = Step(tied_model, "2", "fp32")
    monkeypatch.setattr(data_parallel, "BUCKET_BYTES", 1)

    def out_of_memory(grad):
        raise torch.OutOfMemoryError("out of memory (simulated)")

    for where, error in ((0, torch.OutOfMemoryError), (-1, UserError)):
        with pytest.raises(error, match="out of memory"):
            with GradientSync(step.policy.layer, shard=False) as sync:
                leaves = step.policy.layer.policy_params()
                loss = step.loss(torch.arange(6), leaves)
                sync.arm(loss, leaves)
                tensors = list(leaves.values())
                # Before that tensor's gradient is accumulated, i.e. before its bucket is sent.
                hook = tensors[readiness_order(loss, tensors)[where]].register_hook(out_of_memory)
                try:
                    loss.backward()
                finally:
                    hook.remove()   # the leaves are the masters themselves (fp32)
        assert not sync._hooks
        for p in step.policy.layer.parameters():
            p.grad = None
