"""What memory depends on (the model's shape, the workload) and what a step holds (parts,
phases, plans), with the per-token counts of saved and transient activations."""
from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass

from ..errors import UserError

GiB = 2**30
DTYPE_BYTES = {"fp32": 4, "bf16": 2}
FROZEN_DTYPES = ("nf4", "bf16", "fp32")
# Reserved minus allocated, as a fraction of the bytes allocated within a step (activations,
# caches, transients; not the weights and optimizer state, which are allocated once and never
# fragment). H100, Qwen3-8B NF4, 8 x 512: 12.38 - 11.14 GiB over the ~3.0 GiB allocated within
# the step at its peak = 0.42; TRL's anchors give 0.4-0.7 for QLoRA and one-layer bf16.
SLACK = 0.45
LORA_RANK = 16
# Streaming multiprocessors of the GPU the Triton loss sizes its vocabulary splits for (H100 SXM).
SMS = 132
# onelayer.rollout.decoder.LENGTH_BUCKET (a test keeps them equal): the static decoder's cache
# length is prompt + completion rounded up to a multiple of it.
DECODER_LENGTH_BUCKET = 128


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
    generation_batch: int = 0     # rows generated at once (whole groups); 0: all rows
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
    optimizer_shards: int = 1     # zero1 over N processes: each holds 1/N of AdamW's moments
    offload_optimizer: bool = False  # the layer's master, AdamW state, reference on the host in rollouts

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
        """Rows per generate call: whole groups, at least one (as `single_turn.sample_groups`
        splits them)."""
        if not self.generation_batch:
            return self.rows
        return min(max(1, self.generation_batch // self.group_size) * self.group_size, self.rows)

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
    """Gradients alive at once inside one block's backward, at its peak, the MLP's product:
    dL/d(product) and the gradients of both factors ([I] each), and the gradient flowing into
    the block ([H]); the MLP's input gradient is formed after those are freed."""
    return 3 * c * dims.intermediate + c * dims.hidden


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


def context_part(dims: ModelDims, w: Workload, rows: int, seq: int, label: str) -> Part:
    """What every block call of a pass receives: int64 position ids, rotary cos and sin
    [rows, seq, head_dim] in the compute dtype and, with padding, a [rows, 1, seq, seq] bool mask."""
    per_row = seq * (8 + 2 * dims.head_dim * w.c) + (seq * seq if w.padded else 0)
    return Part(f"positions, rotary{', mask' if w.padded else ''} ({label})", rows * per_row, "activations")


def largest_weight(dims: ModelDims) -> int:
    return max(o * i for o, i in dims.linears())


def dequant_part(dims: ModelDims, w: Workload) -> list[Part]:
    """bitsandbytes multiplies NF4 weights by dequantising one whole matrix to the compute
    dtype first (gate/up/down: 12,288 x 4,096 bf16 = 96 MiB at Qwen3-8B)."""
    if w.frozen != "nf4":
        return []
    return [Part("NF4 weight dequantised for a matmul", largest_weight(dims) * w.c, "activations")]


def _sampler_part(dims: ModelDims, w: Workload, rows: int) -> Part:
    """HF generate, per decode step: the last position's logits (compute dtype), their fp32 copy, and the
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


def hf_generate_phases(dims: ModelDims, w: Workload, steady: list[Part]) -> list[Phase]:
    """Hugging Face `generate` (TRL's rollouts): a dynamic cache that grows a column at a time."""
    rows, prompt = w.gen_rows, w.prompt_tokens
    prefill = Phase("prefill", (*steady, _kv_parts(dims, w, rows, prompt)[0],
                                Part(f"prefill: one block's activations ({rows} x {prompt} tokens)",
                                     rows * prompt * forward_per_token(dims, w.c, prompt, w.padded), "activations"),
                                context_part(dims, w, rows, prompt, "prefill"), *dequant_part(dims, w)))
    decode = Phase("decode", (*steady, *_kv_parts(dims, w, rows, w.seq - 1),
                              _sampler_part(dims, w, rows), *dequant_part(dims, w)))
    return [prefill, decode]


def decoder_columns(w: Workload) -> int:
    """Cache columns of onelayer's static decoder: prompt + completion rounded up to
    DECODER_LENGTH_BUCKET."""
    return -(-w.seq // DECODER_LENGTH_BUCKET) * DECODER_LENGTH_BUCKET


def decoder_phases(dims: ModelDims, w: Workload, steady: list[Part]) -> list[Phase]:
    """onelayer's static decoder (rollout/decoder.py), one generate call of `gen_rows` rows.

    Its KV cache holds every layer's keys and values for the whole length from the prefill on
    (the dynamic-cache loop that some models fall back to grows to about as much: the same
    length, unrounded, plus a copy of one layer's keys as it grows), beside the step
    buffers: the attendable mask (bool), tokens and mask (int64) and log-probs (fp32) per row
    and column. The prefill runs each group's prompt once (rows / G rows) under an explicit
    mask, then copies its keys and values to the group's rows. A sampled decode step draws
    fp32 noise [rows, V] into a buffer, then holds the step's logits (compute dtype) with the
    fp32 scores, probabilities and probabilities / noise; top-k and top-p add [rows, V]
    buffers as in HF generate. The step keeps nothing after it: its outputs are written into
    the buffers."""
    rows, prompt, columns = w.gen_rows, w.prompt_tokens, decoder_columns(w)
    distinct = max(1, rows // w.group_size)
    masked = dataclasses.replace(w, padded=True)
    cache = [Part(f"decoder KV cache ({rows} rows x {columns} columns)",
                  rows * columns * dims.layers * 2 * dims.kv_dim * w.c, "kv"),
             Part("decoder buffers (mask, tokens, log-probs)", rows * columns * (1 + 8 + 4 + 8), "kv")]
    prefill = Phase("prefill", (*steady, *cache,
                                Part(f"prefill: one block's activations ({distinct} x {prompt} tokens)",
                                     distinct * prompt * forward_per_token(dims, w.c, prompt, True), "activations"),
                                context_part(dims, masked, distinct, prompt, "prefill"), *dequant_part(dims, w)))
    per_vocab = (4 if w.temperature > 0 else 0) + w.c + 12 + (5 if w.top_k else 0) + (25 if w.top_p < 1.0 else 0)
    decode = Phase("decode", (*steady, *cache,
                              Part("decode noise, logits and sampler", rows * dims.vocab * per_vocab, "activations"),
                              *dequant_part(dims, w)))
    return [prefill, decode]


def loss_parts(dims: ModelDims, w: Workload, tokens: int, stage: str) -> list[Part]:
    """The fused linear policy loss over `tokens` completion tokens (never [T, V] logits).

    stage: "logprobs" (no-grad log-prob pass), "forward" or "backward" of the loss.
    Triton: forward writes [4, splits, T] fp32 partials and 7 [T] fp32 outputs; backward fills
    a [C, V] dL/dz chunk in the compute dtype (C: 128 MiB / (c V), a multiple of 64) and the
    hidden-state gradient [T, H]. Torch (chunked reference): chunks of C = 32 MiB / (4 V) tokens
    whose fp32 logits z (cast from a compute-dtype matmul output when c = 2, which is freed
    before logsumexp runs) sit beside logsumexp's own z - max; the loss forward then holds z,
    p = exp(z - lse) and p z; backward turns z into dL/dz in place and casts it to the compute
    dtype.
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
    per_row = 8 if stage == "logprobs" else 12
    return [Part("loss: logit chunks", chunk * v * per_row, "activations")]


def rollout_part(w: Workload) -> Part:
    """Token ids and masks (int64 [B, S] twice, [B, N]) and the fp32 old / reference log-probs
    and advantages [B, N] that the update reads."""
    b, n = w.rows, w.new_tokens
    per_row = 2 * 8 * w.seq + 8 * n + 4 * n * (2 + (1 if w.beta > 0 else 0))
    return Part("rollout tensors (ids, masks, log-probs)", b * per_row, "activations")
