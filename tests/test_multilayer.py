"""Several trained layers and full-parameter training (`--layer mid-2`, `1,3`, `all`): the
grammar, what changes after a step, gradients against the model's own full forward, NF4 on
every other block, the reference policy, and checkpoints of several layers."""
import bitsandbytes as bnb
import pytest
import torch
from safetensors import safe_open

from conftest import make_tiny_model
from onelayer.algos import chunked_logprobs, fused_linear_policy_loss_reference
from onelayer.checkpoint import LAYER_FILE, load_layer, save_layer
from onelayer.config import build_config
from onelayer.errors import UserError
from onelayer.evaluate import load_trained_layer
from onelayer.model import full_parameter, load_policy, resolve_layer, resolve_layers
from onelayer.single_turn import rl_step
from onelayer.tasks.arithmetic import arithmetic_task
from onelayer.update import (build_objective, completion_hidden, completion_tokens, frozen_logprobs,
                             head_trained_loss, prefix_cache)
from test_engine import loss_from_logprobs, rollout_and_advantages, varied_rewards


# ---------------------------------------------------------------------------------------------
# --layer grammar
# ---------------------------------------------------------------------------------------------

@pytest.mark.parametrize("spec,expected", [
    (2, [2]), ("-1", [7]), ("mid", [3]), ("auto", [3]), ("mid-1", [3]), ("mid-2", [3, 4]),
    ("mid-3", [2, 3, 4]), ("mid-8", list(range(8))), ("5,1,3", [1, 3, 5]), (" 0, -1 ", [0, 7]),
    ("all", list(range(8))), ("ALL", list(range(8))), ("Mid-2", [3, 4]),
])
def test_layer_grammar(spec, expected):
    assert resolve_layers(spec, 8) == expected
    assert resolve_layer(spec, 8) == expected[0]     # the first trained layer (memory planner)
    assert full_parameter(spec) == (str(spec).strip().lower() == "all")


def test_mid_1_is_mid_for_every_depth():
    for n in range(1, 81):
        assert resolve_layers("mid-1", n) == resolve_layers("mid", n)
        for k in (2, 3, 4):
            if k <= n:
                layers = resolve_layers(f"mid-{k}", n)
                assert len(layers) == k and layers == list(range(layers[0], layers[0] + k))
    assert resolve_layers("mid-2", 36) == [17, 18] and resolve_layers("mid-3", 36) == [16, 17, 18]


@pytest.mark.parametrize("spec,message", [
    ("8", "out of range"), ("1,8", "out of range"), ("1,1", "layer 1 is named twice"),
    ("1,-7", "layer 1 is named twice"), ("1,", "must be an index, a list"), ("x", "must be an index"),
    ("mid-0", "k must be 1..8"), ("mid-9", "k must be 1..8"), ("mid-x", "must be an index"),
    ("top-2", "top-k is the layer probe's choice"), ("1.5", "must be an index"),
])
def test_layer_grammar_errors_are_one_line(spec, message):
    with pytest.raises(UserError, match=message) as info:
        resolve_layers(spec, 8)
    assert "\n" not in str(info.value)


# ---------------------------------------------------------------------------------------------
# What changes after a step
# ---------------------------------------------------------------------------------------------

def step(policy, cfg, *, steps=1):
    task = varied_rewards(arithmetic_task(n_train=10, n_test=1))
    torch.manual_seed(0)
    optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
    for _ in range(steps):
        rl_step(policy, optimizer, task, task.train[:3], cfg, build_objective(cfg, policy.device))
    return optimizer


def snapshot(lm):
    return {n: p.detach().clone() for n, p in [*lm.named_parameters(), *lm.named_buffers()]}


def changed(lm, before):
    return {n for n, p in [*lm.named_parameters(), *lm.named_buffers()] if not torch.equal(p, before[n])}


def test_mid_2_changes_exactly_two_blocks_and_the_optimizer_holds_them_alone(tiny_models):
    cfg = build_config({"model": tiny_models["qwen2"], "layer": "mid-2", "group_size": 4,
                        "prompts_per_step": 3, "max_new_tokens": 6, "lr": 1e-2, "epochs": 2})
    policy = load_policy(cfg.model, layer=cfg.layer, device="cpu")
    assert policy.layer_indices == [1, 2] and policy.split.layer_index == 1
    assert policy.layer.label == "layers 1, 2" and policy.layer.spec == "1,2"
    lm = policy.split.lm
    before = snapshot(lm)
    optimizer = step(policy, cfg)
    moved = changed(lm, before)
    for i in (1, 2):   # every tensor of both blocks moved; nothing else did
        block = {n for n in before if n.startswith(f"model.layers.{i}.")}
        assert block and block <= moved, i
    assert all(n.startswith(("model.layers.1.", "model.layers.2.")) for n in moved)
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    assert trainable == set(policy.layer.master)
    assert {id(p) for p in optimizer.state} == {id(p) for p in policy.layer.parameters()}
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {id(p) for p in policy.layer.parameters()}
    assert all(p.dtype == torch.float32 for p in policy.layer.parameters())


@pytest.fixture(scope="module")
def tied_model(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("tied") / "qwen3", "qwen3", tie_word_embeddings=True)


@pytest.mark.parametrize("tied", [False, True])
def test_all_changes_every_parameter(tiny_models, tied_model, tied):
    path = tied_model if tied else tiny_models["qwen3"]
    cfg = build_config({"model": path, "layer": "all", "group_size": 4, "prompts_per_step": 3,
                        "max_new_tokens": 6, "lr": 1e-2, "epochs": 2})
    policy = load_policy(cfg.model, layer="all", device="cpu")
    lm = policy.split.lm
    assert policy.split.full and policy.layer_indices == [0, 1, 2, 3] and policy.layer.label == "all parameters"
    names = {n for n, _ in lm.named_parameters()}     # a tied matrix once
    assert set(policy.layer.master) == names
    assert ("lm_head.weight" in names) != tied
    before = snapshot(lm)
    optimizer = step(policy, cfg)
    assert changed(lm, before) == names
    assert {id(p) for p in optimizer.state} == {id(p) for p in policy.layer.parameters()}
    if tied:
        assert lm.lm_head.weight is lm.model.embed_tokens.weight


def test_all_in_bf16_keeps_the_compute_copy_and_the_tie(tied_model):
    cfg = build_config({"model": tied_model, "layer": "all", "group_size": 4, "prompts_per_step": 2,
                        "max_new_tokens": 5, "lr": 1e-2, "frozen_dtype": "bf16"})
    policy = load_policy(cfg.model, layer="all", frozen_dtype="bf16", device="cpu")
    lm = policy.split.lm
    assert not policy.layer.shares_storage
    assert all(p.dtype == torch.bfloat16 and not p.requires_grad for p in lm.parameters())
    master_before = {n: p.detach().clone() for n, p in policy.layer.master.items()}
    step(policy, cfg)
    assert all(not torch.equal(p, master_before[n]) for n, p in policy.layer.master.items())
    own = dict(lm.named_parameters())
    for n, p in policy.layer.master.items():
        assert torch.equal(own[n], p.detach().to(torch.bfloat16)), n
    assert lm.lm_head.weight is lm.model.embed_tokens.weight


# ---------------------------------------------------------------------------------------------
# Gradients against the model's own full forward
# ---------------------------------------------------------------------------------------------

def naive_logprobs(policy, rollout):
    """Completion log-probs [T] from the Hugging Face model's own forward (its own positions
    and masks), the trained tensors being the modules' own (fp32: they are the master)."""
    logits = policy.split.lm(input_ids=rollout.sequences, attention_mask=rollout.attention_mask).logits.float()
    logits = logits[:, rollout.prompt_len - 1:-1] / 0.7
    lp = torch.log_softmax(logits, -1).gather(-1, rollout.completion_ids[..., None])[..., 0]
    return lp[rollout.completion_mask.bool()]


@pytest.mark.parametrize("layers,frozen_dtype,tol", [("1,3", "fp32", 1e-5), ("0,2", "fp32", 1e-5),
                                                     ("1,3", "nf4", 1e-4)])
def test_cached_prefix_gradient_of_two_layers_equals_naive_full_forward(tiny_models, layers, frozen_dtype, tol):
    policy = load_policy(tiny_models["qwen3"], layer=layers, frozen_dtype=frozen_dtype, device="cpu")
    assert policy.layer.shares_storage
    trained = [f"model.layers.{i}." for i in policy.layer_indices]
    grad_names = [n for n, p in policy.split.lm.named_parameters() if p.requires_grad]
    assert grad_names and all(n.startswith(tuple(trained)) for n in grad_names)
    rollout, advantages = rollout_and_advantages(policy)
    assert (rollout.attention_mask[:, 0] == 0).any()
    rows = torch.arange(rollout.sequences.shape[0])
    h = prefix_cache(policy, rollout, 0)
    _, targets, _ = completion_tokens(rollout, rows)
    hidden = completion_hidden(policy, h, rollout, rows, policy.layer.policy_params())
    lp = chunked_logprobs(hidden, policy.split.lm_head.weight, targets, temperature=0.7)
    ours = torch.autograd.grad(loss_from_logprobs(lp, rollout, rows, advantages), policy.layer.parameters())
    naive = torch.autograd.grad(loss_from_logprobs(naive_logprobs(policy, rollout), rollout, rows, advantages),
                                policy.layer.parameters())
    for i in policy.layer_indices:   # both layers get a gradient
        assert any(g.abs().sum() > 0 for n, g in zip(policy.layer.master, naive) if n.startswith(f"model.layers.{i}."))
    for name, a, b in zip(policy.layer.master, ours, naive):
        torch.testing.assert_close(a, b, rtol=tol, atol=tol * b.abs().max().item(), msg=name)


@pytest.mark.parametrize("tied", [False, True])
def test_full_parameter_gradient_equals_naive_full_forward(tiny_models, tied_model, tied):
    """Every parameter, lm_head and embeddings included (a tied matrix gets both uses), through
    the trainer's loss for --layer all."""
    policy = load_policy(tied_model if tied else tiny_models["qwen3"], layer="all", device="cpu")
    rollout, advantages = rollout_and_advantages(policy)
    rows = torch.arange(rollout.sequences.shape[0])
    mask, targets, seq_ids = completion_tokens(rollout, rows)
    naive_lp = naive_logprobs(policy, rollout)
    naive = torch.autograd.grad(loss_from_logprobs(naive_lp, rollout, rows, advantages), policy.layer.parameters())

    params = policy.layer.policy_params()
    hidden = completion_hidden(policy, prefix_cache(policy, rollout, 0), rollout, rows, params)
    weight, bias = policy.split.head(params)
    assert weight is params["model.embed_tokens.weight" if tied else "lm_head.weight"]
    loss, _ = head_trained_loss(hidden, weight, targets, naive_lp.detach(), advantages[rows][seq_ids],
                                torch.ones_like(targets, dtype=torch.float32), seq_ids, None, bias,
                                temperature=0.7, aggregation="seq-mean-token-mean", num_seqs=len(rows),
                                chunk_size=5)
    ours = torch.autograd.grad(loss, policy.layer.parameters())
    assert all(g.abs().sum() > 0 for g in naive)
    for name, a, b in zip(policy.layer.master, ours, naive):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5 * b.abs().max().item(), msg=name)


def test_head_trained_loss_matches_the_reference_loss_and_gives_the_head_its_gradient():
    torch.manual_seed(0)
    t, h, v = 37, 16, 50
    hidden = torch.randn(t, h, requires_grad=True)
    weight, bias = torch.randn(v, h, requires_grad=True), torch.randn(v, requires_grad=True)
    targets = torch.randint(0, v, (t,))
    seq_ids = torch.arange(t) // 10
    mask = (torch.rand(t) > 0.2).float()
    args = (targets, torch.randn(t) * 0.1 - 3, torch.randn(t), mask, seq_ids, torch.randn(t) * 0.1 - 3)
    kw = dict(temperature=0.8, logit_scale=0.5, softcap=3.0, beta=0.1, aggregation="seq-mean-token-sum-norm",
              max_len=10, num_seqs=4)
    ref, ref_metrics = fused_linear_policy_loss_reference(hidden, weight, *args, bias, **kw, chunk_size=8)
    ours, metrics = head_trained_loss(hidden, weight, *args, bias, **kw, chunk_size=8)
    torch.testing.assert_close(ours, ref)
    for k, value in ref_metrics.items():
        torch.testing.assert_close(metrics[k], value, msg=k)
    (g_ref,) = torch.autograd.grad(ref, hidden)
    g_hidden, g_weight, g_bias = torch.autograd.grad(ours, (hidden, weight, bias))
    torch.testing.assert_close(g_hidden, g_ref)
    # The head's gradient against autograd through the whole [T, V] logits.
    z = torch.addmm(bias, hidden, weight.T) * 0.5
    z = torch.tanh(z / 3.0) * 3.0 / 0.8
    lp = torch.log_softmax(z, -1).gather(1, targets[:, None])[:, 0]
    from onelayer.algos import policy_loss
    full, _ = policy_loss(lp, *args[1:], **{k: kw[k] for k in ("beta", "aggregation", "max_len", "num_seqs")})
    expected_w, expected_b = torch.autograd.grad(full, (weight, bias))
    torch.testing.assert_close(g_weight, expected_w)
    torch.testing.assert_close(g_bias, expected_b)


# ---------------------------------------------------------------------------------------------
# Options refused, NF4, the reference policy
# ---------------------------------------------------------------------------------------------

def test_all_refuses_nf4_and_the_triton_loss(tiny_models):
    with pytest.raises(UserError, match="--layer all trains every weight, which NF4 cannot hold") as info:
        load_policy(tiny_models["qwen3"], layer="all", frozen_dtype="nf4", device="cpu")
    assert "\n" not in str(info.value)
    cfg = build_config({"model": tiny_models["qwen3"], "layer": "all", "loss_impl": "triton"})
    with pytest.raises(UserError, match="--layer all trains lm_head, which the Triton loss cannot"):
        build_objective(cfg, torch.device("cpu"))
    assert build_objective(build_config({"layer": "all"}), torch.device("cpu")).trains_head
    assert not build_objective(build_config({"layer": "mid-2"}), torch.device("cpu")).trains_head


def test_nf4_with_two_trained_layers_quantises_every_other_block(tiny_models):
    policy = load_policy(tiny_models["llama"], layer="0,2", frozen_dtype="nf4", device="cpu")
    counts = []
    for block in policy.split.lm.model.layers:
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        counts.append((sum(isinstance(m, bnb.nn.Linear4bit) for m in linears), len(linears)))
    assert counts[0][0] == counts[2][0] == 0 and counts[0][1] > 0
    assert counts[1][0] == counts[1][1] > 0 and counts[3][0] == counts[3][1] > 0
    assert not isinstance(policy.split.lm.lm_head, bnb.nn.Linear4bit)
    assert {n.split(".")[2] for n in policy.layer.master} == {"0", "2"}


@pytest.mark.parametrize("layers", ["1,3", "all"])
def test_reference_is_the_policy_at_its_original_weights(tiny_models, layers):
    cfg = build_config({"model": tiny_models["qwen3"], "layer": layers, "group_size": 4, "prompts_per_step": 3,
                        "max_new_tokens": 6, "lr": 5e-2, "beta": 0.1})
    policy = load_policy(cfg.model, layer=layers, device="cpu", keep_reference=True)
    assert set(policy.layer.reference) == set(policy.layer.master)
    step(policy, cfg)
    rollout, _ = rollout_and_advantages(policy)
    objective = build_objective(cfg, policy.device)
    h = prefix_cache(policy, rollout, 0)
    reference = frozen_logprobs(policy, h, rollout, objective, policy.layer.reference)
    trained = frozen_logprobs(policy, h, rollout, objective, None)
    fresh = load_policy(cfg.model, layer=layers, device="cpu")
    original = frozen_logprobs(fresh, prefix_cache(fresh, rollout, 0), rollout, objective, None)
    torch.testing.assert_close(reference, original, rtol=1e-5, atol=1e-5)
    assert (trained - original).abs().max() > 1e-2   # the policy did move


# ---------------------------------------------------------------------------------------------
# Checkpoints of several layers
# ---------------------------------------------------------------------------------------------

def test_checkpoint_of_two_layers_round_trips(tiny_models, tmp_path):
    path = tiny_models["qwen3"]
    policy = load_policy(path, layer="1,3", frozen_dtype="bf16", device="cpu")
    with torch.no_grad():
        for p in policy.layer.parameters():
            p.add_(torch.randn_like(p))
    policy.layer.refresh_compute_copy()
    save_layer(tmp_path / "ck", policy.layer.state_dict(), layer_index=policy.split.layer_index,
               layers=policy.layer.spec, base_model=path, run_config={"layer": "1,3"}, step=1)
    with safe_open(str(tmp_path / "ck" / LAYER_FILE), framework="pt") as f:   # one flat file
        assert set(f.keys()) == set(policy.layer.master)
        assert {k.split(".")[2] for k in f.keys()} == {"1", "3"}
    tensors, meta = load_layer(tmp_path / "ck")
    assert meta["layers"] == "1,3" and meta["layer_index"] == "1"

    fresh = load_policy(path, layer="3,1", frozen_dtype="bf16", device="cpu")
    load_trained_layer(fresh, tmp_path / "ck")
    for name, p in policy.layer.master.items():
        assert torch.equal(fresh.layer.master[name], p) and torch.equal(tensors[name], p.detach())
        assert torch.equal(fresh.layer.compute[name], policy.layer.compute[name])
    for other in ("1", "all"):
        with pytest.raises(UserError, match="holds layers 1,3, the model was set up to train"):
            load_trained_layer(load_policy(path, layer=other, device="cpu"), tmp_path / "ck")
