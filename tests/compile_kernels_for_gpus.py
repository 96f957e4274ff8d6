"""Compiles every Triton kernel launch that onelayer's GPU configurations make, for NVIDIA
targets, on a machine without a GPU; prints one JSON line a (kernel, launch, architecture).

CI has no GPU, and TRITON_INTERPRET=1 runs the kernels with the CPU tiles, never the GPU ones.
So the launchers run here on CPU tensors with each module's GPU configuration and the kernels
replaced by recorders: every launch is kept (arguments, constexprs, warps, stages), not run,
and then compiled for each architecture by Triton with its bundled ptxas. A kernel that does
not compile for a card, or that needs more shared memory than one block of it may have (99 KiB
on the RTX 30x0 / 40x0 cards), fails at its first launch on that card; the test
(tests/test_kernels_compile.py) catches both here.

Run without TRITON_INTERPRET: python tests/compile_kernels_for_gpus.py 80 86 90
"""
from __future__ import annotations

import json
import os
import sys

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("run without TRITON_INTERPRET: the interpreter's kernels cannot be compiled")

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402

from onelayer.kernels import advantages, nf4_matmul, policy_loss  # noqa: E402
from onelayer.nf4 import nf4_weight  # noqa: E402

POINTEE = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.int64: "i64",
           torch.int32: "i32", torch.uint8: "u8", torch.bool: "i1"}


class Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` keeps the launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def argument_type(value) -> str:
    if isinstance(value, torch.Tensor):
        return "*" + POINTEE[value.dtype]
    if isinstance(value, bool):
        return "i1"
    if isinstance(value, int):
        return "i32" if -2**31 <= value < 2**31 else "i64"
    if isinstance(value, float):
        return "fp32"
    raise TypeError(f"no Triton type for {type(value).__name__}")


def source_and_options(kernel, args: tuple, kwargs: dict):
    """The kernel's source specialised to one launch's constexprs, and the launch's options."""
    names = [p.name for p in kernel.params]
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    signature, constexprs = {}, {}
    for p in kernel.params:
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", bound[p.name]
        else:
            signature[p.name] = argument_type(bound[p.name])
    options = {k: v for k, v in kwargs.items() if k not in names}
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs), options, constexprs


def nf4_linear(n: int, k: int, nested: bool) -> bnb.nn.Linear4bit:
    lin = bnb.nn.Linear4bit(k, n, bias=True, compress_statistics=nested, quant_type="nf4")
    lin.weight = bnb.nn.Params4bit(torch.randn(n, k) / k ** 0.5, requires_grad=False,
                                   compress_statistics=nested, quant_type="nf4", blocksize=64, module=lin)
    return lin.to("cpu")


def run_launchers() -> None:
    """Every launcher, in the shapes and dtypes the GPU path takes (values do not matter)."""
    t, h, v = 70, 256, 1000
    for dtype in (torch.bfloat16, torch.float32):
        hidden = torch.randn(t, h, dtype=dtype, requires_grad=True)
        weight = torch.randn(v, h, dtype=dtype)
        targets = torch.randint(v, (t,))
        mask = torch.ones(t)
        seqs = torch.arange(t) // 10
        for bias, softcap in ((None, None), (torch.randn(v, dtype=dtype), 30.0)):
            loss, _ = policy_loss.fused_linear_policy_loss(
                hidden, weight, targets, torch.zeros(t), torch.ones(t), mask, seqs, torch.zeros(t),
                bias, softcap=softcap, beta=0.04)
            loss.backward()
    lin = nf4_linear(96, 512, nested=True)
    for dtype in (torch.bfloat16, torch.float32):
        for rows in (1, 17, 64):   # BLOCK_M 16, 32, 64
            x = torch.randn(rows, 512).to(dtype)
            nf4_matmul.nf4_matmul_triton(x, nf4_weight(lin.weight), lin.bias.to(dtype))   # K split
            nf4_matmul.nf4_matmul_triton(x, nf4_weight(lin.weight), None, splits=1)
    plain = nf4_linear(96, 512, nested=False)   # absmax in fp32, not double-quantised
    nf4_matmul.nf4_matmul_triton(torch.randn(1, 512).bfloat16(), nf4_weight(plain.weight))
    nf4_matmul.nf4_matmul_triton(torch.randn(1, 512).half(), nf4_weight(lin.weight))
    rewards, groups = torch.rand(24), torch.arange(24) // 8
    advantages.group_advantages(rewards, groups, "grpo")
    advantages.group_advantages(torch.rand(10), torch.tensor([1, 2, 1, 3, 2, 1, 3, 3, 2, 1]), "gigpo",
                                traj_returns=torch.rand(4), traj_group_ids=torch.tensor([0, 0, 1, 1]),
                                step_traj=torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 3]))


def main(archs: list[int]) -> None:
    recorders = []
    policy_loss._config = lambda device: policy_loss._GPU
    nf4_matmul._config = lambda device: nf4_matmul._GPU
    for module in (policy_loss, nf4_matmul, advantages):
        for name, value in vars(module).copy().items():
            if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                recorders.append(recorder := Recorder(value))
                setattr(module, name, recorder)
    run_launchers()
    # The --tune variant that computes out^T = W x^T (benchmarks/bench_nf4_matmul.py).
    nf4_matmul._GPU = nf4_matmul._GPU._replace(weights_first=True)
    lin = nf4_linear(96, 512, True)
    for rows in (1, 64):
        nf4_matmul.nf4_matmul_triton(torch.randn(rows, 512).bfloat16(), nf4_weight(lin.weight))
    for recorder in recorders:
        seen = set()
        for args, kwargs in recorder.launches:
            src, options, constexprs = source_and_options(recorder.kernel, args, kwargs)
            key = (tuple(src.signature.items()), tuple(constexprs.items()), tuple(options.items()))
            if key in seen:
                continue
            seen.add(key)
            for arch in archs:
                line = dict(kernel=recorder.kernel.__name__, arch=arch, signature=src.signature,
                            constexprs=constexprs, options=options)
                try:
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                    line["shared"] = compiled.metadata.shared
                except Exception as exc:  # the test names the launch that failed
                    line["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                print(json.dumps(line, default=str), flush=True)


if __name__ == "__main__":
    main([int(a) for a in sys.argv[1:]])
