"""The memory planner: the peak memory of one training step, part by part, from config.json alone.

A step is a sequence of moments (phases); at each, a known set of tensors is alive:

    prefill, decode          frozen weights + layer state + KV cache (HF generate grows it by torch.cat)
    log-probs                + h_L cache [B, S, H]; one micro-batch through layer L, the suffix, the head
    update: loss fwd / bwd   + h_L, layer-L saved activations, checkpointed suffix inputs, loss buffers
    update: suffix bwd       + one suffix block recomputed (checkpointing) and its backward
    update: layer bwd        + fp32 gradients of layer L arriving
    optimizer                + AdamW temporaries

Each phase's bytes are the sum of its parts; the peak is the largest phase. The counts of saved
activations per token follow what autograd keeps for a transformers Qwen3/Llama block with
torch SDPA (derived in `saved_per_token`; benchmarks/validate_memory.py checks them against a
tensor-by-tensor tracker of real steps). Reserved memory adds allocator slack: a fraction of the
bytes allocated within the step (calibrated on the H100 measurement in benchmarks/RESULTS.md).

The same model describes QLoRA (PEFT r16 on every linear, NF4 base) and full-parameter RL as
TRL 1.16's GRPOTrainer runs them (HF generate, gradient checkpointing, its fused tiled LM head,
fused AdamW), the setups of the anchors in BENCHMARKS.md.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass
from pathlib import Path

from .errors import UserError

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
FROZEN_DTYPES = ("nf4", "bf16", "fp32")
# A CUDA context (driver, kernels) takes memory that torch does not count: ~0.5 GiB with
# torch 2.11 on an H100. `--gpu-memory` is the card's size; tensors get the rest.
CUDA_CONTEXT = GiB // 2
# Reserved minus allocated, as a fraction of the bytes allocated within a step (activations,
# caches, transients; not the weights and optimizer state, which are allocated once and never
# fragment). H100, Qwen3-8B NF4, 8 x 512: 12.38 - 11.14 GiB over ~2.9 GiB allocated per step
# = 0.43; TRL's anchors give 0.4-0.7 for QLoRA and one-layer bf16.
SLACK = 0.45
LORA_RANK = 16
# Streaming multiprocessors of the GPU the Triton loss sizes its vocabulary splits for (H100 SXM).
SMS = 132


# ---------------------------------------------------------------------------------------------
# Inputs: the model's shape and the workload
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class ModelDims:
    """What memory depends on, read from a decoder-only model's config.json."""
    name: str
    vocab: int
    hidden: int
    intermediate: int
    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    tied: bool                  # lm_head shares the embedding matrix
    qk_norm: bool               # RMSNorm on q and k per head (Qwen3)
    attention_bias: bool        # biases on q, k, v (Qwen2)
    max_positions: int

    @property
    def q_dim(self) -> int:
        return self.heads * self.head_dim

    @property
    def kv_dim(self) -> int:
        return self.kv_heads * self.head_dim

    def linears(self) -> list[tuple[int, int]]:
        """(out, in) of the block's linear layers: q, k, v, o, gate, up, down."""
        h, i = self.hidden, self.intermediate
        return [(self.q_dim, h), (self.kv_dim, h), (self.kv_dim, h), (h, self.q_dim),
                (i, h), (i, h), (h, i)]

    @property
    def block_linear_params(self) -> int:
        return sum(o * i for o, i in self.linears())

    @property
    def block_small_params(self) -> int:
        """Norm weights and biases: never quantised."""
        norms = 2 * self.hidden + (2 * self.head_dim if self.qk_norm else 0)
        return norms + ((self.q_dim + 2 * self.kv_dim) if self.attention_bias else 0)

    @property
    def block_params(self) -> int:
        return self.block_linear_params + self.block_small_params

    @property
    def params(self) -> int:
        embeddings = self.vocab * self.hidden * (1 if self.tied else 2)
        return self.layers * self.block_params + embeddings + self.hidden

    @classmethod
    def from_config(cls, config: dict, name: str = "model") -> "ModelDims":
        config = config.get("text_config", config)
        if any(k in config for k in ("num_experts", "num_local_experts", "n_routed_experts")):
            raise UserError(f"{name}: mixture-of-experts models are not supported by the planner")
        try:
            hidden, heads = int(config["hidden_size"]), int(config["num_attention_heads"])
            dims = cls(name=name, vocab=int(config["vocab_size"]), hidden=hidden,
                       intermediate=int(config["intermediate_size"]),
                       layers=int(config["num_hidden_layers"]), heads=heads,
                       kv_heads=int(config.get("num_key_value_heads") or heads),
                       head_dim=int(config.get("head_dim") or hidden // heads),
                       tied=bool(config.get("tie_word_embeddings", False)),
                       qk_norm=config.get("model_type") in ("qwen3",),
                       attention_bias=bool(config.get("attention_bias",
                                                      config.get("model_type") == "qwen2")),
                       max_positions=int(config.get("max_position_embeddings") or 1 << 20))
        except (KeyError, TypeError, ValueError) as exc:
            raise UserError(f"{name}: config.json is not a decoder-only transformer config "
                            f"({type(exc).__name__}: {exc})")
        if min(dims.vocab, dims.hidden, dims.intermediate, dims.layers, dims.heads, dims.kv_heads) < 1:
            raise UserError(f"{name}: config.json has non-positive sizes")
        return dims


@dataclass(frozen=True)
class Workload:
    """One RL step: `prompts` x `group_size` sequences of `prompt_tokens` + `new_tokens` (every
    completion at full length: the worst case), trained at `layer`."""
    prompts: int = 8
    group_size: int = 8
    prompt_tokens: int = 256
    new_tokens: int = 1024
    layer: int = 16
    micro_batch: int = 0          # sequences per forward/backward; 0: the whole batch
    generation_batch: int = 0     # rows generated at once; 0: all rows
    minibatch: int = 0            # sequences per optimizer step; 0: the whole batch
    beta: float = 0.0             # > 0 keeps a reference layer and adds a reference pass
    frozen: str = "nf4"           # storage of the frozen blocks: nf4, bf16, fp32
    compute: str = "bf16"         # compute dtype: bf16 on GPU; fp32 on CPU
    device: str = "cuda"
    loss_impl: str = "triton"     # triton (CUDA) or torch (the chunked reference)
    padded: bool = True           # sequences carry padding, so attention takes explicit masks
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0

    @property
    def rows(self) -> int:
        return self.prompts * self.group_size

    @property
    def seq(self) -> int:
        return self.prompt_tokens + self.new_tokens

    @property
    def mb(self) -> int:
        return min(self.micro_batch or self.rows, self.minibatch_rows)

    @property
    def minibatch_rows(self) -> int:
        return min(self.minibatch or self.rows, self.rows)

    @property
    def gen_rows(self) -> int:
        return min(self.generation_batch or self.rows, self.rows)

    @property
    def c(self) -> int:
        """Bytes per element of the compute dtype."""
        return DTYPE_BYTES[self.compute]

    def check(self, dims: ModelDims) -> None:
        def need(ok: bool, message: str) -> None:
            if not ok:
                raise UserError(message)
        need(self.prompts >= 1 and self.group_size >= 1, "--prompts-per-step and --group-size must be >= 1")
        need(self.prompt_tokens >= 1 and self.new_tokens >= 1, "prompt and new tokens must be >= 1")
        need(min(self.micro_batch, self.generation_batch, self.minibatch) >= 0,
             "--micro-batch, --generation-batch and --minibatch must be >= 0")
        need(0 <= self.layer < dims.layers,
             f"--layer {self.layer} is out of range: the model has {dims.layers} layers")
        need(self.frozen in FROZEN_DTYPES, f"frozen dtype must be one of {', '.join(FROZEN_DTYPES)}")
        need(self.compute in DTYPE_BYTES, "compute dtype must be bf16 or fp32")
        need(self.loss_impl in ("triton", "torch"), "loss implementation must be triton or torch")
        need(self.device in ("cuda", "cpu"), "device must be cuda or cpu")


# ---------------------------------------------------------------------------------------------
# The plan: parts, phases, methods
# ---------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Part:
    name: str
    bytes: int
    kind: str             # weights | state | kv | activations
    steady: bool = False  # allocated once and kept across steps (no allocator slack)


@dataclass(frozen=True)
class Phase:
    name: str
    parts: tuple[Part, ...]

    @property
    def allocated(self) -> int:
        return sum(p.bytes for p in self.parts)

    @property
    def stage(self) -> str:
        """generate, log-probs, update or optimizer: the stages a tracker can tell apart."""
        stage = self.name.split(":")[0]
        return "generate" if stage in ("prefill", "decode") else stage

    @property
    def within_step(self) -> int:
        return sum(p.bytes for p in self.parts if not p.steady)


@dataclass(frozen=True)
class Plan:
    method: str
    trainable_params: int
    phases: tuple[Phase, ...]
    device: str

    @property
    def peak(self) -> Phase:
        return max(self.phases, key=lambda p: p.allocated)

    @property
    def allocated(self) -> int:
        return self.peak.allocated

    def reserved_at(self, phase: Phase) -> int:
        """CUDA's caching allocator keeps freed blocks; a CPU process has no such slack."""
        return phase.allocated + (round(SLACK * phase.within_step) if self.device == "cuda" else 0)

    @property
    def reserved(self) -> int:
        return max(self.reserved_at(p) for p in self.phases)

    @property
    def slack(self) -> int:
        return self.reserved - self.allocated

    def fits(self, budget: int) -> bool:
        return self.reserved <= budget


def nf4_bytes(numel: int) -> int:
    """bitsandbytes NF4 with double quantisation: 4-bit codes (0.5 B), one uint8 absmax per 64
    weights, one fp32 scale per 256 absmax values, an fp32 offset and the two code tables
    (16 + 256 fp32). 0.516 B per weight for a large matrix."""
    blocks = math.ceil(numel / 64)
    return math.ceil(numel / 2) + blocks + 4 * math.ceil(blocks / 256) + 4 + 4 * (16 + 256)


def frozen_block_bytes(dims: ModelDims, frozen: str, c: int) -> int:
    linear = (sum(nf4_bytes(o * i) for o, i in dims.linears()) if frozen == "nf4"
              else dims.block_linear_params * DTYPE_BYTES[frozen])
    return linear + dims.block_small_params * (c if frozen == "nf4" else DTYPE_BYTES[frozen])


def _attention_saved(dims: ModelDims, c: int, seq: int, masked: bool) -> int:
    """Bytes per token that SDPA keeps for backward (CPU flash, CUDA flash / memory-efficient):
    q after rotary, k, v, the output and an fp32 log-sum-exp per head. With a padding mask,
    transformers repeats k and v to every head (the GQA path needs no mask) and SDPA keeps the
    mask as a float row of `seq` per query token."""
    if masked:
        return 4 * c * dims.q_dim + c * seq + 4 * dims.heads
    return c * (2 * dims.q_dim + 2 * dims.kv_dim) + 4 * dims.heads


def saved_per_token(dims: ModelDims, c: int, seq: int, masked: bool, kind: str) -> int:
    """Bytes per token that autograd keeps between one block's forward and its backward.

    kind: "frozen" (input needs grad, weights frozen: a suffix block), "trained" (weights need
    grad, input does not: layer L), "lora" (frozen base + adapters on every linear; input needs
    grad), "full" (both).
    RMSNorm works in fp32: pow and mul keep the fp32 input (a copy when c = 2; in fp32 it is the
    tensor already there) and rsqrt; a trained norm weight also keeps its normalised input.
    Linears keep their input only for a weight gradient; the attention output needs no copy
    (SDPA's output is already laid out [B, S, heads, dim]). SiLU keeps the gate, the product
    keeps both factors. Qwen3's q/k norms keep fp32 q and k.
    """
    h, i, q, k = dims.hidden, dims.intermediate, dims.q_dim, dims.kv_dim
    weights = kind in ("trained", "full")
    input_grad = kind in ("frozen", "lora", "full")
    fp32_copy = 4 * h if c == 2 else 0
    norm_in = (fp32_copy + 4 if input_grad else 0) + (2 * c * h if weights else 0)
    norm_post = 4 * h + 4 + (2 * c * h if weights else 0)
    qk = (4 * (q + k) + 4 * (dims.heads + dims.kv_heads) + (c * (q + k) if weights else 0)
          if dims.qk_norm else 0)
    mlp = (4 if weights else 3) * c * i
    total = norm_in + qk + _attention_saved(dims, c, seq, masked) + norm_post + mlp
    if kind == "lora":  # adapter A of every linear keeps its input; B keeps A's output
        total += c * (2 * h + i) + c * LORA_RANK * 7
    return total


def block_backward_per_token(dims: ModelDims, c: int) -> int:
    """Gradients alive at once inside one block's backward: at the MLP, dL/d(product) and the
    gradients of both factors ([I] each), plus the gradient flowing in and the one being formed."""
    return 3 * c * dims.intermediate + 2 * c * dims.hidden


def forward_per_token(dims: ModelDims, c: int, seq: int, masked: bool) -> int:
    """Largest set of one block's tensors alive at once in a no-grad forward, per token. At the
    MLP: the block input, the residual and the normed input ([H] each), SiLU(gate), up and their
    product ([I] each). At the attention: input, normed input, q, k, v, rotated q and k, the
    output, and with a mask its float copy [S] and k, v repeated to every head."""
    h, q, k = dims.hidden, dims.q_dim, dims.kv_dim
    mlp = 3 * c * dims.intermediate + 3 * c * h
    attention = c * (2 * h + 3 * q + 3 * k) + ((2 * c * q + c * seq) if masked else 0)
    return max(mlp, attention)


def norm_per_token(dims: ModelDims, c: int) -> int:
    """Final RMSNorm without grad: input, fp32 copy, its square, the normalised fp32 result."""
    return c * dims.hidden + 12 * dims.hidden


def _context_part(dims: ModelDims, w: Workload, rows: int, seq: int, label: str) -> Part:
    """What every block call of a pass receives: int64 position ids, rotary cos and sin
    [rows, seq, head_dim] in the compute dtype and, with padding, a [rows, 1, seq, seq] bool mask."""
    per_row = seq * (8 + 2 * dims.head_dim * w.c) + (seq * seq if w.padded else 0)
    return Part(f"positions, rotary{', mask' if w.padded else ''} ({label})", rows * per_row, "activations")


def _largest_weight(dims: ModelDims) -> int:
    return max(o * i for o, i in dims.linears())


def _dequant_part(dims: ModelDims, w: Workload) -> list[Part]:
    """bitsandbytes multiplies NF4 weights by dequantising one whole matrix to the compute
    dtype first (gate/up/down: 12,288 x 4,096 bf16 = 96 MiB at Qwen3-8B)."""
    if w.frozen != "nf4":
        return []
    return [Part("NF4 weight dequantised for a matmul", _largest_weight(dims) * w.c, "activations")]


def _sampler_part(dims: ModelDims, w: Workload, rows: int) -> Part:
    """Per decode step: the last position's logits (compute dtype), their fp32 copy, and the
    softmax probabilities, twice (the last step's stay referenced until the new ones replace
    them); temperature, top-k and top-p add [rows, V] buffers (top-p sorts: fp32 values, int64
    indices, softmax, cumsum, masks)."""
    per_vocab = w.c + 4 + 2 * 4 + (4 if w.temperature != 1.0 else 0) + (5 if w.top_k else 0) \
        + (25 if w.top_p < 1.0 else 0)
    return Part("decode logits and sampler", rows * dims.vocab * per_vocab, "activations")


def _kv_parts(dims: ModelDims, w: Workload, rows: int, tokens: int) -> list[Part]:
    per_token = dims.layers * 2 * dims.kv_dim * w.c
    return [Part(f"rollout KV cache ({rows} rows)", rows * tokens * per_token, "kv"),
            # DynamicCache appends by torch.cat: the old and new copies of one layer's keys
            Part("KV cache growth (torch.cat copy of one layer's K)", rows * tokens * dims.kv_dim * w.c, "kv")]


def _generation_phases(dims: ModelDims, w: Workload, steady: list[Part]) -> list[Phase]:
    rows, prompt = w.gen_rows, w.prompt_tokens
    prefill = Phase("prefill", (*steady, _kv_parts(dims, w, rows, prompt)[0],
                                Part(f"prefill: one block's activations ({rows} x {prompt} tokens)",
                                     rows * prompt * forward_per_token(dims, w.c, prompt, w.padded), "activations"),
                                _context_part(dims, w, rows, prompt, "prefill"), *_dequant_part(dims, w)))
    decode = Phase("decode", (*steady, *_kv_parts(dims, w, rows, w.seq - 1),
                              _sampler_part(dims, w, rows), *_dequant_part(dims, w)))
    return [prefill, decode]


def _loss_parts(dims: ModelDims, w: Workload, tokens: int, stage: str) -> list[Part]:
    """The fused linear policy loss over `tokens` completion tokens (never [T, V] logits).

    stage: "logprobs" (no-grad log-prob pass), "forward" or "backward" of the loss.
    Triton: forward writes [4, splits, T] fp32 partials and 7 [T] fp32 outputs; backward fills
    a [C, V] dL/dz chunk in the compute dtype (C: 128 MiB / (c V), a multiple of 64) and the
    hidden-state gradient [T, H]. Torch (chunked reference): chunks of C = 32 MiB / (4 V) tokens
    whose fp32 logits z (from a compute-dtype matmul output when c = 2) sit beside logsumexp's
    own z - max; the loss forward then holds z, p = exp(z - lse) and p z; backward turns z into
    dL/dz in place and casts it to the compute dtype.
    """
    v, c = dims.vocab, w.c
    grad = Part("loss: hidden-state gradient", tokens * dims.hidden * c, "activations")
    if w.loss_impl == "triton":
        if stage == "backward":
            chunk = min(max((128 * 2**20) // (c * v) // 64 * 64, 64), tokens)
            return [Part("loss: dL/dz chunk", chunk * v * c, "activations"), grad]
        # 4 fp32 partials per (split, token); splits = ceil(2 SMs / token blocks of 64), at most
        # 64: splits x T <= min(64 T, 2 SMs x 64 + T), a bound that grows with T (<= 2.2 MB + 16 B/token).
        partials = 16 * min(64 * tokens, 2 * SMS * 64 + tokens)
        return [Part("loss: fp32 partials and outputs", partials + 7 * 4 * tokens, "activations")]
    chunk = min(max(1, (32 * 2**20) // (4 * v)), tokens)
    matmul = c if c == 2 else 0
    if stage == "backward":
        return [Part("loss: logit chunk turned into dL/dz", chunk * v * (4 + matmul), "activations"), grad]
    per_row = 4 + matmul + 4 if stage == "logprobs" else 12
    return [Part("loss: logit chunks", chunk * v * per_row, "activations")]


def _rollout_part(w: Workload) -> Part:
    """Token ids and masks (int64 [B, S] twice, [B, N]) and the fp32 old / reference log-probs
    and advantages [B, N] that the update reads."""
    b, n = w.rows, w.new_tokens
    per_row = 2 * 8 * w.seq + 8 * n + 4 * n * (2 + (1 if w.beta > 0 else 0))
    return Part("rollout tensors (ids, masks, log-probs)", b * per_row, "activations")


# ---------------------------------------------------------------------------------------------
# onelayer
# ---------------------------------------------------------------------------------------------

def _onelayer_state(dims: ModelDims, w: Workload) -> tuple[list[Part], Part, int]:
    """(steady parts without the gradient, the fp32 gradient, trainable params)."""
    c, n = w.c, dims.block_params
    embeddings = dims.vocab * dims.hidden * (1 if dims.tied else 2)
    frozen = Part(f"frozen blocks, {w.frozen} ({dims.layers - 1} x {dims.block_params / 1e6:.0f} M)",
                  (dims.layers - 1) * frozen_block_bytes(dims, w.frozen, c), "weights", True)
    parts = [frozen,
             Part("embeddings + lm_head" + (" (tied)" if dims.tied else "") + f" ({w.compute})",
                  (embeddings + dims.hidden) * c, "weights", True),
             Part(f"layer {w.layer}: fp32 master weights", 4 * n, "state", True),
             Part(f"layer {w.layer}: AdamW m + v (fp32)", 8 * n, "state", True)]
    if c != 4:
        parts.append(Part(f"layer {w.layer}: {w.compute} compute copy", c * n, "state", True))
    if w.beta > 0:
        parts.append(Part(f"reference layer ({w.compute})", c * n, "state", True))
    return parts, Part(f"layer {w.layer}: gradient (fp32)", 4 * n, "state", True), n


def _logprob_phase(dims: ModelDims, w: Workload, steady: list[Part], cache: Part) -> Phase:
    """Prefix pass (inference mode, into the h_L cache) and the old / reference log-prob passes,
    a micro-batch at a time. The largest of three moments: a block's forward beside the micro-
    batch's copy of h_L rows; the final norm's output beside the completion states [T, H] it
    selects; those states beside the log-prob buffers."""
    mb, tok, tokens, c, h = w.mb, w.mb * w.seq, w.mb * w.new_tokens, w.c, dims.hidden
    rows_copy = tok * h * c
    moments = {"blocks": rows_copy + tok * max(forward_per_token(dims, c, w.seq, w.padded), norm_per_token(dims, c)),
               "head": rows_copy + tokens * h * c,
               "log-probs": tokens * h * c + _loss_parts(dims, w, tokens, "logprobs")[0].bytes}
    label = max(moments, key=moments.get)
    return Phase("log-probs", (*steady, cache, _rollout_part(w), _context_part(dims, w, mb, w.seq, "micro-batch"),
                               Part(f"pass working set (largest moment: {label})", moments[label], "activations"),
                               *_dequant_part(dims, w)))


def plan_onelayer(dims: ModelDims, w: Workload) -> Plan:
    w.check(dims)
    c, mb, tok, tokens = w.c, w.mb, w.mb * w.seq, w.mb * w.new_tokens
    state, grad, n = _onelayer_state(dims, w)
    suffix = dims.layers - 1 - w.layer
    cache = Part(f"h_L cache ({w.rows} x {w.seq} x {dims.hidden}, {w.compute})",
                 w.rows * w.seq * dims.hidden * c, "activations")
    # Every update moment keeps these: h_L, layer L's saved activations, the differentiable
    # compute-dtype cast of its weights, the masks and rotary tables (checkpointing keeps its
    # arguments) and the completion states (a local of the update until it returns).
    base = [cache, _rollout_part(w), _context_part(dims, w, mb, w.seq, "micro-batch"),
            Part(f"layer {w.layer}: saved activations ({tok} tokens)",
                 tok * saved_per_token(dims, c, w.seq, w.padded, "trained"), "activations"),
            Part(f"completion hidden states ({tokens} x {dims.hidden})", tokens * dims.hidden * c, "activations")]
    if c != 4:
        base.append(Part(f"layer {w.layer}: {w.compute} cast of the master for autograd", c * n, "state"))
    checkpointed = Part(f"checkpointed suffix inputs ({suffix} blocks)", suffix * tok * dims.hidden * c,
                        "activations")
    norm_saved = Part("final norm: saved fp32 input", tok * (4 * dims.hidden + 4), "activations")
    block_grads = Part("block backward gradients", tok * block_backward_per_token(dims, c), "activations")
    # The forward ends with the micro-batch's h_L rows and the final norm's output beside the
    # states it selects, or with the loss's forward buffers.
    head = max(2 * tok * dims.hidden * c, _loss_parts(dims, w, tokens, "forward")[0].bytes)
    # The engine zeroes gradients after the forward: the last step's are still alive in it.
    # With several micro-batches per minibatch, the accumulated ones are alive in backward too.
    grad_in_backward = [grad] if mb < w.minibatch_rows else []
    phases = [*_generation_phases(dims, w, [*state, grad]),
              _logprob_phase(dims, w, [*state, grad], cache),
              Phase("update: forward", (*state, grad, *base, checkpointed, norm_saved,
                                        Part("head: h_L rows + norm output, or loss buffers", head, "activations"))),
              Phase("update: loss bwd", (*state, *grad_in_backward, *base, checkpointed, norm_saved,
                                         *_loss_parts(dims, w, tokens, "backward")))]
    if suffix:
        phases.append(Phase("update: suffix bwd", (
            *state, *grad_in_backward, *base, checkpointed, block_grads, *_dequant_part(dims, w),
            Part("suffix block recomputed: saved activations",
                 tok * saved_per_token(dims, c, w.seq, w.padded, "frozen"), "activations"))))
    phases.append(Phase("update: layer bwd", (*state, grad, *base, block_grads,
                                              Part(f"a weight gradient in {w.compute}", _largest_weight(dims) * c,
                                                   "activations"))))
    phases.append(Phase("optimizer", (*state, grad, *base[:2], base[4], _adamw_part(dims, w))))
    return Plan(f"onelayer (layer {w.layer}, {w.frozen} frozen)", n, tuple(phases), w.device)


def _adamw_part(dims: ModelDims, w: Workload) -> Part:
    """torch AdamW. CUDA: the foreach path makes sqrt(v) for all the layer's parameters at once
    (fp32). CPU: the single-tensor loop makes sqrt(v) and the denominator per tensor and keeps
    the previous tensor's denominator until the next replaces it (3 of the largest matrix)."""
    size = 4 * dims.block_params if w.device == "cuda" else 3 * 4 * _largest_weight(dims)
    return Part("AdamW temporaries", size, "activations")


# ---------------------------------------------------------------------------------------------
# TRL's QLoRA and full-parameter GRPO (the anchors of BENCHMARKS.md)
# ---------------------------------------------------------------------------------------------

def _trl_loss_parts(dims: ModelDims, w: Workload, tokens: int, weight_grad: bool) -> list[Part]:
    """TRL 1.16's fused LM head (trl.kernels.ChunkedLogProbFunction): a [min(T, 4096), 32768]
    logit tile in the compute dtype, the hidden-state gradient accumulated in fp32, and for a
    trained lm_head an fp32 [V, H] weight gradient before its cast. No [B, T, V] logits."""
    parts = [Part("fused LM head: logit tile", min(tokens, 4096) * min(dims.vocab, 32768) * w.c, "activations"),
             Part("fused LM head: hidden states + fp32 gradient", tokens * dims.hidden * (w.c + 4), "activations")]
    if weight_grad:
        parts.append(Part("fused LM head: fp32 lm_head gradient", 4 * dims.vocab * dims.hidden, "activations"))
    return parts


def _trl_plan(dims: ModelDims, w: Workload, method: str, state: list[Part], grads: Part,
              trainable: int, block_kind: str, checkpointing: bool) -> Plan:
    c, tok, tokens = w.c, w.mb * w.seq, w.mb * w.new_tokens
    saved = Part(f"saved activations, {'one block' if checkpointing else f'{dims.layers} blocks'}",
                 tok * saved_per_token(dims, c, w.seq, w.padded, block_kind) * (1 if checkpointing else dims.layers),
                 "activations")
    common = [_context_part(dims, w, w.mb, w.seq, "batch"),
              Part("final norm: saved fp32 input", tok * (4 * dims.hidden + 4), "activations")]
    if checkpointing:
        common.append(Part(f"checkpointed block inputs ({dims.layers} blocks)",
                           dims.layers * tok * dims.hidden * c, "activations"))
    full = block_kind == "full"
    phases = [*_generation_phases(dims, w, state),
              Phase("loss bwd", (*state, *common, *([] if checkpointing else [saved]),
                                 *_trl_loss_parts(dims, w, tokens, weight_grad=full)))]
    # The last block's backward (recomputed when checkpointing); with every weight trained, the
    # gradients exist by the optimizer step, when activations are gone.
    phases.append(Phase("block bwd", (*state, *common, saved,
                                      Part("block backward gradients", tok * block_backward_per_token(dims, c),
                                           "activations"),
                                      *(_dequant_part(dims, w) if block_kind == "lora" else []))))
    phases.append(Phase("optimizer", (*state, grads)))
    return Plan(method, trainable, tuple(phases), w.device)


def plan_qlora(dims: ModelDims, w: Workload) -> Plan:
    """PEFT LoRA r16 on the 7 linears of every block over an NF4 base (embeddings and lm_head in
    bf16), adapters in fp32, fused AdamW, gradient checkpointing on every block."""
    w.check(dims)
    lora = dims.layers * LORA_RANK * sum(o + i for o, i in dims.linears())
    embeddings = dims.vocab * dims.hidden * (1 if dims.tied else 2)
    state = [Part(f"NF4 blocks ({dims.layers} x {dims.block_params / 1e6:.0f} M)",
                  dims.layers * frozen_block_bytes(dims, "nf4", w.c), "weights", True),
             Part(f"embeddings + lm_head ({w.compute})", (embeddings + dims.hidden) * w.c, "weights", True),
             Part(f"LoRA adapters r{LORA_RANK} (fp32) + AdamW m + v", 12 * lora, "state", True)]
    grads = Part("LoRA gradients (fp32)", 4 * lora, "state", True)
    return _trl_plan(dims, w, f"QLoRA r{LORA_RANK} all-linear (TRL 1.16, checkpointing)", state, grads, lora,
                     "lora", checkpointing=True)


def plan_full(dims: ModelDims, w: Workload, *, checkpointing: bool) -> Plan:
    """Every parameter trained in bf16 with AdamW states in bf16 (TRL's default for a bf16 model);
    a bf16 reference model when beta > 0."""
    w.check(dims)
    n = dims.params
    state = [Part(f"weights ({w.compute})", n * w.c, "weights", True),
             Part(f"AdamW m + v ({w.compute})", 2 * n * w.c, "state", True)]
    if w.beta > 0:
        state.append(Part(f"reference model ({w.compute})", n * w.c, "weights", True))
    grads = Part(f"gradients ({w.compute})", n * w.c, "state", True)
    label = f"full-parameter {w.compute} AdamW (TRL 1.16, {'checkpointing' if checkpointing else 'no checkpointing'})"
    return _trl_plan(dims, w, label, state, grads, n, "full", checkpointing)


def plan_all(dims: ModelDims, w: Workload) -> list[Plan]:
    """onelayer as configured; QLoRA and full-parameter RL on the same workload in the compute
    dtype on CUDA (how TRL runs them)."""
    trl = dataclasses.replace(w, compute="bf16", device="cuda")
    return [plan_onelayer(dims, w), plan_qlora(dims, trl),
            plan_full(dims, trl, checkpointing=True), plan_full(dims, trl, checkpointing=False)]


# ---------------------------------------------------------------------------------------------
# What fits
# ---------------------------------------------------------------------------------------------

def largest_fit(dims: ModelDims, w: Workload, budget: int, knob: str, limit: int) -> int:
    """Largest value <= limit of `knob` (new_tokens or group_size) for which onelayer's peak
    reserved memory fits `budget`; 0 when even 1 does not. Memory grows with either knob, so an
    exponential search brackets the answer and a binary search finds it."""
    def fits(value: int) -> bool:
        return plan_onelayer(dims, dataclasses.replace(w, **{knob: value})).fits(budget)

    if limit < 1 or not fits(1):
        return 0
    good, bad = 1, 2
    while bad <= limit and fits(bad):
        good, bad = bad, bad * 2
    bad = min(bad, limit + 1)
    while bad - good > 1:
        mid = (good + bad) // 2
        good, bad = (mid, bad) if fits(mid) else (good, mid)
    return good


@dataclass(frozen=True)
class BatchChoice:
    """Sequences per forward/backward and rows per generate call that fit a budget."""
    micro_batch: int
    generation_batch: int
    plan: Plan

    def describe(self, budget: int) -> str:
        return (f"micro-batch {self.micro_batch}, generation batch {self.generation_batch}: peak "
                f"{self.plan.reserved / GiB:.1f} GiB reserved of {budget / GiB:.1f} GiB")


def choose_batches(dims: ModelDims, w: Workload, budget: int) -> BatchChoice:
    """The largest micro-batch and generation batch whose step fits `budget` bytes (reserved).

    Generation batch sizes only the prefill and decode phases, the micro-batch only the others,
    so each is the largest that fits with the other at 1. A step that cannot fit at 1 and 1
    raises UserError naming the knob to change and by how much, before any weight is loaded."""
    def fit(knob: str, limit: int) -> int:
        trial = dataclasses.replace(w, micro_batch=1, generation_batch=1)
        return largest_fit(dims, trial, budget, knob, limit)

    micro, generation = fit("micro_batch", w.minibatch_rows), fit("generation_batch", w.rows)
    if micro and generation:
        chosen = dataclasses.replace(w, micro_batch=micro, generation_batch=generation)
        return BatchChoice(micro, generation, plan_onelayer(dims, chosen))
    raise UserError(_what_to_change(dims, dataclasses.replace(w, micro_batch=1, generation_batch=1), budget))


def _what_to_change(dims: ModelDims, w: Workload, budget: int) -> str:
    """One line: the knob that makes a step fit, with the value that does."""
    plan = plan_onelayer(dims, w)
    need = f"{plan.reserved / GiB:.1f} GiB needed, {budget / GiB:.1f} GiB available"
    tokens = largest_fit(dims, w, budget, "new_tokens", w.new_tokens - 1)
    if tokens:
        return f"{need} even one sequence at a time: lower --max-new-tokens from {w.new_tokens} to {tokens}"
    steady = sum(p.bytes for p in plan.phases[0].parts if p.steady)
    if w.frozen != "nf4":
        return f"{need}: weights and layer state alone take {steady / GiB:.1f} GiB; use --frozen-dtype nf4"
    return (f"{need}: weights and layer state alone take {steady / GiB:.1f} GiB; use a smaller model or a "
            f"GPU with more memory")


# ---------------------------------------------------------------------------------------------
# The `plan` command
# ---------------------------------------------------------------------------------------------

SIZE_UNITS = {"": GiB, "b": 1, "kb": 10**3, "mb": 10**6, "gb": 10**9, "tb": 10**12,
              "kib": 2**10, "mib": 2**20, "gib": GiB, "tib": 2**40}


def parse_size(text: str) -> int:
    """'24GiB', '22.5 GB', '24000MiB', '24' (GiB) -> bytes."""
    match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]*)\s*", str(text))
    unit = match and SIZE_UNITS.get(match.group(2).lower())
    if not unit:
        raise UserError(f"memory size {text!r}: expected a number with a unit such as 24GiB, 22.5GB or 24000MiB")
    return int(float(match.group(1)) * unit)


def read_model_config(model: str) -> dict:
    """config.json of the demo, a local model directory, a config.json file, or a hub id (only
    config.json is downloaded)."""
    from .model.load import DEMO_MODEL, DEMO_PATH

    path = Path(model).expanduser()
    if model == DEMO_MODEL:
        path = DEMO_PATH / "config.json"
    elif path.is_dir():
        path = path / "config.json"
    elif not path.is_file():
        if model.count("/") != 1 or model.startswith((".", "/")):
            raise UserError(f"model {model!r} is neither a model directory, a config.json nor a hub id")
        from huggingface_hub import hf_hub_download
        try:
            path = Path(hf_hub_download(model, "config.json"))
        except Exception as exc:  # hub errors have many types; all mean "cannot get this config"
            raise UserError(f"cannot get config.json of {model!r} from the hub: {str(exc).splitlines()[0]}")
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise UserError(f"{path}: cannot read a JSON model config ({exc})")


def workload_from_config(cfg, dims: ModelDims, *, prompt_tokens: int, micro_batch: int = 0,
                         generation_batch: int = 0) -> Workload:
    """The Workload of a `onelayer train` run configuration (onelayer.config.TrainConfig)."""
    from .model.load import resolve_layer

    device = "cpu" if str(cfg.device or "cuda").startswith("cpu") else "cuda"
    frozen = cfg.frozen_dtype or ("nf4" if device == "cuda" else "fp32")
    # As onelayer.model.load.compute_dtype_for: NF4 computes in bf16 on GPU, fp32 on CPU.
    compute = "bf16" if frozen == "bf16" or (frozen == "nf4" and device == "cuda") else "fp32"
    loss = "triton" if cfg.loss_impl == "triton" or (cfg.loss_impl == "auto" and device == "cuda") else "torch"
    return Workload(prompts=cfg.prompts_per_step, group_size=cfg.group_size, prompt_tokens=prompt_tokens,
                    new_tokens=cfg.max_new_tokens, layer=resolve_layer(cfg.layer, dims.layers),
                    micro_batch=micro_batch or getattr(cfg, "micro_batch", 0) or 0,
                    generation_batch=generation_batch, minibatch=cfg.minibatch, beta=cfg.beta, frozen=frozen,
                    compute=compute, device=device, loss_impl=loss, temperature=cfg.temperature,
                    top_p=cfg.top_p, top_k=cfg.top_k)


@dataclass(frozen=True)
class Report:
    """Everything `onelayer plan` prints, for the table and for --json."""
    model: ModelDims
    workload: Workload
    card_bytes: int
    budget_bytes: int
    plans: tuple[Plan, ...]
    largest_new_tokens: int
    largest_group_size: int


def build_report(dims: ModelDims, w: Workload, card_bytes: int) -> Report:
    budget = card_bytes - (CUDA_CONTEXT if w.device == "cuda" else 0)
    if budget <= 0:
        raise UserError(f"--gpu-memory {card_bytes / GiB:.2f} GiB leaves nothing beside the CUDA context")
    return Report(dims, w, card_bytes, budget, tuple(plan_all(dims, w)),
                  largest_fit(dims, w, budget, "new_tokens", dims.max_positions - w.prompt_tokens),
                  largest_fit(dims, w, budget, "group_size", 1 << 16))


def _gib(n: int) -> str:
    return f"{n / GiB:.2f}"


def _count(n: int) -> str:
    return f"{n / 1e9:.2f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"


def _parts_table(plan: Plan) -> list[str]:
    """Every part once, with its largest size, the stages it is alive in, and its bytes at the peak."""
    peak = plan.peak
    at_peak = {p.name: p.bytes for p in peak.parts}
    sizes: dict[str, int] = {}
    stages: dict[str, list[str]] = {}
    for phase in plan.phases:
        for part in phase.parts:
            sizes[part.name] = max(sizes.get(part.name, 0), part.bytes)
            if phase.stage not in stages.setdefault(part.name, []):
                stages[part.name].append(phase.stage)
    every = {ph.stage for ph in plan.phases}
    rows = [f"| {plan.method}: part | GiB | alive in | at peak ({peak.name}) |", "|---|---:|---|---:|"]
    for name, size in sizes.items():
        alive = "every phase" if set(stages[name]) == every else ", ".join(stages[name])
        rows.append(f"| {name} | {_gib(size)} | {alive} | {_gib(at_peak[name]) if name in at_peak else ''} |")
    rows += [f"| **peak allocated** | | | **{_gib(plan.allocated)}** |",
             f"| allocator slack (estimate) | | | {_gib(plan.slack)} |",
             f"| **peak reserved** | | | **{_gib(plan.reserved)}** |"]
    return rows


def _methods_table(plans: tuple[Plan, ...], budget: int) -> list[str]:
    """Per method: steady weights and trained state, then the peaks of generation and training."""
    rows = [f"| method | trainable | weights | trained state | generation peak | training peak | peak allocated | "
            f"peak reserved | fits {budget / GiB:.1f} GiB |", "|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    for plan in plans:
        def steady(kind: str) -> int:
            return max(sum(p.bytes for p in ph.parts if p.kind == kind and p.steady) for ph in plan.phases)

        def peak(generation: bool) -> int:
            return max(ph.allocated for ph in plan.phases if (ph.stage == "generate") == generation)

        cells = [steady("weights"), steady("state"), peak(True), peak(False), plan.allocated, plan.reserved]
        rows.append(f"| {plan.method} | {_count(plan.trainable_params)} | " + " | ".join(_gib(v) for v in cells)
                    + f" | {'yes' if plan.fits(budget) else 'no'} |")
    return rows


def _fit_lines(report: Report) -> list[str]:
    w, budget = report.workload, report.budget_bytes
    lines = [f"Largest onelayer steps that fit {budget / GiB:.1f} GiB at micro-batch {w.mb} and generation batch "
             f"{w.gen_rows}: --max-new-tokens {report.largest_new_tokens} (at {w.rows} sequences), --group-size "
             f"{report.largest_group_size} (at {w.prompts} prompts x {w.new_tokens} new tokens)."]
    try:
        choice = choose_batches(report.model, w, budget)
    except UserError as exc:
        return lines + [f"This step does not fit at any batch size: {exc}."]
    return lines + [f"Largest batches that fit this step: --micro-batch {choice.micro_batch} --generation-batch "
                    f"{choice.generation_batch} (peak {choice.plan.reserved / GiB:.2f} GiB reserved)."]


def format_plan(report: Report) -> str:
    """Markdown: the workload, onelayer part by part, the methods side by side, what fits."""
    d, w, onelayer = report.model, report.workload, report.plans[0]
    card = (f"{report.card_bytes / GiB:.1f} GiB card - {CUDA_CONTEXT / GiB:.1f} GiB CUDA context = "
            if w.device == "cuda" else "")
    return "\n".join([
        f"## onelayer plan: {d.name}, layer {w.layer} of {d.layers}", "",
        f"{w.prompts} prompts x {w.group_size} completions = {w.rows} sequences of {w.prompt_tokens} prompt + "
        f"{w.new_tokens} new tokens (all full length); micro-batch {w.mb}, generation batch {w.gen_rows}; "
        f"beta {w.beta:g}; {w.frozen} frozen blocks, {w.compute} compute, {w.loss_impl} loss, {w.device}. "
        f"Budget: {card}{report.budget_bytes / GiB:.1f} GiB for tensors.", "",
        *_parts_table(onelayer), "",
        "Phases (allocated / reserved GiB): " + ", ".join(
            f"{p.name} {_gib(p.allocated)} / {_gib(onelayer.reserved_at(p))}" for p in onelayer.phases), "",
        *_methods_table(report.plans, report.budget_bytes), "", *_fit_lines(report)])


def report_json(report: Report) -> str:
    def plan(p: Plan) -> dict:
        return {"method": p.method, "trainable_params": p.trainable_params, "peak_phase": p.peak.name,
                "allocated_bytes": p.allocated, "reserved_bytes": p.reserved,
                "fits": p.fits(report.budget_bytes),
                "phases": [{"name": ph.name, "allocated_bytes": ph.allocated, "reserved_bytes": p.reserved_at(ph),
                            "parts": [dataclasses.asdict(part) for part in ph.parts]} for ph in p.phases]}

    return json.dumps({"model": dataclasses.asdict(report.model), "workload": dataclasses.asdict(report.workload),
                       "card_bytes": report.card_bytes, "budget_bytes": report.budget_bytes,
                       "largest_fit": {"max_new_tokens": report.largest_new_tokens,
                                       "group_size": report.largest_group_size},
                       "plans": [plan(p) for p in report.plans]}, indent=2)


def plan_command(options: dict, *, config_file: str | None = None, gpu_memory: str = "24GiB",
                 prompt_tokens: int = 256, micro_batch: int = 0, generation_batch: int = 0,
                 as_json: bool = False) -> str:
    """`onelayer plan`: `options` are train options (model, layer, group_size, prompts_per_step,
    max_new_tokens, beta, frozen_dtype, ...; None = unset) over the config file's; returns the
    text to print."""
    from .config import build_config

    cfg = build_config({k: v for k, v in options.items() if v is not None}, config_file)
    dims = ModelDims.from_config(read_model_config(cfg.model), cfg.model)
    if prompt_tokens < 1:
        raise UserError("--max-prompt-tokens must be >= 1")
    w = workload_from_config(cfg, dims, prompt_tokens=prompt_tokens, micro_batch=micro_batch,
                             generation_batch=generation_batch)
    w.check(dims)
    report = build_report(dims, w, parse_size(gpu_memory))
    return report_json(report) if as_json else format_plan(report)
