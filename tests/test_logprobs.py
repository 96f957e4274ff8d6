"""chunked_logprobs against plain log_softmax of the full logits: values and hidden-grads."""
import pytest
import torch

from onelayer.algos import chunked_logprobs, default_chunk_size

# Softmax math runs in fp32 whatever the input dtype, so float64 gets fp32-level tolerances.
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.float64: dict(atol=1e-6, rtol=1e-6),
       torch.bfloat16: dict(atol=3e-2, rtol=3e-2)}


def _full(hidden, weight, targets, bias, temperature, scale=1.0, softcap=None):
    z = (hidden @ weight.T if bias is None else hidden @ weight.T + bias).float() * scale
    if softcap is not None:
        z = softcap * torch.tanh(z / softcap)
    return torch.log_softmax(z / temperature, dim=-1)[torch.arange(len(targets)), targets]


def _inputs(t, h, v, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(t, h, generator=g).to(dtype)
    weight = (torch.randn(v, h, generator=g) / h ** 0.5).to(dtype)
    bias = torch.randn(v, generator=g).to(dtype)
    return hidden, weight, bias, torch.randint(0, v, (t,), generator=g)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64, torch.bfloat16])
@pytest.mark.parametrize("t, h, v, chunk", [(37, 19, 101, 5), (64, 32, 256, None), (3, 8, 423, 1), (5, 7, 11, 1000)])
# Logit scales and caps of real families: Granite 1/8, Cohere 1/16, Gemma2 cap 30 (small caps
# here so that tanh saturates on these logits and its gradient factor matters).
@pytest.mark.parametrize("use_bias, temperature, scale, softcap", [
    (False, 1.0, 1.0, None), (True, 0.6, 1.0, None), (True, 0.6, 0.125, None), (False, 1.3, 1.0, 0.5),
    (True, 0.7, 4.0, 2.0)])
def test_values_and_grads_match_full_logits(dtype, t, h, v, chunk, use_bias, temperature, scale, softcap):
    hidden, weight, bias, targets = _inputs(t, h, v, dtype)
    bias = bias if use_bias else None
    grad_out = torch.randn(t, generator=torch.Generator().manual_seed(1))  # != 1 on purpose
    h1 = hidden.clone().requires_grad_(True)
    lp = chunked_logprobs(h1, weight, targets, bias, temperature=temperature, logit_scale=scale,
                          softcap=softcap, chunk_size=chunk)
    assert lp.dtype == torch.float32 and lp.shape == (t,)
    lp.backward(grad_out)
    h2 = hidden.clone().requires_grad_(True)
    want = _full(h2, weight, targets, bias, temperature, scale, softcap)
    want.backward(grad_out)
    torch.testing.assert_close(lp, want.float(), **TOL[dtype])
    assert h1.grad.dtype == dtype
    torch.testing.assert_close(h1.grad, h2.grad, **TOL[dtype])


def test_frozen_weight_gets_no_grad_and_no_grad_input_works():
    hidden, weight, bias, targets = _inputs(9, 6, 17, torch.float32)
    weight.requires_grad_(True)
    lp = chunked_logprobs(hidden, weight, targets, bias)  # hidden does not require grad
    assert not lp.requires_grad
    h = hidden.clone().requires_grad_(True)
    chunked_logprobs(h, weight, targets, bias, chunk_size=2).sum().backward()
    assert weight.grad is None and h.grad is not None
    with torch.no_grad():
        torch.testing.assert_close(chunked_logprobs(h, weight, targets), _full(hidden, weight, targets, None, 1.0))


def test_large_logits_are_stable():
    hidden, weight, _, targets = _inputs(8, 4, 33, torch.float32)
    lp = chunked_logprobs(hidden * 200, weight, targets, chunk_size=3)
    assert torch.isfinite(lp).all() and (lp <= 0).all()
    torch.testing.assert_close(lp, _full(hidden * 200, weight, targets, None, 1.0))


def test_default_chunk_size_budget():
    assert default_chunk_size(151_936) == 55 and default_chunk_size(32_768) == 256
    assert default_chunk_size(10**9) == 1


def test_shape_errors():
    with pytest.raises(ValueError):
        chunked_logprobs(torch.randn(4, 3), torch.randn(5, 2), torch.zeros(4, dtype=torch.long))
    with pytest.raises(ValueError):
        chunked_logprobs(torch.randn(4, 3), torch.randn(5, 3), torch.zeros(3, dtype=torch.long))


def test_entropy_matches_full_softmax():
    hidden, weight, bias, targets = _inputs(21, 9, 40, torch.float32)
    logp, entropy = chunked_logprobs(hidden, weight, targets, bias, temperature=0.8, chunk_size=4,
                                     with_entropy=True)
    full = torch.log_softmax((hidden @ weight.T + bias) / 0.8, dim=-1)
    torch.testing.assert_close(entropy, -(full.exp() * full).sum(-1))
    torch.testing.assert_close(logp, full[torch.arange(21), targets])
