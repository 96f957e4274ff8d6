"""Every Triton kernel launch of onelayer's GPU configurations, compiled for NVIDIA
architectures on a machine without a GPU: shared memory, registers, spilled bytes, and what a
pass of the innermost loop executes (instructions, barriers, loads, tensor-core instructions).

    python benchmarks/compile_kernels.py                  # sm_80, sm_86, sm_90: a table
    python benchmarks/compile_kernels.py --arch 89 --json # one JSON line a launch and arch
    python benchmarks/compile_kernels.py --csrc $(which nvcc)   # csrc/'s CUDA C++ kernels

CI has no GPU, and TRITON_INTERPRET=1 runs the kernels with the CPU tiles, never the GPU ones.
So the launchers run here on CPU tensors with each module's GPU configuration and the kernels
replaced by recorders: every launch is kept (arguments, constexprs, warps, stages), not run,
specialised on its arguments as Triton's JIT would (16-byte alignment, integers equal to 1),
and compiled for each architecture by Triton with its bundled ptxas; its bundled cuobjdump
reads registers, stack (spills) and the machine code from the binary. A kernel that does not
compile for a card, or needs more shared memory than one block of it may have (99 KiB on RTX
30x0 / 40x0 cards), fails at its first launch there: tests/test_kernels_compile.py runs this
with --json. These are what the compiler chose, not timings: they say where a tile is too
large for the registers or a loop waits on barriers or on its loads, and bench_nf4_matmul.py
--tune on a GPU says what is fastest. With --csrc the same figures come for every template
instance of csrc/nf4_matmul.cu, compiled by the nvcc named (tests/test_nf4_matmul.py).
"""
from __future__ import annotations

import argparse
import json
import os
import re
import subprocess
import sys
import tempfile

if os.environ.get("TRITON_INTERPRET"):
    sys.exit("run without TRITON_INTERPRET: the interpreter's kernels cannot be compiled")

import bitsandbytes as bnb  # noqa: E402
import torch  # noqa: E402
import triton  # noqa: E402
from triton._C.libtriton import native_specialize_impl  # noqa: E402
from triton.backends.compiler import GPUTarget  # noqa: E402
from triton.backends.nvidia.compiler import CUDABackend  # noqa: E402

from onelayer.kernels import advantages, decode_ops, nf4_matmul, policy_loss  # noqa: E402
from onelayer.nf4 import nf4_weight  # noqa: E402


class Recorder:
    """Stands in for a JITFunction: `kernel[grid](*args, **kwargs)` keeps the launch."""

    def __init__(self, kernel):
        self.kernel, self.launches = kernel, []

    def __getitem__(self, grid):
        return lambda *args, **kwargs: self.launches.append((args, kwargs))


def source_and_options(kernel, args: tuple, kwargs: dict):
    """The kernel's source specialised as Triton's JIT specialises it at this launch, and the
    launch's options. The JIT's own rule (`native_specialize_impl`) types each argument and
    marks pointers whose address, and integers whose value, divide by 16 (`tt.divisibility`):
    that is what lets the compiler load 16 bytes at a time. An integer equal to 1 becomes a
    constant. (Without the marks the NF4 kernel compiled to byte-by-byte loads of its weights,
    with twice the registers a GPU launch takes.)"""
    names = [p.name for p in kernel.params]
    bound = dict(zip(names, args)) | {k: v for k, v in kwargs.items() if k in names}
    signature, constexprs, attrs = {}, {}, {}
    for i, p in enumerate(kernel.params):
        if p.is_constexpr:
            signature[p.name], constexprs[p.name] = "constexpr", bound[p.name]
            continue
        kind, attr = native_specialize_impl(CUDABackend, bound[p.name], p.is_const, True, True)
        signature[p.name] = kind
        if kind == "constexpr":
            constexprs[p.name] = attr
        elif isinstance(attr, str) and attr:
            attrs[(i,)] = CUDABackend.parse_attr(attr)
    options = {k: v for k, v in kwargs.items() if k not in names}
    return triton.compiler.ASTSource(fn=kernel, signature=signature, constexprs=constexprs, attrs=attrs), \
        options, constexprs


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
    for dtype in (torch.bfloat16, torch.float32):   # the decoder's element-wise kernels
        for rows, width in ((8 * 32, 128), (8, 4096)):   # 8 rows' query norms (a head each), a layer's
            decode_ops.rms_norm_triton(torch.randn(rows, width).to(dtype), torch.randn(width).to(dtype), 1e-6)
        q, k = torch.randn(8, 32, 1, 128).to(dtype), torch.randn(8, 8, 1, 128).to(dtype)
        decode_ops.rotary_triton(q, k, torch.randn(8, 1, 128).to(dtype), torch.randn(8, 1, 128).to(dtype))
        decode_ops.silu_mul_triton(torch.randn(8, 12288).to(dtype), torch.randn(8, 12288).to(dtype))
    rewards, groups = torch.rand(24), torch.arange(24) // 8
    advantages.group_advantages(rewards, groups, "grpo")
    advantages.group_advantages(torch.rand(10), torch.tensor([1, 2, 1, 3, 2, 1, 3, 3, 2, 1]), "gigpo",
                                traj_returns=torch.rand(4), traj_group_ids=torch.tensor([0, 0, 1, 1]),
                                step_traj=torch.tensor([0, 0, 1, 1, 2, 2, 2, 3, 3, 3]))


CUOBJDUMP = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")


def function_resources(cubin_path: str) -> dict[str, dict]:
    """For each function of a cubin (mangled name): registers a thread, stack bytes (spills),
    static shared bytes and its innermost loop's instruction mix (`loop_profile`), by the
    cuobjdump beside Triton's ptxas (empty where there is none)."""
    if not os.access(CUOBJDUMP, os.X_OK):
        return {}
    out = subprocess.run([CUOBJDUMP, "-res-usage", "-sass", cubin_path], capture_output=True, text=True).stdout
    usage = {name: dict(registers=int(reg), stack=int(stack), shared=int(shared)) for name, reg, stack, shared in
             re.findall(r"Function (\S+):\s+REG:(\d+) STACK:(\d+) SHARED:(\d+)", out)}
    sections = re.split(r"\n\s*Function : (\S+)\n", out)
    for name, sass in zip(sections[1::2], sections[2::2]):
        usage.setdefault(name, dict(registers=None, stack=None, shared=None))["loop"] = loop_profile(sass)
    return usage


def resources(cubin: bytes) -> dict:
    """Registers, stack bytes and the innermost loop of a Triton kernel's cubin (one function;
    None each where cuobjdump is missing)."""
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        found = next(iter(function_resources(f.name).values()), {})
    return dict(registers=found.get("registers"), stack=found.get("stack"), loop=found.get("loop"))


SASS_LINE = re.compile(r"^\s*/\*([0-9a-f]{4,})\*/\s+(@!?U?P[T0-9]+\s+)?([A-Z][A-Z0-9_]*)(\S*)([^;]*)")


def loop_profile(sass: str) -> dict[str, int] | None:
    """What one pass of the kernel's largest innermost loop executes, a thread: instructions,
    block-wide barriers, global loads (and those of 8 or 16 bytes), shared-memory stores and loads,
    tensor-core instructions, local-memory (spill) accesses. A loop is a backward branch and the
    instructions it jumps back over; where branches inside it part ways, a pass is the longest
    way through (ptxas copies code into each side of a branch on a uniform flag: only one side
    runs). None for a kernel without a loop. Read from SASS: what the card runs, not a timing."""
    code = [(int(m[1], 16), bool(m[2]), m[3], m[4], m[5]) for m in map(SASS_LINE.match, sass.splitlines()) if m]
    loops = [(int(t[1], 16), at) for at, _, op, _, operands in code if op == "BRA"
             for t in [re.search(r"0x([0-9a-f]+)", operands)] if t and int(t[1], 16) < at]
    inner = [(lo, hi) for lo, hi in loops if not any(lo <= a < b <= hi and (a, b) != (lo, hi) for a, b in loops)]
    if not inner:
        return None
    lo, hi = max(inner, key=lambda span: span[1] - span[0])
    loop = [line for line in code if lo <= line[0] <= hi]
    body = [(op, suffix, operands) for _, _, op, suffix, operands in loop]
    path = [body[i] for i in longest_pass(loop)]
    count = lambda *ops: sum(op.startswith(ops) for op, _, _ in path)  # noqa: E731
    return dict(instructions=len(path), barriers=count("BAR"), global_loads=count("LDG"),
                vector_loads=sum(op == "LDG" and (".64" in suffix or ".128" in suffix) for op, suffix, _ in path),
                shared=count("STS", "LDS", "STSM", "LDSM"), mma=count("HMMA", "HGMMA", "IMMA"),
                local=count("LDL", "STL"), load_lead=load_lead(body))


def longest_pass(loop: list[tuple]) -> list[int]:
    """The indices into `loop` (address, predicated, op, suffix, operands; its last line the
    backward branch) of the longest way from its first instruction to its last, along forward
    branches inside it: taken or not when predicated, taken when not."""
    index = {at: i for i, (at, *_) in enumerate(loop)}
    best: list[list[int] | None] = [None] * len(loop)  # the longest way from i to the end
    best[-1] = [len(loop) - 1]
    for i in range(len(loop) - 2, -1, -1):
        _, predicated, op, _, operands = loop[i]
        target = re.search(r"0x([0-9a-f]+)", operands) if op == "BRA" else None
        nexts = [i + 1] if op != "BRA" or predicated or not target else []
        if target and index.get(int(target[1], 16), -1) > i:
            nexts.append(index[int(target[1], 16)])
        ways = [best[j] for j in nexts if best[j] is not None]  # None: a way out of the loop
        best[i] = [i] + max(ways, key=len) if ways else None
    return best[0] or list(range(len(loop)))


def load_lead(body: list[tuple[str, str, str]]) -> int | None:
    """Instructions a loop issues between one of its widest global loads (8 or 16 bytes; the
    weights, in the NF4 kernels) and the first instruction that reads what it loaded (going
    round the loop), the least over those loads: how much work hides their latency. A few: the
    pass waits for DRAM; about a pass: the load was issued for the next pass. None for a loop
    without 8-16 byte loads."""
    def registers(text: str) -> set[int]:
        return {int(r) for r in re.findall(r"\bR(\d+)\b", text)}

    def words(op: str, suffix: str) -> int:  # 4-byte registers a load fills, 8-16 byte loads only
        return 0 if op != "LDG" else 4 if ".128" in suffix else 2 if ".64" in suffix else 0
    widest = max((words(op, suffix) for op, suffix, _ in body), default=0)
    leads = []
    for i, (op, suffix, operands) in enumerate(body):
        first = re.match(r"\s*R(\d+)", operands)
        if not widest or words(op, suffix) != widest or not first:
            continue
        loaded = set(range(int(first[1]), int(first[1]) + widest))
        for step in range(1, len(body) + 1):
            reader_op, _, reader_operands = body[(i + step) % len(body)]
            read = reader_operands if reader_op.startswith(("ST", "RED", "ATOM")) else reader_operands.partition(",")[2]
            if registers(read) & loaded:
                leads.append(step)
                break
    return min(leads) if leads else None


def compiled_launches(archs: list[int]) -> list[dict]:
    """One record a distinct launch and architecture: kernel, arch, signature, constexprs,
    options, and shared / registers / stack / loop, or error."""
    recorders, records = [], []
    policy_loss._config = lambda device: policy_loss._GPU
    nf4_matmul._config = lambda device: nf4_matmul._GPU
    decode_ops._by_bits = lambda device: False
    for module in (policy_loss, nf4_matmul, advantages, decode_ops):
        for name, value in vars(module).copy().items():
            if isinstance(value, triton.runtime.jit.JITFunction) and name.endswith("_kernel"):
                recorders.append(recorder := Recorder(value))
                setattr(module, name, recorder)
    run_launchers()
    # The NF4 kernel's variants the decoder times (nf4_matmul.VARIANTS).
    lin = nf4_linear(96, 512, True)
    for config in nf4_matmul.VARIANTS.values():
        for rows in (1, 64):
            nf4_matmul.nf4_matmul_triton(torch.randn(rows, 512).bfloat16(), nf4_weight(lin.weight), **config)
    # and the fp16 register tables (their conversion differs)
    nf4_matmul.nf4_matmul_triton(torch.randn(1, 512).half(), nf4_weight(lin.weight), registers=True)
    for recorder in recorders:
        seen = set()
        for args, kwargs in recorder.launches:
            src, options, constexprs = source_and_options(recorder.kernel, args, kwargs)
            key = (tuple(src.signature.items()), tuple(constexprs.items()), str(src.attrs),
                   tuple(options.items()))
            if key in seen:
                continue
            seen.add(key)
            for arch in archs:
                record = dict(kernel=recorder.kernel.__name__, arch=arch, signature=src.signature,
                              constexprs=constexprs, options=options)
                try:
                    compiled = triton.compile(src, target=GPUTarget("cuda", arch, 32), options=options)
                    record.update(shared=compiled.metadata.shared, **resources(compiled.asm["cubin"]),
                                  inline_asm=inline_asm_calls(compiled.asm["llir"]))
                except Exception as exc:  # the record names the launch that failed
                    record["error"] = f"{type(exc).__name__}: {str(exc)[:500]}"
                records.append(record)
    return records


def inline_asm_calls(llir: str) -> list[str]:
    """How the compiler hands its operands to each distinct PTX block the kernels write
    themselves (tl.inline_asm_elementwise; a block opening with `.reg`, unlike Triton's own
    loads and stores): "result <- operands", operands as "type vN", N numbering the distinct
    values in order, e.g. "{ <2 x i16>, <2 x i16> } <- <4 x i8> v0, i32 v1, i32 v1". What the
    assembly assumes of the packing (tl.inline_asm_elementwise's `pack`) is checked on it."""
    calls = set()
    for result, operands in re.findall(r'tail call (\{[^}]*\}|\S+) asm "\{\\0A\.reg[^"]*", "[^"]*"\(([^)]*)\)', llir):
        names: dict[str, int] = {}
        typed = [operand.rpartition(" ") for operand in operands.split(", ")]
        calls.add(f"{result} <- " + ", ".join(f"{kind} v{names.setdefault(value, len(names))}"
                                             for kind, _, value in typed))
    return sorted(calls)


CSRC = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "csrc", "nf4_matmul.cu")
TEMPLATE_PARAMS = {"nf4_matmul_kernel": ("MT", "NC", "THREADS"),
                   "nf4_mma_kernel": ("NT", "MB", "WARPS", "REGISTERS")}
CUDA_TYPES = {"13__nv_bfloat16": "bf16", "6__half": "fp16", "f": "fp32"}


def csrc_kernels(archs: list[int], nvcc: str) -> list[dict]:
    """Every kernel instance of csrc/nf4_matmul.cu compiled by `nvcc` for each arch: one record
    each (kernel, arch, launch: dtype and template arguments, shared / registers / stack /
    loop), or one error record per arch."""
    records = []
    for arch in archs:
        with tempfile.TemporaryDirectory() as tmp:
            cubin = os.path.join(tmp, "nf4_matmul.cubin")
            run = subprocess.run([nvcc, "-cubin", f"-arch=sm_{arch}", "-std=c++17", "-O3", CSRC, "-o", cubin],
                                 capture_output=True, text=True)
            if run.returncode:
                records.append(dict(kernel="csrc/nf4_matmul.cu", arch=arch, error=run.stderr[-500:]))
                continue
            for mangled, found in function_resources(cubin).items():
                name = re.search(rf"({'|'.join(TEMPLATE_PARAMS)})I(\d*\w+?)((?:L[ib]\d+E)+)EEv", mangled)
                params = TEMPLATE_PARAMS.get(name[1], ()) if name else ()
                values = re.findall(r"L[ib](\d+)E", name[3]) if name else []
                launch = ", ".join([CUDA_TYPES.get(name[2], name[2]) if name else mangled,
                                    *(f"{p} {v}" for p, v in zip(params, values))])
                records.append(dict(kernel=name[1] if name else mangled, arch=arch, launch=launch, **found))
    return records


def describe(record: dict) -> str:
    """The launch in a few words: dtype of the first pointer, the tile and the switches on."""
    if "launch" in record:  # a csrc kernel
        return record["launch"]
    dtype = next(t for t in record["signature"].values() if t.startswith("*"))[1:]
    c = record["constexprs"]
    tile = " x ".join(f"{k.removeprefix('BLOCK_')} {v}" for k, v in c.items() if k.startswith("BLOCK"))
    flags = [k.lower() for k, v in c.items() if v is True and k not in ("IEEE", "UPCAST")]
    return ", ".join([dtype, tile, *flags, f"{record['options'].get('num_warps', 4)} warps"])


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--arch", type=int, nargs="+", default=[80, 86, 90],
                        help="compute capabilities x 10 (80: A100, 86: RTX 30x0, 89: RTX 40x0, 90: H100)")
    parser.add_argument("--json", action="store_true", help="one JSON line a launch and architecture")
    parser.add_argument("--csrc", metavar="NVCC",
                        help="csrc/nf4_matmul.cu's kernels instead, compiled by this nvcc (pip install "
                             "nvidia-cuda-nvcc)")
    args = parser.parse_args()
    records = csrc_kernels(args.arch, args.csrc) if args.csrc else compiled_launches(args.arch)
    if args.json:
        for record in records:
            print(json.dumps(record, default=str))
        return
    # Launches that differ only in what the table does not show (an int's width, a pointer's
    # dtype) share a row: an error if one of them failed, else the largest figures.
    rows: dict[tuple, dict] = {}
    for r in records:
        key = (r["kernel"], describe(r), r["arch"])
        rows[key] = worst(rows[key], r) if key in rows else r
    print("| kernel | launch | arch | shared KiB | registers | spilled (stack) bytes "
          "| inner loop a pass: instructions / barriers / global loads (of 8-16 bytes) / shared / mma "
          "/ wide-load lead |")
    print("|---|---|---|---:|---:|---:|---|")
    for (kernel, launch, arch), r in rows.items():
        cells = ([f"error: {r['error'][:80]}", "", "", ""] if "error" in r else
                 [f"{r['shared'] / 1024:.0f}", str(r["registers"]), str(r["stack"]), loop_cell(r.get("loop"))])
        print(f"| {kernel} | {launch} | sm_{arch} | " + " | ".join(cells) + " |")


def loop_cell(loop: dict | None) -> str:
    if not loop:
        return "no loop"
    lead = "-" if loop.get("load_lead") is None else loop["load_lead"]
    return (f"{loop['instructions']} / {loop['barriers']} / {loop['global_loads']} ({loop['vector_loads']})"
            f" / {loop['shared']} / {loop['mma']} / {lead}")


def worst(a: dict, b: dict) -> dict:
    """The larger figures of two launches sharing a row (its loop: the longer one's)."""
    if "error" in a or "error" in b:
        return a if "error" in a else b
    loops = [r["loop"] for r in (a, b) if r.get("loop")]
    return {**{k: max(a[k], b[k]) if None not in (a[k], b[k]) else a[k] for k in ("shared", "registers", "stack")},
            "loop": max(loops, key=lambda loop: loop["instructions"]) if loops else None}


if __name__ == "__main__":
    main()
