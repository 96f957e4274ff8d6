"""policy_loss against values worked out by hand from docs/algorithms.md.

Six tokens, three sequences (S = 3):
  seq 0: tokens 0, 1 unmasked, token 2 padding (its log-prob is -inf: must not leak NaN)
  seq 1: tokens 3, 4 unmasked
  seq 2: token 5 padding only (fully masked: counts in S, adds 0)
  token  rho   A    clip (eps 0.2)        surr   l
  0      1.5   +1   high side active      1.2    -1.2
  1      0.5   -1   low side active      -0.8     0.8
  3      1.1   +2   inside                2.2    -2.2
  4      0.5   +1   none (A > 0, low)     0.5    -0.5
  sum of m * l = -3.1 over 4 unmasked tokens
"""
import math

import pytest
import torch

from onelayer.algos import fused_linear_policy_loss_reference, policy_loss, select_loss_impl

RHO = [1.5, 0.5, 1.0, 1.1, 0.5, 1.0]
ADV = torch.tensor([1.0, -1.0, 3.0, 2.0, 1.0, 3.0])
MASK = torch.tensor([1.0, 1.0, 0.0, 1.0, 1.0, 0.0])
SEQ = torch.tensor([0, 0, 0, 1, 1, 2])
OLD = torch.tensor([-1.0, -2.0, -0.5, -0.3, -1.2, -0.7])


def _logp(requires_grad=True):
    lp = OLD + torch.tensor([math.log(r) for r in RHO])
    lp[2] = -math.inf
    return lp.requires_grad_(requires_grad)


def _ref():
    # d = ref - logp: 0, ln 2, -, -ln 2, 0, - ; k3 = 0, 1 - ln 2, -, ln 2 - 0.5, 0 -> sum 0.5.
    lp = _logp(False)
    return lp + torch.tensor([0.0, math.log(2), 0.0, -math.log(2), 0.0, 0.0])


@pytest.mark.parametrize("aggregation, max_len, want", [
    ("token-mean", None, -3.1 / 4),
    ("seq-mean-token-mean", None, ((-1.2 + 0.8) / 2 + (-2.2 - 0.5) / 2 + 0.0) / 3),
    ("seq-mean-token-sum-norm", 4, -3.1 / (3 * 4)),
])
def test_aggregations_hand_values(aggregation, max_len, want):
    lp = _logp()
    loss, m = policy_loss(lp, OLD, ADV, MASK, SEQ, aggregation=aggregation, max_len=max_len)
    assert loss.dim() == 0
    torch.testing.assert_close(loss, torch.tensor(want))
    torch.testing.assert_close(m["clip_low"], torch.tensor(0.25))
    torch.testing.assert_close(m["clip_high"], torch.tensor(0.25))
    torch.testing.assert_close(m["clip_ratio"], torch.tensor(0.5))
    torch.testing.assert_close(m["kl"], torch.tensor(0.0))
    torch.testing.assert_close(m["ratio_mean"], torch.tensor((1.5 + 0.5 + 1.1 + 0.5) / 4))
    loss.backward()
    assert torch.isfinite(lp.grad).all() and lp.grad[2] == 0 and lp.grad[5] == 0


def test_token_mean_grad_hand_values():
    # d l / d logp = -rho A where the unclipped term is taken, 0 where the clip is active.
    lp = _logp()
    policy_loss(lp, OLD, ADV, MASK, SEQ)[0].backward()
    torch.testing.assert_close(lp.grad, torch.tensor([0.0, 0.0, 0.0, -1.1 * 2 / 4, -0.5 / 4, 0.0]))


def test_k3_kl_hand_values():
    lp = _logp()
    loss, m = policy_loss(lp, OLD, ADV, MASK, SEQ, _ref(), beta=0.1)
    torch.testing.assert_close(m["kl"], torch.tensor(0.5 / 4))
    torch.testing.assert_close(loss, torch.tensor(-3.1 / 4 + 0.1 * 0.5 / 4))
    loss.backward()
    # + beta (1 - exp(d)) / 4 on tokens 1 (d = ln 2) and 3 (d = -ln 2)
    want = torch.tensor([0.0, 0.1 * (1 - 2) / 4, 0.0, -1.1 * 2 / 4 + 0.1 * 0.5 / 4, -0.5 / 4, 0.0])
    torch.testing.assert_close(lp.grad, want)


def test_kl_reported_but_not_in_loss_when_beta_zero():
    loss, m = policy_loss(_logp(), OLD, ADV, MASK, SEQ, _ref(), beta=0.0)
    torch.testing.assert_close(loss, torch.tensor(-3.1 / 4))
    torch.testing.assert_close(m["kl"], torch.tensor(0.125))


def test_eps_high_differs_from_eps_low():
    # eps_high = 0.6: token 0 (rho 1.5) is no longer clipped, surr = 1.5.
    loss, m = policy_loss(_logp(), OLD, ADV, MASK, SEQ, eps_low=0.2, eps_high=0.6)
    torch.testing.assert_close(loss, torch.tensor((-1.5 + 0.8 - 2.2 - 0.5) / 4))
    torch.testing.assert_close(m["clip_high"], torch.tensor(0.0))
    # eps_low = 0.6: token 1 (rho 0.5 >= 0.4) is inside the range: surr = -0.5, l = 0.5.
    loss, m = policy_loss(_logp(), OLD, ADV, MASK, SEQ, eps_low=0.6)
    torch.testing.assert_close(loss, torch.tensor((-1.2 + 0.5 - 2.2 - 0.5) / 4))
    torch.testing.assert_close(m["clip_low"], torch.tensor(0.0))


def test_num_seqs_counts_empty_sequences():
    # Two more (absent) sequences: S = 5 in the seq-mean.
    loss, _ = policy_loss(_logp(), OLD, ADV, MASK, SEQ, aggregation="seq-mean-token-mean", num_seqs=5)
    torch.testing.assert_close(loss, torch.tensor((-0.2 - 1.35) / 5))


@pytest.mark.parametrize("aggregation", ["token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm"])
def test_empty_mask_gives_zero(aggregation):
    lp = _logp()
    loss, m = policy_loss(lp, OLD, ADV, torch.zeros(6), SEQ, _ref(), beta=0.1, aggregation=aggregation, max_len=8)
    assert loss.item() == 0.0 and m["clip_ratio"].item() == 0.0 and m["kl"].item() == 0.0
    loss.backward()
    assert torch.equal(lp.grad, torch.zeros(6))


def test_bad_arguments():
    with pytest.raises(ValueError):
        policy_loss(_logp(), OLD, ADV, MASK, SEQ, aggregation="seq-mean-token-sum-norm")
    with pytest.raises(ValueError):
        policy_loss(_logp(), OLD, ADV, MASK, SEQ, aggregation="sum")


def test_fused_reference_matches_full_logits():
    g = torch.Generator().manual_seed(0)
    t, h, v = 23, 16, 51
    hidden = torch.randn(t, h, generator=g, requires_grad=True)
    weight, bias = torch.randn(v, h, generator=g) / 4, torch.randn(v, generator=g)
    targets = torch.randint(0, v, (t,), generator=g)
    old = torch.randn(t, generator=g) * 0.3 - 3
    ref = torch.randn(t, generator=g) * 0.3 - 3
    adv, mask = torch.randn(t, generator=g), (torch.rand(t, generator=g) > 0.3).float()
    seq = torch.arange(t) // 5
    kw = dict(temperature=0.7, beta=0.05, eps_high=0.28, aggregation="seq-mean-token-mean")
    loss, _ = fused_linear_policy_loss_reference(hidden, weight, targets, old, adv, mask, seq, ref, bias,
                                                 chunk_size=4, **kw)
    (3.0 * loss).backward()
    hidden2 = hidden.detach().clone().requires_grad_(True)
    full = torch.log_softmax((hidden2 @ weight.T + bias) / 0.7, dim=-1)[torch.arange(t), targets]
    kw.pop("temperature")
    loss2, _ = policy_loss(full, old, adv, mask, seq, ref, **kw)
    (3.0 * loss2).backward()
    torch.testing.assert_close(loss, loss2)
    torch.testing.assert_close(hidden.grad, hidden2.grad)


def test_select_loss_impl_torch_on_cpu():
    loss_fn, logprobs_fn = select_loss_impl("auto", torch.device("cpu"))
    assert loss_fn is fused_linear_policy_loss_reference
    w = torch.randn(7, 4)
    h = torch.randn(3, 4, requires_grad=True)
    lp = logprobs_fn(h, w, torch.tensor([0, 1, 6]), temperature=1.0)
    assert lp.shape == (3,) and not lp.requires_grad
    with pytest.raises(ValueError):
        select_loss_impl("cuda", "cpu")


def test_sequence_importance_level_is_gspo():
    """importance_level="sequence" (GSPO in its token form) against GSPO written out per
    sequence: s_i = exp(mean_t log(pi / pi_old)), loss = -(1/S) sum_i min(s_i A_i,
    clip(s_i) A_i) with seq-mean-token-mean. Same loss, same gradient; sequence 2 is clipped
    (s > 1 + eps with A > 0: no gradient), and a padding token holding -inf changes nothing."""
    torch.manual_seed(0)
    seq_ids = torch.tensor([0, 0, 0, 1, 1, 1, 2, 2, 2, 2])
    mask = torch.tensor([1, 1, 1, 1, 1, 0, 1, 1, 1, 1], dtype=torch.float32)
    base = -2.0 + 0.1 * torch.randn(10)
    old = base + 0.05 * torch.randn(10)
    old[6:] -= 0.5                                          # sequence 2: s ~ e^0.5, clipped
    logp = base.clone()
    logp[5] = -math.inf                                     # the padding token
    logp.requires_grad_(True)
    adv = torch.tensor([1.0, -0.5, 2.0])[seq_ids]
    options = dict(eps_low=0.2, eps_high=0.2, aggregation="seq-mean-token-mean", num_seqs=3)
    loss, metrics = policy_loss(logp, old, adv, mask, seq_ids, importance_level="sequence",
                                **options)
    (grad,) = torch.autograd.grad(loss, logp)

    x = base.clone().requires_grad_(True)                   # GSPO written out, padding dropped
    valid = mask.bool()
    s = torch.stack([torch.exp((x - old)[valid & (seq_ids == i)].mean()) for i in range(3)])
    a = torch.tensor([1.0, -0.5, 2.0])
    expected = -torch.minimum(s * a, s.clamp(0.8, 1.2) * a).mean()
    (expected_grad,) = torch.autograd.grad(expected, x)
    assert loss.item() == pytest.approx(expected.item(), rel=1e-6)
    torch.testing.assert_close(grad[valid], expected_grad[valid], rtol=1e-5, atol=1e-7)
    assert grad[5] == 0 and torch.all(grad[6:] == 0) and torch.all(grad[:5] != 0)
    ratios = s.detach()[seq_ids[valid]]
    assert metrics["ratio_mean"].item() == pytest.approx(ratios.mean().item(), rel=1e-6)
    assert metrics["clip_high"].item() == pytest.approx(4 / 9)   # sequence 2's 4 of 9 tokens
    # Token level differs on the same inputs: each token its own ratio.
    token_loss, _ = policy_loss(logp, old, adv, mask, seq_ids, **options)
    assert token_loss.item() != pytest.approx(loss.item(), rel=1e-4)
    with pytest.raises(ValueError, match="importance_level"):
        policy_loss(logp, old, adv, mask, seq_ids, importance_level="episode", **options)
