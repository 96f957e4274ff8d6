"""Replicated AdamW against ZeRO-1 for ONE trained layer, on 2 processes (gloo on CPU, or NCCL
when each process has a GPU): the optimizer step with its communication, and the memory of
AdamW's state per rank.

    python benchmarks/bench_zero.py                  # one Qwen3-8B decoder layer, 192.9M params
    python benchmarks/bench_zero.py --scale 0.1      # a tenth of every matrix (a quick run)

A parameter set shaped like one Qwen3-8B decoder layer (hidden 4096, intermediate 12288, 32
query / 8 KV heads of 128, q/k norms) gets random gradients; then each optimizer step is timed
through onelayer.data_parallel, the code the trainer runs after its last backward:
    none:  all-reduce of the gradient (32 MiB buckets) + global-norm clip + AdamW on the layer
    zero1: reduce-scatter of the gradient + global-norm clip + AdamW on this rank's half
           + all-gather of the updated halves
and, for reference, the bare collectives on one flat fp32 tensor of the layer's size
(`collectives`: all-reduce; reduce-scatter; all-gather of the halves).
Each mode runs in its own pair of processes (so that their peak RSS is its own); times are the
slowest rank's, median of --repeats after one warm-up. Prints one RESULT json line per mode.
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
MODES = ("none", "zero1", "collectives")


def qwen3_8b_layer(scale: float) -> dict[str, tuple[int, ...]]:
    """One Qwen3-8B decoder layer's parameter shapes; `scale` shrinks every matrix's rows."""
    hidden, inter, heads, kv, dim = 4096, 12288, 32, 8, 128
    rows = lambda n: max(1, round(n * scale))  # noqa: E731
    return {
        "self_attn.q_proj.weight": (rows(heads * dim), hidden),
        "self_attn.k_proj.weight": (rows(kv * dim), hidden),
        "self_attn.v_proj.weight": (rows(kv * dim), hidden),
        "self_attn.o_proj.weight": (rows(hidden), heads * dim),
        "self_attn.q_norm.weight": (dim,),
        "self_attn.k_norm.weight": (dim,),
        "mlp.gate_proj.weight": (rows(inter), hidden),
        "mlp.up_proj.weight": (rows(inter), hidden),
        "mlp.down_proj.weight": (rows(hidden), inter),
        "input_layernorm.weight": (hidden,),
        "post_attention_layernorm.weight": (hidden,),
    }


class Layer:
    """What onelayer.data_parallel reads of a TrainableLayer: fp32 masters, the compute copy."""

    def __init__(self, shapes: dict[str, tuple[int, ...]], device: torch.device):
        gen = torch.Generator().manual_seed(0)
        self.master = {f"model.layers.18.{n}": torch.nn.Parameter(
            (torch.randn(s, generator=gen) * 0.02).to(device)) for n, s in shapes.items()}
        self.shares_storage, self.compute_dtype = True, torch.float32

    def parameters(self) -> list[torch.nn.Parameter]:
        return list(self.master.values())


def worker(args) -> None:
    import torch.distributed as dist

    from onelayer import data_parallel, distributed

    cuda = torch.cuda.is_available()
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    dist.init_process_group("nccl" if cuda else "gloo")
    device = distributed.device()
    if args.mode == "collectives":
        collectives(args, device, cuda)
        return
    layer = Layer(qwen3_8b_layer(args.scale), device)
    params = layer.parameters()
    if args.mode == "zero1":
        optimizer = data_parallel.ZeroAdamW(layer, lr=1e-6, weight_decay=0.0)
    else:
        optimizer = torch.optim.AdamW(params, lr=1e-6, weight_decay=0.0)
    gen = torch.Generator(device).manual_seed(1 + distributed.rank())

    def now() -> float:
        if cuda:
            torch.cuda.synchronize()
        return time.perf_counter()

    times: dict[str, list[float]] = {"reduce": [], "step": [], "total": []}
    for repeat in range(args.repeats + 1):   # the first is a warm-up (AdamW allocates its state)
        for p in params:
            p.grad = torch.randn(p.shape, generator=gen, device=device)
        dist.barrier()
        t0 = now()
        with data_parallel.gradient_sync(optimizer, layer) as sync:
            sync.finish(torch.tensor(0.0), {})   # every bucket sent after the backward
            sync.clip_(1.0)
            t1 = now()
            optimizer.step()   # zero1: this rank's half, then the all-gather
        t2 = now()
        optimizer.zero_grad(set_to_none=True)
        slowest = torch.tensor([t1 - t0, t2 - t1, t2 - t0], dtype=torch.float64, device=device)
        dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
        if repeat:
            for key, value in zip(times, slowest.tolist()):
                times[key].append(value)

    states = optimizer.local.state if args.mode == "zero1" else optimizer.state
    state_bytes = sum(t.numel() * t.element_size() for s in states.values()
                      for t in s.values() if t.dim() > 0)
    memory = torch.tensor([state_bytes, peak_memory(cuda)], dtype=torch.float64, device=device)
    dist.all_reduce(memory, op=dist.ReduceOp.MAX)
    if distributed.rank() == 0:
        print("RESULT " + json.dumps({
            "mode": args.mode, "ranks": distributed.world_size(), "backend": dist.get_backend(),
            "params": sum(p.numel() for p in params), "repeats": args.repeats,
            **{f"{k}_s": round(statistics.median(v), 3) for k, v in times.items()},
            "optimizer_state_gib_per_rank": round(memory[0].item() / 2**30, 3),
            ("peak_mem_gib" if cuda else "peak_rss_gib"): round(memory[1].item() / 2**30, 2)}),
            flush=True)
    dist.destroy_process_group()


def collectives(args, device: torch.device, cuda: bool) -> None:
    """The bare collectives on one flat fp32 tensor as large as the layer."""
    import torch.distributed as dist

    from onelayer import distributed

    world = distributed.world_size()
    numel = sum(torch.Size(s).numel() for s in qwen3_8b_layer(args.scale).values())
    numel -= numel % world
    flat, part = torch.randn(numel, device=device), torch.empty(numel // world, device=device)
    ops = {"all_reduce_s": lambda: dist.all_reduce(flat),
           "reduce_scatter_s": lambda: distributed.reduce_scatter_flat(part, flat),
           "all_gather_s": lambda: distributed.all_gather_flat(flat, part)}
    result = {}
    for name, op in ops.items():
        times = []
        for _ in range(args.repeats + 1):
            dist.barrier()
            if cuda:
                torch.cuda.synchronize()
            t0 = time.perf_counter()
            op()
            if cuda:
                torch.cuda.synchronize()
            slowest = torch.tensor([time.perf_counter() - t0], dtype=torch.float64, device=device)
            dist.all_reduce(slowest, op=dist.ReduceOp.MAX)
            times.append(slowest.item())
        result[name] = round(statistics.median(times[1:]), 3)
    if distributed.rank() == 0:
        print("RESULT " + json.dumps({"mode": "collectives", "ranks": world,
                                      "backend": dist.get_backend(), "numel": numel,
                                      "repeats": args.repeats, **result}), flush=True)
    dist.destroy_process_group()


def peak_memory(cuda: bool) -> float:
    if cuda:
        return float(torch.cuda.max_memory_allocated())
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024.0   # KiB on Linux


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--scale", type=float, default=1.0, help="fraction of every matrix's rows")
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--ranks", type=int, default=2)
    ap.add_argument("--mode", choices=MODES, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.mode:   # one of the processes torchrun started
        worker(args)
        return
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    for mode in MODES:
        proc = subprocess.run(
            [sys.executable, "-m", "torch.distributed.run", "--standalone",
             f"--nproc-per-node={args.ranks}", __file__, "--mode", mode, "--scale",
             str(args.scale), "--repeats", str(args.repeats)],
            env=env, capture_output=True, text=True)
        lines = [line for line in proc.stdout.splitlines() if line.startswith("RESULT ")]
        if proc.returncode or not lines:
            sys.exit(f"{mode} failed:\n{proc.stderr[-3000:]}")
        print(lines[0], flush=True)


if __name__ == "__main__":
    main()
