"""Which NF4 matmul runs, and swapping it into the bitsandbytes Linear4bit modules of a model.

Rollouts on CUDA (`nf4_kernels`, prefer "measure") time the candidates on the model's first NF4
linears at 1, 2, 4, ..., 64 rows, once per process, as replays of a CUDA graph like the decode
step's (`measure_routes`, `cuda_graph_clock`): bitsandbytes, the Triton kernel and its variants
(kernels/nf4_matmul.py: VARIANTS), the CUDA C++ kernel and its tensor-core variants (bf16 /
fp16, sm_80+: MMA_VARIANTS). Each row count takes the fastest that matches the torch
reference, the table's below unless another is over 10% faster. A card other than an H100
gets its own routes, and a kernel that computes wrong is never used. More than 64 rows
(prefill): bitsandbytes. The table measured on an H100 (ROUTES) is what `nf4_linear`, prefer
"auto" and ONELAYER_NF4_ROUTES=table use:

    rows of x (M)   CUDA input (ROUTES, measured)                      CPU input
    1-2             bitsandbytes (its fused 4-bit GEMV)                bitsandbytes
    3-4             CUDA C++ kernel (csrc/), else the Triton kernel    bitsandbytes
    5-16            Triton kernel (kernels/nf4_matmul.py)              bitsandbytes
    more            bitsandbytes                                       bitsandbytes

Inputs that need a gradient always take bitsandbytes' path (the kernels have no backward).
The CUDA C++ kernels are compiled at first use with torch.utils.cpp_extension where a CUDA
device, nvcc and ninja exist, and cached in $TORCH_EXTENSIONS_DIR or ~/.cache/onelayer; when
they cannot be, one log line says why and the others are compared.

    with nf4_kernels(model):          # decode steps inside use the kernels
        out = model.generate(...)
"""
from __future__ import annotations

import functools
import logging
import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import NamedTuple
import torch
from torch import Tensor

from onelayer.kernels.nf4_matmul import VARIANTS as TRITON_VARIANTS
from onelayer.kernels.nf4_matmul import nf4_matmul_triton, supports
from onelayer.nf4 import NF4Weight, nf4_weight

log = logging.getLogger("onelayer")

# Rows up to which each matmul is the fastest for CUDA inputs; more rows than the last entry:
# bitsandbytes. Measured on an H100 (2026-11-27, `python benchmarks/bench_nf4_matmul.py`), bf16,
# one Qwen3-8B decoder layer's 7 projections, us (bitsandbytes 0.50.2 / CUDA C++ / Triton):
#   M = 1: 114 / 158 / 258    M = 2: 171 / 177 / 259    M = 4: 273 / 222 / 262
#   M = 8: 354 / 406 / 271    M = 16: 355 / 658 / 288   M = 32: 356 / 1283 / 413
#   M = 64: 434 / 2482 / 819
ROUTES = ((2, "bnb"), (4, "cuda"), (16, "triton"))
MAX_ROWS = 64  # prefer="triton" / "native": rows up to this take that kernel

CSRC = Path(__file__).resolve().parent / "csrc"  # links to the repository's csrc/ files
SOURCES = ("nf4_matmul.cpp", "nf4_matmul.cu")

Matmul = Callable[[Tensor, NF4Weight, "Tensor | None"], Tensor]


def build_native(build_dir: str | None = None) -> tuple[ModuleType | None, str]:
    """(the compiled CUDA C++ extension, "") or (None, why it is not available). Compiles at
    the first call on a machine (~30 s on 16 cores), then loads from the build directory."""
    if not torch.cuda.is_available():
        return None, "no CUDA device"
    from torch.utils import cpp_extension
    if cpp_extension.CUDA_HOME is None or not os.path.exists(os.path.join(cpp_extension.CUDA_HOME, "bin", "nvcc")):
        return None, "nvcc not found (install the CUDA toolkit or set CUDA_HOME)"
    if not cpp_extension.is_ninja_available():
        return None, "ninja not found (pip install ninja)"
    if build_dir is None:
        root = os.environ.get("TORCH_EXTENSIONS_DIR") or os.path.join(Path.home(), ".cache", "onelayer")
        tag = f"torch{torch.__version__}-cuda{torch.version.cuda}".replace("+", "_")
        build_dir = os.path.join(root, "nf4_matmul", tag)
    os.makedirs(build_dir, exist_ok=True)
    try:
        ext = cpp_extension.load(name="onelayer_nf4_matmul", sources=[str(CSRC / s) for s in SOURCES],
                                 extra_cuda_cflags=["-O3"], build_directory=build_dir)
    except Exception as exc:  # cpp_extension puts the compiler's output in the message
        log.debug("NF4 matmul: CUDA C++ build:\n%s", exc)
        first = str(exc).strip().splitlines()[0][:200] if str(exc).strip() else type(exc).__name__
        return None, f"the CUDA C++ build failed ({first})"
    return ext, ""


@functools.cache
def native_extension() -> tuple[ModuleType | None, str]:
    """`build_native()` once per process."""
    return build_native()


def nf4_matmul_native(ext: ModuleType, x: Tensor, w: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """x [M, K] @ W^T (+ bias) -> [M, N] by the CUDA C++ kernel, as `nf4_linear_reference`."""
    return ext.nf4_matmul(x, w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.code, bias, w.shape[0], w.blocksize)


MMA_MAX_ROWS = 64  # rows the tensor-core kernel takes


def nf4_matmul_native_mma(ext: ModuleType, x: Tensor, w: NF4Weight, bias: Tensor | None = None, *,
                          registers: bool = False) -> Tensor:
    """The same by the CUDA C++ tensor-core kernel: bf16 / fp16 x of 1..MMA_MAX_ROWS rows, compute
    capability 8.0 or more; `registers`: up to 16 rows, each row's weights looked up from a
    table in registers (csrc/nf4_lookup.cuh). Only measured routes take it (`measure_routes`),
    where it matches the reference and is the fastest."""
    return ext.nf4_matmul_mma(x, w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.code, bias, w.shape[0],
                              w.blocksize, registers)


# The tensor-core kernel's variants that the decoder times (bf16 / fp16 inputs, sm_80+).
MMA_VARIANTS = {"cuda mma": {}, "cuda mma register table": dict(registers=True)}


Routes = tuple[tuple[int, "Matmul | None"], ...]  # (rows up to, matmul or None = bitsandbytes)


def choose_routes(device: torch.device, *, prefer: str = "auto") -> Routes:
    """The matmul for each row count of inputs on `device`: "auto" follows ROUTES (CUDA C++
    rows go to Triton where the extension cannot be built, with one log line saying why);
    "triton" / "native" send rows up to MAX_ROWS to that kernel. Builds the CUDA C++
    extension on first use."""
    if prefer not in ("auto", "triton", "native"):
        raise ValueError(f"prefer must be auto, triton or native, not {prefer!r}")
    if prefer == "triton" or device.type != "cuda":
        return ((MAX_ROWS, nf4_matmul_triton),)
    ext, why = native_extension()
    if ext is None:
        _log_fallback(why)
        if prefer == "native":
            raise RuntimeError(f"the CUDA C++ NF4 kernel is not available: {why}")
    native = nf4_matmul_triton if ext is None else functools.partial(nf4_matmul_native, ext)
    if prefer == "native":
        return ((MAX_ROWS, native),)
    kernels = {"bnb": None, "cuda": native, "triton": nf4_matmul_triton}
    return tuple((rows, kernels[name]) for rows, name in ROUTES)


_auto_routes = functools.cache(choose_routes)  # nf4_linear: chosen once per device


# ---------------------------------------------------------------------------------------------
# Routes measured on the card in use
# ---------------------------------------------------------------------------------------------
BUCKETS = (1, 2, 4, 8, 16, 32, 64)  # decode rows measured (generation batches); an input takes
                             # the route of the bucket at or above its rows, more than the last:
                             # bitsandbytes (every candidate takes up to 64 rows: MAX_ROWS,
                             # MMA_MAX_ROWS)
MEASURED_MODULES = 14        # the first 14 NF4 linears: two blocks of a Llama-like model, more
                             # bytes than an H100's L2 at 8B, so the timings read DRAM
Clock = Callable[[str, int, Callable[[], object]], float]  # (kernel, rows, one pass) -> seconds


def captured(one_pass: Callable[[], object]) -> Callable[[], object] | None:
    """`one_pass` as a CUDA graph's replay, or None where it cannot be captured. The pass runs
    once first on a side stream, so that Triton's compiles and first allocations stay out of
    the capture."""
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        one_pass()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    try:
        with torch.cuda.graph(graph):
            one_pass()
    except Exception as exc:  # the caller times the pass eagerly
        log.debug("NF4 matmul: no CUDA graph of a timed pass (%s: %s)", type(exc).__name__, exc)
        return None
    return graph.replay


def cuda_graph_clock(name: str, rows: int, one_pass: Callable[[], object]) -> float:
    """Seconds a pass as the decoder runs it: replays of a CUDA graph of the pass (its decode
    step is one), so that the host's cost of a launch, which differs between the candidates
    (Triton's launcher, a torch op, the extension's call) and is no part of a graph's replay,
    does not decide between them; eager passes where the pass cannot be captured."""
    return cuda_clock(name, rows, captured(one_pass) or one_pass)


def cuda_clock(name: str, rows: int, one_pass: Callable[[], object], reps: int = 3) -> float:
    """Seconds a pass, by CUDA events over `reps` passes (after one unrecorded pass)."""
    one_pass()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(reps):
        one_pass()
    end.record()
    end.synchronize()
    return start.elapsed_time(end) / 1e3 / reps


def route_candidates(device: torch.device, dtype: torch.dtype) -> dict[str, Matmul | None]:
    """The matmuls `measure_routes` compares on `device` for inputs of `dtype` (None:
    bitsandbytes); builds the CUDA C++ extension on first use."""
    out: dict[str, Matmul | None] = {"bnb": None}
    out |= {name: functools.partial(nf4_matmul_triton, **config) for name, config in TRITON_VARIANTS.items()}
    ext, why = native_extension()
    if ext is None:
        _log_fallback(why)
        return out
    out["cuda"] = functools.partial(nf4_matmul_native, ext)
    if dtype != torch.float32 and torch.cuda.get_device_capability(device)[0] >= 8:
        out |= {name: functools.partial(nf4_matmul_native_mma, ext, **config) for name, config in MMA_VARIANTS.items()}
    return out


def _error(matmul: Matmul, weights: list[NF4Weight], xs: dict[int, Tensor], wants: list[Tensor]) -> float:
    """The largest relative error of `matmul` against the reference outputs `wants`."""
    worst = 0.0
    for w, want in zip(weights, wants):
        got = matmul(xs[w.shape[1]], w, None).float()
        err = ((got - want).norm() / want.norm().clamp_min(1e-30)).item()
        worst = max(worst, err if got.isfinite().all() else float("inf"))
    return worst


MARGIN = 1.1  # a kernel other than the H100 table's must be this much faster to be chosen


def table_choice(rows: int) -> str:
    """The kernel ROUTES gives `rows` rows ("bnb" past its last entry)."""
    return next((name for limit, name in ROUTES if rows <= limit), "bnb")


class Measured(NamedTuple):
    """What `measure_routes` found on one card."""
    routes: Routes
    summary: str                            # "rows 1-2 bnb, 3-8 triton, ..., more bnb"
    seconds: dict[int, dict[str, float]]    # rows -> candidate -> seconds a pass over the modules

    def timings(self) -> str:
        """Each bucket's timings: "1: bnb 61, triton 120 us; 2: ..." (microseconds a pass)."""
        return "; ".join(f"{rows}: " + ", ".join(f"{name} {1e6 * s:.0f}" for name, s in by_name.items()) + " us"
                         for rows, by_name in self.seconds.items())


def measure_routes(modules: list, candidates: dict[str, Matmul | None], *, dtype: torch.dtype,
                   clock: Clock = cuda_graph_clock) -> Measured:
    """For each row count of BUCKETS, the fastest of `candidates` (name -> matmul, None:
    bitsandbytes' own forward) on `modules` (bitsandbytes Linear4bit) with inputs of `dtype`;
    the H100 table's kernel unless another is more than MARGIN times faster, so that timing
    noise does not change the kernel (and the last bits of the logits) from run to run.
    A kernel whose output differs from the torch reference (relative error above 5e-3 in
    16-bit dtypes, 1e-5 in fp32), or that raises, is never chosen, with a warning: it is a
    bug, not a speed.
    Returns the routes, a line that says what was chosen, and every candidate's timings."""
    from onelayer.nf4 import nf4_linear_reference
    weights = [nf4_weight(m.weight) for m in modules]
    device = weights[0].packed.device
    tolerance = 1e-5 if dtype == torch.float32 else 5e-3
    chosen, timed = [], {}
    generator = torch.Generator(device=device).manual_seed(0)
    with torch.no_grad():
        for rows in BUCKETS:
            xs = {k: torch.randn(rows, k, device=device, generator=generator).to(dtype)
                  for k in {w.shape[1] for w in weights}}
            wants = [nf4_linear_reference(xs[w.shape[1]], w).float() for w in weights]
            seconds = {}
            for name, matmul in candidates.items():
                if matmul is None:
                    one_pass = lambda: [m(xs[w.shape[1]]) for m, w in zip(modules, weights)]  # noqa: E731
                else:
                    try:
                        error = _error(matmul, weights, xs, wants)
                    except Exception as exc:  # a kernel that cannot run here is not a candidate
                        _log_disagreement(name, rows, f"failed: {type(exc).__name__}: {str(exc)[:200]}")
                        continue
                    if error > tolerance:
                        _log_disagreement(name, rows, f"relative error {error:.1e}")
                        continue
                    one_pass = lambda f=matmul: [f(xs[w.shape[1]], w, None) for w in weights]  # noqa: E731
                seconds[name] = clock(name, rows, one_pass)
            timed[rows] = seconds
            fastest, usual = min(seconds, key=seconds.get), table_choice(rows)
            keep = usual in seconds and seconds[usual] <= MARGIN * seconds[fastest]
            chosen.append((rows, usual if keep else fastest))
    if device.type == "cuda":
        torch.cuda.empty_cache()  # the reference's dequantised weights: give their memory back
    merged = [pair for i, pair in enumerate(chosen) if i + 1 == len(chosen) or chosen[i + 1][1] != pair[1]]
    spans, low = [], 1
    for rows, name in merged:
        spans.append(f"{low}-{rows} {name}" if rows > low else f"{rows} {name}")
        low = rows + 1
    return Measured(tuple((rows, candidates[name]) for rows, name in merged), f"rows {', '.join(spans)}, more bnb",
                    timed)


_DISAGREED: set[str] = set()  # kernels already reported as not used


def _log_disagreement(name: str, rows: int, why: str) -> None:
    if name not in _DISAGREED:
        _DISAGREED.add(name)
        log.warning("NF4 matmul: %s is not used: at %d rows, against the torch reference, %s", name, rows, why)


_MEASURED: dict[tuple, tuple[Routes, str]] = {}  # (device, dtype, shapes) -> routes, what they are
_TIMINGS: dict[tuple, str] = {}  # the same keys -> every candidate's timings (Measured.timings)


def measured_routes(readable: list[tuple[torch.nn.Module, NF4Weight]], device: torch.device,
                    dtype: torch.dtype) -> Routes:
    """`measure_routes` on this card for the first MEASURED_MODULES of these (module, weight)
    pairs' shapes, once per process (a line in the log says what it chose;
    `measured_summaries` lists them)."""
    sample = readable[:MEASURED_MODULES]
    key = (str(device), dtype, tuple(w.shape for _, w in sample))
    if key not in _MEASURED:
        measured = measure_routes([m for m, _ in sample], route_candidates(device, dtype), dtype=dtype)
        where = f"{torch.cuda.get_device_name(device)}, {str(dtype).removeprefix('torch.')}"
        log.info("NF4 matmul routes measured on %s: %s", where, measured.summary)
        log.debug("NF4 matmul timings on %s: %s", where, measured.timings())
        _MEASURED[key] = measured.routes, f"{where}: {measured.summary}"
        _TIMINGS[key] = f"{where}: {measured.timings()}"
    return _MEASURED[key][0]


def measured_summaries() -> list[str]:
    """What each measurement of this process chose: "card, dtype: rows 1-2 bnb, ...". """
    return [line for _, line in _MEASURED.values()]


def measured_timings() -> list[str]:
    """What each measurement of this process timed: "card, dtype: 1: bnb 61, triton 120 us; ...". """
    return list(_TIMINGS.values())


def _route(routes: Routes, rows: int) -> Matmul | None:
    for limit, matmul in routes:
        if rows <= limit:
            return matmul
    return None


@functools.cache
def _log_fallback(why: str) -> None:
    log.warning("NF4 matmul: using the Triton kernel, not the CUDA C++ one: %s", why)


def _readable_weight(module) -> NF4Weight | None:
    """The NF4Weight of a Linear4bit when the kernels can read it, else None."""
    try:
        w = nf4_weight(module.weight)
    except ValueError:
        return None
    return w if supports(w) is None else None


def _fast_forward(module, w: NF4Weight, routes: Routes, cpu: bool) -> Callable[[Tensor], Tensor]:
    """A forward for one Linear4bit, whose weight the kernels read as `w`, that sends no-grad
    inputs to the kernel of their row count. `cpu`: CPU inputs too (TRITON_INTERPRET=1)."""
    n, k = w.shape
    fallback = module.forward  # bitsandbytes' forward, or a hook's wrapper around it
    bias = module.bias

    def forward(x: Tensor) -> Tensor:
        rows = x.numel() // k
        matmul = _route(routes, rows)
        if matmul is None or rows == 0 or not (x.is_cuda or cpu) or (x.requires_grad and torch.is_grad_enabled()):
            return fallback(x)
        # As Linear4bit: compute in its compute_dtype when set, return in x's dtype.
        compute = module.compute_dtype if module.compute_type_is_set and module.compute_dtype else x.dtype
        b = bias if bias is None or bias.dtype == compute else bias.to(compute)
        out = matmul(x.reshape(rows, k).to(compute), w, b)
        return out.reshape(*x.shape[:-1], n).to(x.dtype)

    return forward


@contextmanager
def nf4_kernels(model: torch.nn.Module, *, prefer: str = "measure", cpu: bool = False) -> Iterator[int]:
    """Inside the block, every bitsandbytes NF4 Linear4bit of `model` whose weight the kernels
    can read multiplies no-grad CUDA inputs with the matmul of their row count (batch x new
    tokens; decode: the batch); other inputs keep bitsandbytes' forward. prefer "measure": the
    routes `measured_routes` finds on this card (on CUDA; the environment variable
    ONELAYER_NF4_ROUTES=table takes the H100 table instead), else as `choose_routes`.
    Yields how many modules were switched; leaving the block restores every forward. Enter it
    after the model is on its device (the kernels hold the weight's tensors as they are)."""
    import bitsandbytes as bnb
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    readable = [(m, w) for m in model.modules()
                if isinstance(m, bnb.nn.Linear4bit) and (w := _readable_weight(m)) is not None]
    if prefer == "measure" and device.type == "cuda" and readable \
            and os.environ.get("ONELAYER_NF4_ROUTES", "measure") != "table":
        first = readable[0][0]
        dtype = first.compute_dtype if first.compute_type_is_set else None
        routes = measured_routes(readable, device, dtype or torch.bfloat16)
    else:
        routes = choose_routes(device, prefer="auto" if prefer == "measure" else prefer)
    saved: list[tuple[torch.nn.Module, object]] = []
    for module, w in readable:
        saved.append((module, module.__dict__.get("forward")))
        module.forward = _fast_forward(module, w, routes, cpu)
    try:
        yield len(saved)
    finally:
        for module, previous in saved:
            if previous is None:
                del module.forward
            else:
                module.forward = previous


def nf4_linear(x: Tensor, weight, bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ W^T (+ bias) for a bitsandbytes NF4 `Params4bit` W: the matmul of
    `choose_routes` for no-grad CUDA inputs, bitsandbytes' matmul_4bit otherwise."""
    import bitsandbytes as bnb
    k = x.shape[-1]
    rows = x.numel() // k
    if x.is_cuda and rows > 0 and not (x.requires_grad and torch.is_grad_enabled()):
        matmul = _route(_auto_routes(x.device), rows)
        try:
            w = nf4_weight(weight) if matmul is not None else None
        except ValueError:
            w = None
        if w is not None and supports(w) is None:
            b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
            return matmul(x.reshape(rows, k), w, b).reshape(*x.shape[:-1], w.shape[0])
    return bnb.matmul_4bit(x, weight, bias=bias, quant_state=weight.quant_state)
