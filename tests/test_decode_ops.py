"""The decoder's fused element-wise kernels (kernels/decode_ops.py) against their torch references
under TRITON_INTERPRET=1, and swapped into tiny models of each family while the static decoder
runs (onelayer/rollout/fusion.py; on CPU here, on CUDA only in use)."""
import logging

import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, GenerationConfig

from onelayer.kernels import decode_ops
from onelayer.kernels.decode_ops import rms_norm_triton, rotary_supports, rotary_triton, silu_mul_triton
from onelayer.rollout import SamplingParams, decoder, fusion
from onelayer.rollout.fusion import rms_norm_reference, rotary_reference, silu_mul_reference
from onelayer.rollout.generate import StopStrings, sample_dynamic
from test_decoder import assert_same, encode, manual_graphs

DTYPES = [torch.float32, torch.bfloat16]


def mostly_equal(a, b, share=0.75):
    """Equal in at least `share` of the entries, close in all: a sum's order may move the last
    bit (fp32); bf16 rounds that away but for a rare tie."""
    torch.testing.assert_close(a, b)
    assert (a == b).float().mean() >= share


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("width", [1, 7, 100, 300])
def test_rms_norm_matches_the_reference(dtype, width):
    g = torch.Generator().manual_seed(width)
    x = (3 * torch.randn(5, 3, 2 * width, generator=g))[..., :width].to(dtype)    # rows strided
    weight = torch.randn(width, generator=g).to(dtype)
    out = rms_norm_triton(x, weight, 1e-6)
    want = rms_norm_reference(x, weight, 1e-6)
    assert out.shape == want.shape and out.dtype == want.dtype
    mostly_equal(out, want, share=0.99 if dtype == torch.bfloat16 else 0.5)


def test_rms_norm_promotes_as_the_model_does():
    """An fp32 weight on bf16 activations gives fp32, the normalised value rounded to bf16 first."""
    x, weight = torch.randn(4, 96).bfloat16(), torch.randn(96)
    out, want = rms_norm_triton(x, weight, 1e-5), rms_norm_reference(x, weight, 1e-5)
    assert out.dtype == want.dtype == torch.float32
    mostly_equal(out, want, share=0.99)
    # Without the rounding to bf16 between, most entries would differ.
    unrounded = weight * (x.float() * torch.rsqrt(x.float().pow(2).mean(-1, keepdim=True) + 1e-5))
    assert (unrounded == want).float().mean() < 0.1


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("batch_of_cos", [1, 3])
@pytest.mark.parametrize("head_dim,seq", [(24, 1), (16, 5), (10, 3)])
def test_rotary_matches_the_reference(dtype, batch_of_cos, head_dim, seq):
    g = torch.Generator().manual_seed(head_dim + seq)
    # As the attention forward lays them out: [B, S, H, D] viewed as [B, H, S, D].
    q = torch.randn(3, seq, 6, head_dim, generator=g).to(dtype).transpose(1, 2)
    k = torch.randn(3, seq, 2, head_dim, generator=g).to(dtype).transpose(1, 2)
    cos = torch.randn(batch_of_cos, seq, head_dim, generator=g).to(dtype)
    sin = torch.randn(batch_of_cos, seq, head_dim, generator=g).to(dtype)
    assert rotary_supports(q, k, cos, sin)
    (q_out, k_out), (q_want, k_want) = rotary_triton(q, k, cos, sin), rotary_reference(q, k, cos, sin)
    # No sum over many terms: every product and sum rounded as torch rounds it, bit for bit.
    assert torch.equal(q_out, q_want) and torch.equal(k_out, k_want)
    assert q_out.stride() == q.stride()


def test_rotary_refuses_what_it_does_not_compute():
    q, k = torch.randn(2, 4, 3, 8), torch.randn(2, 2, 3, 8)
    cos = torch.randn(2, 3, 8)
    assert rotary_supports(q, k, cos, cos)
    assert not rotary_supports(q, k, cos.bfloat16(), cos.bfloat16())          # dtypes differ
    assert not rotary_supports(q, k, cos[..., :4], cos[..., :4])               # partial rotary
    assert not rotary_supports(q[..., ::2], k[..., ::2], cos[..., ::2], cos[..., ::2])  # strided D


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("n", [1, 1000, 2049])
def test_silu_mul_matches_the_reference(dtype, n):
    g = torch.Generator().manual_seed(n)
    gate, up = (4 * torch.randn(n, generator=g)).to(dtype), torch.randn(n, generator=g).to(dtype)
    mostly_equal(silu_mul_triton(gate, up), silu_mul_reference(gate, up),
                 share=0.99 if dtype == torch.bfloat16 else 0.5)


# ---------------------------------------------------------------------------------------------
# Swapped into the models while the decoder runs
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def models(tiny_models):
    return {arch: AutoModelForCausalLM.from_pretrained(path, attn_implementation="sdpa").eval()
            for arch, path in tiny_models.items()}


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_models["qwen3"], padding_side="left")


@pytest.fixture
def fused_on_cpu(monkeypatch):
    monkeypatch.setattr(fusion, "wanted", lambda device, mode: True)


def decode(lm, tok, params, stops=(), seed=None):
    ids, mask = encode(tok)
    return decoder.decode(lm, ids, mask, params, stop_ids=list(stops), stop_strings=StopStrings(tok, ()),
                          pad_id=0, generator=None if seed is None else torch.Generator().manual_seed(seed))


def rotary_functions(lm) -> dict:
    return {modeling: modeling.apply_rotary_pos_emb for modeling in fusion.fusions_for(lm).rotary}


def assert_restored(lm, rotary_before: dict):
    assert not any("forward" in m.__dict__ for m in lm.modules())
    assert rotary_functions(lm) == rotary_before


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama", "mistral"])
def test_fused_decoding_matches_hf_generate(models, tok, fused_on_cpu, arch):
    lm = models[arch]
    decoder.release(lm)
    fusions = fusion.fusions_for(lm)
    blocks = lm.config.num_hidden_layers
    norms_per_block = 4 if arch == "qwen3" else 2       # Qwen3 normalises queries and keys too
    assert len(fusions.norms) == norms_per_block * blocks + 1 and len(fusions.mlps) == blocks
    assert len(fusions.rotary) == 1 and not fusions.left_out
    rotary_before = rotary_functions(lm)
    ours = decode(lm, tok, SamplingParams(8, greedy=True), stops=[3])
    ids, mask = encode(tok)
    hf = lm.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
        do_sample=False, max_new_tokens=8, eos_token_id=3, pad_token_id=0))[:, ids.shape[1]:]
    assert torch.equal(ours.tokens, hf[:, :ours.tokens.shape[1]])
    assert_restored(lm, rotary_before)
    decoder.release(lm)


def test_fused_sampling_draws_what_the_dynamic_loop_draws(models, tok, fused_on_cpu):
    lm = models["qwen3"]
    decoder.release(lm)
    sampled = SamplingParams(8, temperature=0.9, top_k=20)
    ids, mask = encode(tok)
    dynamic = sample_dynamic(lm, ids, mask, sampled, stop_ids=[3], stop_strings=StopStrings(tok, ()), pad_id=0,
                             generator=torch.Generator().manual_seed(4))
    assert_same(decode(lm, tok, sampled, stops=[3], seed=4), dynamic)
    decoder.release(lm)


def test_bf16_fused_decoding_takes_the_same_tokens(tiny_models, tok, fused_on_cpu, monkeypatch):
    """In bf16, where every intermediate rounding counts: the same greedy tokens and log-probs
    as the model's own forwards."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"], attn_implementation="sdpa",
                                              dtype=torch.bfloat16).eval()
    fused = decode(lm, tok, SamplingParams(8, greedy=True))
    decoder.release(lm)
    monkeypatch.setattr(fusion, "wanted", lambda device, mode: False)
    own = decode(lm, tok, SamplingParams(8, greedy=True))
    assert torch.equal(fused.tokens, own.tokens)
    torch.testing.assert_close(fused.logprobs, own.logprobs, rtol=0, atol=1e-2)


def test_the_fused_step_runs_none_of_the_ops_it_replaces(models, tok, fused_on_cpu, monkeypatch):
    """The launches of one captured decode step (the graph's), fused and not: the norms' pow /
    rsqrt, the rotation's neg and the gate's silu are gone, and fewer than half the launches are
    left. (Each Triton launcher counts as the one launch it is on a GPU; the interpreter's own
    tensor ops inside it are not counted.)"""
    counts, current = {}, {}

    def counting_capture(run, device, pool):
        on = current["on"]

        def replay():
            with StepCalls() as current["calls"]:
                run()
            counts.setdefault(on, current.pop("calls").count)
        return replay, pool

    def one_launch(name, launcher):
        def run(*args, **kwargs):
            calls = current.get("calls")
            if calls is None:
                return launcher(*args, **kwargs)
            calls.count[name] = calls.count.get(name, 0) + 1
            calls.paused = True
            try:
                return launcher(*args, **kwargs)
            finally:
                calls.paused = False
        return run

    for name in ("rms_norm_triton", "rotary_triton", "silu_mul_triton"):
        monkeypatch.setattr(decode_ops, name, one_launch(name, getattr(decode_ops, name)))
    manual_graphs(monkeypatch, counting_capture)
    lm = models["qwen3"]
    for on in (True, False):
        current["on"] = on
        monkeypatch.setattr(fusion, "wanted", lambda device, mode, on=on: on)
        decoder.release(lm)
        decode(lm, tok, SamplingParams(6, greedy=True))
    decoder.release(lm)
    fused, own = counts[True], counts[False]
    blocks = lm.config.num_hidden_layers
    assert fused["rms_norm_triton"] == 4 * blocks + 1 and fused["silu_mul_triton"] == blocks
    assert fused["rotary_triton"] == blocks
    for op in ("pow", "rsqrt", "neg", "silu"):
        assert own.get(op, 0) > 0 and op not in fused, op
    assert fused["cat"] == 1     # the rotary table's (cos, sin of the positions), no rotation's
    assert sum(fused.values()) < 0.5 * sum(own.values())


class StepCalls(TorchDispatchMode):
    """The ops a piece of code runs that launch a kernel (views and allocations do not), counted
    unless paused."""
    FREE = {"view", "_unsafe_view", "t", "transpose", "permute", "expand", "slice", "select", "unsqueeze",
            "squeeze", "alias", "as_strided", "detach", "split", "unbind", "_reshape_alias", "empty",
            "empty_strided", "empty_like", "reshape", "lift_fresh"}

    def __init__(self):
        super().__init__()
        self.count, self.paused = {}, False

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        name = func.overloadpacket.__name__
        if name not in self.FREE and not self.paused:
            self.count[name] = self.count.get(name, 0) + 1
        return func(*args, **(kwargs or {}))


def test_a_swap_that_disagrees_with_the_model_is_left_out(tiny_models, tok, fused_on_cpu, monkeypatch, caplog):
    """A norm kernel that computes something else (here: 1 + weight, Gemma's norm) fails its
    check: the norms keep the model's forward, with a warning, the rest is fused, and the tokens
    are the model's own."""
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["llama"], attn_implementation="sdpa").eval()
    wrong = lambda module, x: rms_norm_reference(x, 1 + module.weight, module.variance_epsilon)  # noqa: E731
    monkeypatch.setattr(fusion, "fused_norm", wrong)
    with caplog.at_level(logging.WARNING, logger="onelayer"):
        fusions = fusion.fusions_for(lm)
    assert not fusions.norms and len(fusions.mlps) == lm.config.num_hidden_layers and fusions.rotary
    assert fusions.left_out and fusions.left_out[0].startswith("LlamaRMSNorm of width")
    assert "not fusing LlamaRMSNorm" in caplog.text
    ours = decode(lm, tok, SamplingParams(8, greedy=True))
    monkeypatch.setattr(fusion, "wanted", lambda device, mode: False)
    decoder.release(lm)
    assert torch.equal(ours.tokens, decode(lm, tok, SamplingParams(8, greedy=True)).tokens)


def test_forwards_are_restored_after_an_error(models, tok, fused_on_cpu, monkeypatch):
    lm = models["mistral"]
    decoder.release(lm)
    rotary_before = rotary_functions(lm)

    def fail(*args, **kwargs):
        assert "forward" in lm.model.norm.__dict__       # the swap was in place
        raise RuntimeError("boom")

    monkeypatch.setattr(decoder.StaticDecoder, "complete", fail)
    with pytest.raises(RuntimeError, match="boom"):
        decode(lm, tok, SamplingParams(4, greedy=True))
    assert_restored(lm, rotary_before)
    decoder.release(lm)


def test_only_cuda_outside_compile_mode_wants_them():
    assert fusion.wanted(torch.device("cuda"), "manual") and fusion.wanted(torch.device("cuda"), "off")
    assert not fusion.wanted(torch.device("cuda"), "compile")
    assert not fusion.wanted(torch.device("cpu"), "off")


def test_empty_inputs_launch_nothing():
    assert rms_norm_triton(torch.randn(0, 3, 8), torch.ones(8), 1e-6).shape == (0, 3, 8)
    assert silu_mul_triton(torch.randn(0, 5), torch.randn(0, 5)).shape == (0, 5)
    q, k = rotary_triton(torch.randn(2, 4, 0, 8), torch.randn(2, 2, 0, 8), torch.randn(2, 0, 8), torch.randn(2, 0, 8))
    assert q.shape == (2, 4, 0, 8) and k.shape == (2, 2, 0, 8)


def test_a_model_the_checks_cannot_read_decodes_with_its_own_ops(tiny_models, monkeypatch, caplog):
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], attn_implementation="sdpa").eval()
    monkeypatch.setattr(fusion, "_checked", lambda lm: 1 / 0)
    with caplog.at_level(logging.WARNING, logger="onelayer"):
        fusions = fusion.fusions_for(lm)
    assert not (fusions.norms or fusions.mlps or fusions.rotary)
    assert "not fusing this model (ZeroDivisionError" in caplog.text


def test_a_swap_that_fails_to_launch_is_left_out(tiny_models, monkeypatch, caplog):
    lm = AutoModelForCausalLM.from_pretrained(tiny_models["qwen2"], attn_implementation="sdpa").eval()

    def no_launch(module, x):
        raise RuntimeError("out of resources: shared memory")

    monkeypatch.setattr(fusion, "fused_mlp", no_launch)
    with caplog.at_level(logging.WARNING, logger="onelayer"):
        fusions = fusion.fusions_for(lm)
    assert not fusions.mlps and fusions.norms and fusions.rotary
    assert fusions.left_out == ["Qwen2MLP (RuntimeError: out of resources: shared memory)"]
