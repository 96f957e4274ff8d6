"""The engine on paths the fp32 equivalence test does not take: a bf16 compute copy of the
trained layer, tied input/output embeddings, and a whole Dr. GRPO update with an uneven last
minibatch, each against a reference built from the plain Hugging Face model."""
import pytest
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM

from conftest import make_tiny_model
from onelayer.algos import chunked_logprobs
from onelayer.config import build_config
from onelayer.model import load_policy
from onelayer.rollout import Rollout
from onelayer.update import (build_objective, completion_hidden, completion_tokens, frozen_logprobs,
                             optimize, schedule)
from test_engine import loss_from_logprobs, rollout_and_advantages

LAYER = 2
TEMPERATURE = 0.7


def engine_loss(policy, rollout, advantages):
    """The trainer's path: cached h_L, layer L through functional_call with the master cast to
    the compute dtype, suffix, chunked log-probs."""
    rows = torch.arange(rollout.sequences.shape[0])
    ctx = policy.split.context(rollout.attention_mask, policy.compute_dtype)
    h = policy.split.prefix(rollout.sequences, ctx)
    _, targets, _ = completion_tokens(rollout, rows)
    hidden = completion_hidden(policy, h, rollout, rows, policy.layer.policy_params())
    lm_head = policy.split.lm_head
    lp = chunked_logprobs(hidden, lm_head.weight, targets, lm_head.bias, temperature=TEMPERATURE)
    return loss_from_logprobs(lp, rollout, rows, advantages)


def hf_logprobs(lm, rollout, temperature=TEMPERATURE):
    """Completion-token log-probs [B, C] from the model's own forward (its own positions)."""
    logits = lm(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).logits.float()
    logits = logits[:, rollout.prompt_len - 1:-1] / temperature
    return torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None])[..., 0]


def frozen_but_layer(lm, layer):
    lm.requires_grad_(False)
    params = {f"model.layers.{layer}.{n}": p for n, p in lm.model.layers[layer].named_parameters()}
    for p in params.values():
        p.requires_grad_(True)
    return params


# ---------------------------------------------------------------------------------------------
# bf16 compute copy
# ---------------------------------------------------------------------------------------------

def test_bf16_compute_path_gradient_reaches_the_fp32_master(tiny_models):
    path = tiny_models["qwen3"]
    policy = load_policy(path, layer=LAYER, frozen_dtype="bf16", device="cpu")
    assert policy.compute_dtype == torch.bfloat16 and not policy.layer.shares_storage
    rollout, advantages = rollout_and_advantages(policy)
    assert rollout.completion_mask.sum() > 0 and (rollout.attention_mask[:, 0] == 0).any()

    loss = engine_loss(policy, rollout, advantages)
    loss.backward()
    master = policy.layer.master
    assert all(p.grad is not None and p.grad.dtype == torch.float32 for p in master.values())
    # The block's own bf16 copy is not a leaf of the graph: nothing accumulates there.
    assert all(p.grad is None for p in policy.layer.block.parameters())

    # Naive: the whole Hugging Face model in bf16, only layer L's (bf16) weights with grad.
    lm = AutoModelForCausalLM.from_pretrained(path, dtype=torch.bfloat16).eval()
    params = frozen_but_layer(lm, LAYER)
    assert set(params) == set(master)
    lp = hf_logprobs(lm, rollout)[rollout.completion_mask.bool()]
    rows = torch.arange(rollout.sequences.shape[0])
    naive = torch.autograd.grad(loss_from_logprobs(lp, rollout, rows, advantages),
                                list(params.values()))
    total = sum(g.float().abs().sum() for g in naive)
    assert total > 0
    for (name, p), g in zip(params.items(), naive):
        ours, ref = master[name].grad, g.float()
        # bf16 keeps 8 mantissa bits: compare at a few percent of the tensor's largest entry,
        # and require the direction to agree closely.
        torch.testing.assert_close(ours, ref, rtol=0, atol=0.03 * ref.abs().max().item(),
                                   msg=name)
        cos = torch.nn.functional.cosine_similarity(ours.flatten(), ref.flatten(), dim=0)
        assert cos > 0.999, (name, cos.item())


# ---------------------------------------------------------------------------------------------
# Tied embeddings
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    path = make_tiny_model(tmp_path_factory.mktemp("tied") / "qwen3", "qwen3",
                           tie_word_embeddings=True)
    with safe_open(f"{path}/model.safetensors", framework="pt") as f:
        assert "lm_head.weight" not in set(f.keys())   # the checkpoint stores the matrix once
    return path


@pytest.mark.parametrize("frozen_dtype", ["fp32", "nf4"])
def test_tied_embeddings_load_score_and_train_only_layer_l(tied_model, frozen_dtype):
    cfg = build_config({"model": tied_model, "group_size": 3, "max_new_tokens": 7, "lr": 1e-2,
                        "temperature": TEMPERATURE, "minibatch": 6})
    policy = load_policy(tied_model, layer=LAYER, frozen_dtype=frozen_dtype, device="cpu")
    split = policy.split
    assert split.lm_head.weight is split.embed.weight

    rollout, advantages = rollout_and_advantages(policy)
    objective = build_objective(cfg, policy.device)
    ctx = split.context(rollout.attention_mask, policy.compute_dtype)
    h = split.prefix(rollout.sequences, ctx)
    ours = frozen_logprobs(policy, h, rollout, objective, params=None)
    with torch.no_grad():
        theirs = hf_logprobs(split.lm, rollout) * rollout.completion_mask
    torch.testing.assert_close(ours, theirs, rtol=1e-4, atol=1e-4)

    before = {n: p.detach().clone() for n, p in split.lm.named_parameters()}
    embedding = split.embed.weight.detach().clone()
    optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
    token_adv = advantages[:, None].expand_as(rollout.completion_mask)
    optimize(policy, optimizer, rollout, token_adv, schedule(cfg), objective)
    changed = {n for n, p in split.lm.named_parameters() if not torch.equal(p, before[n])}
    assert changed and all(n.startswith(f"model.layers.{LAYER}.") for n in changed)
    assert torch.equal(split.embed.weight, embedding) and split.lm_head.weight is split.embed.weight


# ---------------------------------------------------------------------------------------------
# Dr. GRPO through the whole update
# ---------------------------------------------------------------------------------------------

MAX_NEW = 6
REWARDS = torch.tensor([1.0, 0.0, 0.0, 1.0, 1.0, 0.0])    # two groups of G = 3
LENGTHS = [6, 2, 4, 1, 3, 5]                              # completion tokens, EOS included


def hand_rollout(tokenizer):
    """Six rows: two left-padded prompts x 3, completions of the given lengths ending in EOS
    (fixed random tokens: the update does not care who wrote them)."""
    prompts = tokenizer(["12+34=", "5-5="], return_tensors="pt", padding=True,
                        add_special_tokens=False)
    ids = prompts.input_ids.repeat_interleave(3, 0)
    mask = prompts.attention_mask.repeat_interleave(3, 0)
    gen = torch.Generator().manual_seed(0)
    completion = torch.randint(2, 43, (6, MAX_NEW), generator=gen)
    completion_mask = torch.zeros(6, MAX_NEW, dtype=torch.long)
    for row, n in enumerate(LENGTHS):
        completion[row, n - 1] = tokenizer.eos_token_id
        completion[row, n:] = tokenizer.pad_token_id
        completion_mask[row, :n] = 1
    return Rollout(torch.cat([ids, completion], 1), torch.cat([mask, completion_mask], 1),
                   completion_mask, ids.shape[1], [""] * 6)


def reference_update(path, rollout, orders, cfg, adam, sequences_in):
    """The update written out by hand on the Hugging Face model: Dr. GRPO advantages
    A_i = r_i - mean of its group, per minibatch L = sum m l / (S * L_max), S = sequences_in(rows),
    clipped ratio against the log-probs before the first step, one AdamW step per minibatch."""
    lm = AutoModelForCausalLM.from_pretrained(path).eval()
    params = frozen_but_layer(lm, LAYER)
    optimizer = torch.optim.AdamW(params.values(), lr=cfg.lr, weight_decay=cfg.weight_decay, **adam)
    adv = REWARDS - REWARDS.view(2, 3).mean(1).repeat_interleave(3)
    with torch.no_grad():
        old = hf_logprobs(lm, rollout, cfg.temperature)
    for order in orders:
        for start in range(0, len(order), cfg.minibatch):
            rows = order[start:start + cfg.minibatch]
            mb = Rollout(rollout.sequences[rows], rollout.attention_mask[rows],
                         rollout.completion_mask[rows], rollout.prompt_len, [])
            logp = hf_logprobs(lm, mb, cfg.temperature)
            ratio = torch.exp(logp - old[rows])
            a = adv[rows][:, None]
            surr = torch.minimum(ratio * a, ratio.clamp(1 - cfg.eps_low, 1 + cfg.eps_high) * a)
            m = mb.completion_mask.float()
            loss = (m * -surr).sum() / (sequences_in(rows) * cfg.max_new_tokens)
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    return {n: p.detach() for n, p in params.items()}


def test_dr_grpo_update_with_an_uneven_last_minibatch(tiny_models, monkeypatch):
    path = tiny_models["qwen3"]
    # Batch 6, minibatch 4: the second step sees 2 sequences. max_grad_norm is out of reach so
    # that clipping cannot hide a wrongly scaled loss; Adam's eps is near the gradients' size
    # so that the step depends on their scale (with eps ~ 0 the first step is sign(g) * lr).
    cfg = build_config({"model": path, "algo": "dr_grpo", "group_size": 3, "prompts_per_step": 2,
                        "max_new_tokens": MAX_NEW, "minibatch": 4, "epochs": 1, "lr": 1e-2,
                        "weight_decay": 0.1, "temperature": TEMPERATURE, "max_grad_norm": 1e9})
    adam = dict(eps=1e-3)
    assert (cfg.aggregation, cfg.reward_scaling) == ("seq-mean-token-sum-norm", "none")
    policy = load_policy(path, layer=LAYER, device="cpu")
    rollout = hand_rollout(policy.tokenizer)
    assert (rollout.attention_mask[:, 0] == 0).any()      # left padding in the batch

    objective = build_objective(cfg, policy.device)
    advantages = objective.advantages_fn(REWARDS, torch.arange(2).repeat_interleave(3),
                                         mode=objective.advantage_mode)
    torch.testing.assert_close(advantages, torch.tensor([2, -1, -1, 1, 1, -2]) / 3)
    orders = []
    randperm = torch.randperm
    # Record the minibatch order that optimize draws, to replay it.
    monkeypatch.setattr(torch, "randperm",
                        lambda *a, **k: orders.append(randperm(*a, **k)) or orders[-1])
    optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr,
                                  weight_decay=cfg.weight_decay, **adam)
    token_adv = advantages[:, None].expand_as(rollout.completion_mask)
    stats = optimize(policy, optimizer, rollout, token_adv, schedule(cfg), objective)
    monkeypatch.undo()
    assert len(stats) == 2 and len(orders) == 1

    expected = reference_update(path, rollout, orders, cfg, adam, sequences_in=len)
    for name, p in policy.layer.master.items():
        torch.testing.assert_close(p.detach(), expected[name], rtol=1e-4, atol=1e-6, msg=name)
    # The control: normalising the short minibatch by the full minibatch size (4) instead of
    # its own 2 sequences lands elsewhere, so the comparison above can tell them apart.
    wrong = reference_update(path, rollout, orders, cfg, adam,
                             sequences_in=lambda rows: cfg.minibatch)
    assert any((wrong[n] - p.detach()).abs().max() > 1e-4 for n, p in policy.layer.master.items())
