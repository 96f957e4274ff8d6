"""Peak memory and seconds per step of onelayer GRPO on a Qwen3 config with random weights.

Same workload as the TRL anchor of docs/benchmarks.md: one
prompt of 48 tokens x G = 8 completions x 512 new tokens, beta = 0, two steps, the second
reported. Random weights never emit EOS, so every completion runs to full length (worst case).

    python benchmarks/bench_train_step.py --config 8b --layer 16          # on the GPU machine
    python benchmarks/bench_train_step.py --config tiny --new-tokens 16   # CPU smoke run

Prints a RESULT json line; record it in benchmarks/RESULTS.md with card, date and command.
On CUDA a first RESULT ("partial": true) comes right after the training steps, so that a run
cut short by gpu_check.sh's timeout keeps them, and the full RESULT after the timings below
(benchmarks/gpu_summary.py reads the last). The RESULT holds the rollout decoder's
graph status in the last training step (decode_graph, recorded before the step releases the
decoder), the seconds of that step's prefix pass (prefix_s) and of its CUDA graph captures
(capture_s, captures: what is spent again each step because the decoder is released before
the update); on CUDA also, for each graph mode of --decode-modes (":unfused": without the
fused element-wise kernels of onelayer/rollout/fusion.py), ms per decode step of
generate_completions (G rows x --mode-tokens, one prefill included) and whether its greedy
tokens equal eager's. With --decode-compile, a DECODE line after the RESULT times
torch.compile(mode="reduce-overhead") too (printed last: a slow compile loses nothing else).
With --gqa-context N (CUDA), the RESULT also holds decode_gqa: ms per decode step (graph mode
manual, prefill taken out) at G rows x N cache columns with the grouped-query fold and with keys
and values repeated to every query head (ONELAYER_DECODE_GQA, see onelayer/rollout/attention.py).
"""
from __future__ import annotations

import argparse
import json
import os
import time

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

from onelayer import nf4_dispatch, single_turn
from onelayer import update as update_module
from onelayer.config import build_config
from onelayer.model import load_policy
from onelayer.rollout import SamplingParams, attention, decoder, fusion, generate_completions
from onelayer.tasks import Task
from onelayer.single_turn import rl_step
from onelayer.train import memory_gib
from onelayer.update import build_objective

CONFIGS = {
    # Qwen/Qwen3-8B config.json values
    "8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128,
               max_position_embeddings=40960, rope_theta=1000000.0, rms_norm_eps=1e-6,
               tie_word_embeddings=False),
    "tiny": dict(vocab_size=2048, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
                 num_attention_heads=4, num_key_value_heads=2, head_dim=16,
                 max_position_embeddings=2048, tie_word_embeddings=False),
}


def random_checkpoint(name: str, root: str) -> str:
    path = os.path.join(root, f"qwen3-{name}-random")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    device = "cuda" if torch.cuda.is_available() else "cpu"
    config = Qwen3Config(**CONFIGS[name], dtype="bfloat16")
    default_dtype = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)  # no fp32 copy of 8B parameters on the way
    try:
        with torch.device(device):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default_dtype)
    model.save_pretrained(path)
    # Special tokens get names that no prompt word contains (added tokens match inside words).
    vocab = {"<unk>": 0, "<pad>": 1, "<eos>": 2, **{f"t{i}": i for i in range(3, config.vocab_size)}}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="<eos>").save_pretrained(path)
    del model
    if device == "cuda":
        torch.cuda.empty_cache()
    return path


def decode_bytes(policy) -> int:
    """Bytes a decode step must read: every frozen and trained weight but the embedding table
    (a gather of B rows), i.e. the blocks (NF4 data + quantisation state), norms and lm_head."""
    lm = policy.split.lm
    embed = policy.split.embed.weight
    tensors = {id(t): t for t in [*lm.parameters(), *lm.buffers()] if t is not embed}
    for module in lm.modules():  # bitsandbytes keeps absmax and the nested state outside buffers
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            for t in (state.absmax, getattr(state.state2, "absmax", None), state.code,
                      getattr(state.state2, "code", None)):
                if t is not None:
                    tensors[id(t)] = t
    return sum(t.numel() * t.element_size() for t in tensors.values())


def copy_bandwidth(gib: float = 2.0) -> float:
    """Device memory bandwidth in bytes/s, read + written, of a large device-to-device copy."""
    src = torch.empty(int(gib * 2**30), dtype=torch.uint8, device="cuda")
    dst = torch.empty_like(src)
    for _ in range(3):
        dst.copy_(src)
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(10):
        dst.copy_(src)
    end.record()
    torch.cuda.synchronize()
    seconds = start.elapsed_time(end) / 1e3 / 10
    del src, dst
    torch.cuda.empty_cache()
    return 2 * gib * 2**30 / seconds


def graph_status(lm) -> str:
    """The graph mode of the model's decoder (GRAPH_MODE on CUDA, off elsewhere; GRAPH_MODE when
    it has none), what each of its keys ran as (graph / eager / failed), and what it fused."""
    state = decoder._DECODERS.get(lm)
    seen = sorted({"failed" if e.failed else "graph" if e.replay is not None else "eager"
                   for e in state.graphs.values()}) if state else ["none"]
    fused = fusion._FUSIONS.get(lm) if state and fusion.wanted(state.device, state.mode) else None
    return (f"{state.mode if state else decoder.GRAPH_MODE}: {','.join(seen)}"
            + (f"; fused {fused.summary()}" if fused else ""))


def run_steps(policy, optimizer, task, cfg, objective, steps: int) -> tuple[list[dict], list[str]]:
    """`steps` rl_steps, each with the decoder's graph status at the end of its generation
    (rl_step releases the decoder before its update, so it is recorded just before that) and
    two timings inside it: `prefix_s`, the seconds of the update's prefix pass (layers 0..L-1
    over every row), the most that keeping h_L from the rollout, instead of recomputing it,
    could save a step; `capture_s`, the seconds of the decoder's CUDA graph captures (0 unless
    GRAPH_MODE is manual on CUDA), the most that keeping the decoder's graphs from one step to
    the next, instead of releasing them for the update, could save a step."""
    statuses = []
    timings = {"prefix_s": [], "capture_s": []}
    release = single_turn.release_decoder
    prefix_cache, capture = update_module.prefix_cache, decoder.capture

    def record_then_release(lm) -> None:
        statuses.append(graph_status(lm))
        release(lm)

    def timed(function, name: str):
        def run(*args, **kwargs):
            update_module.sync_device(policy.device)
            t0 = time.perf_counter()
            out = function(*args, **kwargs)
            update_module.sync_device(policy.device)
            timings[name].append(time.perf_counter() - t0)
            return out
        return run

    single_turn.release_decoder = record_then_release
    update_module.prefix_cache = timed(prefix_cache, "prefix_s")
    decoder.capture = timed(capture, "capture_s")
    try:
        steps_out = []
        for _ in range(steps):
            for seconds in timings.values():
                seconds.clear()
            step = rl_step(policy, optimizer, task, [task.train[0]], cfg, objective)
            steps_out.append({**step, **{k: sum(v) for k, v in timings.items()},
                              "captures": len(timings["capture_s"])})
        return steps_out, statuses
    finally:
        single_turn.release_decoder = release
        update_module.prefix_cache, decoder.capture = prefix_cache, capture


def time_decode(policy, prompt: str, mode: str, rows: int, new_tokens: int, gqa: str = "fold"):
    """(ms per decode step, greedy tokens, graph status) of generate_completions in graph mode
    `mode` and grouped-query mode `gqa`: one call to capture, one timed."""
    lm, tok = policy.split.lm, policy.tokenizer
    saved, saved_gqa, saved_fused = decoder.GRAPH_MODE, attention.GQA_MODE, fusion.FUSED
    decoder.GRAPH_MODE, attention.GQA_MODE = mode.split(":")[0], gqa
    fusion.FUSED = "off" if mode.endswith(":unfused") else "on"
    decoder.release(lm)
    try:
        params = SamplingParams(new_tokens, greedy=True)
        generate_completions(lm, tok, [prompt], params, repeat=rows)
        torch.cuda.synchronize()
        t0 = time.perf_counter()
        out = generate_completions(lm, tok, [prompt], params, repeat=rows)
        torch.cuda.synchronize()
        seconds = time.perf_counter() - t0
        return 1e3 * seconds / out.completion_mask.shape[1], out.completion_ids.cpu(), graph_status(lm)
    finally:
        decoder.GRAPH_MODE, attention.GQA_MODE, fusion.FUSED = saved, saved_gqa, saved_fused
        decoder.release(lm)


def time_gqa(policy, rows: int, context: int, new_tokens: int) -> dict:
    """ms per decode step, prefill excluded, with the grouped-query fold and with the keys and
    values repeated (graph mode manual), at `rows` x `context` cache columns: the prompt fills
    what the completion leaves, and the static cache attends all of it every step. The prefill
    (timed alone as a 1-token call) is taken out of the `new_tokens` call."""
    prompt = " ".join(f"t{(11 * j) % 1000 + 3}" for j in range(context - new_tokens - 8))
    out, tokens = dict(context=context, rows=rows), {}
    for gqa in ("fold", "repeat"):
        prefill_ms = time_decode(policy, prompt, "manual", rows, 1, gqa=gqa)[0]
        ms, tokens[gqa], status = time_decode(policy, prompt, "manual", rows, new_tokens, gqa=gqa)
        step_ms = (ms * tokens[gqa].shape[1] - prefill_ms) / (tokens[gqa].shape[1] - 1)
        out[gqa] = dict(ms=round(step_ms, 2), tokens_per_s=round(1e3 * rows / step_ms, 1),
                        prefill_ms=round(prefill_ms, 1), status=status)
    out["same_tokens"] = bool(torch.equal(tokens["fold"], tokens["repeat"]))
    return out


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--config", choices=sorted(CONFIGS), default="tiny")
    ap.add_argument("--layer", default="16")
    ap.add_argument("--frozen-dtype", default=None)
    ap.add_argument("--group-size", type=int, default=8)
    ap.add_argument("--new-tokens", type=int, default=512)
    ap.add_argument("--beta", type=float, default=0.0)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--root", default="/tmp/onelayer-bench")
    ap.add_argument("--decode-modes", default="manual,manual:unfused,off",
                    help="graph modes to time (CUDA); ':unfused' without the fused element-wise kernels")
    ap.add_argument("--mode-tokens", type=int, default=128)
    ap.add_argument("--decode-compile", action="store_true", help="also time mode 'compile'")
    ap.add_argument("--gqa-context", type=int, default=0,
                    help="time the grouped-query fold against repeated keys at this many cache columns (CUDA)")
    a = ap.parse_args()

    t0 = time.perf_counter()
    path = random_checkpoint(a.config, a.root)
    checkpoint_s = time.perf_counter() - t0
    cuda = torch.cuda.is_available()
    bandwidth = copy_bandwidth() if cuda else None
    prompt = " ".join(f"t{(7 * j) % 1000 + 3}" for j in range(48))
    task = Task("random", train=[{"q": prompt}], test=[], prompt=lambda r: r["q"],
                reward=lambda c, r: float(len(c) % 7))
    cfg = build_config({"model": path, "layer": a.layer, "group_size": a.group_size,
                        "prompts_per_step": 1, "max_new_tokens": a.new_tokens,
                        "frozen_dtype": a.frozen_dtype, "lr": 1e-5, "beta": a.beta})
    t0 = time.perf_counter()
    policy = load_policy(path, layer=cfg.layer, frozen_dtype=cfg.frozen_dtype,
                         keep_reference=cfg.beta > 0)
    load_s = time.perf_counter() - t0
    objective = build_objective(cfg, policy.device)
    optimizer = torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
    if cuda:
        torch.cuda.reset_peak_memory_stats()
    steps, statuses = run_steps(policy, optimizer, task, cfg, objective, a.steps)
    last = steps[-1]
    # Generation lasts until the longest row stops: with random weights, every row runs to
    # max_new_tokens (EOS is one token in 151,936).
    decode_steps = a.new_tokens
    result = dict(config=a.config, layer=policy.split.layer_index, frozen=policy.frozen_dtype,
                  group=a.group_size, new_tokens=a.new_tokens, beta=a.beta,
                  completion_len=last["completion_len"], checkpoint_s=round(checkpoint_s, 1),
                  load_s=round(load_s, 1), step_s=[round(s["step_s"], 2) for s in steps],
                  gen_s=round(last["gen_s"], 2), update_s=round(last["update_s"], 2),
                  prefix_s=round(last["prefix_s"], 3), capture_s=round(last["capture_s"], 3),
                  captures=last["captures"],
                  decode_tokens_per_s=round(a.group_size * decode_steps / last["gen_s"], 1),
                  decode_ms_per_step=round(1e3 * last["gen_s"] / decode_steps, 2),
                  decode_graph=statuses[-1] if statuses else "?",
                  nf4_routes=nf4_dispatch.measured_summaries(), nf4_route_timings=nf4_dispatch.measured_timings(),
                  device=torch.cuda.get_device_name() if cuda else "cpu",
                  torch=torch.__version__, **{k: round(v, 2) for k, v in memory_gib(policy.device).items()})
    # How far the rollout path (decoder, CUDA graph, NF4 decode kernels) is from the engine's.
    result.update({k: float(f"{last[k]:.3g}") for k in ("sampler_logprob_gap", "sampler_kl")
                   if k in last})
    if cuda:
        weight_bytes = decode_bytes(policy)
        limit_ms = 1e3 * weight_bytes / (bandwidth / 2)   # bandwidth counts read + write
        result.update(peak_alloc_gib=round(torch.cuda.max_memory_allocated() / 2**30, 2),
                      decode_weight_gib=round(weight_bytes / 2**30, 2),
                      copy_bandwidth_tb_s=round(bandwidth / 1e12, 2),
                      decode_limit_ms=round(limit_ms, 2),
                      decode_share_of_limit=round(limit_ms / result["decode_ms_per_step"], 3))
    # The steps' figures first: a slow decode-mode or GQA timing below then loses nothing of them.
    print("RESULT " + json.dumps({**result, "partial": True} if cuda else result), flush=True)
    eager_tokens = None
    if cuda:
        by_mode = {}
        modes = [m for m in a.decode_modes.split(",") if m]
        timed = {m: time_decode(policy, prompt, m, a.group_size, a.mode_tokens) for m in modes}
        eager_tokens = timed["off"][1] if "off" in timed else None
        for mode, (ms, tokens, status) in timed.items():
            by_mode[mode] = dict(ms=round(ms, 2), status=status,
                                 same_as_eager=None if eager_tokens is None else bool(torch.equal(tokens, eager_tokens)))
        result.update(decode_ms_by_mode=by_mode, mode_tokens=a.mode_tokens)
        if a.gqa_context:
            result.update(decode_gqa=time_gqa(policy, a.group_size, a.gqa_context, a.mode_tokens))
        print("RESULT " + json.dumps(result), flush=True)
    if cuda and a.decode_compile:
        t0 = time.perf_counter()
        try:
            ms, tokens, status = time_decode(policy, prompt, "compile", a.group_size, a.mode_tokens)
            line = dict(mode="compile", ms=round(ms, 2), status=status,
                        first_call_s=round(time.perf_counter() - t0, 1),
                        same_as_eager=None if eager_tokens is None else bool(torch.equal(tokens, eager_tokens)))
        except Exception as exc:
            line = dict(mode="compile", error=f"{type(exc).__name__}: {str(exc).splitlines()[0][:200]}")
        print("DECODE " + json.dumps(line), flush=True)


if __name__ == "__main__":
    main()
