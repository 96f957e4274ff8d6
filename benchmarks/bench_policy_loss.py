"""Fused linear policy loss on one GPU: Triton kernel vs torch chunked reference vs full logits.

    python benchmarks/bench_policy_loss.py                 # default shapes, bf16
    python benchmarks/bench_policy_loss.py --quick         # one small shape (smoke run)
    python benchmarks/bench_policy_loss.py --shapes 4096x4096x151936 --dtype bf16 --reps 20

For each shape T x H x V (tokens x hidden x vocab) it first checks the Triton loss, its
hidden-gradient and the no-grad log-probs against the fp32 torch reference on the GPU, then times
forward + backward (CUDA events, median of --reps after --warmup) and measures the peak extra
memory (torch.cuda.max_memory_allocated over the inputs). It prints a markdown table; copy it
into benchmarks/RESULTS.md with the GPU, date and command. Nothing here runs on CPU.
"""
from __future__ import annotations

import argparse
import statistics
import sys

import torch

from onelayer.algos import chunked_logprobs, fused_linear_policy_loss_reference, policy_loss
from onelayer.algos.advantages import group_advantages_reference

DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# The first is the target: 8 sequences x 4096 tokens, Qwen3-8B hidden and vocabulary.
DEFAULT_SHAPES = ["32768x4096x151936", "8192x4096x151936", "2048x4096x151936", "8192x4096x32000"]
LOSS_KW = dict(temperature=0.7, eps_low=0.2, eps_high=0.28, beta=0.04, aggregation="token-mean")


def make_batch(t: int, h: int, v: int, dtype: torch.dtype, seed: int = 0) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = "cuda"
    hidden = torch.randn(t, h, device=dev, generator=g).to(dtype)
    weight = (torch.randn(v, h, device=dev, generator=g) / h ** 0.5).to(dtype)
    targets = torch.randint(0, v, (t,), device=dev, generator=g)
    with torch.no_grad():
        base = chunked_logprobs(hidden, weight, targets, temperature=LOSS_KW["temperature"])
    return dict(hidden=hidden, weight=weight, targets=targets,
                old_logprobs=base + 0.2 * torch.randn(t, device=dev, generator=g),
                advantages=torch.randn(t, device=dev, generator=g),
                mask=(torch.rand(t, device=dev, generator=g) > 0.2).float(),
                seq_ids=torch.arange(t, device=dev) * 16 // t,
                ref_logprobs=base + 0.1 * torch.randn(t, device=dev, generator=g))


def full_logits_loss(hidden, weight, targets, old_logprobs, advantages, mask, seq_ids, ref_logprobs, **kw):
    """The naive baseline: materialise [T, V] logits, fp32 log_softmax."""
    temperature = kw.pop("temperature")
    logp = torch.log_softmax((hidden @ weight.T).float() / temperature, dim=-1)
    logp = logp.gather(1, targets[:, None]).squeeze(1)
    return policy_loss(logp, old_logprobs, advantages, mask, seq_ids, ref_logprobs, **kw)


def run_step(loss_fn, batch: dict) -> None:
    hidden = batch["hidden"].detach().requires_grad_(True)
    args = {**batch, "hidden": hidden}
    loss, _ = loss_fn(**args, **dict(LOSS_KW))
    loss.backward()


def measure(fn, *, warmup: int, reps: int) -> tuple[float, float]:
    """(median ms, peak extra MiB) of fn() on the current CUDA stream."""
    for _ in range(warmup):
        fn()
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    peak = (torch.cuda.max_memory_allocated() - base) / 2**20
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times), peak


def check(batch: dict, dtype: torch.dtype) -> str:
    """Triton vs the fp32 torch reference on the same (dtype-rounded) inputs: max abs diff of
    loss and log-probs, max hidden-grad diff relative to the largest entry.

    The reference must run in fp32: a bf16 reference rounds its logits to bf16 (~1e-2 nats),
    which flips the clip decision of tokens near 1 +- eps; each flip changes a whole row of the
    gradient (measured 2026-11-27: bf16 vs fp32 reference, grad rel 0.43 at 8192 tokens)."""
    from onelayer.kernels import fused_linear_logprobs, fused_linear_policy_loss

    hidden = batch["hidden"].detach().requires_grad_(True)
    loss, _ = fused_linear_policy_loss(**{**batch, "hidden": hidden}, **dict(LOSS_KW))
    loss.backward()
    upcast = batch["hidden"].float().requires_grad_(True)
    want, _ = fused_linear_policy_loss_reference(**{**batch, "hidden": upcast,
                                                    "weight": batch["weight"].float()}, **dict(LOSS_KW))
    want.backward()
    with torch.no_grad():
        lp = fused_linear_logprobs(batch["hidden"], batch["weight"], batch["targets"], temperature=0.7)
        lp_ref = chunked_logprobs(batch["hidden"].float(), batch["weight"].float(), batch["targets"],
                                  temperature=0.7)
    d_loss = (loss.float() - want).abs().item()
    d_grad = ((hidden.grad.float() - upcast.grad).abs().max() / upcast.grad.abs().max().clamp_min(1e-30)).item()
    d_lp = (lp - lp_ref).abs().max().item()
    tol = 2e-2 if dtype != torch.float32 else 1e-4
    ok = d_loss < tol and d_grad < tol and d_lp < tol
    return f"{'ok' if ok else 'MISMATCH'} (loss {d_loss:.1e}, grad rel {d_grad:.1e}, logp {d_lp:.1e})"


def bench_advantages(reps: int) -> list[str]:
    from onelayer.kernels import group_advantages

    rows = []
    for n, group in [(128, 8), (1024, 16), (8192, 16)]:
        rewards = torch.randint(0, 2, (n,), device="cuda").float()
        groups = torch.arange(n, device="cuda") // group
        for name, fn in [("triton", group_advantages), ("torch ref", group_advantages_reference)]:
            ms, _ = measure(lambda fn=fn: fn(rewards, groups, "grpo"), warmup=3, reps=reps)
            rows.append(f"| group_advantages N={n} G={group} | {name} | {ms:.3f} |")
    return rows


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--shapes", nargs="+", default=DEFAULT_SHAPES, help="TxHxV, e.g. 4096x4096x151936")
    p.add_argument("--dtype", choices=sorted(DTYPES), default="bf16")
    p.add_argument("--reps", type=int, default=10)
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--quick", action="store_true", help="one small shape, 3 reps")
    p.add_argument("--skip-full", action="store_true", help="skip the full-logits baseline")
    args = p.parse_args()
    if not torch.cuda.is_available():
        print("bench_policy_loss.py needs a CUDA GPU", file=sys.stderr)
        return 2
    from onelayer.kernels import fused_linear_policy_loss

    shapes = ["1024x1024x32000"] if args.quick else args.shapes
    reps = 3 if args.quick else args.reps
    dtype = DTYPES[args.dtype]
    torch.backends.cuda.matmul.allow_tf32 = False   # the check's fp32 reference must be fp32
    print(f"GPU: {torch.cuda.get_device_name()}  torch {torch.__version__}  dtype {args.dtype}  "
          f"loss {LOSS_KW}")
    print()
    print("| T x H x V | impl | fwd+bwd ms | peak extra MiB | [T,V] fp32 MiB | check |")
    print("|---|---|---|---|---|---|")
    impls = [("triton fused", fused_linear_policy_loss), ("torch chunked", fused_linear_policy_loss_reference)]
    if not args.skip_full:
        impls.append(("torch full logits", full_logits_loss))
    for shape in shapes:
        t, h, v = (int(x) for x in shape.split("x"))
        batch = make_batch(t, h, v, dtype)
        verdict = check(batch, dtype)
        logits_mib = t * v * 4 / 2**20
        for name, fn in impls:
            try:
                ms, peak = measure(lambda fn=fn, batch=batch: run_step(fn, batch), warmup=args.warmup, reps=reps)
                cells = f"{ms:.2f} | {peak:.0f}"
            except torch.OutOfMemoryError:
                cells = "OOM | OOM"
            torch.cuda.empty_cache()
            print(f"| {shape} | {name} | {cells} | {logits_mib:.0f} | {verdict if name.startswith('triton') else ''} |")
        del batch
        torch.cuda.empty_cache()
    print()
    print("| op | impl | ms |")
    print("|---|---|---|")
    for row in bench_advantages(reps):
        print(row)
    return 0


if __name__ == "__main__":
    sys.exit(main())
