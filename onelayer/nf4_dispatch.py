"""Which NF4 matmul runs, and swapping it into the bitsandbytes Linear4bit modules of a model.

    rows of x (M)        CUDA input                                  CPU input
    <= NATIVE_MAX_ROWS   CUDA C++ kernel (csrc/), else Triton        bitsandbytes
    <= MAX_ROWS          Triton kernel (kernels/nf4_matmul.py)       bitsandbytes
    larger (prefill)     bitsandbytes (dequantise + cuBLAS)          bitsandbytes

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
import shutil
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path
from types import ModuleType
from typing import NamedTuple

import torch
from torch import Tensor

from onelayer.kernels.nf4_matmul import nf4_matmul_triton, supports
from onelayer.nf4 import NF4Weight, nf4_weight

log = logging.getLogger("onelayer")

# Decode rows up to which each kernel is the default: placeholders until measured on a GPU by
# benchmarks/bench_nf4_matmul.py (the CUDA kernel accumulates on CUDA cores, the Triton one
# on tensor cores; above MAX_ROWS bitsandbytes' dequantise + cuBLAS reads W at full speed).
NATIVE_MAX_ROWS = 4
MAX_ROWS = 64

CSRC = Path(__file__).resolve().parent / "csrc"  # links to the repository's csrc/ files
SOURCES = ("nf4_matmul.cpp", "nf4_matmul.cu")

Matmul = Callable[[Tensor, NF4Weight, "Tensor | None"], Tensor]


def find_nvcc() -> str | None:
    """nvcc of $CUDA_HOME, else on PATH, else of the pip package nvidia-cuda-nvcc."""
    home = os.environ.get("CUDA_HOME") or os.environ.get("CUDA_PATH")
    if home and os.access(os.path.join(home, "bin", "nvcc"), os.X_OK):
        return os.path.join(home, "bin", "nvcc")
    if found := shutil.which("nvcc"):
        return found
    try:
        import nvidia
    except ImportError:
        return None
    for root in nvidia.__path__:
        for candidate in sorted(Path(root).glob("cu*/bin/nvcc")):
            return str(candidate)
    return None


def build_native(build_dir: str | None = None) -> tuple[ModuleType | None, str]:
    """(the compiled CUDA C++ extension, "") or (None, why it is not available). Compiles at
    the first call on a machine (about a minute), then loads from the build directory."""
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


class Backends(NamedTuple):
    small: Matmul           # rows <= small_rows
    small_rows: int
    medium: Matmul          # small_rows < rows <= max_rows
    max_rows: int


def choose_backends(device: torch.device, *, max_rows: int = MAX_ROWS, prefer: str = "auto") -> Backends:
    """The kernels for CUDA inputs of `device` (prefer "auto" | "triton" | "native"). Builds
    the CUDA C++ extension on first use; without it, logs once why Triton runs instead."""
    if prefer not in ("auto", "triton", "native"):
        raise ValueError(f"prefer must be auto, triton or native, not {prefer!r}")
    if prefer == "triton" or device.type != "cuda":
        return Backends(nf4_matmul_triton, 0, nf4_matmul_triton, max_rows)
    ext, why = native_extension()
    if ext is None:
        _log_fallback(why)
        if prefer == "native":
            raise RuntimeError(f"the CUDA C++ NF4 kernel is not available: {why}")
        return Backends(nf4_matmul_triton, 0, nf4_matmul_triton, max_rows)
    native = functools.partial(nf4_matmul_native, ext)
    if prefer == "native":
        return Backends(native, max_rows, native, max_rows)
    return Backends(native, NATIVE_MAX_ROWS, nf4_matmul_triton, max_rows)


@functools.cache
def _log_fallback(why: str) -> None:
    log.warning("NF4 matmul: using the Triton kernel, not the CUDA C++ one: %s", why)


def _fast_forward(module, backends: Backends, cpu: bool) -> Callable[[Tensor], Tensor] | None:
    """A forward for one Linear4bit that sends small no-grad inputs to the kernels, or None
    if the kernels cannot read its weight. `cpu`: CPU inputs too (TRITON_INTERPRET=1, tests)."""
    try:
        w = nf4_weight(module.weight)
    except ValueError:
        return None
    if supports(w) is not None:
        return None
    n, k = w.shape
    fallback = module.forward  # bitsandbytes' forward, or a hook's wrapper around it
    bias = module.bias
    small, small_rows, medium, max_rows = backends

    def forward(x: Tensor) -> Tensor:
        rows = x.numel() // k
        if rows > max_rows or rows == 0 or not (x.is_cuda or cpu) or (x.requires_grad and torch.is_grad_enabled()):
            return fallback(x)
        # As Linear4bit: compute in its compute_dtype when set, return in x's dtype.
        compute = module.compute_dtype if module.compute_type_is_set and module.compute_dtype else x.dtype
        x2 = x.reshape(rows, k).to(compute)
        b = bias if bias is None or bias.dtype == compute else bias.to(compute)
        out = (small if rows <= small_rows else medium)(x2, w, b)
        return out.reshape(*x.shape[:-1], n).to(x.dtype)

    return forward


@contextmanager
def nf4_kernels(model: torch.nn.Module, *, max_rows: int = MAX_ROWS, prefer: str = "auto",
                cpu: bool = False) -> Iterator[int]:
    """Inside the block, every bitsandbytes NF4 Linear4bit of `model` whose weight the kernels
    can read multiplies CUDA inputs of at most `max_rows` rows (batch x new tokens: decode)
    with the NF4 kernels; other inputs keep bitsandbytes' forward. Yields how many modules
    were switched; leaving the block restores every forward. Enter it after the model is on
    its device (the kernels hold the weight's tensors as they are at entry)."""
    import bitsandbytes as bnb
    device = next((p.device for p in model.parameters()), torch.device("cpu"))
    backends = choose_backends(device, max_rows=max_rows, prefer=prefer)
    saved: list[tuple[torch.nn.Module, object]] = []
    for module in model.modules():
        if not isinstance(module, bnb.nn.Linear4bit):
            continue
        forward = _fast_forward(module, backends, cpu)
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


def nf4_linear(x: Tensor, weight, bias: Tensor | None = None, *, max_rows: int = MAX_ROWS) -> Tensor:
    """x [..., K] @ W^T (+ bias) for a bitsandbytes NF4 `Params4bit` W: the kernels for CUDA
    inputs of at most max_rows rows (and no grad), bitsandbytes' matmul_4bit otherwise."""
    import bitsandbytes as bnb
    k = x.shape[-1]
    rows = x.numel() // k
    if x.is_cuda and 0 < rows <= max_rows and not (x.requires_grad and torch.is_grad_enabled()):
        try:
            w = nf4_weight(weight)
        except ValueError:
            w = None
        if w is not None and supports(w) is None:
            small, small_rows, medium, _ = choose_backends(x.device, max_rows=max_rows)
            b = bias if bias is None or bias.dtype == x.dtype else bias.to(x.dtype)
            out = (small if rows <= small_rows else medium)(x.reshape(rows, k), w, b)
            return out.reshape(*x.shape[:-1], w.shape[0])
    return bnb.matmul_4bit(x, weight, bias=bias, quant_state=weight.quant_state)
