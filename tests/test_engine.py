"""The cached-prefix engine: gradient equivalence, nothing saved in the prefix, one prefix pass
per batch, and only layer L ever changes."""
import dataclasses

import pytest
import torch

from onelayer.algos import chunked_logprobs, policy_loss
from onelayer.config import build_config
from onelayer.model import load_policy
from onelayer.rollout import SamplingParams, generate_completions
from onelayer.single_turn import rl_step
from onelayer.tasks.arithmetic import arithmetic_task
from onelayer.update import build_objective, completion_hidden, completion_tokens

PROMPTS = ["12+34=", "7-800=", "999+1=", "5-5="]


def rollout_and_advantages(policy, seed=0, group=3, max_new_tokens=7):
    torch.manual_seed(seed)
    rollout = generate_completions(policy.split.lm, policy.tokenizer, PROMPTS,
                                   SamplingParams(max_new_tokens), repeat=group)
    advantages = torch.randn(rollout.sequences.shape[0])
    return rollout, advantages


def loss_from_logprobs(logprobs, rollout, rows, advantages):
    """The GRPO loss on per-token log-probs [T] (ratio 1, no clip: a plain policy gradient)."""
    mask, _, seq_ids = completion_tokens(rollout, rows)
    loss, _ = policy_loss(logprobs, logprobs.detach(), advantages[rows][seq_ids],
                          torch.ones_like(logprobs), seq_ids, aggregation="seq-mean-token-mean",
                          num_seqs=len(rows))
    return loss


def engine_grad(policy, rollout, advantages):
    rows = torch.arange(rollout.sequences.shape[0])
    ctx = policy.split.context(rollout.attention_mask, policy.compute_dtype)
    h = policy.split.prefix(rollout.sequences, ctx)
    mask, targets, _ = completion_tokens(rollout, rows)
    hidden = completion_hidden(policy, h, rollout, rows, policy.layer.policy_params())
    lm_head = policy.split.lm_head
    lp = chunked_logprobs(hidden, lm_head.weight, targets, lm_head.bias, temperature=0.7)
    loss = loss_from_logprobs(lp, rollout, rows, advantages)
    return torch.autograd.grad(loss, policy.layer.parameters())


def naive_grad(policy, rollout, advantages):
    """The Hugging Face model's own full forward, given only tokens and the padding mask: it
    builds its own positions, masks and rotary embeddings, so nothing of the engine's split
    (least of all its position formula) is reused. Layer L's module weights are the master."""
    rows = torch.arange(rollout.sequences.shape[0])
    logits = policy.split.lm(input_ids=rollout.sequences,
                             attention_mask=rollout.attention_mask).logits.float()
    logits = logits[:, rollout.prompt_len - 1:-1] / 0.7
    mask = rollout.completion_mask.bool()
    lp = torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None])[..., 0][mask]
    loss = loss_from_logprobs(lp, rollout, rows, advantages)
    return torch.autograd.grad(loss, policy.layer.parameters())


@pytest.mark.parametrize("frozen_dtype,tol", [("fp32", 1e-5), ("nf4", 1e-4)])
def test_cached_prefix_gradient_equals_naive_full_forward(tiny_models, frozen_dtype, tol):
    policy = load_policy(tiny_models["qwen3"], layer=2, frozen_dtype=frozen_dtype, device="cpu")
    assert policy.layer.shares_storage  # the HF module computes with the master weights
    # Only layer L can get a gradient in the naive forward too: all else is frozen.
    trainable = [n for n, p in policy.split.lm.named_parameters() if p.requires_grad]
    assert trainable and all(n.startswith("model.layers.2.") for n in trainable)
    rollout, advantages = rollout_and_advantages(policy)
    assert rollout.completion_mask.sum() > 0
    # The prompts differ in length: some rows are left-padded, where positions matter.
    assert (rollout.attention_mask[:, 0] == 0).any() and (rollout.attention_mask[:, 0] == 1).any()
    ours = engine_grad(policy, rollout, advantages)
    reference = naive_grad(policy, rollout, advantages)
    total = sum(g.abs().sum() for g in reference)
    assert total > 0
    for a, b in zip(ours, reference):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item())


def test_prefix_saves_nothing_for_backward(tiny_models):
    policy = load_policy(tiny_models["llama"], layer=2, device="cpu")
    rollout, _ = rollout_and_advantages(policy)
    ctx = policy.split.context(rollout.attention_mask, policy.compute_dtype)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        h = policy.split.prefix(rollout.sequences, ctx)
    assert saved == [] and not h.requires_grad and h.grad_fn is None
    # The control: the same hook does see what layer L saves.
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        policy.split.from_layer(h, ctx, policy.layer.policy_params())
    assert saved


def varied_rewards(task):
    """The task with a reward that differs inside a group, so that updates are not zero."""
    return dataclasses.replace(task, reward=lambda completion, row: float(len(completion) % 2))


def count_calls(module):
    calls = []
    module.register_forward_pre_hook(lambda *_: calls.append(1))
    return calls


@pytest.mark.parametrize("layer", [2, 3])
def test_prefix_runs_once_per_batch_however_many_epochs(tiny_models, layer):
    cfg = build_config({"model": tiny_models["qwen3"], "epochs": 3, "minibatch": 4, "group_size": 4,
                        "prompts_per_step": 2, "max_new_tokens": 6, "lr": 1e-3, "beta": 0.1})
    policy = load_policy(cfg.model, layer=layer, device="cpu", keep_reference=True)
    first, trained, last = (count_calls(policy.split.blocks[i]) for i in (0, layer, 3))
    task = arithmetic_task(n_train=10, n_test=1)
    optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
    rl_step(policy, optimizer, task, task.train[:2], cfg, build_objective(cfg, policy.device))
    updates = cfg.epochs * (2 * 4 // cfg.minibatch)
    # generation calls every block once per decoded token; count what the update adds:
    # prefix once, every later block twice more (old + reference) plus per update its forward
    # and its recomputation in backward; not the trained layer's when it is the last block
    # (no other block's backward runs beside its activations).
    generated = len(first) - 1
    assert generated >= 1
    assert len(trained) == generated + 2 + (2 if layer < 3 else 1) * updates
    assert len(last) == (len(trained) if layer == 3 else generated + 2 + 2 * updates)


def test_only_layer_l_changes_and_optimizer_holds_layer_l_alone(tiny_models):
    cfg = build_config({"model": tiny_models["qwen2"], "group_size": 4, "prompts_per_step": 3,
                        "max_new_tokens": 6, "lr": 1e-2, "epochs": 2})
    policy = load_policy(cfg.model, layer=1, device="cpu")
    before = {n: p.detach().clone() for n, p in policy.split.lm.named_parameters()}
    before.update({n: b.detach().clone() for n, b in policy.split.lm.named_buffers()})
    task = varied_rewards(arithmetic_task(n_train=10, n_test=1))
    optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
    for _ in range(2):
        rl_step(policy, optimizer, task, task.train[:3], cfg, build_objective(cfg, policy.device))
    changed = {n for n, p in policy.split.lm.named_parameters() if not torch.equal(p, before[n])}
    changed |= {n for n, b in policy.split.lm.named_buffers() if not torch.equal(b, before[n])}
    assert changed and all(n.startswith("model.layers.1.") for n in changed)
    trainable = {n for n, p in policy.split.lm.named_parameters() if p.requires_grad}
    assert trainable == set(policy.layer.master)
    state_params = {id(p) for p in optimizer.state}
    assert state_params == {id(p) for p in policy.layer.parameters()}
    assert all(p.dtype == torch.float32 for p in policy.layer.parameters())


def test_compute_copy_follows_master_in_bf16(tiny_models):
    """With a bf16 compute dtype the block holds a copy; gradients reach the fp32 master and
    the copy is refreshed after the step."""
    cfg = build_config({"model": tiny_models["qwen3"], "group_size": 4, "prompts_per_step": 2,
                        "max_new_tokens": 5, "lr": 1e-2, "frozen_dtype": "bf16"})
    policy = load_policy(cfg.model, layer=1, frozen_dtype="bf16", device="cpu")
    assert not policy.layer.shares_storage
    own = policy.layer.compute
    assert all(not p.requires_grad and p.dtype == torch.bfloat16 for p in own.values())
    master_before = {n: p.detach().clone() for n, p in policy.layer.master.items()}
    task = arithmetic_task(n_train=10, n_test=1)
    task = varied_rewards(task)
    optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
    rl_step(policy, optimizer, task, task.train[:2], cfg, build_objective(cfg, policy.device))
    assert any(not torch.equal(p, master_before[n]) for n, p in policy.layer.master.items())
    for n, p in policy.layer.master.items():
        assert torch.equal(own[n], p.detach().to(torch.bfloat16))


def test_bf16_training_leaves_share_the_compute_copy_and_give_the_casts_gradient(tiny_models):
    """policy_params() in bf16: leaves on the compute copy's own storage (no second copy of the
    layer), whose gradients reach the fp32 masters bit for bit as a differentiable cast
    master.to(bf16) would bring them, over two accumulated micro-batches; no bf16 gradient kept."""
    policy = load_policy(tiny_models["qwen3"], layer=1, frozen_dtype="bf16", device="cpu")
    rollout, advantages = rollout_and_advantages(policy)
    h = policy.split.prefix(rollout.sequences, policy.split.context(rollout.attention_mask, policy.compute_dtype))
    lm_head = policy.split.lm_head

    def backward(rows, params):
        mask, targets, _ = completion_tokens(rollout, rows)
        hidden = completion_hidden(policy, h, rollout, rows, params)
        lp = chunked_logprobs(hidden, lm_head.weight, targets, lm_head.bias, temperature=0.7)
        loss_from_logprobs(lp, rollout, rows, advantages).backward()

    halves = torch.arange(12).split(7)
    for rows in halves:   # the differentiable cast
        backward(rows, {n: p.to(torch.bfloat16) for n, p in policy.layer.master.items()})
    cast = {n: p.grad.clone() for n, p in policy.layer.master.items()}
    for p in policy.layer.master.values():
        p.grad = None
    for rows in halves:
        leaves = policy.layer.policy_params()
        assert all(leaves[n].data_ptr() == policy.layer.compute[n].data_ptr() for n in leaves)
        backward(rows, leaves)
        assert all(t.grad is None for t in leaves.values())
    for n, p in policy.layer.master.items():
        assert p.grad.dtype == torch.float32 and torch.equal(p.grad, cast[n]), n


def test_triton_loss_impl_trains_like_the_torch_reference(tiny_models):
    """The trainer's calls into onelayer.kernels (the CUDA default), here under the Triton
    interpreter: one step from the same state and seed lands on the same weights."""
    task = arithmetic_task(n_train=10, n_test=1)
    task = varied_rewards(task)
    weights = {}
    for impl in ("torch", "triton"):
        cfg = build_config({"model": tiny_models["qwen3"], "group_size": 4, "prompts_per_step": 2,
                            "max_new_tokens": 5, "lr": 1e-2, "beta": 0.05, "loss_impl": impl,
                            "epochs": 2, "minibatch": 4})
        policy = load_policy(cfg.model, layer=1, device="cpu", keep_reference=True)
        optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
        torch.manual_seed(0)
        stats = rl_step(policy, optimizer, task, task.train[:2], cfg, build_objective(cfg, policy.device))
        assert stats["loss"] != 0 or stats["grad_norm"] > 0
        weights[impl] = {n: p.detach().clone() for n, p in policy.layer.master.items()}
    for name, expected in weights["torch"].items():
        torch.testing.assert_close(weights["triton"][name], expected, rtol=1e-4, atol=1e-5)
