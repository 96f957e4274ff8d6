"""x @ W^T for a frozen NF4 weight at small batch (decode: M = batch rows, 1..64), reading the
4-bit weight once and dequantising it in registers: no bf16 copy of W is ever written.

Torch reference and oracle: `onelayer.nf4.nf4_linear_reference` (layout and semantics there).
Dispatch between this kernel, the CUDA C++ one (csrc/) and bitsandbytes: `onelayer.nf4_dispatch`.

Why the tiles are what they are. Decode is weight-read bound: at M = 8, a [4096 x 4096] NF4
weight is 8.4 MB and 0.27 GFLOP, i.e. 32 FLOP per byte against ~330 for an H100 (990 TFLOP/s
over 3 TB/s). So each program owns a BLOCK_N slice of the outputs and streams its weight rows
exactly once, for all M rows of x at once (x is at most 64 x 12288 bf16 = 1.5 MiB and stays
in L2). A [BLOCK_N, BLOCK_K] weight tile is BLOCK_N x BLOCK_K / 2 bytes; its byte j of row n
holds W[n, k0 + 2j] (high nibble) and W[n, k0 + 2j + 1] (low nibble), so the two nibble tiles
are multiplied with the even and the odd columns of x: no interleave of the weight in
registers. BLOCK_K divides the quantisation block (64), so a tile row has one scale: the
double-quantised absmax is undone once per row and tile, not per element. tl.dot needs at
least 16 rows, so M is padded to BLOCK_M >= 16 with masked (zero) rows; the tensor cores have
FLOPs to spare. When N / BLOCK_N programs cannot fill the GPU (k/v projections: N = 1024) K is
split, each split writes an fp32 partial and a second small kernel sums them, adds the bias
and rounds.

Measured on an H100 (2026-11-27, benchmarks/bench_nf4_matmul.py --tune, one Qwen3-8B layer's
7 projections): BLOCK_N = 256 with 8 warps is the fastest of the tiles tried (255 us at M = 1,
268 at M = 8, 290 at M = 16; BLOCK_N = 64 / 4 warps: 290, 325, 376), and num_stages must
stay 1: with 2 or more Triton pipelines the NF4 table lookups (gathers) through cp.async and
shared memory, and the kernel runs 6-8x slower (2,139 us at M = 1). So the pipelining is done
by hand (`_Config.prefetch`, since 2026-12-08, after those timings): each pass of the K loop
first issues the next pass's weight and scale loads, then does its own lookups and dots, so
DRAM latency overlaps work instead of stalling it. In the machine code (compile_kernels.py,
"wide-load lead", bf16) the weight bytes are first read 72-494 instructions after their load,
against 3-22 when each pass loaded its own tile. Not yet timed: the decoder times the kernel
with and without it (`onelayer.nf4_dispatch.route_candidates`).

BLOCK_N is the tile at M <= 16. Wider row blocks take proportionally narrower tiles
(`block_n_for`), so that the accumulator stays BLOCK_N x 16. The H100 run above took 413 us at
M = 32 and 819 at M = 64 with 256 columns (twice the time at 16 rows) and gave those rows to
bitsandbytes; whether the narrower tiles win them back is for a GPU to measure (`--tune`; the
decoder measures its routes at its start). Compiled as a launch specialises it
(benchmarks/compile_kernels.py, bf16), 256 columns take 167-172 registers a thread at 32 rows
and 254-255 at 64, without spilling; 128 and 64 columns take 80-109 and 78-90 (with the
prefetch; 80-106 and 74-82 without).

What a pass of the K loop executes, read from the machine code (compile_kernels.py, bf16, 8
rows): ~20 instructions a thread per weight byte in every tile tried (64-256 columns, 2-8 warps,
either operand order), most of them the table lookups (an address and a load per weight) and
the scaling; and with 256 columns, 36 block-wide barriers, where the dequantised tile goes
through a 4 KiB shared-memory scratch in pieces to reach the tensor cores' layout (9-10 with
the weights as first operand, 2 with 128 columns). An estimate from those counts: at ~0.6 warp
instructions per weight byte, issuing 4 a clock on each of an H100's 132 SMs at 1.755 GHz
caps the kernel near 1.5 TB/s, half the card's bandwidth; the measured ~400 GB/s suggests
most of the rest is waiting (barriers, one tile of loads in flight). Not timings: the decoder
times both operand orders (`onelayer.nf4_dispatch.route_candidates`). (Counts from before the
prefetch; with it, 556-580 instructions at 16 rows; with the lookups from a table in registers
instead of memory, `_Config.registers`, 470-475, 14 barriers and no table loads.)
"""
from __future__ import annotations

from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from onelayer.nf4 import NF4Weight


class _Config(NamedTuple):
    block_n: int
    block_k: int      # upper bound; the launch uses min(block_k, blocksize)
    num_warps: int
    num_stages: int
    max_splits: int   # split-K upper bound
    upcast: bool      # interpreter: dot operands to fp32 (its tl.dot garbles bf16) and bf16
                      # rounding done on the bits (it truncates fp32 -> bf16 casts)
    weights_first: bool = False  # the weight tile as the dot's first operand, out^T = W x^T:
                      # no transpose of the [BLOCK_N, BLOCK_K] tile, and on Hopper wgmma may
                      # read it from registers (its first operand only). Not yet timed on a GPU:
                      # benchmarks/bench_nf4_matmul.py --tune compares both
    prefetch: bool = True  # each pass of the K loop issues the next pass's weight and scale
                      # loads before its own lookups and dots (software pipelining by hand:
                      # num_stages must stay 1). Not yet timed on a GPU: the decoder times
                      # both at its start (nf4_dispatch.route_candidates), as does --tune
    registers: bool = False  # 16-bit x on a GPU: the NF4 lookups from a per-row table of the 16
                      # scaled weights in registers, by byte permutes (_table_asm, _lookup_asm),
                      # not from memory. Not yet timed on a GPU (the interpreter cannot run PTX:
                      # there this switch changes nothing)


# GPU: measured (module docstring). CPU (TRITON_INTERPRET=1, tests only): small tiles and up
# to 3 splits so that small test shapes cross tile and split edges.
_GPU = _Config(block_n=256, block_k=64, num_warps=8, num_stages=1, max_splits=16, upcast=False)
_CPU = _Config(block_n=16, block_k=64, num_warps=4, num_stages=1, max_splits=3, upcast=True)


def _config(device: torch.device) -> _Config:
    return _GPU if device.type == "cuda" else _CPU


# What the decoder times at its start besides the configuration above, as `_Config` fields
# (onelayer.nf4_dispatch.route_candidates; benchmarks/bench_nf4_matmul.py has a column each):
# the choices that no GPU has timed yet. 128 columns at up to 16 rows, against 256: 80
# registers a thread, not 146, and a ninth of the barriers a weight byte, for the same
# instructions a weight byte (sm_90, benchmarks/compile_kernels.py). Register tables: below.
VARIANTS = {"triton": {}, "triton weights-first": dict(weights_first=True),
            "triton no prefetch": dict(prefetch=False), "triton 128 columns": dict(block_n=128),
            "triton register table": dict(registers=True),
            "triton 128 columns register table": dict(block_n=128, registers=True)}


# The register-table lookups (_Config.registers). A pass of the gather path spends, a weight,
# a table load from memory, its address, a multiply by the row's scale and half a conversion
# (~6 instructions and a load a weight in its machine code, benchmarks/RESULTS.md). Here each
# row's 16 possible weights of the pass, code[i] * scale rounded to x's dtype exactly as the
# gather path rounds them, are made once a row and pass and held as two byte planes in 8
# registers (_table_asm, ~1 instruction a weight: two threads hold a row's 64), and a weight is
# picked by `prmt` byte permutes (_lookup_asm, 22 integer instructions for 8 weights), with
# no memory access. Values are bit for bit the gather path's. Checked on CPU by a model of
# these PTX instructions (tests/test_nf4_matmul.py) and compiled for sm_80-90 with Triton's
# operand packing pinned (tests/test_kernels_compile.py).
#
# prmt.b32 d, a, b, c: byte i of d is byte (nibble i of c) & 7 of the 8 bytes {b, a} (a's
# bytes 0-3, b's 4-7); bit 3 of the nibble replaces the byte by its sign bit, replicated.
_PLANES = "lo0 lo1 lo2 lo3 hi0 hi1 hi2 hi3".split()  # lo1: low bytes of entries 4-7, ...


def _table_asm(convert: str) -> str:
    """Outputs $0-$7: the byte planes of the 16 entries round(code[i] * scale) (convert: the
    PTX conversion of two fp32 to a 16-bit pair); inputs $8: the row's scale, $9-$24: code."""
    lines = [f"mul.rn.f32 p{i}, ${9 + i}, $8;" for i in range(16)]
    lines += [f"{convert} w{i}, p{2 * i + 1}, p{2 * i};" for i in range(8)]  # w_i: entries 2i | 2i+1 << 16
    lines += [f"prmt.b32 ${j}, w{2 * j}, w{2 * j + 1}, 0x6420;" for j in range(4)]      # low bytes
    lines += [f"prmt.b32 ${4 + j}, w{2 * j}, w{2 * j + 1}, 0x7531;" for j in range(4)]  # high bytes
    return "{\n.reg .f32 p<16>;\n.reg .b32 w<8>;\n" + "\n".join(lines) + "\n}"


def _lookup_half(half: int, plane) -> list[str]:
    """The lookups of 4 weights, the nibbles of packed bytes 2 half and 2 half + 1 (odd, even,
    odd, even weight) -> even pair e{half} and odd pair o{half}, in x's 16-bit dtype."""
    lo, hi = plane("lo"), plane("hi")
    return [
        "mov.b32 r, $4;" if half == 0 else "shr.b32 r, $4, 16;",  # its nibbles: selectors 0-3
        "and.b32 s, r, 0x7777;",                      # entry within its half of the table
        f"prmt.b32 la, {lo(0)}, {lo(1)}, s;", f"prmt.b32 lb, {lo(2)}, {lo(3)}, s;",
        f"prmt.b32 ha, {hi(0)}, {hi(1)}, s;", f"prmt.b32 hb, {hi(2)}, {hi(3)}, s;",
        # m: byte i 0xFF where nibble i is 8 or more, the sign bit of its byte replicated: a
        # high nibble's bit 3 is its byte's sign bit in $4, a low nibble's in $4 << 4.
        f"prmt.b32 m, $4, up, {'0x9D8C' if half == 0 else '0xBFAE'};",
        "xor.b32 t, la, lb;", "and.b32 t, t, m;", "xor.b32 la, la, t;",  # low bytes: lb where m,
        "xor.b32 t, ha, hb;", "and.b32 t, t, m;", "xor.b32 ha, ha, t;",  # else la (one LOP3)
        f"prmt.b32 e{half}, la, ha, 0x7351;",         # bytes 1 and 3: the even weights
        f"prmt.b32 o{half}, la, ha, 0x6240;",         # bytes 0 and 2: the odd weights
    ]


def _lookup_asm() -> str:
    """Outputs $0-$1: even weights (2 a register), $2-$3: odd weights; inputs $4: 4 packed bytes,
    then the 8 byte planes, 4 registers each (pack=4 repeats a 32-bit operand; the first is
    read)."""
    def plane(kind):
        return lambda j: f"${5 + 4 * _PLANES.index(f'{kind}{j}')}"
    lines = ["shl.b32 up, $4, 4;"] + _lookup_half(0, plane) + _lookup_half(1, plane)
    lines += ["mov.b32 $0, e0;", "mov.b32 $1, e1;", "mov.b32 $2, o0;", "mov.b32 $3, o1;"]  # after every read
    return "{\n.reg .b32 r, s, m, t, up, la, lb, ha, hb, e0, e1, o0, o1;\n" + "\n".join(lines) + "\n}"


_BF16_TABLE_ASM = tl.constexpr(_table_asm("cvt.rn.bf16x2.f32"))
_FP16_TABLE_ASM = tl.constexpr(_table_asm("cvt.rn.f16x2.f32"))
_LOOKUP_ASM = tl.constexpr(_lookup_asm())
_TABLE_OPERANDS = tl.constexpr(",".join(["=r"] * 8 + ["r"] * 17))   # 8 planes <- scale, code
_LOOKUP_OPERANDS = tl.constexpr(",".join(["=r"] * 4 + ["r"] * 33))  # 4 pairs <- bytes, 8 planes x 4


def supports(w: NF4Weight) -> str | None:
    """None if the kernels can read this weight, else why not."""
    n, k = w.shape
    if w.blocksize < 32 or k % w.blocksize:
        return f"K = {k} is not a multiple of the blocksize {w.blocksize} (>= 32)"
    return None


def _num_splits(cfg: _Config, n_programs: int, k_tiles: int, device: torch.device) -> int:
    """K splits so that programs x splits covers the GPU about twice, >= 4 K tiles a split."""
    if device.type == "cuda":
        want = triton.cdiv(2 * torch.cuda.get_device_properties(device).multi_processor_count, n_programs)
    else:
        want = cfg.max_splits
    return max(1, min(want, cfg.max_splits, k_tiles // 4 if device.type == "cuda" else k_tiles))


@triton.jit
def _round(v, dtype: tl.constexpr, BY_BITS: tl.constexpr):
    """fp32 v rounded to nearest even in dtype. The interpreter truncates fp32 -> bf16 casts,
    so there (BY_BITS) bf16 is rounded on the bits first; the cast of the result is exact."""
    if BY_BITS and dtype == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) & 0xFFFF0000
        v = bits.to(tl.float32, bitcast=True)
    return v.to(dtype)


@triton.jit
def _dot_tile(acc, x, w, IEEE: tl.constexpr, WEIGHTS_FIRST: tl.constexpr):
    """acc + x [BLOCK_M, k] @ w [BLOCK_N, k]^T, or its transpose acc^T + w @ x^T."""
    if WEIGHTS_FIRST:
        a, b = w, tl.trans(x)
    else:
        a, b = x, tl.trans(w)
    if IEEE:
        return tl.dot(a, b, acc, input_precision="ieee")
    return tl.dot(a, b, acc)


@triton.jit
def _codes(code_ptr):
    """The 16 NF4 values, as scalars (registers of every thread)."""
    return (tl.load(code_ptr + 0), tl.load(code_ptr + 1), tl.load(code_ptr + 2), tl.load(code_ptr + 3),
            tl.load(code_ptr + 4), tl.load(code_ptr + 5), tl.load(code_ptr + 6), tl.load(code_ptr + 7),
            tl.load(code_ptr + 8), tl.load(code_ptr + 9), tl.load(code_ptr + 10), tl.load(code_ptr + 11),
            tl.load(code_ptr + 12), tl.load(code_ptr + 13), tl.load(code_ptr + 14), tl.load(code_ptr + 15))


@triton.jit
def _register_lookups(q, scale, c, dtype: tl.constexpr):
    """(even, odd) weights of the packed bytes q [BLOCK_N, BLOCK_K // 2]: round(code[nibble] *
    scale[row]) in dtype (bf16 or fp16), by a table in registers (_Config.registers)."""
    # scale [BLOCK_N, 1]: each table made where its row's bytes are, not exchanged through
    # shared memory (14 barriers a pass instead of 18 at 256 columns, sm_90)
    planes = tl.inline_asm_elementwise(
        _FP16_TABLE_ASM if dtype == tl.float16 else _BF16_TABLE_ASM, _TABLE_OPERANDS,
        [scale[:, None], c[0], c[1], c[2], c[3], c[4], c[5], c[6], c[7], c[8], c[9], c[10], c[11], c[12], c[13],
         c[14], c[15]], dtype=(tl.int32,) * 8, is_pure=True, pack=1)
    even, odd = tl.inline_asm_elementwise(
        _LOOKUP_ASM, _LOOKUP_OPERANDS,
        [q, planes[0], planes[1], planes[2], planes[3], planes[4], planes[5], planes[6], planes[7]],
        dtype=(tl.int16, tl.int16), is_pure=True, pack=4)
    return even.to(dtype, bitcast=True), odd.to(dtype, bitcast=True)


@triton.jit
def _tile_loads(w_rows, half, col_ok, absmax_ptr, absmax2_ptr, blk_rows, b0, b_end,
                NESTED: tl.constexpr, BLOCKSIZE: tl.constexpr):
    """What a pass of the K loop reads from DRAM for the tile at byte b0 of its rows: the packed
    bytes, and each row's absmax as stored (NESTED: its uint8 code into code2 and the
    second-level scale; else the fp32 scale, twice). Zeros from b_end on: the split's end."""
    ok = tl.where(b0 < b_end, col_ok, False)  # (col_ok & (b0 < b_end) is no mask to the interpreter)
    q = tl.load(w_rows + (b0 + half)[None, :], mask=ok[:, None], other=0)
    blk = blk_rows + 2 * b0 // BLOCKSIZE  # one quantisation block per tile row (BLOCK_K | BLOCKSIZE)
    if NESTED:
        absmax = tl.load(absmax_ptr + blk, mask=ok, other=0).to(tl.int32)
        absmax2 = tl.load(absmax2_ptr + blk // 256, mask=ok, other=0.0)
    else:
        absmax = tl.load(absmax_ptr + blk, mask=ok, other=0.0)
        absmax2 = absmax
    return q, absmax, absmax2


@triton.jit
def _nf4_matmul_kernel(
    x_ptr,                      # [M, K] activations, unit column stride
    packed_ptr,                 # uint8 [N * K / 2]: W [N, K] row-major, high nibble first
    absmax_ptr,                 # NESTED: uint8 [N * K / BLOCKSIZE] codes into code2; else fp32 scales
    absmax2_ptr, code2_ptr,     # NESTED: fp32 [ceil(blocks / 256)], fp32 [256]
    offset_ptr,                 # NESTED: fp32 [1]
    code_ptr,                   # fp32 [16]: the NF4 values
    bias_ptr,                   # [N] in x's dtype (HAS_BIAS)
    out_ptr,                    # SPLIT: fp32 [S, M, N] partials; else [M, N] in x's dtype
    M, N, K, stride_xm,
    row_bytes,                  # K // 2, an argument of its own so that Triton sees it divisible
                                # by 16 and loads the weight bytes 16 at a time
    bytes_per_split,            # weight bytes of a row per split, a multiple of BLOCK_K // 2
    NESTED: tl.constexpr, HAS_BIAS: tl.constexpr, SPLIT: tl.constexpr, IEEE: tl.constexpr,
    UPCAST: tl.constexpr, WEIGHTS_FIRST: tl.constexpr, PREFETCH: tl.constexpr, BLOCKSIZE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    REGISTERS: tl.constexpr,   # lookups from a table in registers (_Config.registers)
):
    """Program (j, s, i): out[i*BLOCK_M : +BLOCK_M, j*BLOCK_N : +BLOCK_N] over split s of K."""
    pid_n, pid_s, pid_m = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    half = tl.arange(0, BLOCK_K // 2)
    row_ok = rows < M
    col_ok = cols < N
    # int64: N * K / 2 bytes pass 2^31 for large weights (vocab x hidden).
    w_rows = packed_ptr + cols.to(tl.int64)[:, None] * row_bytes
    x_rows = x_ptr + rows.to(tl.int64)[:, None] * stride_xm
    blk_rows = cols.to(tl.int64) * (K // BLOCKSIZE)
    if NESTED:
        offset = tl.load(offset_ptr)
    if REGISTERS:
        codes = _codes(code_ptr)
    if WEIGHTS_FIRST:
        acc = tl.zeros((BLOCK_N, BLOCK_M), tl.float32)  # out^T
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), tl.float32)
    b_start = pid_s * bytes_per_split
    b_end = tl.minimum(b_start + bytes_per_split, row_bytes)
    q, absmax, absmax2 = _tile_loads(w_rows, half, col_ok, absmax_ptr, absmax2_ptr, blk_rows, b_start, b_end,
                                     NESTED, BLOCKSIZE)
    for b0 in range(b_start, b_end, BLOCK_K // 2):  # b0: byte of the row, k0 = 2 b0 its first column
        if PREFETCH:  # the next pass's loads, in flight while this pass computes
            q_next, absmax_next, absmax2_next = _tile_loads(w_rows, half, col_ok, absmax_ptr, absmax2_ptr, blk_rows,
                                                            b0 + BLOCK_K // 2, b_end, NESTED, BLOCKSIZE)
        if NESTED:
            scale = tl.load(code2_ptr + absmax) * absmax2 + offset
        else:
            scale = absmax
        k0 = 2 * b0
        if REGISTERS:
            w_even, w_odd = _register_lookups(q, scale, codes, x_ptr.dtype.element_ty)
        else:
            w_even = _round(tl.load(code_ptr + (q >> 4).to(tl.int32)) * scale[:, None], x_ptr.dtype.element_ty,
                            UPCAST)
            w_odd = _round(tl.load(code_ptr + (q & 0xF).to(tl.int32)) * scale[:, None], x_ptr.dtype.element_ty,
                           UPCAST)
        x_even = tl.load(x_rows + (k0 + 2 * half)[None, :], mask=row_ok[:, None], other=0.0)
        x_odd = tl.load(x_rows + (k0 + 2 * half + 1)[None, :], mask=row_ok[:, None], other=0.0)
        if UPCAST:
            w_even, w_odd = w_even.to(tl.float32), w_odd.to(tl.float32)
            x_even, x_odd = x_even.to(tl.float32), x_odd.to(tl.float32)
        acc = _dot_tile(acc, x_even, w_even, IEEE, WEIGHTS_FIRST)
        acc = _dot_tile(acc, x_odd, w_odd, IEEE, WEIGHTS_FIRST)
        if PREFETCH:
            q, absmax, absmax2 = q_next, absmax_next, absmax2_next
        else:
            q, absmax, absmax2 = _tile_loads(w_rows, half, col_ok, absmax_ptr, absmax2_ptr, blk_rows,
                                             b0 + BLOCK_K // 2, b_end, NESTED, BLOCKSIZE)
    if WEIGHTS_FIRST:
        acc = tl.trans(acc)  # once per program: [BLOCK_M, BLOCK_N] for the epilogue
    at = rows[:, None] * N + cols[None, :]
    ok = row_ok[:, None] & col_ok[None, :]
    if SPLIT:
        tl.store(out_ptr + pid_s * M * N + at, acc, mask=ok)
    else:
        if HAS_BIAS:
            acc += tl.load(bias_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)[None, :]
        tl.store(out_ptr + at, _round(acc, x_ptr.dtype.element_ty, UPCAST), mask=ok)


@triton.jit
def _sum_splits_kernel(
    part_ptr,      # fp32 [S, M * N] partials of `_nf4_matmul_kernel`
    bias_ptr,      # [N] (HAS_BIAS)
    out_ptr,       # [M * N] in x's dtype
    MN, N, S,
    HAS_BIAS: tl.constexpr, BY_BITS: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program i: out elements [i * BLOCK, (i + 1) * BLOCK) = sum over splits (+ bias), rounded."""
    idx = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    ok = idx < MN
    acc = tl.zeros((BLOCK,), tl.float32)
    for s in range(S):
        acc += tl.load(part_ptr + s * MN + idx, mask=ok, other=0.0)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + idx % N, mask=ok, other=0.0).to(tl.float32)
    tl.store(out_ptr + idx, _round(acc, out_ptr.dtype.element_ty, BY_BITS), mask=ok)


def block_n_for(cfg: _Config, block_m: int) -> int:
    """The weight tile's columns for row blocks of `block_m`: cfg.block_n up to 16 rows, then
    narrower in proportion, so that the accumulator stays cfg.block_n x 16 (at least 16: tl.dot)."""
    return max(16, cfg.block_n * 16 // max(16, block_m))


def _tables_fit(cfg: _Config, dtype: torch.dtype, block_n: int, block_k: int) -> bool:
    """Whether a launch can take register tables: a 16-bit x, the GPU's tiles (the interpreter
    cannot run PTX), and at least 4 weight bytes of a tile a thread, which Triton then holds
    as consecutive bytes of one row, as _lookup_asm reads them (pack=4). With 2 (32 x 32
    tiles: 64 rows, blocksize 32, 128 columns) it packs bytes of two rows into one register."""
    return (dtype in (torch.bfloat16, torch.float16) and not cfg.upcast
            and block_n * block_k // 2 >= 4 * 32 * cfg.num_warps)


def nf4_matmul_triton(x: Tensor, w: NF4Weight, bias: Tensor | None = None, *, splits: int | None = None,
                      **config) -> Tensor:
    """x [M, K] @ W^T (+ bias) -> [M, N] in x's dtype, as `nf4_linear_reference`. CUDA tensors,
    or CPU tensors under TRITON_INTERPRET=1 (tests). `splits` overrides the split-K heuristic,
    `config` fields of the device's `_Config` (VARIANTS)."""
    n, k = w.shape
    if x.dim() != 2 or x.shape[1] != k:
        raise ValueError(f"x {tuple(x.shape)} must be [M, {k}] for a [{n}, {k}] weight")
    if why := supports(w):
        raise ValueError(why)
    if x.stride(1) != 1:
        x = x.contiguous()
    m = x.shape[0]
    if m == 0:
        return x.new_empty(0, n)
    cfg = _config(x.device)
    if config:  # (not on every call: this is the decode loop's launcher)
        cfg = cfg._replace(**config)
    block_k = min(cfg.block_k, w.blocksize)
    block_m = max(16, min(64, triton.next_power_of_2(m)))
    block_n = block_n_for(cfg, block_m)
    grid_n, grid_m = triton.cdiv(n, block_n), triton.cdiv(m, block_m)
    k_tiles = k // block_k
    if splits is None:
        splits = _num_splits(cfg, grid_n * grid_m, k_tiles, x.device)
    k_per_split = triton.cdiv(k_tiles, splits) * block_k
    splits = triton.cdiv(k, k_per_split)  # every split non-empty
    out = torch.empty(m, n, dtype=x.dtype, device=x.device)
    target = out if splits == 1 else torch.empty(splits, m, n, dtype=torch.float32, device=x.device)
    bias_arg = out if bias is None else bias  # dummy pointer when HAS_BIAS is False
    nested = w.nested
    _nf4_matmul_kernel[(grid_n, splits, grid_m)](
        x, w.packed, w.absmax, w.absmax2 if nested else w.absmax, w.code2 if nested else w.code,
        w.offset if nested else w.code, w.code, bias_arg, target, m, n, k, x.stride(0), k // 2, k_per_split // 2,
        NESTED=nested, HAS_BIAS=bias is not None, SPLIT=splits > 1, IEEE=x.dtype == torch.float32,
        UPCAST=cfg.upcast, WEIGHTS_FIRST=cfg.weights_first, PREFETCH=cfg.prefetch, BLOCKSIZE=w.blocksize,
        BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
        REGISTERS=cfg.registers and _tables_fit(cfg, x.dtype, block_n, block_k),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages,
        # code2 * absmax2 + offset rounded twice, as bitsandbytes computes it: no fused multiply-add.
        enable_fp_fusion=False)
    if splits > 1:
        block = 1024
        _sum_splits_kernel[(triton.cdiv(m * n, block),)](target, bias_arg, out, m * n, n, splits,
                                                       HAS_BIAS=bias is not None, BY_BITS=cfg.upcast, BLOCK=block,
                                                       num_warps=4)
    return out
