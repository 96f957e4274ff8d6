"""NF4 small-batch matmul: the layout bitsandbytes writes, the torch reference against
bitsandbytes, the Triton kernel (interpreter) against the reference, the dispatch and its
fallbacks, swapping the kernels into Linear4bit modules, and a compile check of csrc/.

On a GPU the kernels are checked and timed by benchmarks/bench_nf4_matmul.py.
"""
import contextlib
import inspect
import json
import logging
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import bitsandbytes as bnb
import numpy as np
import pytest
import torch
import triton
import triton.language as tl
from bitsandbytes import functional as bnbf
from triton.runtime.interpreter import InterpretedFunction

import onelayer.kernels.nf4_matmul as kernel_module
import onelayer.nf4_dispatch as dispatch
from onelayer.kernels.nf4_matmul import nf4_matmul_triton, supports
from onelayer.nf4 import block_scales, dequantize_nf4_reference, nf4_linear_reference, nf4_weight

interpreted = pytest.mark.skipif(not isinstance(tl.zeros, InterpretedFunction),
                                 reason="triton was imported before TRITON_INTERPRET=1 was set")
# fp32: sums in another order; bf16 / fp16: the output may round the other way (1 ulp).
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=8e-3),
       torch.float16: dict(atol=1e-3, rtol=1e-3)}


def linear4bit(n: int, k: int, *, bias: bool = True, nested: bool = True, blocksize: int = 64,
               dtype: torch.dtype = torch.float32, weight: torch.Tensor | None = None, seed: int = 0):
    """A bitsandbytes NF4 Linear4bit [k -> n] quantised on the CPU."""
    g = torch.Generator().manual_seed(seed)
    lin = bnb.nn.Linear4bit(k, n, bias=bias, compress_statistics=nested, quant_type="nf4", compute_dtype=dtype)
    w = torch.randn(n, k, generator=g) / k ** 0.5 if weight is None else weight
    lin.weight = bnb.nn.Params4bit(w.to(dtype), requires_grad=False, compress_statistics=nested,
                                   quant_type="nf4", blocksize=blocksize, module=lin)
    if bias:
        lin.bias = torch.nn.Parameter(torch.randn(n, generator=g).to(dtype), requires_grad=False)
    lin = lin.to("cpu")  # quantises
    # Keep the row-major layout: on AVX512-BF16 CPUs bitsandbytes repacks at the first no-grad call.
    lin.support_avx512bf16_for_cpu = False
    return lin


# ---------------------------------------------------------------------------------------------
# Layout and reference
# ---------------------------------------------------------------------------------------------
def test_packed_layout_is_row_major_high_nibble_first():
    n, k, bs = 7, 96, 32
    g = torch.Generator().manual_seed(1)
    codes = torch.randint(0, 16, (n * k,), generator=g)
    codes[::bs] = 15  # code 15 is +1.0: each block's absmax is then exactly its scale
    scales = torch.rand(n * k // bs, generator=g) + 0.5
    table = bnbf.get_4bit_type("nf4", device="cpu")
    weight = (table[codes] * scales.repeat_interleave(bs)).reshape(n, k)
    lin = linear4bit(n, k, nested=False, blocksize=bs, weight=weight)
    packed = lin.weight.data
    assert packed.dtype == torch.uint8 and packed.shape == (n * k // 2, 1)
    flat = packed.reshape(-1)
    assert torch.equal(flat >> 4, codes[0::2].to(torch.uint8))   # element 2i: high nibble of byte i
    assert torch.equal(flat & 0xF, codes[1::2].to(torch.uint8))  # element 2i + 1: low nibble
    torch.testing.assert_close(lin.weight.quant_state.absmax, scales, atol=0, rtol=0)


def test_double_quantised_state_shapes():
    n, k = 77, 320  # 385 blocks of 64: two second-level blocks of 256, the last one partial
    lin = linear4bit(n, k)
    qs, w = lin.weight.quant_state, nf4_weight(lin.weight)
    assert qs.nested and qs.blocksize == 64 and qs.state2.blocksize == 256
    assert w.absmax.dtype == torch.uint8 and w.absmax.shape == (385,)
    assert w.absmax2.shape == (2,) and w.code2.shape == (256,) and w.offset.shape == (1,)
    assert w.code.shape == (16,) and w.packed.shape == (n * k // 2,) and w.shape == (n, k)
    # The scales undo the 8-bit step: close to each block's true absmax (the 8-bit error is small).
    true = linear4bit(n, k, nested=False).weight.quant_state.absmax
    torch.testing.assert_close(block_scales(w), true, atol=2e-3, rtol=2e-2)


@pytest.mark.parametrize("n, k, nested, blocksize, dtype", [
    (77, 320, True, 64, torch.float32),
    (37, 192, True, 64, torch.bfloat16),
    (40, 130, True, 64, torch.float32),    # K not a multiple of the blocksize: blocks straddle rows
    (5, 96, False, 32, torch.float32),
    (33, 128, True, 128, torch.float16),
])
def test_reference_matches_bitsandbytes(n, k, nested, blocksize, dtype):
    lin = linear4bit(n, k, nested=nested, blocksize=blocksize, dtype=dtype)
    w = nf4_weight(lin.weight)
    assert torch.equal(dequantize_nf4_reference(w, dtype), bnbf.dequantize_4bit(lin.weight.data, lin.weight.quant_state))
    x = torch.randn(3, 2, k).to(dtype)
    with torch.no_grad():
        want = lin(x)
    got = nf4_linear_reference(x, w, lin.bias)
    assert got.dtype == dtype and got.shape == (3, 2, n)
    torch.testing.assert_close(got, want, **TOL[dtype])


def test_nf4_weight_rejects_what_the_kernels_cannot_read():
    lin = bnb.nn.Linear4bit(64, 8, quant_type="fp4").to("cpu")
    with pytest.raises(ValueError, match="nf4"):
        nf4_weight(lin.weight)
    with pytest.raises(ValueError, match="quant_state"):
        nf4_weight(bnb.nn.Linear4bit(64, 8, quant_type="nf4").weight)  # not quantised yet
    assert "multiple" in supports(nf4_weight(linear4bit(40, 130).weight))
    assert supports(nf4_weight(linear4bit(40, 128).weight)) is None


# ---------------------------------------------------------------------------------------------
# Triton kernel (interpreter; CPU tiles BLOCK_N = 16, BLOCK_K = 64, up to 3 K splits)
# ---------------------------------------------------------------------------------------------
@interpreted
@pytest.mark.parametrize("m", [1, 3, 17])
@pytest.mark.parametrize("n, k", [(37, 192), (77, 320)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("use_bias", [True, False])
def test_triton_matches_reference(m, n, k, dtype, use_bias):
    lin = linear4bit(n, k, bias=use_bias, seed=m)
    w = nf4_weight(lin.weight)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    bias = lin.bias.to(dtype) if use_bias else None
    got = nf4_matmul_triton(x, w, bias)
    assert got.dtype == dtype and got.shape == (m, n)
    torch.testing.assert_close(got, nf4_linear_reference(x, w, bias), **TOL[dtype])


@interpreted
@pytest.mark.parametrize("m, n, k, nested, blocksize, dtype, splits", [
    (65, 21, 128, True, 64, torch.bfloat16, None),  # two row blocks of 64
    (2, 50, 256, False, 32, torch.float32, None),   # plain fp32 absmax, BLOCK_K = blocksize = 32
    (5, 19, 256, True, 128, torch.float16, None),   # blocksize 128: two K tiles a block
    (4, 37, 192, True, 64, torch.bfloat16, 1),      # no split: bias and rounding in the main kernel
])
def test_triton_other_layouts(m, n, k, nested, blocksize, dtype, splits):
    lin = linear4bit(n, k, nested=nested, blocksize=blocksize)
    w = nf4_weight(lin.weight)
    x = torch.randn(m, k).to(dtype)
    bias = lin.bias.to(dtype)
    got = nf4_matmul_triton(x, w, bias, splits=splits)
    torch.testing.assert_close(got, nf4_linear_reference(x, w, bias), **TOL[dtype])


@interpreted
@pytest.mark.parametrize("m, n, k, dtype, use_bias, splits", [
    (1, 37, 192, torch.float32, True, None),    # K split 3 ways, partials summed
    (3, 77, 320, torch.bfloat16, False, None),
    (17, 21, 128, torch.bfloat16, True, 1),     # no split: bias and rounding in the main kernel
    (65, 19, 256, torch.float32, False, 1),     # two row blocks of 64
])
def test_triton_with_the_weights_as_first_operand(m, n, k, dtype, use_bias, splits):
    """The variant that computes out^T = W x^T (a candidate the decoder times) gives the same
    result."""
    lin = linear4bit(n, k, bias=use_bias, seed=m)
    w = nf4_weight(lin.weight)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    bias = lin.bias.to(dtype) if use_bias else None
    got = nf4_matmul_triton(x, w, bias, splits=splits, weights_first=True)
    torch.testing.assert_close(got, nf4_linear_reference(x, w, bias), **TOL[dtype])


@interpreted
@pytest.mark.parametrize("name", [name for name in kernel_module.VARIANTS if name != "triton"])
@pytest.mark.parametrize("m, n, k, dtype, use_bias, splits", [
    (3, 77, 320, torch.bfloat16, True, None),   # K split 3 ways: each split loads from its own start
    (17, 21, 128, torch.float32, False, 1),
])
def test_triton_variants(name, m, n, k, dtype, use_bias, splits):
    """Each variant the decoder times (its loads not issued a pass ahead, 128 columns, ...) gives
    the reference's result."""
    lin = linear4bit(n, k, bias=use_bias, seed=m)
    w = nf4_weight(lin.weight)
    x = torch.randn(m, k, generator=torch.Generator().manual_seed(k)).to(dtype)
    bias = lin.bias.to(dtype) if use_bias else None
    got = nf4_matmul_triton(x, w, bias, splits=splits, **kernel_module.VARIANTS[name])
    torch.testing.assert_close(got, nf4_linear_reference(x, w, bias), **TOL[dtype])


def run_ptx(asm: str, operands: dict[int, int]) -> dict[str, int]:
    """Executes, on 32-bit values, the PTX instructions the register-table blocks use (PTX ISA:
    prmt's default mode, cvt.rn.{bf16x2,f16x2}.f32 putting its first source in the upper
    half); `operands`: $N -> value. Returns every register after the block."""
    f32 = lambda bits: np.array([bits], np.uint32).view(np.float32)  # noqa: E731
    half_bits = {"bf16x2": lambda v: torch.from_numpy(v).to(torch.bfloat16).view(torch.int16).item() & 0xFFFF,
                 "f16x2": lambda v: int(v.astype(np.float16).view(np.uint16)[0])}

    def prmt(a: int, b: int, c: int) -> int:
        source = [(a >> 8 * i) & 0xFF for i in range(4)] + [(b >> 8 * i) & 0xFF for i in range(4)]
        out = 0
        for i in range(4):
            select = (c >> 4 * i) & 0xF
            byte = source[select & 7]
            out |= ((0xFF if byte & 0x80 else 0) if select & 8 else byte) << 8 * i
        return out

    ops = {"mov.b32": lambda a: a, "and.b32": lambda a, b: a & b, "or.b32": lambda a, b: a | b,
           "xor.b32": lambda a, b: a ^ b, "shl.b32": lambda a, b: a << b, "shr.b32": lambda a, b: a >> b,
           "prmt.b32": prmt, "mul.rn.f32": lambda a, b: int((f32(a) * f32(b)).view(np.uint32)[0])}
    ops |= {f"cvt.rn.{kind}.f32": lambda a, b, bits=bits: bits(f32(a)) << 16 | bits(f32(b))
            for kind, bits in half_bits.items()}
    regs = {f"${n}": value for n, value in operands.items()}
    for line in asm.splitlines():
        if line in ("{", "}") or line.startswith(".reg"):
            continue
        op, _, rest = line.rstrip(";").partition(" ")
        dest, *sources = rest.split(", ")
        regs[dest] = ops[op](*(regs[t] if t in regs else int(t, 0) for t in sources)) & 0xFFFFFFFF
    return regs


@pytest.mark.parametrize("dtype, name", [(torch.bfloat16, "_BF16_TABLE_ASM"), (torch.float16, "_FP16_TABLE_ASM")])
def test_register_table_assembly_picks_the_gather_paths_weights(dtype, name):
    """The register-table PTX (_Config.registers; GPU only: the interpreter cannot run it),
    executed instruction by instruction: for every byte and scales across the range, the even
    and odd weights are round(code[nibble] * scale), bit for bit what the gather path makes,
    in the registers Triton reads (4 bytes in $4, 16-bit pairs low element first: $0-$1 even,
    $2-$3 odd; each table plane's first of 4 repeated registers)."""
    code = nf4_weight(linear4bit(8, 64).weight).code
    bits = lambda t: t.view(torch.int32).item() & 0xFFFFFFFF  # noqa: E731
    g = torch.Generator().manual_seed(0)
    scales = torch.cat([torch.tensor([1.0, 0.0, 1e-30, 3e4, -0.7]), torch.rand(4, generator=g) * 2])
    for scale in scales:
        table = run_ptx(getattr(kernel_module, name).value,
                        {8: bits(scale)} | {9 + i: bits(c) for i, c in enumerate(code)})
        planes = {5 + 4 * p: table[f"${p}"] for p in range(8)}  # the first of each plane's 4 registers
        want = (code[:, None] * scale).to(dtype).view(torch.int16).int() & 0xFFFF  # [nibble] -> bits
        for word in range(0, 256, 4):
            packed = sum(((word + j) * 37 % 256) << 8 * j for j in range(4))  # all 256 bytes, shuffled
            noise = {5 + 4 * p + r: (p * 7919 + r * 104729) & 0xFFFFFFFF for p in range(8) for r in range(1, 4)}
            got = run_ptx(kernel_module._LOOKUP_ASM.value, {4: packed} | planes | noise)
            byte = [(packed >> 8 * j) & 0xFF for j in range(4)]
            even = [int(want[b >> 4]) for b in byte]
            odd = [int(want[b & 0xF]) for b in byte]
            assert [got[f"${i}"] for i in range(4)] == [even[0] | even[1] << 16, even[2] | even[3] << 16,
                                                        odd[0] | odd[1] << 16, odd[2] | odd[3] << 16]


def test_register_tables_only_where_a_thread_holds_four_bytes_of_a_row():
    """The register tables read 4 bytes of one row a register; where a thread holds fewer
    bytes of a tile (32 x 32 at 64 rows, blocksize 32), Triton would pack two rows' bytes into
    one, so those launches keep the gather path; so do fp32 and the interpreter."""
    gpu = kernel_module._GPU._replace(registers=True)
    fits = kernel_module._tables_fit
    assert fits(gpu, torch.bfloat16, 256, 64) and fits(gpu, torch.float16, 32, 64)  # 32 and 4 bytes a thread
    assert not fits(gpu, torch.bfloat16, 32, 32)                                   # 2 bytes a thread
    assert fits(gpu._replace(num_warps=4), torch.bfloat16, 16, 64)
    assert not fits(gpu, torch.float32, 256, 64)
    assert not fits(kernel_module._CPU._replace(registers=True), torch.bfloat16, 256, 64)


def test_candidates_include_the_triton_variants(monkeypatch):
    """Without the CUDA C++ extension the decoder times bitsandbytes, the Triton kernel and each
    of its VARIANTS, each launching with its switches."""
    monkeypatch.setattr(dispatch, "native_extension", lambda: (None, "nvcc not found"))
    candidates = dispatch.route_candidates(torch.device("cuda"), torch.bfloat16)
    assert list(candidates) == ["bnb", "triton", "triton weights-first", "triton no prefetch", "triton 128 columns",
                                "triton register table", "triton 128 columns register table"]
    assert candidates["bnb"] is None
    launched = []

    class Recorder:
        def __getitem__(self, grid):
            return lambda *args, **kwargs: launched.append(
                (kwargs["BLOCK_N"], kwargs["WEIGHTS_FIRST"], kwargs["PREFETCH"], kwargs["REGISTERS"])
                if "PREFETCH" in kwargs else "sum")
    monkeypatch.setattr(kernel_module, "_nf4_matmul_kernel", Recorder())
    monkeypatch.setattr(kernel_module, "_sum_splits_kernel", Recorder())
    monkeypatch.setattr(kernel_module, "_CPU", kernel_module._GPU)  # CPU tensors, the GPU tiles
    w = nf4_weight(linear4bit(21, 128).weight)
    for name in list(candidates)[1:]:
        candidates[name](torch.zeros(3, 128, dtype=torch.bfloat16), w, None)
    assert [flags for flags in launched if flags != "sum"] == [
        (256, False, True, False), (256, True, True, False), (256, False, False, False), (128, False, True, False),
        (256, False, True, True), (128, False, True, True)]
    launched.clear()
    candidates["triton register table"](torch.zeros(3, 128), w, None)  # fp32 x: no 16-bit table
    assert launched[0] == (256, False, True, False)


def test_candidates_include_the_tensor_core_variants_where_they_run(monkeypatch):
    """With the CUDA C++ extension: its FMA kernel for every dtype, and on sm_80+ for 16-bit
    inputs the tensor-core kernel twice, the second with its tables in registers."""
    calls = []

    class FakeExt:
        @staticmethod
        def nf4_matmul_mma(*args):
            calls.append(args[-1])
    monkeypatch.setattr(dispatch, "native_extension", lambda: (FakeExt, ""))
    for major, dtype, mma in [(8, torch.bfloat16, True), (9, torch.float16, True), (7, torch.bfloat16, False),
                              (9, torch.float32, False)]:
        monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device, major=major: (major, 0))
        names = list(dispatch.route_candidates(torch.device("cuda"), dtype))
        tail = ["cuda", "cuda mma", "cuda mma register table"] if mma else ["triton 128 columns register table", "cuda"]
        assert names[-len(tail):] == tail
    w = nf4_weight(linear4bit(21, 128).weight)
    candidates = dispatch.route_candidates(torch.device("cuda"), torch.bfloat16)
    for name in dispatch.MMA_VARIANTS:
        candidates[name](torch.zeros(3, 128, dtype=torch.bfloat16), w, None)
    assert calls == [False, True]  # the binding's `registers`


@interpreted
@pytest.mark.parametrize("m, dtype", [(5, torch.bfloat16), (17, torch.float32), (40, torch.bfloat16)])
def test_triton_narrows_the_weight_tile_for_wide_row_blocks(monkeypatch, m, dtype):
    """A 64-column tile at <= 16 rows becomes 32 columns at 32 rows and 16 at 64 (the GPU's
    256 -> 128 -> 64): same result, tile edges inside N."""
    monkeypatch.setattr(kernel_module, "_CPU", kernel_module._CPU._replace(block_n=64))
    block_m = max(16, triton.next_power_of_2(m))
    assert kernel_module.block_n_for(kernel_module._CPU, block_m) == {16: 64, 32: 32, 64: 16}[block_m]
    assert kernel_module.block_n_for(kernel_module._GPU, block_m) == {16: 256, 32: 128, 64: 64}[block_m]
    lin = linear4bit(72, 128, seed=m)
    w = nf4_weight(lin.weight)
    x = torch.randn(m, 128, generator=torch.Generator().manual_seed(m)).to(dtype)
    got = nf4_matmul_triton(x, w, lin.bias.to(dtype), splits=2)
    torch.testing.assert_close(got, nf4_linear_reference(x, w, lin.bias.to(dtype)), **TOL[dtype])


def test_triton_strided_input_and_bad_shapes():
    lin = linear4bit(21, 128)
    w = nf4_weight(lin.weight)
    x = torch.randn(128, 3).T  # column stride 3
    torch.testing.assert_close(nf4_matmul_triton(x, w), nf4_linear_reference(x, w), **TOL[torch.float32])
    with pytest.raises(ValueError, match="must be"):
        nf4_matmul_triton(torch.randn(3, 64), w)
    with pytest.raises(ValueError, match="multiple"):
        nf4_matmul_triton(torch.randn(3, 130), nf4_weight(linear4bit(40, 130).weight))


@interpreted
def test_triton_allocates_no_dequantised_weight(monkeypatch):
    """Every tensor torch allocates around the kernel (the launches themselves run unprobed):
    the output and the split-K partials, nothing of the weight's size."""
    from test_kernels import largest_allocation
    m, n, k = 3, 300, 512
    w = nf4_weight(linear4bit(n, k).weight)
    x = torch.randn(m, k).to(torch.bfloat16)
    with largest_allocation(monkeypatch) as probe:
        nf4_matmul_triton(x, w)
    assert 0 < probe.largest <= 3 * m * n * 4  # at most 3 splits (CPU tiles) of fp32 [M, N]
    assert probe.largest * 16 < n * k * 2      # a bf16 copy of W


# ---------------------------------------------------------------------------------------------
# Dispatch: the CUDA C++ loader's reasons, backend choice, the one log line
# ---------------------------------------------------------------------------------------------
def test_native_loader_says_why_not(monkeypatch, tmp_path):
    from torch.utils import cpp_extension
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert dispatch.build_native(str(tmp_path)) == (None, "no CUDA device")
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", None)
    ext, why = dispatch.build_native(str(tmp_path))
    assert ext is None and "nvcc not found" in why
    fake_home = tmp_path / "cuda"
    (fake_home / "bin").mkdir(parents=True)
    (fake_home / "bin" / "nvcc").touch()
    monkeypatch.setattr(cpp_extension, "CUDA_HOME", str(fake_home))
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: False)
    assert "ninja" in dispatch.build_native(str(tmp_path))[1]
    monkeypatch.setattr(cpp_extension, "is_ninja_available", lambda: True)

    def failing_load(**kwargs):
        assert [p.split("/")[-1] for p in kwargs["sources"]] == ["nf4_matmul.cpp", "nf4_matmul.cu"]
        raise RuntimeError("Error building extension 'onelayer_nf4_matmul'\nnf4_matmul.cu(1): error\nninja: stopped")
    monkeypatch.setattr(cpp_extension, "load", failing_load)
    ext, why = dispatch.build_native(str(tmp_path))
    assert ext is None and why == "the CUDA C++ build failed (Error building extension 'onelayer_nf4_matmul')"


def test_sources_are_packaged_links():
    """The build reads csrc/ through the package's links (package data): every source, and
    every header they include."""
    repository = Path(__file__).resolve().parent.parent / "csrc"
    assert sorted(p.name for p in dispatch.CSRC.iterdir()) == sorted(p.name for p in repository.iterdir())
    for name in dispatch.SOURCES:
        assert (dispatch.CSRC / name).is_file()


def test_routes_fall_back_to_triton_with_one_log_line(monkeypatch, caplog):
    cuda = torch.device("cuda")
    monkeypatch.setattr(dispatch, "native_extension", lambda: (None, "nvcc not found (reason)"))
    dispatch._log_fallback.cache_clear()
    with caplog.at_level(logging.WARNING, logger="onelayer"):
        for _ in range(3):
            routes = dispatch.choose_routes(cuda)
    assert routes == ((2, None), (4, nf4_matmul_triton), (16, nf4_matmul_triton))
    lines = [r.getMessage() for r in caplog.records if r.name == "onelayer"]
    assert lines == ["NF4 matmul: using the Triton kernel, not the CUDA C++ one: nvcc not found (reason)"]
    with pytest.raises(RuntimeError, match="nvcc not found"):
        dispatch.choose_routes(cuda, prefer="native")
    with pytest.raises(ValueError, match="prefer"):
        dispatch.choose_routes(cuda, prefer="cublas")


def test_routes_follow_the_measured_table(monkeypatch):
    calls = []

    class FakeExt:
        @staticmethod
        def nf4_matmul(*args):
            calls.append(args)
            return "native"
    monkeypatch.setattr(dispatch, "native_extension", lambda: (FakeExt, ""))
    routes = dispatch.choose_routes(torch.device("cuda"))
    picked = [dispatch._route(routes, m) for m in (1, 2, 3, 4, 5, 16, 17, 64)]
    assert picked[:2] == [None, None] and picked[4:6] == [nf4_matmul_triton] * 2 and picked[6:] == [None, None]
    w = nf4_weight(linear4bit(21, 128).weight)
    assert picked[2](torch.zeros(3, 128), w, None) == "native" and picked[3] is picked[2]
    assert calls[0][1] is w.packed and calls[0][-2:] == (21, 64)  # n, blocksize
    assert dispatch.choose_routes(torch.device("cuda"), prefer="native")[0][0] == dispatch.MAX_ROWS
    assert dispatch.choose_routes(torch.device("cuda"), prefer="triton") == ((dispatch.MAX_ROWS, nf4_matmul_triton),)
    assert dispatch.choose_routes(torch.device("cpu")) == ((dispatch.MAX_ROWS, nf4_matmul_triton),)


@interpreted
def test_measured_routes_take_the_fastest_kernel_that_agrees(caplog):
    """Each bucket of rows takes its fastest candidate, but keeps the H100 table's kernel when
    that is within MARGIN of it; one that differs from the reference is never timed nor
    chosen, however fast, and says so once; so is one that raises."""
    modules = [linear4bit(21, 128, seed=1), linear4bit(40, 64, bias=False, seed=2)]

    def wrong(x, w, bias):
        return nf4_matmul_triton(x, w, bias) * 1.01

    def other(x, w, bias):  # right, and as fast as its clock says
        return nf4_matmul_triton(x, w, bias)

    def broken(x, w, bias):
        raise RuntimeError("nf4_matmul_mma: needs compute capability 8.0")

    speed = {"bnb": lambda rows: 3.0 if rows <= 2 or rows == 64 else 9.0, "triton": lambda rows: 5.0,
             "wrong": lambda rows: 1.0, "other": lambda rows: 2.0 if rows in (16, 32) else 4.8}
    timed = []

    def clock(name, rows, one_pass):
        outputs = one_pass()
        assert len(outputs) == 2 and outputs[0].shape == (rows, 21)
        timed.append((name, rows))
        return speed[name](rows)

    dispatch._DISAGREED.clear()
    candidates = {"bnb": None, "triton": nf4_matmul_triton, "wrong": wrong, "other": other, "broken": broken}
    with caplog.at_level(logging.WARNING, logger="onelayer"):
        routes, line, seconds = dispatch.measure_routes(modules, candidates, dtype=torch.float32, clock=clock)
    # 1-2: bnb, the table's and the fastest; 3-4: the table's "cuda" is not a candidate, so the
    # fastest; 5-8: the table's triton, 4% slower than "other"; 9-32: "other", 2.5x faster than
    # triton (16) and bnb (32); 33-64: bnb, the table's and the fastest.
    assert routes == ((2, None), (4, other), (8, nf4_matmul_triton), (32, other), (64, None))
    assert line == "rows 1-2 bnb, 3-4 other, 5-8 triton, 9-32 other, 33-64 bnb, more bnb"
    assert [dispatch._route(routes, r) for r in (1, 3, 5, 9, 32, 33, 65)] == [None, other, nf4_matmul_triton,
                                                                               other, other, None, None]
    assert {name for name, _ in timed} == {"bnb", "triton", "other"}
    assert seconds[16] == {"bnb": 9.0, "triton": 5.0, "other": 2.0} and list(seconds) == list(dispatch.BUCKETS)
    assert dispatch.Measured(routes, line, {1: {"bnb": 3e-6, "triton": 5e-6}, 2: {"bnb": 1e-5}}).timings() == \
        "1: bnb 3, triton 5 us; 2: bnb 10 us"
    warnings = [r.getMessage() for r in caplog.records if r.name == "onelayer"]
    assert warnings == ["NF4 matmul: wrong is not used: at 1 rows, against the torch reference, relative error 1.0e-02",
                        "NF4 matmul: broken is not used: at 1 rows, against the torch reference, failed: "
                        "RuntimeError: nf4_matmul_mma: needs compute capability 8.0"]


@pytest.mark.parametrize("capturable", [True, False])
def test_routes_are_timed_as_graph_replays(monkeypatch, capturable):
    """The decoder's routes are timed as its decode step runs them, replays of a CUDA graph: the
    pass runs once on a side stream (compiles and first allocations), then is captured and its
    replay timed; a pass that cannot be captured is timed eagerly. (Fakes of torch.cuda: CI
    has no GPU; gpu_check.sh runs the real one.)"""
    events = []

    class Stream:
        def wait_stream(self, other):
            events.append("wait")

    @contextlib.contextmanager
    def on_stream(stream):
        events.append("side stream")
        yield
        events.append("main stream")

    class Graph:
        def replay(self):
            events.append("replay")

    @contextlib.contextmanager
    def capture(graph):
        events.append("capture")
        yield
        if not capturable:
            raise RuntimeError("operation not permitted when stream is capturing")

    for name, fake in dict(Stream=Stream, stream=on_stream, current_stream=Stream, CUDAGraph=Graph,
                           graph=capture).items():
        monkeypatch.setattr(torch.cuda, name, fake)
    monkeypatch.setattr(dispatch, "cuda_clock", lambda name, rows, one_pass: [one_pass() for _ in range(4)] and 7.0)
    assert dispatch.cuda_graph_clock("triton", 8, lambda: events.append("pass")) == 7.0
    assert events[:6] == ["wait", "side stream", "pass", "main stream", "wait", "capture"]
    assert events[6:] == (["pass"] + ["replay"] * 4 if capturable else ["pass"] * 5)
    assert inspect.signature(dispatch.measure_routes).parameters["clock"].default is dispatch.cuda_graph_clock


def test_nf4_linear_on_cpu_is_bitsandbytes():
    lin = linear4bit(21, 128)
    x = torch.randn(2, 3, 128)
    want = bnb.matmul_4bit(x, lin.weight, bias=lin.bias, quant_state=lin.weight.quant_state)
    assert torch.equal(dispatch.nf4_linear(x, lin.weight, lin.bias), want)


# ---------------------------------------------------------------------------------------------
# Swapping the kernels into a model's Linear4bit modules
# ---------------------------------------------------------------------------------------------
class _Net(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.up = linear4bit(192, 128, seed=1)
        self.odd = linear4bit(13, 192, seed=2)           # N = 13: less than one tile
        self.skip = linear4bit(24, 130, seed=3)          # K = 130: the kernels cannot read it
        self.down = linear4bit(130, 192, bias=False, seed=4)
        self.plain = torch.nn.Linear(130, 8)

    def forward(self, x):
        h = torch.relu(self.up(x))
        return self.plain(self.down(h)) + self.odd(h).sum(-1, keepdim=True) + self.skip(self.down(h)).mean()


@interpreted
def test_nf4_kernels_swaps_and_restores_forwards():
    net = _Net()
    x = torch.randn(2, 3, 128)  # 6 rows
    with torch.no_grad():
        want = net(x)
    spy_calls = []
    original = net.up.forward
    net.up.forward = lambda t: spy_calls.append(t.shape) or original(t)  # a hook's wrapper, say
    with torch.no_grad(), dispatch.nf4_kernels(net, prefer="triton", cpu=True) as switched:
        assert switched == 3  # up, odd, down; not skip
        got = net(x)
        assert spy_calls == []             # 6 rows: the kernel, not the previous forward
        net.up(torch.randn(65, 128))       # 65 rows > MAX_ROWS: the previous forward
        assert spy_calls == [(65, 128)]
    torch.testing.assert_close(got, want, **TOL[torch.float32])
    assert net.up.forward.__name__ == "<lambda>"  # the wrapper is back
    for name in ("odd", "skip", "down"):
        assert "forward" not in getattr(net, name).__dict__
    del net.up.forward
    with torch.no_grad():
        assert torch.equal(net(x), want)


@interpreted
def test_nf4_kernels_keeps_bitsandbytes_for_gradients_and_cpu():
    net = _Net()
    x = torch.randn(4, 128, requires_grad=True)
    with torch.no_grad():
        want = net(x)
    with dispatch.nf4_kernels(net, prefer="triton", cpu=True):
        net(x).sum().backward()  # the kernels have no backward: bitsandbytes' path runs
    assert x.grad is not None and x.grad.abs().sum() > 0
    with torch.no_grad(), dispatch.nf4_kernels(net, prefer="triton") as switched:  # cpu=False
        assert switched == 3
        assert torch.equal(net(x), want)


# ---------------------------------------------------------------------------------------------
# CI compile check of the CUDA source (no GPU needed; skipped where no nvcc is installed)
# ---------------------------------------------------------------------------------------------
def find_nvcc() -> str | None:
    """nvcc of $CUDA_HOME, else on PATH, else of the pip package nvidia-cuda-nvcc (.ci/run)."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    if found := shutil.which("nvcc"):
        return found
    try:
        import nvidia
    except ImportError:
        return None
    return next((str(p) for root in nvidia.__path__ for p in sorted(Path(root).glob("cu*/bin/nvcc"))), None)


def test_cuda_source_compiles_for_ampere_ada_hopper():
    """Every kernel of csrc/nf4_matmul.cu compiles for sm_80 / 89 / 90 (benchmarks/compile_kernels.py
    --csrc, from its machine code); the tensor-core kernel spills no registers (its tables in
    registers only up to 16 rows, one tile a warp: there they fit), and up to 32 rows issues
    the next chunk's weight loads before this chunk's lookups and MMAs (hundreds of
    instructions between a load and the first read of it; 52-137 when each chunk loaded its own)."""
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.skip("no nvcc (pip install nvidia-cuda-nvcc nvidia-cuda-cccl)")
    root = Path(__file__).resolve().parent.parent
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, str(root / "benchmarks" / "compile_kernels.py"), "--json", "--arch", "80",
                          "89", "90", "--csrc", nvcc], capture_output=True, text=True, timeout=600,
                         env={**env, "PYTHONPATH": str(root)})
    assert run.returncode == 0, run.stderr[-3000:]
    records = [json.loads(line) for line in run.stdout.splitlines()]
    assert not [r for r in records if "error" in r], [r for r in records if "error" in r][:1]
    assert {(r["kernel"], r["arch"]) for r in records} == {(k, a) for k in ("nf4_matmul_kernel", "nf4_mma_kernel")
                                                          for a in (80, 89, 90)}
    mma = [r for r in records if r["kernel"] == "nf4_mma_kernel"]
    assert all(r["stack"] == 0 for r in mma), [(r["arch"], r["launch"], r["stack"]) for r in mma]
    registers = {re.sub(r"^\w+, ", "", r["launch"]) for r in mma if r["launch"].endswith("REGISTERS 1")}
    assert registers == {"NT 1, MB 1, WARPS 16, REGISTERS 1", "NT 1, MB 2, WARPS 16, REGISTERS 1"}
    ahead = [r for r in mma if int(re.search(r"MB (\d+)", r["launch"])[1]) <= 4]
    assert len(ahead) == 3 * 2 * (5 + 2)  # archs x dtypes x (NT, MB) instances up to 32 rows, + 2 with registers
    assert all(r["loop"]["load_lead"] >= 200 for r in ahead), [(r["launch"], r["loop"]) for r in ahead]


def find_cuda_runtime_header() -> Path | None:
    """cuda_runtime.h of $CUDA_HOME, of the pip package nvidia-cuda-runtime (.ci/run), or beside
    the nvcc found."""
    roots = [os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")]
    try:
        import nvidia
        roots += [str(p.parent.parent) for root in nvidia.__path__ for p in Path(root).glob("*/include/cuda_runtime.h")]
    except ImportError:
        pass
    if nvcc := find_nvcc():
        roots.append(str(Path(nvcc).resolve().parent.parent))
    return next((Path(r) / "include" / "cuda_runtime.h" for r in roots
                 if r and (Path(r) / "include" / "cuda_runtime.h").is_file()), None)


@pytest.mark.parametrize("dtype, flag", [(torch.float16, 1), (torch.bfloat16, 2)])
def test_cuda_register_table_lookups_give_the_references_weights(tmp_path, dtype, flag):
    """csrc/nf4_lookup.cuh (the tensor-core kernel's REGISTERS variant), compiled for the CPU
    with prmt emulated (tests/nf4_lookup_host.cpp): for every byte at every position of a word
    and scales across the range, the A-operand registers hold (weight of the high nibble, of
    the low nibble), each round(code[nibble] * scale) bit for bit as the torch reference makes
    it from bitsandbytes' NF4 code (which the header's constants must equal)."""
    cxx = shutil.which("g++") or shutil.which("c++")
    runtime = find_cuda_runtime_header()
    if cxx is None or runtime is None:
        pytest.skip("no C++ compiler or no CUDA headers (pip install nvidia-cuda-nvcc)")
    exe = tmp_path / "lookups"
    build = subprocess.run([cxx, "-std=c++17", "-O1", f"-I{dispatch.CSRC}", f"-I{runtime.parent}",
                            str(Path(__file__).with_name("nf4_lookup_host.cpp")), "-o", str(exe)],
                           capture_output=True, text=True, timeout=300)
    assert build.returncode == 0, build.stderr[-3000:]
    code = nf4_weight(linear4bit(8, 64).weight).code
    g = torch.Generator().manual_seed(0)
    scales = torch.cat([torch.tensor([1.0, 0.0, 1e-30, 3e4, -0.7]), torch.rand(4, generator=g) * 2])
    bits = scales.view(torch.int32).tolist()
    run = subprocess.run([str(exe)], input=" ".join(map(str, [flag] + [b & 0xFFFFFFFF for b in bits])),
                         capture_output=True, text=True, timeout=60)
    assert run.returncode == 0, run.stderr
    printed = torch.tensor([int(v) for v in run.stdout.split()])
    assert printed[:16].tolist() == [b & 0xFFFFFFFF for b in code.view(torch.int32).tolist()]  # nf4_code
    got = printed[16:].reshape(len(scales), 256, 4)
    byte = (torch.arange(256)[:, None] + torch.arange(4)) % 256               # [word, position]
    for scale, lookups in zip(scales, got):
        want = (code * scale).to(dtype).view(torch.int16).long() & 0xFFFF     # [nibble] -> bits
        assert torch.equal(lookups, want[byte >> 4] | want[byte & 15] << 16), float(scale)


def test_torch_binding_compiles_against_torch_headers(tmp_path):
    """csrc/nf4_matmul.cpp (both entry points) against the installed torch's headers and the CUDA
    runtime headers of the pip nvcc, syntax only: a mistake in the binding shows here, not at
    the first build on a GPU machine. The CPU torch wheel ships the c10/cuda headers but not
    the one CMake generates for CUDA builds; a stand-in defines what it would."""
    from torch.utils.cpp_extension import include_paths
    cxx = shutil.which("g++") or shutil.which("c++")
    runtime = find_cuda_runtime_header()
    if cxx is None or runtime is None:
        pytest.skip("no C++ compiler or no CUDA runtime headers (pip install nvidia-cuda-nvcc)")
    macros = tmp_path / "c10" / "cuda" / "impl" / "cuda_cmake_macros.h"
    macros.parent.mkdir(parents=True)
    macros.write_text("#define C10_CUDA_BUILD_SHARED_LIBS\n")
    import sysconfig
    run = subprocess.run([cxx, "-std=c++20", "-fsyntax-only", "-w", *(f"-I{p}" for p in include_paths()),
                          f"-I{tmp_path}", f"-I{runtime.parent}", f"-I{sysconfig.get_paths()['include']}",
                          "-DTORCH_EXTENSION_NAME=onelayer_nf4_matmul", str(dispatch.CSRC / "nf4_matmul.cpp")],
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-3000:]


def test_benchmark_script_runs_on_cpu():
    """benchmarks/bench_nf4_matmul.py --smoke: its checks and tables on CPU (Triton under the
    interpreter), so that the GPU run does not fail on the script itself."""
    script = Path(dispatch.__file__).resolve().parent.parent / "benchmarks" / "bench_nf4_matmul.py"
    env = {**os.environ, "PYTHONPATH": str(script.parent.parent)}
    run = subprocess.run([sys.executable, str(script), "--smoke"], capture_output=True, text=True, env=env,
                         timeout=300)
    assert run.returncode == 0, run.stdout[-2000:] + run.stderr[-2000:]
    checks = 2 * len(kernel_module.VARIANTS)  # two shapes a Triton variant on CPU
    assert f"CHECKS {checks}/{checks} ok" in run.stdout and "fastest over a layer, by M:" in run.stdout

