"""Triton kernels (run by the interpreter on CPU) against the torch references.

TRITON_INTERPRET=1 must be set before triton is first imported; tests/conftest.py does that.
On a GPU the kernels are checked against the references by benchmarks/bench_policy_loss.py.
"""
import os
import subprocess
import sys
import textwrap

import pytest
import torch
import triton.language as tl
from hypothesis import given, settings, strategies as st
from torch.utils._python_dispatch import TorchDispatchMode, _disable_current_modes
from torch.utils._pytree import tree_leaves
from triton.runtime.interpreter import InterpretedFunction

if not isinstance(tl.zeros, InterpretedFunction):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set", allow_module_level=True)

import onelayer.kernels.policy_loss as _pl  # noqa: E402
from onelayer.algos import (  # noqa: E402
    anchor_ids,
    chunked_logprobs,
    fused_linear_policy_loss_reference,
    gigpo_advantages_reference,
    group_advantages_reference,
)
from onelayer.kernels import (  # noqa: E402
    fused_linear_logprobs,
    fused_linear_policy_loss,
    gigpo_advantages,
    group_advantages,
)

# Kernel vs reference. bf16: the kernel accumulates bf16 products in fp32 (like the fp32
# reference on the upcast inputs) but rounds dL/dz to bf16 before the W matmul, so values are
# compared to the fp32 reference of the same (bf16-rounded) inputs, gradients more loosely.
VALUE_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-5), torch.bfloat16: dict(atol=2e-4, rtol=2e-4)}
GRAD_TOL = {torch.float32: dict(atol=2e-5, rtol=2e-4), torch.bfloat16: dict(atol=2e-2, rtol=2e-2)}
AGGS = ("token-mean", "seq-mean-token-mean", "seq-mean-token-sum-norm")


def _batch(t, h, v, dtype, *, seed=0, use_bias=True, ref=True, temperature=1.0, logits=None):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) * 2 / h ** 0.5).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype) if use_bias else None
    targets = torch.randint(0, v, (t,), generator=g)
    with torch.no_grad():
        base = chunked_logprobs(hidden.float(), weight.float(), targets, None if bias is None else bias.float(),
                                temperature=temperature, **(logits or {}))
    old = base + 0.6 * torch.randn(t, generator=g)  # ratios spread across both clip edges
    seq = torch.arange(t) * 5 // t                  # 5 sequences
    mask = (torch.rand(t, generator=g) > 0.25).float()
    mask[seq == 2] = 0.0                            # a fully masked sequence
    adv = torch.randn(t, generator=g)
    reflp = base + 0.3 * torch.randn(t, generator=g) if ref else None
    return hidden, weight, bias, targets, old, adv, mask, seq, reflp


# The model's own logit transform: Granite-like scaling, and soft-caps small enough that tanh
# saturates on these logits (|z| ~ 2), so that its gradient factor matters.
GRANITE = dict(logit_scale=0.125)
CAPPED = dict(softcap=0.8)
SCALED_CAPPED = dict(logit_scale=3.0, softcap=1.5)

CASES = [  # dtype, (T, H, V), aggregation, beta, ref, temperature, eps_high, bias, logit transform
    (torch.float32, (37, 45, 173), "token-mean", 0.0, False, 1.0, 0.2, False, {}),
    (torch.float32, (37, 45, 173), "seq-mean-token-mean", 0.1, True, 0.7, 0.28, True, {}),
    (torch.float32, (32, 32, 64), "seq-mean-token-sum-norm", 0.0, True, 1.0, 0.2, True, {}),
    (torch.float32, (37, 45, 173), "token-mean", 0.1, True, 0.7, 0.28, True, CAPPED),
    (torch.float32, (19, 17, 71), "seq-mean-token-mean", 0.0, True, 1.0, 0.2, False, GRANITE),
    (torch.bfloat16, (37, 45, 173), "token-mean", 0.04, True, 0.7, 0.28, True, {}),
    (torch.bfloat16, (32, 32, 64), "seq-mean-token-mean", 0.0, False, 1.0, 0.2, False, {}),
    (torch.bfloat16, (19, 17, 71), "seq-mean-token-sum-norm", 0.5, True, 1.3, 0.28, True, {}),
    (torch.bfloat16, (37, 45, 173), "seq-mean-token-mean", 0.04, True, 1.3, 0.28, True, SCALED_CAPPED),
]


@pytest.mark.parametrize("dtype, shape, aggregation, beta, use_ref, temperature, eps_high, use_bias, logits", CASES)
def test_fused_loss_matches_reference(dtype, shape, aggregation, beta, use_ref, temperature, eps_high, use_bias,
                                      logits):
    hidden, weight, bias, targets, old, adv, mask, seq, ref = _batch(*shape, dtype, use_bias=use_bias, ref=use_ref,
                                                                     temperature=temperature, logits=logits)
    kw = dict(temperature=temperature, eps_low=0.2, eps_high=eps_high, beta=beta, aggregation=aggregation,
              max_len=11, **logits)
    grad_out = -2.5  # != 1 on purpose
    h1 = hidden.clone().requires_grad_(True)
    loss, m = fused_linear_policy_loss(h1, weight, targets, old, adv, mask, seq, ref, bias, **kw)
    (grad_out * loss).backward()
    h2 = hidden.float().requires_grad_(True)
    up = None if bias is None else bias.float()
    want, wm = fused_linear_policy_loss_reference(h2, weight.float(), targets, old, adv, mask, seq, ref, up, **kw)
    (grad_out * want).backward()
    torch.testing.assert_close(loss, want, **VALUE_TOL[dtype])
    assert h1.grad.dtype == dtype
    torch.testing.assert_close(h1.grad.float(), h2.grad, **GRAD_TOL[dtype])
    assert m.keys() == wm.keys()
    for k in ("clip_low", "clip_high", "clip_ratio", "kl", "ratio_mean", "entropy"):
        torch.testing.assert_close(m[k], wm[k], **VALUE_TOL[dtype])
    assert wm["clip_low"] > 0 and wm["clip_high"] > 0  # the batch exercises both clip sides
    if dtype == torch.bfloat16:  # and the bf16 torch path (matmul rounded to bf16) agrees coarsely
        coarse, _ = fused_linear_policy_loss_reference(hidden, weight, targets, old, adv, mask, seq, ref, bias, **kw)
        torch.testing.assert_close(loss, coarse, atol=3e-2, rtol=3e-2)


GSPO_CASES = [  # dtype, (T, H, V), aggregation, beta, num_seqs (None: from the ids)
    (torch.float32, (37, 45, 173), "seq-mean-token-mean", 0.0, None),
    (torch.float32, (19, 17, 71), "token-mean", 0.1, 5),
    (torch.bfloat16, (37, 45, 173), "seq-mean-token-sum-norm", 0.04, 5),
]


@pytest.mark.parametrize("dtype, shape, aggregation, beta, num_seqs", GSPO_CASES)
def test_fused_loss_sequence_ratios_match_reference(dtype, shape, aggregation, beta, num_seqs):
    """importance_level="sequence" (GSPO) on the kernel, whose loss epilogue runs on old
    log-probs shifted by each sequence's mean log-ratio, against the torch path: loss,
    gradient and the metrics of the sequence ratios. Sequence 0 sits below the clip range,
    1 and 4 above, 3 inside, 2 is fully masked; advantages of both signs in each."""
    hidden, weight, bias, targets, _, adv, mask, seq, ref = _batch(*shape, dtype)
    with torch.no_grad():
        base = chunked_logprobs(hidden.float(), weight.float(), targets, bias.float())
    g = torch.Generator().manual_seed(1)
    old = base + 0.05 * torch.randn(len(seq), generator=g) + torch.tensor([0.5, -0.3, 0.0, 0.02, -0.6])[seq]
    kw = dict(eps_low=0.2, eps_high=0.28, beta=beta, aggregation=aggregation, max_len=11, num_seqs=num_seqs,
              importance_level="sequence")
    h1 = hidden.clone().requires_grad_(True)
    loss, m = fused_linear_policy_loss(h1, weight, targets, old, adv, mask, seq, ref, bias, **kw)
    (-1.5 * loss).backward()
    h2 = hidden.float().requires_grad_(True)
    want, wm = fused_linear_policy_loss_reference(h2, weight.float(), targets, old, adv, mask, seq, ref,
                                                  bias.float(), **kw)
    (-1.5 * want).backward()
    torch.testing.assert_close(loss, want, **VALUE_TOL[dtype])
    torch.testing.assert_close(h1.grad.float(), h2.grad, **GRAD_TOL[dtype])
    for k in ("clip_low", "clip_high", "clip_ratio", "kl", "ratio_mean", "entropy"):
        torch.testing.assert_close(m[k], wm[k], **VALUE_TOL[dtype])
    assert wm["clip_low"] > 0 and wm["clip_high"] > 0 and wm["clip_ratio"] < 0.9
    token_level, _ = fused_linear_policy_loss_reference(hidden.float(), weight.float(), targets, old, adv, mask,
                                                        seq, ref, bias.float(), **{**kw, "importance_level": "token"})
    assert (loss - token_level).abs() > 1e-3   # the sequence ratios are not the token ones here
    with pytest.raises(ValueError, match="importance_level"):
        fused_linear_policy_loss(hidden, weight, targets, old, adv, mask, seq, ref, bias,
                                 **{**kw, "importance_level": "episode"})


def test_entropy_metric_and_strided_hidden():
    hidden, weight, bias, targets, old, adv, mask, seq, _ = _batch(29, 21, 83, torch.float32)
    strided = hidden.T.contiguous().T  # same values, column-major strides
    loss, m = fused_linear_policy_loss(strided, weight, targets, old, adv, mask, seq, None, bias, temperature=0.9)
    want, _ = fused_linear_policy_loss_reference(hidden, weight, targets, old, adv, mask, seq, None, bias,
                                                 temperature=0.9)
    torch.testing.assert_close(loss, want, **VALUE_TOL[torch.float32])
    logp = torch.log_softmax((hidden @ weight.T + bias) / 0.9, dim=-1)
    entropy = -(logp.exp() * logp).sum(-1)
    torch.testing.assert_close(m["entropy"], (entropy * mask).sum() / mask.sum(), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("aggregation", AGGS)
def test_fused_loss_empty_mask(aggregation):
    hidden, weight, bias, targets, old, adv, _, seq, ref = _batch(20, 16, 40, torch.float32)
    h = hidden.clone().requires_grad_(True)
    loss, m = fused_linear_policy_loss(h, weight, targets, old, adv, torch.zeros(20), seq, ref, bias,
                                       beta=0.1, aggregation=aggregation, max_len=4)
    loss.backward()
    assert loss.item() == 0.0 and m["clip_ratio"].item() == 0.0 and torch.equal(h.grad, torch.zeros_like(h))


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("logits", [{}, GRANITE, CAPPED, SCALED_CAPPED])
def test_fused_logprobs_matches_reference(dtype, logits):
    hidden, weight, bias, targets, *_ = _batch(33, 40, 150, dtype)
    got = fused_linear_logprobs(hidden.requires_grad_(True), weight, targets, bias, temperature=0.6, **logits)
    assert got.dtype == torch.float32 and not got.requires_grad
    want = chunked_logprobs(hidden.float(), weight.float(), targets, bias.float(), temperature=0.6, **logits)
    torch.testing.assert_close(got, want, **VALUE_TOL[dtype])


# ---------------------------------------------------------------------------------------------
# Group advantages: property tests against the reference. Rewards are multiples of 1/4 (exact
# in fp32): with arbitrary floats a group that is flat in fp32 but not in the float64
# reference (or the reverse) would make the comparison meaningless, not the kernel wrong.
# ---------------------------------------------------------------------------------------------
quarters = st.integers(-12, 12).map(lambda x: x / 4)


@settings(max_examples=40, deadline=None)
@given(data=st.lists(st.tuples(quarters, st.integers(-3, 6)), min_size=1, max_size=40),
       mode=st.sampled_from(["grpo", "dr_grpo", "batch"]))
def test_group_advantages_property(data, mode):
    rewards = torch.tensor([r for r, _ in data])
    groups = torch.tensor([gid * 1000 for _, gid in data])  # sparse, unsorted ids
    got = group_advantages(rewards, groups, mode)
    want = group_advantages_reference(rewards, groups, mode)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)
    assert torch.equal(got == 0, want == 0)  # flat groups and singletons exactly 0 in both


@st.composite
def episodes(draw):
    rows = {k: [] for k in ("step_rewards", "traj_ids", "step_index", "episode_group_ids", "obs")}
    traj = 100
    for group in range(draw(st.integers(1, 3))):
        for _ in range(draw(st.integers(1, 4))):
            traj += 7
            for t in range(draw(st.integers(1, 5))):
                rows["step_rewards"].append(draw(quarters))
                rows["traj_ids"].append(traj)
                rows["step_index"].append(t)
                rows["episode_group_ids"].append(group * 3 + 1)
                rows["obs"].append(draw(st.sampled_from(["kitchen", "hall", "garden"])))
    perm = draw(st.permutations(range(len(rows["obs"]))))
    out = {k: torch.tensor([v[i] for i in perm]) for k, v in rows.items() if k != "obs"}
    out["anchor_ids"] = anchor_ids([rows["obs"][i] for i in perm])
    return out


@settings(max_examples=30, deadline=None)
@given(ep=episodes(), gamma=st.sampled_from([0.5, 0.95]), omega=st.sampled_from([1.0, 0.3]),
       norm=st.sampled_from(["std", "mean"]))
def test_gigpo_kernel_property(ep, gamma, omega, norm):
    got = gigpo_advantages(**ep, gamma=gamma, omega=omega, norm=norm)
    want = gigpo_advantages_reference(**ep, gamma=gamma, omega=omega, norm=norm)
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4)


def test_group_advantages_bad_input():
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3), torch.zeros(3, dtype=torch.long), "ppo")
    with pytest.raises(ValueError):
        group_advantages(torch.zeros(3), torch.zeros(3, dtype=torch.long), "gigpo")
    assert group_advantages(torch.zeros(0), torch.zeros(0, dtype=torch.long)).numel() == 0


# ---------------------------------------------------------------------------------------------
# Allocation bounds
# ---------------------------------------------------------------------------------------------
class _LargestAlloc(TorchDispatchMode):
    """Largest tensor (bytes) any torch op returns while active: host launchers + autograd.

    Kernel launches run with the mode off: the interpreter copies every argument to emulate
    device memory (the weight [V, H] among them), which a GPU launch does not do.
    """

    def __init__(self):
        super().__init__()
        self.largest = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        seen = {x.untyped_storage().data_ptr() for x in tree_leaves((args, kwargs)) if isinstance(x, torch.Tensor)}
        for x in tree_leaves(out):  # new storage only: views (detach, slices) allocate nothing
            if isinstance(x, torch.Tensor) and x.untyped_storage().data_ptr() not in seen:
                self.largest = max(self.largest, x.untyped_storage().nbytes())
        return out


def largest_allocation(monkeypatch) -> _LargestAlloc:
    """A probe of torch's allocations around the kernels; the launches themselves run with it
    off (see _LargestAlloc)."""
    launch = InterpretedFunction.run

    def launch_unprobed(*args, **kwargs):
        with _disable_current_modes():
            return launch(*args, **kwargs)

    monkeypatch.setattr(InterpretedFunction, "run", launch_unprobed)
    return _LargestAlloc()


def test_kernel_path_allocates_no_logits(monkeypatch):
    """Triton path, forward + backward, T=128, V=1024, with the small tiles that the other
    kernel tests use (the issue's size follows with large tiles). This sees every tensor
    torch allocates for the kernels: outputs, split partials, the backward's [C, V] dL/dz chunk
    (C = 16 rows on CPU) and the gradient; the kernels write only into those."""
    t, h, v = 128, 32, 1024
    hidden, weight, bias, targets, old, adv, mask, seq, ref = _batch(t, h, v, torch.float32)
    hidden.requires_grad_(True)
    with largest_allocation(monkeypatch) as probe:
        loss, _ = fused_linear_policy_loss(hidden, weight, targets, old, adv, mask, seq, ref, bias, beta=0.1)
        loss.backward()
    chunk = _pl._grad_chunk(_pl._CPU, t, v, 4)
    assert chunk * 8 <= t
    assert probe.largest <= max(chunk * v * 4, t * h * 4)
    assert probe.largest * 8 <= t * v * 4  # one [T, V] fp32 logits tensor


def test_kernel_path_at_4096x32768_allocates_far_less_than_the_logits(monkeypatch):
    """The issue's size, T=4096 x V=32768 (one [T, V] fp32 tensor: 512 MiB), forward + backward
    through the Triton kernels under the interpreter. Large CPU tiles keep the interpreter to
    seconds; the allocation pattern (outputs, split partials, one [C, V] dL/dz chunk) is the
    GPU's. Every tensor torch allocates is seen; the largest must stay under 1/8 of [T, V]."""
    monkeypatch.setattr(_pl, "_CPU", _pl._CPU._replace(block_t=256, block_v=2048, block_h=16,
                                                       grad_chunk_bytes=32 * 2**20, max_splits=4))
    t, h, v = 4096, 16, 32768
    hidden, weight, _, targets, old, adv, mask, seq, ref = _batch(t, h, v, torch.float32, use_bias=False)
    hidden.requires_grad_(True)
    with largest_allocation(monkeypatch) as probe:
        loss, _ = fused_linear_policy_loss(hidden, weight, targets, old, adv, mask, seq, ref, beta=0.1)
        loss.backward()
    assert probe.largest * 8 <= t * v * 4, probe.largest
    # and it is the same loss and gradient as the torch reference
    expected_hidden = hidden.detach().clone().requires_grad_(True)
    expected, _ = fused_linear_policy_loss_reference(expected_hidden, weight, targets, old, adv, mask,
                                                     seq, ref, beta=0.1)
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(hidden.grad, expected_hidden.grad, rtol=1e-3, atol=1e-6)


def test_torch_chunked_path_peak_memory_at_4096x32768():
    """Peak RSS growth of chunked forward + backward at T=4096, V=32768 (one [T, V] fp32
    tensor: 512 MiB), in a fresh process; the full-logits path then runs in the same process as
    a check that the measurement sees a [T, V] tensor. The peak is the process image's own
    (VmHWM): ru_maxrss would carry over the pytest parent's peak across fork and exec."""
    script = textwrap.dedent("""
        import re, torch
        from onelayer.algos import chunked_logprobs
        def peak_mib():
            status = open("/proc/self/status").read()
            return int(re.search(r"VmHWM:\\s+(\\d+) kB", status).group(1)) / 1024
        T, H, V = 4096, 16, 32768
        g = torch.Generator().manual_seed(0)
        hidden = torch.randn(T, H, generator=g, requires_grad=True)
        weight = torch.randn(V, H, generator=g) / 4
        targets = torch.randint(0, V, (T,), generator=g)
        chunked_logprobs(hidden[:8], weight, targets[:8]).sum().backward()  # warm up kernels
        base = peak_mib()
        chunked_logprobs(hidden, weight, targets).sum().backward()
        chunked = peak_mib() - base
        full = torch.log_softmax(hidden @ weight.T, -1)[torch.arange(T), targets]
        full.sum().backward()
        print(chunked, peak_mib() - base)
    """)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env.pop("TRITON_INTERPRET", None)
    res = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, env=env, timeout=120,
                         cwd=os.path.dirname(os.path.abspath(__file__)))
    assert res.returncode == 0, res.stderr
    chunked_mib, full_mib = map(float, res.stdout.split())
    assert full_mib >= 512, full_mib      # the probe sees one [T, V] fp32 tensor
    assert chunked_mib <= 128, chunked_mib  # default chunk: 256 tokens x 32768 x 4 B = 32 MiB buffers
