"""Which NF4 matmul runs, and swapping it into the bitsandbytes Linear4bit modules of a model.

    rows of x (M)   CUDA input (ROUTES, measured)                      CPU input
    1-2             bitsandbytes (its fused 4-bit GEMV)                bitsandbytes
    3-4             CUDA C++ kernel (csrc/), else the Triton kernel    bitsandbytes
    5-16            Triton kernel (kernels/nf4_matmul.py)              bitsandbytes
    more            bitsandbytes                                       bitsandbytes

The CUDA C++ extension also holds a tensor-core kernel (bf16 / fp16, M <= 16:
`nf4_matmul_native_mma`), which no route takes until it has been checked and timed on a GPU.
Inputs that need a gradient always take bitsandbytes' path (the kernels have no backward).
The CUDA C++ kernel is compiled at first use with torch.utils.cpp_extension where a CUDA
device, nvcc and ninja exist, and cached in $TORCH_EXTENSIONS_DIR or ~/.cache/onelayer; when
it cannot be, one log line says why and the Triton kernel takes its rows.

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
import torch
from torch import Tensor

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


MMA_MAX_ROWS = 16  # rows the tensor-core kernel takes


def nf4_matmul_native_mma(ext: ModuleType, x: Tensor, w: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """The same by the CUDA C++ tensor-core kernel: bf16 / fp16 x of 1..MMA_MAX_ROWS rows, compute
    capability 8.0 or more. No route takes it until benchmarks/bench_nf4_matmul.py has checked
    and timed it on a GPU."""
    return ext.nf4_matmul_mma(x, w.packed, w.absmax, w.absmax2, w.code2, w.offset, w.code, bias, w.shape[0],
                              w.blocksize)


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


def _route(routes: Routes, rows: int) -> Matmul | None:
    for limit, matmul in routes:
        if rows <= limit:
            return matmul
    return None


@functools.cache
def _log_fallback(why: str) -> None:
    log.warning("NF4 matmul: using the Triton kernel, not the CUDA C++ one: %s", why)


def _fast_forward(module, routes: Routes, cpu: bool) -> Callable[[Tensor], Tensor] | None:
    """A forward for one Linear4bit that sends no-grad inputs to the kernel of their row count,
    or None if the kernels cannot read its weight. `cpu`: CPU inputs too (TRITON_INTERPRET=1)."""
    try:
        w = nf4_weight(module.weight)
    except ValueError:
        return None
    if supports(w) is not None:
        return None
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
def nf4_kernels(model: torch.nn.Module, *, prefer: str = "auto", cpu: bool = False) -> Iterator[int]:
    """Inside the block, every bitsandbytes NF4 Linear4bit of `model` whose weight the kernels
    can read multiplies no-grad CUDA inputs with the matmul `choose_routes` gives their row
    count (batch x new tokens; decode: the batch); other inputs keep bitsandbytes' forward.
    Yields how many modules were switched; leaving the block restores every forward. Enter it
    after the model is on its device (the kernels hold the weight's tensors as they are)."""
    import bitsandbytes as bnb
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    routes = choose_routes(device, prefer=prefer)
    saved: list[tuple[torch.nn.Module, object]] = []
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        forward = _fast_forward(module, routes, cpu)
        if forward is not None:
            saved.append((module, module.__dict__.get("forward")))
            module.forward = forward
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
