"""NF4 weights as bitsandbytes stores them, and the torch reference of x @ W^T over them.

Layout of a `bnb.nn.Linear4bit` weight W [N, K] (out_features x in_features), checked against
bitsandbytes 0.50 in tests/test_nf4_matmul.py:

    packed   uint8 [ceil(N*K / 2), 1]   W flattened row-major; flat element f sits in byte f // 2,
                                        the high nibble when f is even, the low nibble when odd.
                                        A nibble c is an index into `code`.
    code     fp32 [16]                  the NF4 values in [-1, 1] (quant_state.code)
    absmax   one scale per `blocksize` consecutive flat elements (blocks may straddle rows):
               plain:   fp32 [ceil(N*K / blocksize)]
               nested (double quantisation, compress_statistics=True):
                        uint8 [blocks] codes into code2, and the scale of block b is
                        code2[absmax[b]] * absmax2[b // 256] + offset     (fp32 arithmetic)
    absmax2  fp32 [ceil(blocks / 256)]  (quant_state.state2.absmax; state2.blocksize is 256)
    code2    fp32 [256]                 signed dynamic 8-bit map (quant_state.state2.code)
    offset   fp32 0-d                   mean of the fp32 absmax, subtracted before the 8-bit step

    W[n, k] = code[nibble(n*K + k)] * scale[(n*K + k) // blocksize]     (fp32)

At blocksize 64 with double quantisation that is 0.5 + 1/64 + 4/(64*256) bytes per weight.
"""
from __future__ import annotations

from typing import NamedTuple

import torch
from torch import Tensor


class NF4Weight(NamedTuple):
    """The tensors of one 4-bit weight, flat, on the weight's device. Building one does not sync."""
    packed: Tensor          # uint8 [ceil(N*K / 2)]
    absmax: Tensor          # nested: uint8 [blocks]; plain: fp32 [blocks]
    absmax2: Tensor | None  # nested only: fp32 [ceil(blocks / 256)]
    code2: Tensor | None    # nested only: fp32 [256]
    offset: Tensor | None   # nested only: fp32 [1]
    code: Tensor            # fp32 [16]
    blocksize: int
    shape: tuple[int, int]  # (N, K)

    @property
    def nested(self) -> bool:
        return self.absmax2 is not None


def nf4_weight(weight) -> NF4Weight:
    """NF4Weight of a quantised `bitsandbytes.nn.Params4bit` (a Linear4bit's `.weight`).

    Raises ValueError for what the kernels do not read: FP4, a weight bitsandbytes repacked
    for its AVX512 CPU path, a nested state whose second level is not 256 wide.
    """
    qs = getattr(weight, "quant_state", None)
    if qs is None:
        raise ValueError("not a quantised Params4bit: no quant_state (move the module to a device first)")
    if qs.quant_type != "nf4":
        raise ValueError(f"quant_type {qs.quant_type!r}: only nf4 is supported")
    if getattr(qs, "packing_format_for_cpu", False):
        raise ValueError("weight is in bitsandbytes' CPU repacked layout, not the row-major one")
    if len(qs.shape) != 2:
        raise ValueError(f"weight shape {tuple(qs.shape)} is not [N, K]")
    n, k = (int(s) for s in qs.shape)
    packed = weight.data.view(torch.uint8).reshape(-1)  # quant_storage may be another dtype
    if packed.numel() != (n * k + 1) // 2:
        raise ValueError(f"{packed.numel()} packed bytes for a [{n}, {k}] weight")
    if qs.nested:
        if qs.state2.blocksize != 256:
            raise ValueError(f"nested absmax blocksize {qs.state2.blocksize}, expected 256")
        return NF4Weight(packed, qs.absmax, qs.state2.absmax.float(), qs.state2.code.float(),
                         qs.offset.float().reshape(1), qs.code.float(), int(qs.blocksize), (n, k))
    return NF4Weight(packed, qs.absmax.float(), None, None, None, qs.code.float(), int(qs.blocksize), (n, k))


def block_scales(w: NF4Weight) -> Tensor:
    """fp32 [blocks]: the absmax of each block, double quantisation undone."""
    if not w.nested:
        return w.absmax
    second = w.absmax2.repeat_interleave(256)[: w.absmax.numel()]
    return w.code2[w.absmax.long()] * second + w.offset


def dequantize_nf4_reference(w: NF4Weight, dtype: torch.dtype = torch.float32) -> Tensor:
    """W [N, K]: fp32 code * scale, rounded once to `dtype` (as bitsandbytes' dequantize_4bit)."""
    n, k = w.shape
    nibbles = torch.stack((w.packed >> 4, w.packed & 0xF), dim=1).reshape(-1)[: n * k]
    scale = block_scales(w).repeat_interleave(w.blocksize)[: n * k]
    return (w.code[nibbles.long()] * scale).reshape(n, k).to(dtype)


def nf4_linear_reference(x: Tensor, w: NF4Weight, bias: Tensor | None = None) -> Tensor:
    """x [..., K] @ W^T (+ bias) -> [..., N] in x's dtype.

    The semantics every NF4 kernel here implements: W is dequantised in fp32 and rounded to x's
    dtype (what bitsandbytes multiplies with), products and sums are fp32, bias is added in
    fp32, and the result is rounded to x's dtype once. Kernels differ from this only in the
    order of the fp32 sums.
    """
    wq = dequantize_nf4_reference(w, x.dtype).float()
    out = x.float() @ wq.T
    if bias is not None:
        out = out + bias.float()
    return out.to(x.dtype)
