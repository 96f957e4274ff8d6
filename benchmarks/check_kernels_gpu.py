"""The Triton kernels against their torch references on a CUDA GPU, with the GPU tile configs.

    python benchmarks/check_kernels_gpu.py
    TRITON_INTERPRET=1 python benchmarks/check_kernels_gpu.py --smoke   # CPU: the script itself

tests/test_kernels.py checks the same properties under TRITON_INTERPRET=1 on CPU tensors, where
the kernels run with small interpreter tiles; this script runs the real GPU tiles and compiled
code: loss value, metrics and hidden-state gradient (grad_output != 1) of the fused linear
policy loss, the no-grad log-probs, and the advantage kernels, in fp32 and bf16, on shapes that
are not multiples of the tiles, with masked tokens, a fully masked sequence, bias and no bias,
token and sequence (GSPO) ratios; the decoder's fused RMSNorm, rotary and SiLU-gate kernels.
Then the rollout decoder (onelayer/rollout/decoder.py) on the GPU: greedy tokens of the static
decoder, in each graph mode, identical to Hugging Face `generate` and to the dynamic-cache loop
(tiny fp32 Qwen3 and Mistral with a window of 8, left-padded rows stopping at different times),
and sampled tokens identical across graph modes from the same generator seed (modes "manual"
and "off" with the fused element-wise kernels swapped in, as the decoder runs on CUDA;
"manual:unfused" without them).
Prints one line per case, `DECODER <passed>/<total> ok` and a last line
`KERNELS <passed>/<total> ok` (all checks); exits 1 on a mismatch.
"""
from __future__ import annotations

import sys

import torch

from onelayer.algos import (
    anchor_ids,
    chunked_logprobs,
    fused_linear_policy_loss_reference,
    gigpo_advantages_reference,
    group_advantages_reference,
)

# Kernel vs the fp32 reference on the same (dtype-rounded) inputs; tf32 is off for the reference
# (the kernel's fp32 dots are IEEE). bf16 rounds dL/dz to bf16 before the W matmul, so gradients
# are compared relative to the largest reference entry (their scale depends on the aggregation).
VALUE_TOL = {torch.float32: dict(atol=1e-4, rtol=1e-4), torch.bfloat16: dict(atol=2e-3, rtol=2e-3)}
GRAD_REL_TOL = {torch.float32: 1e-4, torch.bfloat16: 2e-2}
# The decoder's element-wise kernels against theirs: a few ulps of fp32, one of bf16 (2^-8).
ROUNDING_TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-5, rtol=1.6e-2)}
SMOKE_CASES = [  # --smoke: the script's own logic on CPU under TRITON_INTERPRET=1
    (torch.float32, (37, 45, 173), "token-mean", 0.04, 0.7, True),
    (torch.bfloat16, (19, 17, 71), "seq-mean-token-sum-norm", 0.0, 1.0, False, "sequence"),
]
DEV = "cuda"
CASES = [  # dtype, (T, H, V), aggregation, beta, temperature, bias
    (torch.float32, (1000, 256, 5003), "token-mean", 0.0, 1.0, False),
    (torch.float32, (777, 512, 32001), "seq-mean-token-mean", 0.04, 0.7, True),
    (torch.bfloat16, (1000, 1024, 50257), "seq-mean-token-sum-norm", 0.0, 1.0, False),
    (torch.bfloat16, (2049, 4096, 151936), "token-mean", 0.04, 0.7, False),
    (torch.bfloat16, (333, 896, 151936), "seq-mean-token-mean", 0.1, 1.3, True),
    (torch.float32, (777, 512, 32001), "seq-mean-token-mean", 0.04, 0.7, True, "sequence"),   # GSPO
    (torch.bfloat16, (1000, 1024, 50257), "seq-mean-token-mean", 0.0, 1.0, False, "sequence"),
]
# GSPO: each sequence's old log-probs shifted as one, so that sequence ratios fall below,
# inside and above the clip range.
SEQUENCE_SHIFTS = [0.5, -0.3, 0.0, 0.02, -0.6, 0.1, -0.15]


def batch(t: int, h: int, v: int, dtype: torch.dtype, temperature: float, use_bias: bool, seed: int = 0):
    g = torch.Generator(device=DEV).manual_seed(seed)
    hidden = torch.randn(t, h, device=DEV, generator=g).to(dtype)
    weight = (torch.randn(v, h, device=DEV, generator=g) * 2 / h ** 0.5).to(dtype)
    bias = torch.randn(v, device=DEV, generator=g).to(dtype) if use_bias else None
    targets = torch.randint(0, v, (t,), device=DEV, generator=g)
    with torch.no_grad():
        base = chunked_logprobs(hidden.float(), weight.float(), targets,
                                None if bias is None else bias.float(), temperature=temperature)
    seq = torch.arange(t, device=DEV) * 7 // t                 # 7 sequences
    mask = (torch.rand(t, device=DEV, generator=g) > 0.25).float()
    mask[seq == 3] = 0.0                                          # one fully masked sequence
    return dict(hidden=hidden, weight=weight, bias=bias, targets=targets,
                old_logprobs=base + 0.6 * torch.randn(t, device=DEV, generator=g),
                advantages=torch.randn(t, device=DEV, generator=g), mask=mask, seq_ids=seq,
                ref_logprobs=base + 0.3 * torch.randn(t, device=DEV, generator=g))


def close(a: torch.Tensor, b: torch.Tensor, tol: dict) -> tuple[bool, float]:
    diff = (a.float() - b.float()).abs()
    ok = bool((diff <= tol["atol"] + tol["rtol"] * b.float().abs()).all())
    return ok, diff.max().item()


def close_relative(a: torch.Tensor, b: torch.Tensor, tol: float) -> tuple[bool, float]:
    """Max |a - b| relative to max |b|."""
    rel = ((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30)).item()
    return rel <= tol, rel


def check_loss(dtype, shape, aggregation, beta, temperature, use_bias, importance_level="token") -> bool:
    from onelayer.kernels import fused_linear_logprobs, fused_linear_policy_loss

    b = batch(*shape, dtype, temperature, use_bias)
    if importance_level == "sequence":
        b["old_logprobs"] = b["old_logprobs"] + torch.tensor(SEQUENCE_SHIFTS, device=DEV)[b["seq_ids"]]
    kw = dict(temperature=temperature, eps_low=0.2, eps_high=0.28, beta=beta, aggregation=aggregation,
              max_len=64, num_seqs=7, importance_level=importance_level)
    args = (b["targets"], b["old_logprobs"], b["advantages"], b["mask"], b["seq_ids"], b["ref_logprobs"])
    grad_out = -2.5
    h1 = b["hidden"].clone().requires_grad_(True)
    loss, metrics = fused_linear_policy_loss(h1, b["weight"], *args, b["bias"], **kw)
    (grad_out * loss).backward()
    h2 = b["hidden"].float().requires_grad_(True)
    bias = None if b["bias"] is None else b["bias"].float()
    want, want_metrics = fused_linear_policy_loss_reference(h2, b["weight"].float(), *args, bias, **kw)
    (grad_out * want).backward()
    with torch.no_grad():
        lp = fused_linear_logprobs(b["hidden"], b["weight"], b["targets"], b["bias"], temperature=temperature)
        lp_want = chunked_logprobs(b["hidden"].float(), b["weight"].float(), b["targets"], bias,
                                   temperature=temperature)
    results = {"loss": close(loss, want, VALUE_TOL[dtype]),
               "grad (rel)": close_relative(h1.grad, h2.grad, GRAD_REL_TOL[dtype]),
               "logprobs": close(lp, lp_want, VALUE_TOL[dtype]),
               **{f"metric {k}": close(metrics[k], want_metrics[k], VALUE_TOL[dtype])
                  for k in ("clip_ratio", "kl", "ratio_mean", "entropy")}}
    ok = all(r[0] for r in results.values()) and h1.grad.dtype == dtype
    detail = ", ".join(f"{k} {d:.1e}{'' if good else ' FAIL'}" for k, (good, d) in results.items())
    print(f"{'ok  ' if ok else 'FAIL'} policy loss {str(dtype)[6:]} T,H,V={shape} {aggregation} "
          f"beta={beta} T={temperature} bias={use_bias} ratios={importance_level}: {detail}", flush=True)
    return ok


def check_advantages() -> list[bool]:
    from onelayer.kernels import gigpo_advantages, group_advantages

    results = []
    g = torch.Generator(device=DEV).manual_seed(1)
    for n, group in [(8, 8), (1000, 8), (4099, 16), (65536, 64)][:2 if DEV == "cpu" else 4]:
        rewards = torch.randint(0, 3, (n,), device=DEV, generator=g).float()
        groups = torch.arange(n, device=DEV) // group
        groups = groups[torch.randperm(n, device=DEV, generator=g)]   # rows in any order
        for mode in ("grpo", "dr_grpo", "batch"):
            ok, d = close(group_advantages(rewards, groups, mode),
                          group_advantages_reference(rewards, groups, mode), dict(atol=1e-5, rtol=1e-5))
            print(f"{'ok  ' if ok else 'FAIL'} group advantages N={n} G={group} {mode}: max diff {d:.1e}")
            results.append(ok)
    # GiGPO: 4 episode groups x 6 trajectories x up to 9 steps over 5 recurring observations.
    rows = {"step_rewards": [], "traj_ids": [], "step_index": [], "episode_group_ids": []}
    observations = []
    gen = torch.Generator().manual_seed(2)
    for traj in range(24):
        for t in range(int(torch.randint(1, 10, (1,), generator=gen))):
            rows["step_rewards"].append(float(torch.rand(1, generator=gen) < 0.3))
            rows["traj_ids"].append(traj)
            rows["step_index"].append(t)
            rows["episode_group_ids"].append(traj // 6)
            observations.append(f"room {int(torch.randint(0, 5, (1,), generator=gen))}")
    episode = {k: torch.tensor(v, device=DEV) for k, v in rows.items()}
    episode["anchor_ids"] = anchor_ids(observations).to(DEV)
    for norm in ("std", "mean"):
        ok, d = close(gigpo_advantages(**episode, gamma=0.95, omega=1.0, norm=norm),
                      gigpo_advantages_reference(**episode, gamma=0.95, omega=1.0, norm=norm),
                      dict(atol=1e-4, rtol=1e-4))
        print(f"{'ok  ' if ok else 'FAIL'} gigpo advantages S={len(observations)} norm={norm}: max diff {d:.1e}")
        results.append(ok)
    return results


def check_decode_ops() -> list[bool]:
    """The decoder's fused element-wise kernels against their references: within rounding, and
    in bf16 bit-equal in almost every entry (each rounds where torch rounds; only a sum's order
    differs)."""
    from onelayer.kernels.decode_ops import rms_norm_triton, rotary_triton, silu_mul_triton
    from onelayer.rollout.fusion import rms_norm_reference, rotary_reference, silu_mul_reference

    results = []
    g = torch.Generator(device=DEV).manual_seed(3)
    big = DEV != "cpu"
    norm_shapes = [(8, 4096), (256, 128), (37, 1000)] if big else [(5, 100)]
    rotary_shapes = [(8, 32, 8, 1, 128), (2, 32, 8, 48, 128), (3, 12, 2, 5, 64)] if big else [(2, 4, 2, 3, 16)]
    for dtype in (torch.float32, torch.bfloat16):
        rand = lambda *shape: torch.randn(*shape, device=DEV, generator=g).to(dtype)  # noqa: E731
        cases = [(f"rms_norm {rows}x{width}", rms_norm_triton, rms_norm_reference,
                  (3 * rand(rows, width), rand(width), 1e-6)) for rows, width in norm_shapes]
        cases += [(f"rotary B={b} Hq={hq} Hk={hk} S={s} D={d}", rotary_triton, rotary_reference,
                   (rand(b, s, hq, d).transpose(1, 2), rand(b, s, hk, d).transpose(1, 2), rand(b, s, d), rand(b, s, d)))
                  for b, hq, hk, s, d in rotary_shapes]
        cases += [(f"silu_mul {n}", silu_mul_triton, silu_mul_reference, (4 * rand(n), rand(n)))
                  for n in ([8 * 12288, 5 * 1001] if big else [1001])]
        for name, kernel, reference, args in cases:
            try:
                out, want = kernel(*args), reference(*args)
                pairs = list(zip(out, want)) if isinstance(out, tuple) else [(out, want)]
                ok = all(torch.allclose(a.float(), b.float(), **ROUNDING_TOL[dtype]) for a, b in pairs)
                same = min(float((a == b).float().mean()) for a, b in pairs)
                ok = ok and (dtype != torch.bfloat16 or same >= 0.99)
                print(f"{'ok  ' if ok else 'FAIL'} {name} {str(dtype)[6:]}: {100 * same:.1f}% of entries equal")
            except Exception as exc:  # a compile or launch failure is a failed check
                ok = False
                print(f"FAIL {name} {str(dtype)[6:]}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            results.append(ok)
    return results


def check_decoder() -> list[bool]:
    from transformers import (GenerationConfig, MistralConfig, MistralForCausalLM, Qwen3Config,
                              Qwen3ForCausalLM)

    from onelayer.rollout import SamplingParams, decoder, fusion
    from onelayer.rollout.generate import StopStrings, sample_dynamic

    common = dict(vocab_size=256, hidden_size=128, intermediate_size=256, num_hidden_layers=4,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
    lengths = torch.tensor([5, 17, 9, 30, 12, 3, 22, 8])
    P, new = int(lengths.max()), 48
    g = torch.Generator().manual_seed(0)
    mask = (torch.arange(P)[None] >= P - lengths[:, None]).long()
    ids = (torch.randint(2, 256, (8, P), generator=g) * mask).to(DEV)
    mask = mask.to(DEV)
    modes = ("off",) if DEV == "cpu" else ("manual", "manual:unfused", "off")
    results, saved, saved_fused = [], decoder.GRAPH_MODE, fusion.FUSED
    for name, config_cls, model_cls, extra in [("qwen3", Qwen3Config, Qwen3ForCausalLM, dict(head_dim=32)),
                                                ("mistral", MistralConfig, MistralForCausalLM, dict(sliding_window=8))]:
        torch.manual_seed(0)
        lm = model_cls._from_config(config_cls(**common, **extra), attn_implementation="sdpa").to(DEV).eval()
        run = lambda fn, params, stops, seed=None: fn(  # noqa: E731
            lm, ids, mask, params, stop_ids=stops, stop_strings=StopStrings(None, ()), pad_id=0,
            generator=None if seed is None else torch.Generator(DEV).manual_seed(seed))
        greedy, sampled = SamplingParams(new, greedy=True), SamplingParams(new, temperature=1.0, top_p=0.95)
        free = run(decoder.decode, greedy, [])
        stop = int(torch.bincount(free.tokens[:, 4:].flatten().cpu(), minlength=256).argmax())
        reference = run(sample_dynamic, greedy, [stop])
        hf = lm.generate(input_ids=ids, attention_mask=mask, generation_config=GenerationConfig(
            do_sample=False, max_new_tokens=new, eos_token_id=stop, pad_token_id=0))[:, P:]
        draws = {}
        for mode in modes:
            decoder.GRAPH_MODE, unfused = mode.split(":")[0], mode.endswith(":unfused")
            fusion.FUSED = "off" if unfused else "on"
            decoder.release(lm)
            try:
                run(decoder.decode, greedy, [stop])     # the first call captures
                ours = run(decoder.decode, greedy, [stop])
                draws[mode] = run(decoder.decode, sampled, [stop], seed=3)
                status = {("failed" if e.failed else "graph" if e.replay is not None else "eager")
                          for e in decoder._DECODERS[lm].graphs.values()}
                ok = (torch.equal(ours.tokens, reference.tokens) and torch.equal(ours.tokens, hf)
                      and torch.equal(ours.mask, reference.mask))
                # A failed capture decodes eagerly and gets the same tokens: manual must capture.
                ok = ok and (not mode.startswith("manual") or status == {"graph"})
                lengths_seen = sorted(set(ours.mask.sum(1).tolist()))
                print(f"{'ok  ' if ok else 'FAIL'} decoder {name} {mode} ({','.join(sorted(status))}): greedy "
                      f"tokens == HF generate == dynamic loop, row lengths {lengths_seen}", flush=True)
            except Exception as exc:
                ok = False
                print(f"FAIL decoder {name} {mode}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            results.append(ok)
        if len(draws) > 1:
            first, *rest = draws.values()
            ok = all(torch.equal(first.tokens, d.tokens) for d in rest)
            print(f"{'ok  ' if ok else 'FAIL'} decoder {name} sampled tokens equal across {', '.join(draws)}")
            results.append(ok)
        decoder.release(lm)
    decoder.GRAPH_MODE, fusion.FUSED = saved, saved_fused
    print(f"DECODER {sum(results)}/{len(results)} ok", flush=True)
    return results


def main() -> int:
    global DEV
    smoke = "--smoke" in sys.argv
    if smoke:
        DEV = "cpu"
    elif not torch.cuda.is_available():
        print("check_kernels_gpu.py needs a CUDA GPU (--smoke: CPU under TRITON_INTERPRET=1)",
              file=sys.stderr)
        return 2
    else:
        torch.backends.cuda.matmul.allow_tf32 = False   # the fp32 reference must be fp32
        print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}", flush=True)
    results = []
    for case in SMOKE_CASES if smoke else CASES:
        try:
            results.append(check_loss(*case))
        except Exception as exc:  # a compile or launch failure is a failed check, not a stop
            print(f"FAIL policy loss {case}: {type(exc).__name__}: {str(exc).splitlines()[0][:300]}")
            results.append(False)
        torch.cuda.empty_cache()
    results += check_advantages()
    results += check_decode_ops()
    try:
        results += check_decoder()
    except Exception as exc:  # outside its per-mode checks (a model, HF generate): keep the rest
        print(f"FAIL decoder: {type(exc).__name__}: {str(exc).splitlines()[0][:300] if str(exc) else ''}")
        print("DECODER 0/1 ok", flush=True)
        results.append(False)
    print(f"KERNELS {sum(results)}/{len(results)} ok", flush=True)
    return 0 if all(results) else 1


if __name__ == "__main__":
    sys.exit(main())
