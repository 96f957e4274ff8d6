"""NF4 small-batch matmul on one GPU: bitsandbytes vs the Triton kernel vs the CUDA C++ kernel
vs what the dispatch picks (nf4_linear) vs a dense bf16 matmul, at decode row counts and the
Qwen3-8B projection shapes.

    python benchmarks/bench_nf4_matmul.py            # checks, then the timing table (< 60 s
                                                     # once the CUDA C++ kernel is built)
    python benchmarks/bench_nf4_matmul.py --tune     # also time Triton tile variants
    python benchmarks/bench_nf4_matmul.py --smoke    # CPU: the script's logic, Triton under
                                                     # TRITON_INTERPRET=1, one tiny shape
    python benchmarks/bench_nf4_matmul.py --check-only   # the checks alone (gpu_check.sh)

First every kernel is checked against `onelayer.nf4.nf4_linear_reference` (fp32) on odd
shapes, bf16 / fp16 / fp32, with and without bias, plain and double-quantised absmax; the
output is poisoned with NaN first, so an unwritten element fails. Then each (shape, M) is
timed as the median over replays of a CUDA graph that calls the op once on each of enough
weight copies to overflow the L2 cache (decode reads every weight from DRAM: 252 different
matrices a step), so launch gaps and cache hits stay out of the figure. GB/s counts the bytes
of the weight (4-bit codes + scales; bf16 for the dense column). The last lines name the
fastest matmul over a decoder layer for each M: onelayer.nf4_dispatch.ROUTES is that table.
Copy the tables into benchmarks/RESULTS.md with the GPU, date and command.
"""
from __future__ import annotations

import os
import sys

if "--smoke" in sys.argv:  # before anything imports triton
    os.environ["TRITON_INTERPRET"] = "1"

import argparse
import functools
import math
import statistics
import time
from collections.abc import Callable

import torch

from onelayer.kernels.nf4_matmul import VARIANTS
from onelayer.nf4_dispatch import MMA_VARIANTS

# Qwen3-8B: hidden 4096, 32 query heads and 8 key/value heads of 128, MLP 12288.
SHAPES = {  # name: (K, N, how many of them a decoder layer has)
    "q/o 4096->4096": (4096, 4096, 2),
    "k/v 4096->1024": (4096, 1024, 2),
    "gate/up 4096->12288": (4096, 12288, 2),
    "down 12288->4096": (12288, 4096, 1),
}
ROWS = (1, 2, 4, 8, 16, 32, 64)
CHECKS = [  # (M, N, K, dtype, bias, nested, blocksize): tails of every tile, both absmax forms
    (1, 77, 320, torch.bfloat16, True, True, 64), (3, 4099, 4096, torch.bfloat16, False, True, 64),
    (5, 1000, 1024, torch.bfloat16, True, True, 64), (17, 300, 2048, torch.bfloat16, True, True, 64),
    (64, 1024, 4096, torch.bfloat16, False, True, 64), (65, 129, 512, torch.bfloat16, True, True, 64),
    (2, 333, 1024, torch.float16, True, True, 64), (9, 333, 1024, torch.float16, False, False, 64),
    (1, 257, 512, torch.float32, True, True, 64), (8, 257, 512, torch.float32, False, False, 32),
    (4, 500, 1024, torch.bfloat16, True, True, 128),
]
KERNELS = ("bnb", *VARIANTS, "cuda", *MMA_VARIANTS)  # the NF4 matmuls compared
SMOKE_CHECKS = [(1, 48, 128, torch.float32, True, True, 64), (3, 21, 128, torch.bfloat16, False, True, 64)]
L2_FLUSH_BYTES = 256 * 2**20  # weight copies per timed pass: > 4x the L2 of an H100 / H200


def make_linear(n: int, k: int, *, bias: bool, nested: bool, blocksize: int, dtype: torch.dtype, device: str,
                seed: int = 0):
    import bitsandbytes as bnb
    g = torch.Generator(device=device).manual_seed(seed)
    lin = bnb.nn.Linear4bit(k, n, bias=bias, compress_statistics=nested, quant_type="nf4", compute_dtype=dtype,
                            device=device)
    w = torch.randn(n, k, generator=g, device=device) / k ** 0.5
    lin.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, compress_statistics=nested, quant_type="nf4",
                                   blocksize=blocksize, module=lin)
    if bias:
        lin.bias = torch.nn.Parameter(torch.randn(n, generator=g, device=device).to(dtype), requires_grad=False)
    lin = lin.to(device)  # quantises
    lin.support_avx512bf16_for_cpu = False  # keep the row-major layout on CPU (--smoke)
    return lin.eval()


def weight_bytes(w) -> int:
    parts = [w.packed, w.absmax] + ([w.absmax2, w.code2, w.offset] if w.nested else [])
    return sum(t.numel() * t.element_size() for t in parts)


class NotApplicable(Exception):
    """A kernel that does not take these inputs (the tensor-core one: fp32, more than 64 rows)."""


def backends(device: str, native: bool) -> dict[str, Callable]:
    """name -> f(x, NF4Weight, bias); the CUDA C++ ones only where they build."""
    from onelayer.kernels.nf4_matmul import nf4_matmul_triton
    from onelayer.nf4_dispatch import MMA_MAX_ROWS, native_extension, nf4_matmul_native, nf4_matmul_native_mma
    out = {name: functools.partial(nf4_matmul_triton, **config) for name, config in VARIANTS.items()}
    if device == "cuda" and native:
        t0 = time.perf_counter()
        ext, why = native_extension()
        if ext is None:
            print(f"CUDA C++ kernel not available: {why}")
        else:
            print(f"CUDA C++ kernel ready in {time.perf_counter() - t0:.1f} s (build or load)")
            out["cuda"] = lambda x, w, b: nf4_matmul_native(ext, x, w, b)

            def mma(x, w, b, **config):
                if x.dtype == torch.float32 or x.shape[0] > MMA_MAX_ROWS:
                    raise NotApplicable
                return nf4_matmul_native_mma(ext, x, w, b, **config)
            out |= {name: functools.partial(mma, **config) for name, config in MMA_VARIANTS.items()}
    return out


def check(fns: dict[str, Callable], device: str, smoke: bool) -> bool:
    from onelayer.nf4 import nf4_linear_reference, nf4_weight
    bad = total = 0
    for m, n, k, dtype, use_bias, nested, bs in (SMOKE_CHECKS if smoke else CHECKS):
        lin = make_linear(n, k, bias=use_bias, nested=nested, blocksize=bs, dtype=dtype, device=device, seed=m)
        w = nf4_weight(lin.weight)
        x = torch.randn(m, k, device=device).to(dtype)
        b = lin.bias if use_bias else None
        want = nf4_linear_reference(x, w, b).float()
        for name, fn in fns.items():
            torch.full((m, n), float("nan"), dtype=dtype, device=device)  # freed, then reused: poison
            try:
                got = fn(x, w, b).float()
            except NotApplicable:
                continue
            err = ((got - want).norm() / want.norm()).item()
            ok = not got.isnan().any().item() and err < (1e-5 if dtype == torch.float32 else 5e-3)
            bad += not ok
            total += 1
            if not ok:
                print(f"MISMATCH {name} M={m} N={n} K={k} {dtype} bias={use_bias} nested={nested} bs={bs}: "
                      f"rel err {err:.2e}")
    print(f"CHECKS {total - bad}/{total} ok ({', '.join(fns)} vs the fp32 reference)")
    return bad == 0


def time_per_call(calls: list[Callable[[], object]], device: str, reps: int) -> float:
    """Median ms per call: replays of a CUDA graph of all `calls` on CUDA, a host clock on CPU."""
    if device != "cuda":
        t0 = time.perf_counter()
        for f in calls:
            f()
        return (time.perf_counter() - t0) * 1e3 / len(calls)
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up (Triton compiles, bitsandbytes allocates) off the graph
        for f in calls:
            f()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        for f in calls:
            f()
    graph.replay()
    times = []
    for _ in range(reps):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end))
    return statistics.median(times) / len(calls)


def bench_shape(name: str, k: int, n: int, rows: tuple[int, ...], fns: dict[str, Callable], device: str,
                reps: int, dtype: torch.dtype) -> dict[tuple[str, int], float]:
    from onelayer.nf4 import nf4_weight
    from onelayer.nf4_dispatch import nf4_linear
    one = make_linear(n, k, bias=False, nested=True, blocksize=64, dtype=dtype, device=device)
    nbytes = weight_bytes(nf4_weight(one.weight))
    copies = max(2, math.ceil(L2_FLUSH_BYTES / nbytes)) if device == "cuda" else 2
    lins = [one] + [make_linear(n, k, bias=False, nested=True, blocksize=64, dtype=dtype, device=device, seed=i)
                    for i in range(1, copies)]
    ws = [nf4_weight(lin.weight) for lin in lins]
    dense_copies = max(2, math.ceil(L2_FLUSH_BYTES / (2 * n * k))) if device == "cuda" else 2
    dense = [torch.randn(n, k, device=device).to(dtype) for _ in range(dense_copies)]
    ms = {}
    for m in rows:
        x = torch.randn(m, k, device=device).to(dtype)
        with torch.no_grad():
            cases = {"bnb": [lambda lin=lin: lin(x) for lin in lins],
                     "auto": [lambda lin=lin: nf4_linear(x, lin.weight) for lin in lins]}
            cases.update({nm: [lambda w=w, fn=fn: fn(x, w, None) for w in ws] for nm, fn in fns.items()})
            cases["dense bf16"] = [lambda d=d: torch.nn.functional.linear(x, d) for d in dense]
            for impl, calls in cases.items():
                try:
                    ms[(impl, m)] = time_per_call(calls, device, reps)
                except Exception as exc:  # one failing op must not lose the table
                    print(f"{name} M={m} {impl}: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
    dense_bytes = 2 * n * k
    for m in rows:
        cells = []
        for impl in (*KERNELS, "auto", "dense bf16"):
            t = ms.get((impl, m))
            b = dense_bytes if impl == "dense bf16" else nbytes
            cells.append("-" if t is None else f"{t * 1e3:.1f} us, {b / t / 1e6:.0f} GB/s")
        fastest = min((i for i in KERNELS if (i, m) in ms), key=lambda i: ms[(i, m)], default="-")
        print(f"| {name} | {m} | " + " | ".join(cells) + f" | {fastest} |")
    del lins, ws, dense
    return ms


def variant_agrees(fn: Callable, device: str, dtype: torch.dtype) -> bool:
    """A tile variant against the torch reference (check()'s criterion) at two odd shapes and
    every M of ROWS."""
    from onelayer.nf4 import nf4_linear_reference, nf4_weight
    for n, k in ((1000, 4096), (77, 320)):
        w = nf4_weight(make_linear(n, k, bias=False, nested=True, blocksize=64, dtype=dtype, device=device,
                                   seed=n).weight)
        for m in ROWS:
            x = torch.randn(m, k, device=device).to(dtype)
            got, want = fn(x, w).float(), nf4_linear_reference(x, w).float()
            if got.isnan().any() or ((got - want).norm() / want.norm()).item() >= 5e-3:
                return False
    return True


# The Triton tile sweep of --tune, as `_Config` fields over the GPU configuration. block_n is
# the tile at <= 16 rows (wider row blocks narrow it: nf4_matmul.block_n_for); block_k 32 halves
# the registers and takes 2 barriers a pass where 64 with 256 columns takes 36 (compile_kernels.py).
TUNE_VARIANTS = [dict(block_n=bn, num_warps=wp, block_k=bk) for bn, wp, bk in
                 ((64, 4, 64), (128, 4, 64), (128, 8, 64), (256, 4, 64), (256, 8, 64),
                  (128, 4, 32), (128, 8, 32), (256, 4, 32), (256, 8, 32))]
TUNE_VARIANTS += [dict(block_n=64, num_warps=4, num_stages=2), dict(block_n=128, num_warps=8, weights_first=True),
                  dict(block_n=256, num_warps=8, weights_first=True), dict(block_n=256, num_warps=8, prefetch=False),
                  dict(block_n=128, num_warps=8, prefetch=False), dict(block_n=256, num_warps=8, registers=True),
                  dict(block_n=128, num_warps=8, registers=True), dict(block_n=128, num_warps=4, registers=True),
                  dict(block_n=256, num_warps=8, registers=True, weights_first=True)]


def tune(device: str, reps: int, dtype: torch.dtype) -> None:
    """Time the Triton tile variants of TUNE_VARIANTS on every shape and M: one Qwen3-8B layer's
    sum."""
    import onelayer.kernels.nf4_matmul as nf4mod
    from onelayer.nf4 import nf4_weight
    weights = {}
    for name, (k, n, _) in SHAPES.items():
        copies = max(2, math.ceil(L2_FLUSH_BYTES / (n * k // 2)))
        weights[name] = [nf4_weight(make_linear(n, k, bias=False, nested=True, blocksize=64, dtype=dtype,
                                                device=device, seed=i).weight) for i in range(copies)]

    def layer_row(label: str, fn: Callable) -> None:
        per_m = []
        for m in ROWS:
            layer = 0.0
            for name, (k, n, count) in SHAPES.items():
                x = torch.randn(m, k, device=device).to(dtype)
                layer += count * time_per_call([lambda w=w: fn(x, w) for w in weights[name]], device, reps)
            per_m.append(layer)
        print(f"| {label} | " + " | ".join(f"{t * 1e3:.1f}" for t in per_m) + f" | {sum(per_m) * 1e3:.0f} |")

    print("\n| variant: layer us | " + " | ".join(f"M={m}" for m in ROWS) + " | sum |")
    print("|---|" + "---|" * (len(ROWS) + 1))
    base = nf4mod._GPU
    try:
        for variant in TUNE_VARIANTS:
            nf4mod._GPU = base._replace(**variant)
            label = "triton " + ", ".join(f"{k} {v}" for k, v in variant.items())
            if not variant_agrees(nf4mod.nf4_matmul_triton, device, dtype):
                print(f"| {label} | differs from the torch reference: not timed |")
                continue
            layer_row(label, nf4mod.nf4_matmul_triton)
    finally:
        nf4mod._GPU = base


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--smoke", action="store_true", help="CPU, interpreter, one tiny shape")
    p.add_argument("--tune", action="store_true", help="also time Triton tile variants")
    p.add_argument("--no-native", action="store_true", help="leave out the CUDA C++ kernel")
    p.add_argument("--check-only", action="store_true",
                   help="the checks against the reference, no timings (gpu_check.sh, before the train step)")
    p.add_argument("--reps", type=int, default=20)
    args = p.parse_args()
    device = "cpu" if args.smoke else "cuda"
    if device == "cuda" and not torch.cuda.is_available():
        print("bench_nf4_matmul.py needs a CUDA GPU (or --smoke)", file=sys.stderr)
        return 2
    import bitsandbytes
    import triton
    dtype = torch.bfloat16
    name = torch.cuda.get_device_name() if device == "cuda" else "CPU (interpreter)"
    print(f"{name}  torch {torch.__version__}  triton {triton.__version__}  bitsandbytes {bitsandbytes.__version__}")
    torch.backends.cuda.matmul.allow_tf32 = False  # the fp32 reference must be fp32
    t0 = time.perf_counter()
    fns = backends(device, not args.no_native)
    ok = check(fns, device, args.smoke)
    if args.check_only:
        return 0 if ok else 1
    shapes = {"smoke 128->48": (128, 48, 1)} if args.smoke else SHAPES
    rows = (1, 3) if args.smoke else ROWS
    how = "median of CUDA-graph replays over L2-flushing weight copies" if device == "cuda" else "host clock"
    print(f"\nus per call ({how}), GB/s of weight bytes\n")
    print("| shape (K->N) | M | " + " | ".join(KERNELS) + " | auto (nf4_linear) | dense bf16 | fastest NF4 |")
    print("|---|---|" + "---|" * (len(KERNELS) + 3))
    layer = {}
    for sname, (k, n, count) in shapes.items():
        for key, t in bench_shape(sname, k, n, rows, fns, device, args.reps, dtype).items():
            layer[key] = layer.get(key, 0.0) + count * t
    print("\nOne Qwen3-8B decoder layer's 7 projections (us; x 36 layers = a decode step's linears)\n")
    impls = [i for i in (*KERNELS, "auto", "dense bf16") if any((i, m) in layer for m in rows)]
    print("| M | " + " | ".join(impls) + " |")
    print("|---|" + "---|" * len(impls))
    for m in rows:
        print(f"| {m} | " + " | ".join(f"{layer[(i, m)] * 1e3:.1f}" if (i, m) in layer else "-" for i in impls) + " |")
    kernels = [i for i in KERNELS if i in impls]
    best = {m: min(kernels, key=lambda i: layer.get((i, m), math.inf)) for m in rows}
    print(f"\nfastest over a layer, by M: {best}  (onelayer.nf4_dispatch.ROUTES should say the same)")
    if device == "cuda":
        from onelayer.nf4_dispatch import measure_routes, route_candidates
        layer_linears = [make_linear(n, k, bias=False, nested=True, blocksize=64, dtype=dtype, device=device, seed=i)
                         for i, (k, n, count) in enumerate(SHAPES.values()) for _ in range(count)]
        measured = measure_routes(layer_linears, route_candidates(torch.device(device), dtype), dtype=dtype)
        print(f"routes the decoder measures at start (onelayer.nf4_dispatch.measure_routes, one layer): "
              f"{measured.summary}\n  timings by rows: {measured.timings()}")
    if args.tune and device == "cuda":
        tune(device, args.reps, dtype)
    print(f"\nwall {time.perf_counter() - t0:.0f} s")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
