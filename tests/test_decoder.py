"""The static-shape decoder (onelayer/rollout/decoder.py) against Hugging Face `generate` and the
dynamic-cache loop; its stops, truncation, and the graph bookkeeping run on CPU with capture
replaced by a stand-in (the same step function, replayed eagerly)."""
import pytest
import torch
from torch.utils._python_dispatch import TorchDispatchMode
from transformers import AutoModelForCausalLM, GenerationConfig

from conftest import make_tiny_model
from onelayer.rollout import SamplingParams, generate_completions
from onelayer.rollout import attention, decoder
from onelayer.rollout.generate import StopStrings, restrict, sample_dynamic

# Different lengths, so that the batch is left-padded.
PROMPTS = ["1+1=", "23+45=", "999-1=", "abc", "7-8=", "hello", "0-0=", "12345+67890="]


def load(path, attn="sdpa"):
    return AutoModelForCausalLM.from_pretrained(path, attn_implementation=attn).eval()


def encode(tok, prompts=PROMPTS):
    tok.padding_side = "left"
    enc = tok(prompts, return_tensors="pt", padding=True, add_special_tokens=False)
    return enc.input_ids, enc.attention_mask


def both(lm, tok, params, stop_ids, prompts=PROMPTS, seed=None):
    """(static decoder, dynamic loop) on the same batch, each from a fresh generator."""
    ids, mask = encode(tok, prompts)
    out = []
    for run in (decoder.decode, sample_dynamic):
        gen = None if seed is None else torch.Generator().manual_seed(seed)
        out.append(run(lm, ids, mask, params, stop_ids=stop_ids, stop_strings=StopStrings(tok, params.stop),
                       pad_id=0, generator=gen))
    return out


def assert_same(a, b):
    assert torch.equal(a.tokens, b.tokens) and torch.equal(a.mask, b.mask)
    assert torch.equal(a.truncated, b.truncated)
    torch.testing.assert_close(a.logprobs, b.logprobs, rtol=0, atol=2e-5)


@pytest.fixture(scope="module")
def models(tiny_models):
    return {arch: load(path) for arch, path in tiny_models.items()}


@pytest.fixture(scope="module")
def tok(tiny_models):
    from transformers import AutoTokenizer
    return AutoTokenizer.from_pretrained(tiny_models["qwen3"], padding_side="left")


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama", "mistral"])   # mistral: window 8
def test_greedy_matches_hf_generate_and_the_dynamic_loop(models, tok, arch):
    lm = models[arch]
    assert decoder.unsupported(lm) is None
    ids, mask = encode(tok)
    free = decoder.decode(lm, ids, mask, SamplingParams(14, greedy=True), stop_ids=[],
                          stop_strings=StopStrings(tok, ()), pad_id=0)
    assert free.tokens.shape == (8, 14) and free.truncated.all()
    # A token that some rows emit early, some late and some never: rows stop at different times.
    counts = torch.bincount(free.tokens[:, 2:].flatten(), minlength=64)
    stop = int(counts.argmax())
    ours, dynamic = both(lm, tok, SamplingParams(14, greedy=True), [stop])
    assert_same(ours, dynamic)
    lengths = ours.mask.sum(1)
    assert ours.truncated.any() or len(set(lengths.tolist())) > 1
    config = GenerationConfig(do_sample=False, max_new_tokens=14, eos_token_id=stop, pad_token_id=0)
    hf = lm.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    assert torch.equal(ours.tokens, hf[:, :ours.tokens.shape[1]])
    assert hf.shape[1] == ours.tokens.shape[1]        # both stop when the last row does


def test_eager_attention_and_mixed_full_and_sliding_layers(tmp_path, tok):
    eager = load(make_tiny_model(tmp_path / "llama", "llama"), attn="eager")
    # Qwen2 with a window on layers >= 2 only: a dict of two masks.
    mixed = load(make_tiny_model(tmp_path / "mixed", "qwen2", use_sliding_window=True,
                                 sliding_window=5, max_window_layers=2))
    assert sorted(set(mixed.config.layer_types)) == ["full_attention", "sliding_attention"]
    for lm in (eager, mixed):
        assert decoder.unsupported(lm) is None
        assert_same(*both(lm, tok, SamplingParams(12, greedy=True), [3]))
        assert_same(*both(lm, tok, SamplingParams(12, temperature=0.9, top_k=20), [3], seed=1))
    # eager keeps its own attention function; the sdpa model decodes with the fold
    assert decoder._DECODERS[eager].spec.attention is None
    assert decoder._DECODERS[mixed].spec.attention == "onelayer_sdpa_fold"


def test_what_falls_back_to_the_dynamic_loop(models):
    lm = models["qwen3"]
    lm.config._attn_implementation = "flash_attention_2"
    try:
        assert "flash_attention_2" in decoder.unsupported(lm)
    finally:
        lm.config._attn_implementation = "sdpa"


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
def test_sampled_tokens_and_logprobs(models, tok, arch):
    lm = models[arch]
    params = SamplingParams(10, temperature=0.8, top_p=0.9, top_k=30)
    ours, dynamic = both(lm, tok, params, [1], seed=5)
    assert_same(ours, dynamic)       # the same draws from the same generator state
    # Log-probs of the filtered distribution of a full forward over the finished sequences.
    ids, mask = encode(tok)
    seq = torch.cat([ids, ours.tokens], 1)
    full_mask = torch.cat([mask, ours.mask], 1)
    with torch.no_grad():
        logits = lm(input_ids=seq, attention_mask=full_mask,
                    position_ids=(full_mask.cumsum(-1) - 1).clamp(min=0)).logits[:, ids.shape[1] - 1:-1]
    want = restrict(logits.float() / 0.8, 30, 0.9).log_softmax(-1).gather(-1, ours.tokens[..., None])[..., 0]
    live = ours.mask.bool()
    torch.testing.assert_close(ours.logprobs[live], want[live], rtol=0, atol=2e-5)
    assert (ours.logprobs[~live] == 0).all()


@pytest.mark.parametrize("every", [1, 3, 8])
def test_stop_strings_are_cut_back_to_the_token_that_completed_them(models, tok, monkeypatch, every):
    monkeypatch.setattr(decoder, "check_every", lambda device: every)
    lm = models["qwen3"]
    free = generate_completions(lm, tok, PROMPTS, SamplingParams(12, greedy=True))
    stop = free.texts[2][3:5]
    params = SamplingParams(12, greedy=True, stop=(stop,))
    ours, dynamic = both(lm, tok, params, [1])
    assert_same(ours, dynamic)
    assert not ours.truncated[2] and ours.mask[2].sum() <= 5
    stopped = generate_completions(lm, tok, PROMPTS, params)
    assert stopped.texts[2].endswith(stop)


def test_truncation_flags_and_one_token(models, tok):
    lm = models["llama"]
    one, dyn_one = both(lm, tok, SamplingParams(1, greedy=True), [])
    assert_same(one, dyn_one)
    assert one.tokens.shape == (8, 1) and one.truncated.all()
    # Every row stops at its first token: one step, nothing truncated, the decode never runs.
    first = one.tokens[:, 0].unique().tolist()
    out, dyn = both(lm, tok, SamplingParams(9, greedy=True), first)
    assert_same(out, dyn)
    assert out.tokens.shape == (8, 1) and not out.truncated.any()
    # Half the rows stop: truncated is exactly the rows that never did.
    some = one.tokens[:4, 0].unique().tolist()
    out, dyn = both(lm, tok, SamplingParams(9, greedy=True), some)
    assert_same(out, dyn)
    stopped = torch.isin(out.tokens, torch.tensor(some)).any(1)
    assert torch.equal(out.truncated, ~stopped)
    # Many stop ids (the step compares against all of them; torch.isin would sync on CUDA).
    never = [i for i in range(1000, 1400) if i not in first][:30]
    many, dyn_many = both(lm, tok, SamplingParams(9, greedy=True), never + some)
    assert_same(many, dyn_many)
    assert torch.equal(many.tokens, out.tokens)


def manual_graphs(monkeypatch, capture) -> None:
    """The decoder's CUDA-graph path on CPU: `capture(run, device, pool)` stands in for the
    capture and returns (replay, pool); warmup steps run on the current stream."""
    monkeypatch.setattr(decoder, "graph_mode", lambda device: "manual")
    monkeypatch.setattr(decoder, "capture", capture)
    monkeypatch.setattr(decoder, "run_on_side_stream", lambda run, device: run())


def test_graph_bookkeeping_on_cpu(models, tok, monkeypatch):
    """The manual CUDA-graph path with capture replaced by the step itself: warmup, capture once
    per key, replay; buffers reused by a smaller batch; grown and re-captured for a longer one."""
    captured = []

    pools = []

    def fake_capture(run, device, pool):
        captured.append(run)
        pools.append(pool)
        return run, pool or f"pool-{len(captured)}"   # "replay" re-runs the closure captured

    manual_graphs(monkeypatch, fake_capture)
    lm = models["qwen2"]
    decoder.release(lm)
    greedy = SamplingParams(8, greedy=True)
    ours, dyn = both(lm, tok, greedy, [5])
    assert_same(ours, dyn)
    assert len(captured) == 1
    state = decoder._DECODERS[lm]
    cache_ptr = state.cache.keys[0].data_ptr()
    assert (state.capacity, state.length) == (8, 128)

    assert_same(*both(lm, tok, greedy, [5]))                     # same key: replayed
    assert len(captured) == 1
    assert_same(*both(lm, tok, SamplingParams(8, temperature=1.1), [5], seed=2))  # new key
    assert len(captured) == 2
    assert_same(*both(lm, tok, greedy, [5], prompts=PROMPTS[:3]))  # 3 rows: same buffers
    assert len(captured) == 3 and decoder._DECODERS[lm] is state
    assert state.cache.keys[0].data_ptr() == cache_ptr
    # Longer than the buffers: grown (to the larger of old and new), captured again.
    long = ["9" * 99 + "=", "1+1="]             # 100 + 30 columns > 128
    assert_same(*both(lm, tok, SamplingParams(30, greedy=True), [5], prompts=long))
    grown = decoder._DECODERS[lm]
    assert grown is not state and (grown.capacity, grown.length) == (8, 256)
    assert len(captured) == 4
    # New weight storage drops the graphs (they read the weights at their old addresses).
    head = lm.lm_head.weight
    lm.lm_head.weight = torch.nn.Parameter(head.detach().clone(), requires_grad=False)
    try:
        assert_same(*both(lm, tok, SamplingParams(30, greedy=True), [5], prompts=long))
        assert len(captured) == 5
        # A decoder's graphs share the memory pool of its first one.
        assert pools == [None, "pool-1", "pool-1", None, "pool-4"]
    finally:
        lm.lm_head.weight = head
        decoder.release(lm)


# What a captured decode step must not do. The host waits for the device (a value read back, or
# an output whose size depends on the data): a CUDA graph capture fails there, and the decoder
# falls back to eager steps. A random draw: it would replay the same numbers; the sampler's noise
# is drawn before each step, outside the graph.
HOST_WAITS = {"_local_scalar_dense", "is_nonzero", "item", "equal", "allclose", "nonzero", "masked_select",
              "_unique", "_unique2", "unique_dim", "unique_consecutive", "bincount", "histc"}
RANDOM = {"multinomial", "exponential", "exponential_", "uniform", "uniform_", "normal", "normal_",
          "bernoulli", "bernoulli_", "random_", "randint", "rand", "randn", "randperm", "rand_like",
          "randn_like", "randint_like"}


class StepOps(TorchDispatchMode):
    """The aten ops a piece of code runs, with the two data-dependent ones that hide behind an
    ordinary name: indexing by a bool mask and repeat_interleave without its output size."""

    def __init__(self, seen: set):
        super().__init__()
        self.seen = seen

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func.overloadpacket.__name__
        if func.overloadpacket is torch.ops.aten.index and any(
                isinstance(i, torch.Tensor) and i.dtype == torch.bool for i in args[1] if i is not None):
            name = "index by a bool mask"
        if func is torch.ops.aten.repeat_interleave.Tensor and kwargs.get("output_size") is None:
            name = "repeat_interleave without output_size"
        self.seen.add(name)
        return func(*args, **kwargs)


@pytest.mark.parametrize("arch", ["qwen3", "qwen2", "llama", "mistral"])
def test_the_captured_step_never_waits_for_the_device_nor_draws(models, tok, monkeypatch, arch):
    """Every op of the decode step that a CUDA graph captures, recorded on CPU (replay stands in
    for the graph), greedy and sampled with top-k / top-p, 20 stop ids: none that waits for the
    device or draws random numbers. What waits on CUDA only (torch.isin's sort past a dozen ids)
    shows on a GPU alone: check_kernels_gpu.py captures the real step."""
    seen: set[str] = set()

    def recorded_capture(run, device, pool):
        def replay():
            with StepOps(seen):
                run()
        return replay, pool

    manual_graphs(monkeypatch, recorded_capture)
    lm = models[arch]
    decoder.release(lm)
    ids, mask = encode(tok)
    try:
        for params in (SamplingParams(12, greedy=True), SamplingParams(12, temperature=0.9, top_k=7, top_p=0.8)):
            decoder.decode(lm, ids, mask, params, stop_ids=list(range(200, 220)), stop_strings=StopStrings(tok, ()),
                           pad_id=0, generator=torch.Generator().manual_seed(0))
    finally:
        decoder.release(lm)
    assert {"index_copy_", "argmax", "_log_softmax", "topk", "sort"} <= seen   # the steps, both samplers
    waits = seen & (HOST_WAITS | {"index by a bool mask", "repeat_interleave without output_size"})
    assert not waits and not seen & RANDOM, sorted(waits | (seen & RANDOM))


@pytest.mark.parametrize("arch", ["qwen3", "llama", "mistral"])
def test_the_decode_step_traces_as_one_graph(models, tok, monkeypatch, arch):
    """GRAPH_MODE "compile" (torch.compile, reduce-overhead) makes a CUDA graph of each graph
    dynamo traces: a graph break would split the step and run Python between the pieces. The
    step of each family, sampled with top-k / top-p, traces whole (dynamo on CPU, no compile)."""
    explained = []

    def explaining_capture(run, device, pool):
        explained.append(torch._dynamo.explain(run)())
        return run, pool

    manual_graphs(monkeypatch, explaining_capture)
    lm = models[arch]
    decoder.release(lm)
    ids, mask = encode(tok, PROMPTS[:3])
    try:
        decoder.decode(lm, ids, mask, SamplingParams(4, temperature=0.9, top_k=7, top_p=0.8), stop_ids=[5],
                       stop_strings=StopStrings(tok, ()), pad_id=0, generator=torch.Generator().manual_seed(0))
    finally:
        decoder.release(lm)
        torch._dynamo.reset()
    assert len(explained) == 1
    assert (explained[0].graph_count, explained[0].graph_break_count) == (1, 0), explained[0].break_reasons


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])   # mistral: sliding window 8
def test_steps_attend_the_written_columns_in_doubling_buckets(models, tok, monkeypatch, arch):
    """ATTEND_MIN 16: prompts of at most 14 tokens and 40 new tokens attend 16, 32, then 64 of
    the 128 cache columns, one graph for each (capture replaced by the step), and decode what
    the dynamic-cache loop decodes, greedy and sampled."""
    captured = []

    def fake_capture(run, device, pool):
        captured.append(run)
        return run, "pool"

    monkeypatch.setattr(decoder, "ATTEND_MIN", 16)
    manual_graphs(monkeypatch, fake_capture)
    lm = models[arch]
    decoder.release(lm)
    try:
        ids, _ = encode(tok)
        assert ids.shape[1] < 16
        assert_same(*both(lm, tok, SamplingParams(40, greedy=True), []))
        state = decoder._DECODERS[lm]
        assert state.length == 128 and sorted(key[1] for key in state.graphs) == [16, 32, 64]
        assert len(captured) == 3
        assert_same(*both(lm, tok, SamplingParams(40, temperature=1.0), [], seed=3))
    finally:
        decoder.release(lm)


@pytest.mark.parametrize("arch", ["qwen3", "mistral"])
def test_repeated_prompts_are_prefilled_once(models, tok, monkeypatch, arch):
    """group = 4 (GRPO's G copies of each prompt, consecutive): the prefill runs the 2 distinct
    prompts, not 8 rows, and the tokens and log-probs are those of the 8-row prefill, greedy
    and sampled."""
    lm = models[arch]
    ids, mask = encode(tok, PROMPTS[-2:])                     # two lengths: left padding
    ids, mask = ids.repeat_interleave(4, 0), mask.repeat_interleave(4, 0)
    prefill_rows, prefill = [], decoder.StaticDecoder.prefill

    def counted(self, lm, input_ids, prompt_mask):
        prefill_rows.append(input_ids.shape[0])
        return prefill(self, lm, input_ids, prompt_mask)

    monkeypatch.setattr(decoder.StaticDecoder, "prefill", counted)
    for params, seed in ((SamplingParams(12, greedy=True), None), (SamplingParams(12, temperature=1.0), 5)):
        outs = [decoder.decode(lm, ids, mask, params, stop_ids=[], stop_strings=StopStrings(tok, ()), pad_id=0,
                               generator=None if seed is None else torch.Generator().manual_seed(seed), group=group)
                for group in (1, 4)]
        assert_same(*outs)
    assert prefill_rows == [8, 2, 8, 2]
    # Rows that are not whole groups prefill whole.
    decoder.decode(lm, ids[:6], mask[:6], SamplingParams(3, greedy=True), stop_ids=[],
                   stop_strings=StopStrings(tok, ()), pad_id=0, group=4)
    assert prefill_rows[-1] == 6


def test_buffers_the_step_mutates_are_static_addresses(models, tok):
    """torch.compile(mode="reduce-overhead") skips cudagraphs for a step that writes in place
    into an input not marked static: the KV cache (index_copy_ per step) and the noise buffer,
    allocated lazily, are marked when allocated (in every mode: the mark is an attribute)."""
    lm = models["qwen3"]
    decoder.release(lm)
    both(lm, tok, SamplingParams(4, temperature=1.0), [], seed=0)
    state = decoder._DECODERS[lm]
    buffers = [*state.cache.keys.values(), *state.cache.values.values(), state.noise]
    assert len(buffers) == 2 * lm.config.num_hidden_layers + 1
    assert all(getattr(t, "_dynamo_static_input_type", None) == "unguarded" for t in buffers)
    decoder.release(lm)


def test_generate_completions_is_unchanged_for_callers(tiny_models):
    from onelayer.model import load_policy
    policy = load_policy(tiny_models["mistral"], layer=1, device="cpu")
    gen = torch.Generator().manual_seed(0)
    rollout = generate_completions(policy.split.lm, policy.tokenizer, PROMPTS[:3],
                                   SamplingParams(20, temperature=0.7), repeat=2, generator=gen)
    assert rollout.sequences.shape[0] == 6 and rollout.logprobs.shape == rollout.completion_mask.shape
    assert torch.equal(rollout.attention_mask[:, rollout.prompt_len:], rollout.completion_mask)


def spy_attention(monkeypatch):
    """Every SDPA call's (query shape, key shape), and every call of the fold function as the
    attention interface hands it out."""
    from transformers import AttentionInterface
    from transformers.integrations import sdpa_attention
    calls = {"sdpa": [], "fold": 0, "hf_fold": 0}
    sdpa, fold = torch.nn.functional.scaled_dot_product_attention, attention.fold_attention
    hf_fold = getattr(sdpa_attention, "pack_gqa", None)      # transformers >= 5.23 folds too

    def spy_sdpa(query, key, *args, **kwargs):
        calls["sdpa"].append((tuple(query.shape), tuple(key.shape)))
        return sdpa(query, key, *args, **kwargs)

    def spy_fold(*args, **kwargs):
        calls["fold"] += 1
        return fold(*args, **kwargs)

    def spy_hf_fold(*args, **kwargs):
        calls["hf_fold"] += 1
        return hf_fold(*args, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", spy_sdpa)
    monkeypatch.setitem(AttentionInterface._global_mapping, "onelayer_sdpa_fold", spy_fold)
    if hf_fold is not None:
        monkeypatch.setattr(sdpa_attention, "pack_gqa", spy_hf_fold)
    return calls


def test_decode_attends_each_key_value_head_once(tmp_path, tok, monkeypatch):
    """Qwen3 with 8 query heads on 2 key/value heads (g = 4): every decode step's SDPA call
    reads the cache's 2 heads with the 4 query heads of a group as 4 query rows, tokens as HF
    generate's; ONELAYER_DECODE_GQA=repeat reads 8 copied heads, same tokens. The model's own
    sdpa is back after each call, also after an error, and a plain forward never folds."""
    lm = load(make_tiny_model(tmp_path / "gqa4", "qwen3", num_attention_heads=8, num_key_value_heads=2))
    ids, mask = encode(tok)
    calls = spy_attention(monkeypatch)
    greedy = SamplingParams(10, greedy=True)
    run = lambda: decoder.decode(lm, ids, mask, greedy, stop_ids=[], stop_strings=StopStrings(tok, ()),  # noqa: E731
                                 pad_id=0)
    decoder.release(lm)
    folded = run()
    decode_calls = [c for c in calls["sdpa"] if c[1][2] == decoder._DECODERS[lm].length]
    assert len(decode_calls) == 9 * 4                          # 9 steps after the prefill, 4 layers
    assert set(decode_calls) == {((8, 2, 4, 16), (8, 2, 128, 16))}
    assert calls["fold"] == 10 * 4                              # the prefill's calls too (delegated)
    assert calls["hf_fold"] == 0                                # ours folded, not transformers'
    assert lm.config._attn_implementation == "sdpa"
    config = GenerationConfig(do_sample=False, max_new_tokens=10, pad_token_id=0, eos_token_id=None)
    hf = lm.generate(input_ids=ids, attention_mask=mask, generation_config=config)[:, ids.shape[1]:]
    assert torch.equal(folded.tokens, hf)

    monkeypatch.setattr(attention, "GQA_MODE", "repeat")
    decoder.release(lm)
    calls["sdpa"].clear()
    assert torch.equal(run().tokens, folded.tokens)
    decode_calls = [c for c in calls["sdpa"] if c[1][2] == decoder._DECODERS[lm].length]
    assert set(decode_calls) == {((8, 8, 1, 16), (8, 8, 128, 16))}
    assert lm.config._attn_implementation == "sdpa"

    monkeypatch.setattr(attention, "GQA_MODE", "fold")
    decoder.release(lm)
    seen = []

    def fail(self, *args, **kwargs):
        seen.append(lm.config._attn_implementation)
        raise RuntimeError("stop here")

    monkeypatch.setattr(decoder.StaticDecoder, "record", fail)
    with pytest.raises(RuntimeError, match="stop here"):
        run()
    assert seen == ["onelayer_sdpa_fold"] and lm.config._attn_implementation == "sdpa"
    calls["fold"] = 0
    with torch.no_grad():
        lm(input_ids=ids, attention_mask=mask)
        lm(input_ids=ids[:, :1], attention_mask=mask[:, :1])
    assert calls["fold"] == 0
    decoder.release(lm)


def test_attention_gets_an_additive_mask_in_the_activations_dtype(models, tok, monkeypatch):
    """SDPA turns a bool mask into an additive one in every layer (three launches on CUDA); the
    decoder passes one built once a step, in the dtype of the queries."""
    seen = []
    sdpa = torch.nn.functional.scaled_dot_product_attention

    def recording(query, key, value, attn_mask=None, **kwargs):
        seen.append((attn_mask.dtype if attn_mask is not None else None, query.dtype))
        return sdpa(query, key, value, attn_mask=attn_mask, **kwargs)

    monkeypatch.setattr(torch.nn.functional, "scaled_dot_product_attention", recording)
    lm = models["mistral"]                     # full and sliding-window layers' masks alike
    decoder.release(lm)
    ours, dynamic = both(lm, tok, SamplingParams(6, greedy=True), [3])
    decoder.release(lm)
    assert_same(ours, dynamic)
    decoded = seen[:lm.config.num_hidden_layers * 6]        # the decoder ran first
    assert decoded and all(mask == query for mask, query in decoded)
