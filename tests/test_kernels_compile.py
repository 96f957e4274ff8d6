"""Every Triton kernel launch of the GPU configurations compiles for the cards onelayer targets
and fits the shared memory one block of each may have. No GPU needed: Triton compiles for a
named architecture with its bundled ptxas (benchmarks/compile_kernels.py). Under the
interpreter (every other kernel test) only the CPU tiles ever run, and nothing is type-checked
as the compiler does (loop-carried types, constexpr branches, dot shapes)."""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from onelayer.kernels import nf4_matmul, policy_loss

ROOT = Path(__file__).resolve().parent.parent

# The most shared memory one block may opt in to, by compute capability (CUDA C++ Programming
# Guide, "Technical Specifications per Compute Capability"); Triton refuses a launch above it.
# 8.9 (RTX 40x0, L4) has 8.6's limit and instructions as far as these kernels go.
SHARED_PER_BLOCK = {80: 163 * 1024,   # A100
                    86: 99 * 1024,    # RTX 30x0, A10, A40
                    90: 227 * 1024}   # H100, H200


def triton_kernels() -> set[str]:
    """Names of the @triton.jit functions in kernels/ that are launched (not inlined helpers)."""
    return {name for source in (ROOT / "kernels").glob("*.py")
            for name in re.findall(r"@triton\.jit\s+def (\w+_kernel)\(", source.read_text())}


# A folder holding triton 3.6.0, our floor and the version on the lent GPUs (.ci/run installs it
# there): the same checks with it, for an H100. Unset (a plain `pytest`), that test is skipped.
FLOOR_TRITON = os.environ.get("ONELAYER_FLOOR_TRITON")


def compiled(archs, site: str | None = None) -> list[dict]:
    """benchmarks/compile_kernels.py --json for `archs`, with the triton of `site` (a folder put
    first on the path) or this environment's."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    path = os.pathsep.join([*([site] if site else []), str(ROOT)])
    env |= {"PYTHONPATH": path, "TRITON_DEFAULT_FP_FUSION": "1"}
    if site:
        version = subprocess.run([sys.executable, "-c", "import triton; print(triton.__version__)"],
                                 capture_output=True, text=True, env=env).stdout.strip()
        assert version == "3.6.0", f"{site} holds triton {version or '(none)'}, not 3.6.0"
    run = subprocess.run([sys.executable, str(ROOT / "benchmarks" / "compile_kernels.py"), "--json",
                          "--arch", *map(str, archs)], capture_output=True, text=True, timeout=900, env=env)
    assert run.returncode == 0, run.stderr[-3000:]
    return [json.loads(line) for line in run.stdout.splitlines()]


def test_every_gpu_launch_compiles_and_fits_the_shared_memory_of_each_card():
    check_launches(compiled(SHARED_PER_BLOCK), SHARED_PER_BLOCK)


@pytest.mark.skipif(not FLOOR_TRITON, reason="ONELAYER_FLOOR_TRITON: no folder with triton 3.6.0 (.ci/run makes one)")
def test_every_gpu_launch_compiles_with_the_floor_triton_for_an_h100():
    check_launches(compiled([90], FLOOR_TRITON), [90])


def check_launches(launches: list[dict], archs) -> None:
    """Every launch compiled for every arch, within its shared memory, with the tiles, loads,
    registers and operand packing the kernels are written for."""
    assert {launch["kernel"] for launch in launches} == triton_kernels()
    assert {launch["arch"] for launch in launches} == set(archs)
    failed = [launch for launch in launches
              if "error" in launch or launch["shared"] > SHARED_PER_BLOCK[launch["arch"]]]
    assert not failed, json.dumps(failed[:3], indent=1)
    # With the GPU tiles, in both dtypes, and the NF4 kernel's variants that the decoder times.
    loss_tiles = {(c["BLOCK_T"], c["BLOCK_V"], c["BLOCK_H"], c["IEEE"]) for c in
                  (launch["constexprs"] for launch in launches if launch["kernel"] == "_lse_partial_kernel")}
    gpu = policy_loss._GPU
    assert loss_tiles == {(gpu.block_t, gpu.block_v, gpu.block_h, ieee) for ieee in (False, True)}
    nf4 = {(c["BLOCK_N"], c["BLOCK_M"], c["WEIGHTS_FIRST"]) for c in
           (launch["constexprs"] for launch in launches if launch["kernel"] == "_nf4_matmul_kernel")}
    assert {(nf4_matmul.block_n_for(nf4_matmul._GPU, m), m, False) for m in (16, 32, 64)} <= nf4
    assert (nf4_matmul.block_n_for(nf4_matmul._GPU, 64), 64, True) in nf4
    timed = {(cfg.block_n, cfg.weights_first, cfg.prefetch) for cfg in
             (nf4_matmul._GPU._replace(**config) for config in nf4_matmul.VARIANTS.values())}
    assert timed <= {(c["BLOCK_N"], c["WEIGHTS_FIRST"], c["PREFETCH"]) for c in
                     (launch["constexprs"] for launch in launches if launch["kernel"] == "_nf4_matmul_kernel")
                     if c["BLOCK_M"] == 16}
    # Specialised as the JIT specialises a launch (16-byte aligned tensors): the NF4 kernel's K
    # loop loads its weight bytes 8 or 16 at a time, not one by one (where a thread has 8 bytes
    # of a tile: not in the 32 columns the 128-column variant narrows to at 64 rows), and in
    # 16-bit dtypes multiplies on the tensor cores.
    nf4_launches = [launch for launch in launches if launch["kernel"] == "_nf4_matmul_kernel"]
    wide = [launch for launch in nf4_launches if launch["constexprs"]["BLOCK_N"] * launch["constexprs"]["BLOCK_K"] // 2
            >= 8 * 32 * launch["options"]["num_warps"]]
    assert len(wide) >= len(nf4_launches) - 2 * len(archs)
    assert all(launch["loop"]["vector_loads"] >= 1 for launch in wide), [launch["loop"] for launch in wide]
    assert all(launch["loop"]["mma"] >= 1 for launch in nf4_launches if launch["signature"]["x_ptr"] != "*fp32")
    # The next pass's weight bytes are loaded a pass ahead: dozens of instructions (the lookups
    # and dots of this pass) run before the loop reads them. (Loaded in the pass that used them,
    # the first read came 3-22 instructions after the load.)
    ahead = [launch for launch in wide if launch["constexprs"]["PREFETCH"]]
    assert all(launch["loop"]["load_lead"] >= 50 for launch in ahead), [(launch["arch"], launch["loop"]) for launch in ahead]
    # The configuration's own tiles (no variant) keep the next pass's loads in registers without
    # spilling at decode's up to 16 rows; at 32-64 rows triton 3.6 (our floor, and the lent GPUs'
    # version) spills 8 bytes on sm_80 / 86 where 3.9 spills none.
    configured = [launch for launch in ahead if not launch["constexprs"]["WEIGHTS_FIRST"] and launch["constexprs"]["BLOCK_N"]
                  == nf4_matmul.block_n_for(nf4_matmul._GPU, launch["constexprs"]["BLOCK_M"])]
    assert configured and all(launch["stack"] <= (0 if launch["constexprs"]["BLOCK_M"] == 16 else 8)
                              for launch in configured), \
        [(launch["arch"], launch["constexprs"], launch["stack"]) for launch in configured if launch["stack"]]
    # Register tables (bf16 and fp16, every card): of the gather path's loads a pass, exactly its
    # two table lookups a weight byte are gone; no spills; and the operands packed as the
    # assembly reads them: 4 weight bytes in one register, two 16-bit weights a result
    # register, each plane's register repeated (pack=4).
    tables = [launch for launch in nf4_launches if launch["constexprs"]["REGISTERS"]]
    assert {(launch["arch"], launch["signature"]["x_ptr"]) for launch in tables} == \
        {(arch, dtype) for arch in archs for dtype in ("*bf16", "*fp16")}
    assert all(launch["stack"] == 0 for launch in tables)
    planes = ", ".join(f"i32 v{plane}, i32 v{plane}, i32 v{plane}, i32 v{plane}" for plane in range(1, 9))
    lookup = f"{{ <2 x i16>, <2 x i16>, <2 x i16>, <2 x i16> }} <- <4 x i8> v0, {planes}"
    table = "{ i32, i32, i32, i32, i32, i32, i32, i32 } <- " + ", ".join(f"float v{i}" for i in range(17))
    assert all(launch["inline_asm"] == [lookup, table] for launch in tables), tables[0]["inline_asm"]
    for launch in tables:
        gather = next(other for other in nf4_launches if other["arch"] == launch["arch"]
                      and other["signature"]["x_ptr"] == launch["signature"]["x_ptr"]
                      and other["constexprs"] == {**launch["constexprs"], "REGISTERS": False})
        c = launch["constexprs"]
        bytes_a_thread = c["BLOCK_N"] * c["BLOCK_K"] // 2 // (32 * launch["options"]["num_warps"])
        assert gather["loop"]["global_loads"] - launch["loop"]["global_loads"] == 2 * bytes_a_thread, \
            (c, launch["loop"], gather["loop"])


def test_a_pass_is_the_longest_way_through_the_loops_branches(monkeypatch):
    """compile_kernels.loop_profile on a hand-written loop: a uniform branch with two sides of 3
    and 2 instructions (ptxas copies code into both; one runs a pass), and a branch out of the
    loop: a pass counts the longer side and what both share, not every instruction."""
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))
    import compile_kernels
    sass = """
        /*0000*/                   MOV R1, c[0x0][0x28] ;
        /*0010*/              @P0 BRA 0x50 ;
        /*0020*/                   FMUL R2, R2, R3 ;
        /*0030*/                   FMUL R2, R2, R3 ;
        /*0040*/                   BRA 0x70 ;
        /*0050*/                   LDG.E.128 R4, desc[UR4][R6.64] ;
        /*0060*/                   FADD R2, R2, R4 ;
        /*0070*/              @P1 BRA 0xa0 ;
        /*0080*/                   HMMA.16816.F32.BF16 R8, R4, R6, R8 ;
        /*0090*/              @P2 BRA 0x10 ;
        /*00a0*/                   EXIT ;
    """
    loop = compile_kernels.loop_profile(sass)
    assert (loop["instructions"], loop["global_loads"], loop["mma"]) == (7, 0, 1)  # 0x10-0x40, 0x70-0x90
    one_side = "\n".join(line for line in sass.splitlines() if "FMUL" not in line)
    assert compile_kernels.loop_profile(one_side)["instructions"] == 6  # now the load's side is longer
    assert compile_kernels.loop_profile(one_side)["global_loads"] == 1
