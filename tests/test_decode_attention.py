"""The decode step's grouped-query attention (onelayer/rollout/attention.py) against transformers'
sdpa_attention_forward and a plain softmax reference; which models get it; its traceability."""
import logging
from types import SimpleNamespace

import pytest
import torch
from transformers.integrations.sdpa_attention import sdpa_attention_forward

from onelayer.rollout import attention
from onelayer.rollout.attention import fold_attention, repeat_attention


def reference(query, key, value, mask, scaling):
    """softmax(q k^T * scaling + mask) v in float64 with every key/value head repeated to its
    query heads; [B, Q, H_q, D_v] as attention functions return it."""
    g = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(g, 1).double(), value.repeat_interleave(g, 1).double()
    scores = query.double() @ key.transpose(-1, -2) * scaling
    if mask is not None:
        scores = scores.masked_fill(~mask, float("-inf")) if mask.dtype == torch.bool else scores + mask
    return (scores.softmax(-1) @ value).transpose(1, 2).float()


def inputs(B, H_kv, g, L, D=16, Q=1, mask="left_pad", seed=0):
    gen = torch.Generator().manual_seed(seed)
    query = torch.randn(B, H_kv * g, Q, D, generator=gen)
    key, value = (torch.randn(B, H_kv, L, D, generator=gen) for _ in range(2))
    pads = torch.randint(0, L, (B,), generator=gen)
    visible = torch.arange(L)[None, :] >= pads[:, None]                    # [B, L] left padding
    visible &= torch.rand(B, L, generator=gen) > 0.3                      # and holes
    visible[:, -1] = True                                                 # the query's own column
    masks = {
        "none": None,
        "left_pad": visible[:, None, None, :].expand(B, 1, Q, L),
        "additive": torch.zeros(B, 1, Q, L).masked_fill(~visible[:, None, None, :], torch.finfo(torch.float32).min),
        "per_head": visible[:, None, None, :] & (torch.rand(B, H_kv * g, Q, L, generator=gen) > 0.2)
                    | (torch.arange(L) == L - 1),
    }
    module = SimpleNamespace(num_key_value_groups=g, is_causal=True, training=False)
    return module, query, key, value, masks[mask]


@pytest.mark.parametrize("g", [1, 2, 4])
@pytest.mark.parametrize("L", [1, 37, 128])
@pytest.mark.parametrize("mask", ["left_pad", "per_head", "additive", "none"])
def test_decode_step_equals_transformers_sdpa_and_the_reference(g, L, mask):
    module, query, key, value, attn_mask = inputs(B=3, H_kv=2, g=g, L=L, mask=mask, seed=L + g)
    want = reference(query, key, value, attn_mask, 0.25)
    hf, _ = sdpa_attention_forward(module, query, key, value, attn_mask, scaling=0.25)
    for function in (fold_attention, repeat_attention):
        out, weights = function(module, query, key, value, attn_mask, scaling=0.25)
        assert weights is None and out.shape == hf.shape == (3, 1, 2 * g, 16) and out.is_contiguous()
        torch.testing.assert_close(out, hf, rtol=0, atol=1e-6)
        torch.testing.assert_close(out, want, rtol=0, atol=1e-6)


def test_default_scale_and_value_width():
    """scaling None is 1 / sqrt(D) of the query's D, and D_v may differ from D."""
    module, query, key, _, mask = inputs(B=2, H_kv=2, g=4, L=9, D=8)
    value = torch.randn(2, 2, 9, 5)
    out, _ = fold_attention(module, query, key, value, mask)
    torch.testing.assert_close(out, reference(query, key, value, mask, 8 ** -0.5), rtol=0, atol=1e-6)


def test_what_goes_to_transformers_unchanged(monkeypatch):
    """The prefill (several query tokens) and calls with soft-capping or sinks: transformers'
    own function, with every argument as given."""
    calls = []

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return sdpa_attention_forward(*args, **kwargs)

    monkeypatch.setattr(attention, "sdpa_attention_forward", spy)
    module, query, key, value, mask = inputs(B=2, H_kv=2, g=2, L=11, Q=11)
    causal = mask & torch.ones(11, 11, dtype=torch.bool).tril() | torch.eye(11, dtype=torch.bool)
    for function in (fold_attention, repeat_attention):
        out, _ = function(module, query, key, value, causal, scaling=0.3)
        assert torch.equal(out, sdpa_attention_forward(module, query, key, value, causal, scaling=0.3)[0])
    assert len(calls) == 2
    module, query, key, value, mask = inputs(B=2, H_kv=2, g=2, L=11)
    with pytest.raises(ValueError, match="softcap"):     # transformers' sdpa refuses it
        fold_attention(module, query, key, value, mask, softcap=30.0)
    assert calls[-1]["softcap"] == 30.0


def test_the_fold_traces_as_one_graph():
    """No host sync, no data-dependent shape: dynamo traces the decode step's attention whole
    (fullgraph raises at a graph break), as a CUDA graph capture needs."""
    module, query, key, value, mask = inputs(B=2, H_kv=2, g=4, L=24)
    traced = torch.compile(fold_attention, fullgraph=True, backend="eager", dynamic=False)
    out, _ = traced(module, query, key, value, mask, scaling=0.25)
    torch.testing.assert_close(out, fold_attention(module, query, key, value, mask, scaling=0.25)[0],
                               rtol=0, atol=0)


class _Model(torch.nn.Module):
    def __init__(self, impl="sdpa", heads=4, kv_heads=2, **config):
        super().__init__()
        self.config = SimpleNamespace(_attn_implementation=impl, num_attention_heads=heads,
                                      num_key_value_heads=kv_heads, **config)
        self.attn = torch.nn.Module()


def test_which_models_decode_with_the_fold(monkeypatch, caplog):
    assert attention.decode_attention(_Model()) == "onelayer_sdpa_fold"
    assert attention.decode_attention(_Model(impl="eager")) is None          # eager: its own
    assert attention.decode_attention(_Model(heads=4, kv_heads=4)) is None   # nothing to fold
    assert attention.decode_attention(_Model(kv_heads=None)) is None
    sinks = _Model()
    sinks.attn.sinks = torch.nn.Parameter(torch.zeros(4))
    with caplog.at_level(logging.INFO, logger="onelayer"):
        assert attention.decode_attention(_Model(attn_logit_softcapping=50.0)) is None
        assert attention.decode_attention(_Model(attn_logit_softcapping=50.0)) is None
        assert attention.decode_attention(sinks) is None
    messages = [r.getMessage() for r in caplog.records]
    assert sum("soft-capping" in m for m in messages) == 1 and sum("sinks" in m for m in messages) == 1
    monkeypatch.setattr(attention, "GQA_MODE", "repeat")
    assert attention.decode_attention(_Model()) == "onelayer_sdpa_repeat"
    monkeypatch.setattr(attention, "GQA_MODE", "folded")
    with pytest.raises(ValueError, match="ONELAYER_DECODE_GQA"):
        attention.decode_attention(_Model())


def test_the_implementation_is_restored_on_an_error_too():
    config = SimpleNamespace(_attn_implementation="sdpa")
    with pytest.raises(RuntimeError):
        with attention.attention_implementation(config, "onelayer_sdpa_fold"):
            assert config._attn_implementation == "onelayer_sdpa_fold"
            raise RuntimeError("boom")
    assert config._attn_implementation == "sdpa"
    with attention.attention_implementation(config, None):
        assert config._attn_implementation == "sdpa"
