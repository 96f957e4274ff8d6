"""The decoder's fused element-wise kernels (kernels/decode_ops.py), swapped into a Hugging Face
model while the static decoder runs on CUDA, and their torch references.

What is swapped, in the classes whose forwards compute exactly the references below (Qwen3,
Qwen2, Llama and Mistral write them alike):

    *RMSNorm.forward              -> rms_norm_triton (every norm: the layers', the final one,
                                     Qwen3's query and key norms)
    *MLP.forward with a SiLU gate -> down_proj(silu_mul_triton(gate_proj(x), up_proj(x)))
    apply_rotary_pos_emb          -> rotary_triton for calls it computes, the model's own for
                                     the rest (a global of the modeling module, looked up by
                                     the attention forward at each call)

Why: a decode step is launch-bound in these ops (kernels/decode_ops.py counts them). The
forward of every module and the global are restored when the decoder returns, on an error too:
training forwards never see them. On CUDA the graph modes manual and off use them; compile does
not (inductor fuses these ops itself, and would have to trace the launchers).

Before a model first decodes with them, each swap runs beside the model's own forward on random
inputs of the model's shapes and dtype (one module per class and width); one that raises or
differs by more than rounding is left out, with a warning naming it, and those modules keep
their own forward. ONELAYER_DECODE_FUSED=off turns the swaps off (to time the two:
benchmarks/bench_train_step.py, decode mode "manual:unfused").
"""
from __future__ import annotations

import contextlib
import functools
import logging
import os
import sys
import weakref
from dataclasses import dataclass, field

import torch
from torch import Tensor, nn

log = logging.getLogger("onelayer")

FUSED = os.environ.get("ONELAYER_DECODE_FUSED", "on")
NORMS = ("Qwen3RMSNorm", "Qwen2RMSNorm", "LlamaRMSNorm", "MistralRMSNorm")
MLPS = ("Qwen3MLP", "Qwen2MLP", "LlamaMLP", "MistralMLP")
SILU = ("SiLU", "SiLUActivation")


# ---------------------------------------------------------------------------------------------
# Torch references: what the Hugging Face forwards compute
# ---------------------------------------------------------------------------------------------

def rms_norm_reference(x: Tensor, weight: Tensor, eps: float) -> Tensor:
    x32 = x.float()
    normed = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * normed.to(x.dtype)


def rotate_half(x: Tensor) -> Tensor:
    half = x.shape[-1] // 2
    return torch.cat((-x[..., half:], x[..., :half]), dim=-1)


def rotary_reference(q: Tensor, k: Tensor, cos: Tensor, sin: Tensor) -> tuple[Tensor, Tensor]:
    """q, k [B, H, S, D]; cos, sin [B or 1, S, D], shared by every head."""
    cos, sin = cos[:, None], sin[:, None]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


def silu_mul_reference(gate: Tensor, up: Tensor) -> Tensor:
    return nn.functional.silu(gate) * up


# ---------------------------------------------------------------------------------------------
# The swaps
# ---------------------------------------------------------------------------------------------

def fused_norm(module: nn.Module, hidden_states: Tensor) -> Tensor:
    from ..kernels.decode_ops import rms_norm_triton
    return rms_norm_triton(hidden_states, module.weight, module.variance_epsilon)


def fused_mlp(module: nn.Module, x: Tensor) -> Tensor:
    from ..kernels.decode_ops import silu_mul_triton
    return module.down_proj(silu_mul_triton(module.gate_proj(x), module.up_proj(x)))


def fused_rotary(own):
    """apply_rotary_pos_emb(q, k, cos, sin) by rotary_triton where it computes the call (four
    arguments, the layout it reads), by `own` otherwise."""
    from ..kernels.decode_ops import rotary_supports, rotary_triton

    @functools.wraps(own)
    def apply(q, k, cos, sin, *args, **kwargs):
        if not args and not kwargs and rotary_supports(q, k, cos, sin):
            return rotary_triton(q, k, cos, sin)
        return own(q, k, cos, sin, *args, **kwargs)
    return apply


@dataclass
class Fusions:
    """What is swapped in one model, decided once (`fusions_for`)."""
    norms: list[nn.Module] = field(default_factory=list)
    mlps: list[nn.Module] = field(default_factory=list)
    rotary: list[object] = field(default_factory=list)     # modeling modules (Python modules)
    left_out: list[str] = field(default_factory=list)      # what failed its check, and why

    def summary(self) -> str:
        parts = [f"{len(self.norms)} norms", f"{len(self.mlps)} MLPs", "rotary" if self.rotary else "no rotary"]
        return ", ".join(parts) + "".join(f"; not {why}" for why in self.left_out)


_FUSIONS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def wanted(device: torch.device, graph_mode: str) -> bool:
    return FUSED == "on" and device.type == "cuda" and graph_mode != "compile"


def fusions_for(lm: nn.Module) -> Fusions:
    """The model's swaps that pass their check (cached per model)."""
    found = _FUSIONS.get(lm)
    if found is None:
        try:
            found = _checked(lm)
        except Exception as exc:  # a config these checks cannot read: the model's own ops
            found = Fusions(left_out=[f"this model ({type(exc).__name__}: {exc})"])
        _FUSIONS[lm] = found
        log.info("decode: fused kernels for %s", found.summary())
        for why in found.left_out:
            log.warning("decode: not fusing %s; that part runs unfused", why)
    return found


def _agrees(name: str, fused, own, inputs, left_out: list[str]) -> bool:
    """Whether `fused` computes what `own` does on `inputs`, to within rounding: 4 ulps of the
    dtype at the output's largest value. (Not per entry: one input rounded the other way moves
    every output of a matmul after it, and outputs near 0 by far more than their ulps.) A
    different formula, such as a norm by 1 + weight, misses by the output's own size."""
    try:
        with torch.no_grad():
            got, want = fused(*inputs), own(*inputs)
        for a, b in zip(*((got, want) if isinstance(want, tuple) else ((got,), (want,)))):
            scale = float(b.abs().max()) if b.numel() else 0.0
            torch.testing.assert_close(a, b, rtol=0, atol=4 * torch.finfo(b.dtype).eps * scale)
        return True
    except Exception as exc:  # a launch failure or a different result: that part stays the model's own
        left_out.append(f"{name} ({type(exc).__name__}: {str(exc).strip().splitlines()[0][:160] if str(exc) else ''})")
        return False


def _checked(lm: nn.Module) -> Fusions:
    """Each candidate swap beside the model's own forward on random inputs in the model's dtype:
    one module per class and width, the rotary function once per modeling module."""
    embed = lm.get_input_embeddings().weight
    device, dtype = embed.device, embed.dtype
    config = lm.config.get_text_config() if hasattr(lm.config, "get_text_config") else lm.config
    out = Fusions()
    g = torch.Generator(device=device).manual_seed(0)
    randn = lambda *shape: torch.randn(*shape, generator=g, device=device).to(dtype)  # noqa: E731
    passed: dict[tuple, bool] = {}
    for module in lm.modules():
        kind = type(module).__name__
        if kind in NORMS and hasattr(module, "variance_epsilon"):
            width = module.weight.shape[-1]
            key = (kind, width)
            if key not in passed:
                passed[key] = _agrees(f"{kind} of width {width}", functools.partial(fused_norm, module),
                                      functools.partial(type(module).forward, module), (randn(3, 5, width),),
                                      out.left_out)
            if passed[key]:
                out.norms.append(module)
        elif kind in MLPS and type(getattr(module, "act_fn", None)).__name__ in SILU:
            key = (kind,)
            if key not in passed:
                passed[key] = _agrees(kind, functools.partial(fused_mlp, module),
                                      functools.partial(type(module).forward, module),
                                      (randn(3, config.hidden_size),), out.left_out)
            if passed[key]:
                out.mlps.append(module)
    heads, kv_heads = config.num_attention_heads, getattr(config, "num_key_value_heads", None) or config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    for modeling in {sys.modules[type(m).__module__] for m in lm.modules() if type(m).__name__ in NORMS}:
        own = getattr(modeling, "apply_rotary_pos_emb", None)
        if own is None:
            continue
        # q and k as the attention forward makes them: [B, S, H, D] transposed to [B, H, S, D].
        q, k = randn(2, 3, heads, head_dim).transpose(1, 2), randn(2, 3, kv_heads, head_dim).transpose(1, 2)
        cos, sin = randn(2, 3, head_dim), randn(2, 3, head_dim)
        if _agrees(f"rotary of {modeling.__name__.rsplit('.', 1)[-1]}", fused_rotary(own), own,
                   (q, k, cos, sin), out.left_out):
            out.rotary.append(modeling)
    return out


@contextlib.contextmanager
def swapped(lm: nn.Module, on: bool):
    """Inside the block, the model runs the fused kernels that `fusions_for` kept (nothing when
    `on` is false); every forward and global restored on leaving it."""
    if not on:
        yield None
        return
    fusions = fusions_for(lm)
    saved_forwards = [(m, m.__dict__.get("forward")) for m in (*fusions.norms, *fusions.mlps)]
    saved_rotary = [(modeling, modeling.apply_rotary_pos_emb) for modeling in fusions.rotary]
    try:
        for m in fusions.norms:
            m.forward = functools.partial(fused_norm, m)
        for m in fusions.mlps:
            m.forward = functools.partial(fused_mlp, m)
        for modeling, own in saved_rotary:
            modeling.apply_rotary_pos_emb = fused_rotary(own)
        yield fusions
    finally:
        for m, previous in saved_forwards:
            if previous is None:
                m.__dict__.pop("forward", None)
            else:
                m.forward = previous
        for modeling, own in saved_rotary:
            modeling.apply_rotary_pos_emb = own
