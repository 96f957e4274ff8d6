"""The static-shape decoder behind `generate_completions`: a preallocated KV cache, one batched
prefill, then one decode step whose shapes never change, captured as a CUDA graph on CUDA.

    prefill   prompts [B, P] -> keys/values into cache columns [0, P), logits of column P - 1
              (a GRPO group's G copies of a prompt: the prompt once, its keys and values copied)
    decode    token [B] at cache column c (positions [B]): writes column c, attends over the
              first A columns of the cache under the mask buffer (A: ATTEND_MIN doubled until
              it holds column c, at most S), samples token c + 1 on the device,
              writes it into the output buffers at step t, advances c, t and the positions
              (all in place: the step reads and writes the same tensors every time)

Every buffer is allocated for a capacity (B_cap rows, S_cap columns, S_cap a multiple of
LENGTH_BUCKET) and reused by later calls that fit: a smaller batch takes the first B rows
(views, same addresses), a longer prompt + completion that does not fit grows the buffers and
drops every captured graph. One graph is captured per (batch, attended columns A, sampling
parameters, stop ids, pad id), all in one memory pool; the last MAX_GRAPHS are kept.

What decides the token is what `generate.py` documents: softmax(logits / T), top-k, then
top-p, nothing else. The draw is `torch.multinomial`'s own fast path written out: noise
E ~ Exp(1) per vocabulary entry from the caller's generator, token = argmax(probs / E); this
is exactly a draw from probs, and from the same generator state it picks the very token
`torch.multinomial(probs, 1)` picks. The noise is drawn eagerly before each step (one kernel)
so that the generator's state advances outside the graph; everything else is in the graph.

Host syncs: none per token on CUDA. Every CHECK_EVERY steps the host reads `done` (stop when every row
has stopped) and, when the call has stop strings, the new tokens: a stop string is decoded on
the host, so its row is cut back to the token that completed it (mask, tokens and log-probs
after it cleared), up to CHECK_EVERY - 1 tokens after the fact. Stop tokens (EOS, end of turn)
are checked on the device at every step. So a batch runs at most CHECK_EVERY - 1 steps past
its last stop; their outputs are discarded. On CPU the check runs after every step (free there).

Where it runs: on CUDA the decode step is a CUDA graph (GRAPH_MODE "manual": torch.cuda.graph
capture after WARMUP eager steps on a side stream; "compile": torch.compile(mode=
"reduce-overhead"); "off": eager). On CPU the same step function runs eagerly; CI tests it so.
`unsupported(lm)` names the models this decoder cannot run exactly; `generate.sample` sends
them to the dynamic-cache loop.

Attention: a step attends the first A cache columns (masked columns weigh exactly 0), A the
smallest of 256, 512, 1,024, ... (or S) that holds the columns written so far, so the keys and
values a step reads grow with the batch's length instead of being the whole static length S
from the first token (gpt-fast attends all of S; at 32 rows x 1,224 columns of Qwen3-8B the
cache is 5.8 GB a step, more than the 4.8 GB of NF4 weights). A doubling costs one more
capture per batch shape. The mask buffer `valid` [B, S] marks real prompt tokens and the
generated columns written so far. Sliding-window layers get the same buffer with their window
applied in column space (j > c - window): real tokens of a row are contiguous, so this is the
window in positions that Hugging Face's masks use.

Grouped-query attention (attention.py): while the decoder runs, an sdpa model with fewer
key/value heads than query heads runs our own attention function (the model's
`_attn_implementation` is swapped for the call and restored after it, on an error too; the
training forward never sees it). In the decode step it folds each group's g query heads into
g query rows of their key/value head, so SDPA reads the cache as it is. What that saves, for
Qwen3-8B (36 layers, 8 key/value heads of 128, g = 4, bf16) at B = 8 rows x L = 1,024
attended cache columns: the cache holds 2 (K, V) x 8 x 8 x
1,024 x 128 x 2 bytes = 33.5 MB a layer, 1.2 GB a step, which any decoder reads. Copying the
keys and values to 32 heads first (transformers' sdpa with a dense mask before 5.23, and under
dynamo in 5.23+) reads those 33.5 MB, writes 134 MB and SDPA reads the 134 MB back: ~302 MB a
layer, ~10.9 GB a step, 9.7 GB more than the fold, about twice the 4.8 GiB of NF4 weights a
step reads. At the benchmark's 8 x (48 + 512) tokens (L = 640) the difference is ~6 GB a step.
With transformers 5.24 in eager or "manual" (CUDA graph) mode, transformers' own sdpa already
folds the decode step (its `pack_gqa`); ours matters for GRAPH_MODE "compile" and for
transformers 5.20-5.22, and makes the step the same on every version. The prefill (P query
tokens) keeps transformers' path: one copy of the prompt's keys and values a layer.
ONELAYER_DECODE_GQA=repeat copies instead of folding, to time the two (gpu_check.sh does); the
speed-up on a GPU is not measured yet.

Element-wise ops (fusion.py): at 8 rows a decode step is a few kilobytes of activations a
layer, so each of the ~60 ops a layer runs costs a kernel launch, graph or not. On CUDA
(graph modes manual and off) every RMSNorm, the rotary embedding and the SiLU gate run as one
Triton kernel each while the decoder runs, checked once per model against the model's own
forward; ONELAYER_DECODE_FUSED=off keeps the model's ops (to time the two).
"""
from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import os
import weakref
from collections import OrderedDict
from dataclasses import dataclass

import torch
from torch import Tensor
from transformers import Cache

from ..model.split import layer_types, positions
from . import fusion
from .attention import attention_implementation, decode_attention

log = logging.getLogger("onelayer")

# manual (default): torch.cuda.CUDAGraph capture, the least machinery between us and the GPU
# (no dynamo tracing of the Hugging Face forward, the NF4 kernels and the cache); compile:
# torch.compile(mode="reduce-overhead"); off: eager on CUDA too. To be chosen by measurement:
# benchmarks/bench_train_step.py times them on the GPU (decode_ms_by_mode), and
# benchmarks/check_kernels_gpu.py checks their tokens against Hugging Face generate.
GRAPH_MODE = os.environ.get("ONELAYER_DECODE_GRAPH", "manual")
CHECK_EVERY = 8        # decode steps between host checks of `done` (and of stop strings), CUDA
LENGTH_BUCKET = 128    # cache length rounded up to this: prompts of varying length share a graph
WARMUP = 2             # eager steps on a side stream before a capture (Triton JIT, cuBLAS init)
MAX_GRAPHS = 16        # captured graphs kept per model (they share one memory pool)
ATTEND_MIN = 256       # a decode step attends the first A cache columns, A the smallest of
                       # ATTEND_MIN, 2 ATTEND_MIN, 4 ATTEND_MIN, ... (or S) that holds every
                       # column written so far: one graph for each A a batch reaches

ATTENTION_KINDS = ("full_attention", "sliding_attention")


@dataclass
class Samples:
    """What the decode loop returns for a batch of B rows, C = steps run (<= max_new_tokens)."""
    tokens: Tensor      # [B, C] int64, pad after a row's stop
    logprobs: Tensor    # [B, C] float32, 0 after a row's stop
    mask: Tensor        # [B, C] int64, 1 up to and including the stop
    truncated: Tensor   # [B] bool, the row never stopped


# ---------------------------------------------------------------------------------------------
# Sampling one token (on the device, no sync)
# ---------------------------------------------------------------------------------------------

def restrict(scores: Tensor, top_k: int, top_p: float) -> Tensor:
    """scores [..., V] with every token outside the top-k, then outside the nucleus of mass
    top_p, set to -inf. The nucleus is the smallest set of highest-probability tokens whose
    mass reaches top_p (the most likely token is always kept)."""
    if 0 < top_k < scores.shape[-1]:
        kth = scores.topk(top_k, dim=-1).values[..., -1:]
        scores = scores.masked_fill(scores < kth, float("-inf"))
    if top_p < 1.0:
        ranked, order = scores.sort(dim=-1, descending=True)
        probs = ranked.softmax(dim=-1)
        mass_before = probs.cumsum(dim=-1) - probs
        outside = torch.zeros_like(mass_before, dtype=torch.bool).scatter_(
            -1, order, mass_before >= top_p)
        scores = scores.masked_fill(outside, float("-inf"))
    return scores


def pick(logits: Tensor, params, noise: Tensor | None) -> tuple[Tensor, Tensor]:
    """Next tokens [B] and their log-probs [B] (float32) from last-position logits [B, V].

    Sampling: argmax(probs / noise) with noise [B, V] ~ Exp(1) (see the module docstring), and
    the log-prob of the distribution drawn from. Greedy (noise unused): argmax, with its
    log-prob under softmax(logits / T)."""
    scores = logits.float() / params.temperature
    if params.greedy:
        tokens = scores.argmax(dim=-1)
    else:
        scores = restrict(scores, params.top_k, params.top_p)
        tokens = (scores.softmax(dim=-1) / noise).argmax(dim=-1)
    logprobs = scores.log_softmax(dim=-1).gather(-1, tokens[:, None]).squeeze(1)
    return tokens, logprobs


def pick_tokens(logits: Tensor, params, generator: torch.Generator | None) -> tuple[Tensor, Tensor]:
    """`pick` with fresh noise from `generator` (None: torch's global stream): the same token
    as torch.multinomial(probs, 1, generator=generator)."""
    noise = None
    if not params.greedy:
        noise = torch.empty(logits.shape, dtype=torch.float32, device=logits.device)
        noise.exponential_(1, generator=generator)
    return pick(logits, params, noise)


# ---------------------------------------------------------------------------------------------
# Which models, and the cache
# ---------------------------------------------------------------------------------------------

def _takes_mask_dict(lm) -> bool:
    """Whether the model's forward takes {attention type: prepared mask} (most 5.x families;
    Llama and Mistral take one prepared 4D mask, which they pass through unchanged)."""
    try:
        source = inspect.getsource(type(lm.model).forward)
    except (OSError, TypeError, AttributeError):
        return False
    return "attention_mask, dict)" in source


def unsupported(lm) -> str | None:
    """Why the static decoder cannot run `lm` exactly, or None when it can."""
    impl = getattr(lm.config, "_attn_implementation", None)
    if impl not in ("sdpa", "eager"):
        return f"attention {impl!r} takes no dense mask (static decoding needs sdpa or eager)"
    kinds = set(layer_types(lm.config))
    if not kinds <= set(ATTENTION_KINDS):
        return f"attention types {sorted(kinds - set(ATTENTION_KINDS))} (only full and sliding)"
    if "sliding_attention" in kinds and not getattr(lm.config, "sliding_window", None):
        return "sliding layers without a sliding_window"
    if len(kinds) > 1 and not _takes_mask_dict(lm):
        return "mixed full / sliding layers, and the model's forward takes a single mask"
    return None


def mark_static(*tensors: Tensor) -> None:
    """Mark buffers the decode step reads or writes in place as fixed addresses for
    torch.compile(mode="reduce-overhead"): its cudagraphs skip a function that mutates an input
    not so marked ("mutated inputs"). Only an attribute on the tensor: inert in the other modes."""
    for t in tensors:
        torch._dynamo.mark_static_address(t)


class StaticKV(Cache):
    """Keys and values of every layer in preallocated [B_cap, H_kv, S_cap, D] buffers, written
    in place: the prefill writes columns [0, P) and attends over those alone; a decode step
    writes the column in `column` ([1] int64) and returns the first `attend` columns (the mask
    hides those not yet written). `batch` rows are used (a view: the same addresses for every
    batch <= B_cap)."""

    def __init__(self, batch: int, length: int, device: torch.device):
        super().__init__(layers=[])
        self.capacity, self.length = batch, length
        self.batch = batch
        self.column = torch.zeros(1, dtype=torch.long, device=device)
        self.prefill_len: int | None = None
        self.attend = length     # columns a decode step attends (a Python int: fixed in a graph)
        self.keys: dict[int, Tensor] = {}
        self.values: dict[int, Tensor] = {}

    def _buffers(self, layer: int, key: Tensor, value: Tensor) -> tuple[Tensor, Tensor]:
        if layer not in self.keys:  # at the first prefill: heads, dims and dtype as the model has them
            self.keys[layer] = key.new_zeros(self.capacity, key.shape[1], self.length, key.shape[3])
            self.values[layer] = value.new_zeros(self.capacity, value.shape[1], self.length, value.shape[3])
            mark_static(self.keys[layer], self.values[layer])
        return self.keys[layer][:self.batch], self.values[layer][:self.batch]

    def spread(self, rows: int, group: int, columns: int) -> None:
        """Rows [0, rows) of every layer's first `columns` columns copied to rows
        [0, rows x group), each `group` times in a row: a prefill of distinct prompts becomes
        the cache of their repeated rows."""
        for buffers in (self.keys, self.values):
            for cache in buffers.values():
                cache[:rows * group, :, :columns] = cache[:rows, :, :columns].repeat_interleave(group, 0)

    def update(self, key_states: Tensor, value_states: Tensor, layer_idx: int, *args, **kwargs):
        keys, values = self._buffers(layer_idx, key_states, value_states)
        if self.prefill_len is not None:
            P = self.prefill_len
            keys[:, :, :P] = key_states
            values[:, :, :P] = value_states
            return keys[:, :, :P], values[:, :, :P]
        keys.index_copy_(2, self.column, key_states)
        values.index_copy_(2, self.column, value_states)
        return keys[:, :, :self.attend], values[:, :, :self.attend]

    def get_seq_length(self, layer_idx: int = 0) -> int:
        return 0  # never needed: positions and masks are always passed in

    @property
    def is_compileable(self) -> bool:
        return True


# ---------------------------------------------------------------------------------------------
# The decoder
# ---------------------------------------------------------------------------------------------

@functools.cache
def _cache_kwarg(model_class: type) -> str:
    # transformers 5.2x renamed `past_key_values` to `cache` (the old name warns until 5.40).
    parameters = inspect.signature(model_class.forward).parameters
    return "cache" if "cache" in parameters else "past_key_values"


class _Spec:
    """What the decoder needs to know of a model, read once: its attention types, window,
    mask dtype (the activations'), cache keyword and the attention implementation it decodes
    with (attention.decode_attention: None keeps the model's)."""

    def __init__(self, lm):
        self.kinds = sorted(set(layer_types(lm.config)))
        self.window = getattr(lm.config, "sliding_window", None)
        self.mask_dtype = lm.get_input_embeddings().weight.dtype
        self.as_dict = _takes_mask_dict(lm)
        self.cache_kwarg = _cache_kwarg(type(lm))
        self.attention = decode_attention(lm)


@dataclass
class _Graph:
    """The decode step of one (batch, sampling parameters, stop ids, pad id)."""
    stops: Tensor               # [K] int64 stop token ids, read by the step
    warm: int = 0               # eager steps run so far (manual capture waits for WARMUP)
    replay: object = None       # the captured step: CUDAGraph.replay or a compiled function
    failed: bool = False        # capture failed: this key runs eagerly


def check_every(device: torch.device) -> int:
    """Decode steps between host checks: CHECK_EVERY on CUDA, where a check stalls the queue of
    launched steps; every step elsewhere, where it costs nothing and a finished batch should
    not run on (short multi-turn actions would otherwise decode several times their length)."""
    return CHECK_EVERY if device.type == "cuda" else 1


def graph_mode(device: torch.device) -> str:
    """GRAPH_MODE on CUDA; eager elsewhere."""
    return GRAPH_MODE if device.type == "cuda" else "off"


def run_on_side_stream(run, device: torch.device) -> None:
    """One eager step on a side stream (the warmup a capture needs), ordered with the current
    stream on both sides."""
    side, main = torch.cuda.Stream(device), torch.cuda.current_stream(device)
    side.wait_stream(main)
    with torch.cuda.stream(side):
        run()
    main.wait_stream(side)


def capture(run, device: torch.device, pool=None):
    """`run` captured as a CUDA graph (not executed) in memory pool `pool` (None: a new one);
    returns what replays it and its pool. The decoder's graphs share one pool: a step keeps
    nothing of its own alive after it (its results are written into the decoder's buffers),
    and the graphs of one decoder never run at the same time."""
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph, pool=pool):
        run()
    return graph.replay, graph.pool()


class StaticDecoder:
    """The cache, step buffers and captured graphs of one model, for up to `capacity` rows and
    `length` cache columns (prompt + completion). Holds no reference to the model."""

    def __init__(self, lm, capacity: int, length: int, device: torch.device):
        self.capacity, self.length, self.device = capacity, length, device
        self.spec = _Spec(lm)
        self.mode = graph_mode(device)
        self.cache = StaticKV(capacity, length, device)
        new = dict(device=device)
        self.column = self.cache.column                                  # [1] cache column of `token`
        self.step = torch.zeros(1, dtype=torch.long, **new)              # [1] output column of the next token
        self.token = torch.zeros(capacity, dtype=torch.long, **new)      # [B] the token to feed
        self.position = torch.zeros(capacity, dtype=torch.long, **new)   # [B] its position
        self.done = torch.zeros(capacity, dtype=torch.bool, **new)       # [B] the row has stopped
        self.valid = torch.zeros(capacity, length, dtype=torch.bool, **new)  # [B, S] attendable columns
        self.tokens = torch.zeros(capacity, length, dtype=torch.long, **new)  # [B, S] outputs by step
        self.logprobs = torch.zeros(capacity, length, dtype=torch.float32, **new)
        self.mask = torch.zeros(capacity, length, dtype=torch.long, **new)
        self.columns = torch.arange(length, **new)
        self.noise: Tensor | None = None       # [B, V] float32, allocated by the first sampled call
        self.graphs: OrderedDict[tuple, _Graph] = OrderedDict()
        self.pool = None                       # the memory pool of the captured graphs
        self.weights: tuple = ()
        if self.mode == "compile":
            mark_static(self.column, self.step, self.token, self.position, self.done, self.valid,
                        self.tokens, self.logprobs, self.mask)

    def fits(self, batch: int, length: int) -> bool:
        return batch <= self.capacity and length <= self.length

    # -- one forward ---------------------------------------------------------------------------

    def masks(self, valid: Tensor, query: Tensor):
        """The attention mask argument for attendable columns valid [B, K] and query columns
        query [Q]: per attention type [B, 1, Q, K], causal, windowed for sliding layers,
        additive in the activations' dtype (0 or its lowest value), so that SDPA does not turn
        a bool mask into one in every layer (three launches a layer on CUDA); a dict, or the
        one mask for forwards that take one. A query always sees its own column, so no row is
        fully masked: a left-pad query would give NaN under some kernels, and NaN keys reach
        the cache (masked weights are 0, 0 x NaN is not)."""
        cols = self.columns[:valid.shape[1]]
        q = query[:, None]                                               # [Q, 1]
        out = {}
        for kind in self.spec.kinds:
            allowed = cols <= q                                          # [Q, K]
            if kind == "sliding_attention":
                allowed = allowed & (cols > q - self.spec.window)
            mask = (valid[:, None, None, :] & allowed) | (cols == q)     # [B, 1, Q, K]
            dtype = self.spec.mask_dtype
            out[kind] = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill_(
                ~mask, torch.finfo(dtype).min)
        return out if self.spec.as_dict else out[self.spec.kinds[0]]

    def forward(self, lm, input_ids: Tensor, mask, position_ids: Tensor) -> Tensor:
        out = lm(input_ids=input_ids, attention_mask=mask, position_ids=position_ids,
                 use_cache=True, logits_to_keep=1, **{self.spec.cache_kwarg: self.cache})
        return out.logits[:, -1]

    def prefill(self, lm, input_ids: Tensor, prompt_mask: Tensor) -> Tensor:
        """Prompts [B, P] into cache columns [0, P) -> logits of their last column [B, V]."""
        B, P = input_ids.shape
        self.cache.batch, self.cache.prefill_len = B, P
        try:
            mask = self.masks(prompt_mask.bool(), self.columns[:P])
            return self.forward(lm, input_ids, mask, positions(prompt_mask))
        finally:
            self.cache.prefill_len = None

    def record(self, logits: Tensor, B: int, params, pad_id: int, stops: Tensor) -> None:
        """Pick the next token of every row from logits [B, V] (noise already drawn), write it
        at output column `step`, stop rows on stop tokens, advance step, column and positions."""
        token, logprob = pick(logits, params, None if params.greedy else self.noise[:B])
        live = ~self.done[:B]
        self.tokens[:B].index_copy_(1, self.step, torch.where(live, token, pad_id)[:, None])
        self.logprobs[:B].index_copy_(1, self.step, torch.where(live, logprob, 0.0)[:, None])
        self.mask[:B].index_copy_(1, self.step, live.long()[:, None])
        # A [B, K] comparison, not torch.isin: isin takes a sorting path that syncs with the
        # host once K grows past a dozen ids, and a sync cannot be captured in a graph.
        self.done[:B].logical_or_(live & (token[:, None] == stops).any(-1))
        self.token[:B].copy_(token)
        self.position[:B].add_(1)
        self.column.add_(1)
        self.step.add_(1)

    def decode_step(self, lm, B: int, attend: int, params, pad_id: int, stops: Tensor) -> None:
        """The step that is captured: feed `token` at `column` (< attend), attending the first
        `attend` cache columns; record the next token. Reads and writes only the decoder's
        buffers and the model's weights."""
        self.valid[:B].index_fill_(1, self.column, True)
        self.cache.attend = attend
        try:
            logits = self.forward(lm, self.token[:B, None],
                                  self.masks(self.valid[:B, :attend], self.column), self.position[:B, None])
        finally:
            self.cache.attend = self.length
        self.record(logits, B, params, pad_id, stops)

    def attended(self, columns: int) -> int:
        """The columns a step attends when `columns` are written: the smallest of ATTEND_MIN x
        2^i that holds them, at most the cache length; the whole cache under torch.compile
        (each length would be a compilation)."""
        if self.mode == "compile":
            return self.length
        attend = ATTEND_MIN
        while attend < columns:
            attend *= 2
        return min(attend, self.length)

    # -- graphs ----------------------------------------------------------------------------------

    def graph_for(self, lm, B: int, attend: int, params, stop_ids: list[int], pad_id: int) -> _Graph:
        weights = tuple(p.data_ptr() for p in lm.parameters())
        if weights != self.weights:   # a graph reads the weights at the addresses it captured
            self.graphs.clear()
            self.weights = weights
        key = (B, attend, params, tuple(stop_ids), pad_id)
        entry = self.graphs.get(key)
        if entry is None:
            entry = _Graph(torch.tensor(stop_ids, dtype=torch.long, device=self.device))
            self.graphs[key] = entry
            while len(self.graphs) > MAX_GRAPHS:
                self.graphs.popitem(last=False)
        self.graphs.move_to_end(key)
        return entry

    def run_step(self, lm, entry: _Graph, B: int, attend: int, params, pad_id: int) -> None:
        if entry.replay is not None:
            entry.replay()
            return
        if self.mode == "off" or entry.failed:
            self.decode_step(lm, B, attend, params, pad_id, entry.stops)
            return
        if self.mode == "compile":
            model = weakref.ref(lm)   # the compiled step must not keep the model alive
            entry.replay = torch.compile(
                lambda: self.decode_step(model(), B, attend, params, pad_id, entry.stops),
                mode="reduce-overhead", dynamic=False)
            entry.replay()
            return
        run = lambda: self.decode_step(lm, B, attend, params, pad_id, entry.stops)  # noqa: E731
        if entry.warm < WARMUP:
            run_on_side_stream(run, self.device)
            entry.warm += 1
            return
        try:
            entry.replay, self.pool = capture(run, self.device, self.pool)
        except Exception as exc:  # a host sync or an uncapturable op somewhere in the forward
            entry.failed = True
            log.warning("decode: CUDA graph capture failed, decoding eagerly: %s: %s",
                        type(exc).__name__, str(exc).splitlines()[0][:200] if str(exc) else "")
            run()
            return
        entry.replay()

    # -- a batch -------------------------------------------------------------------------------

    def stop_strings(self, stop_strings, B: int, start: int, end: int, pad_id: int) -> None:
        """Rows whose text completed a stop string at an output column in [start, end): cut back
        to that column (host side: the tokens are decoded)."""
        if not stop_strings.strings or start >= end:
            return
        tokens = self.tokens[:B, :end].cpu()                           # host sync
        live = self.mask[:B, start:end].cpu().bool()
        hit_at: dict[int, int] = {}
        for s in range(start, end):
            rows = live[:, s - start].clone()
            rows[list(hit_at)] = False
            if rows.any():
                for row in stop_strings(tokens[:, :s + 1], rows).nonzero().flatten().tolist():
                    hit_at[row] = s
        for row, s in hit_at.items():
            self.tokens[row, s + 1:end] = pad_id
            self.logprobs[row, s + 1:end] = 0.0
            self.mask[row, s + 1:end] = 0
            self.done[row] = True

    def run(self, lm, input_ids: Tensor, prompt_mask: Tensor, params, **kwargs) -> Samples:
        """`complete` under the decoder's attention implementation and fused element-wise
        kernels (fusion.py; prefill, every decode step and every capture), the model's own
        restored after it, on an error too."""
        with attention_implementation(lm.config, self.spec.attention), \
                fusion.swapped(lm, fusion.wanted(self.device, self.mode)):
            return self.complete(lm, input_ids, prompt_mask, params, **kwargs)

    def complete(self, lm, input_ids: Tensor, prompt_mask: Tensor, params, *, stop_ids: list[int],
                 stop_strings, pad_id: int, generator: torch.Generator | None, group: int = 1) -> Samples:
        """group > 1: the rows come in runs of `group` copies of one prompt (a GRPO group); the
        prefill runs each prompt once and copies its keys and values to the other rows."""
        B, P = input_ids.shape
        N = params.max_new_tokens
        self.cache.batch = B
        self.valid[:B].zero_()
        self.valid[:B, :P] = prompt_mask.bool()
        self.done[:B] = False
        key_params = dataclasses.replace(params, max_new_tokens=0, stop=())
        attend = self.attended(P + 1)
        entry = self.graph_for(lm, B, attend, key_params, stop_ids, pad_id)

        if group > 1:
            logits = self.prefill(lm, input_ids[::group], prompt_mask[::group]).repeat_interleave(group, 0)
            self.cache.spread(B // group, group, P)
            self.cache.batch = B
        else:
            logits = self.prefill(lm, input_ids, prompt_mask)
        self.position[:B] = prompt_mask.long().sum(-1) - 1   # record() advances both to token 0's
        self.column.fill_(P - 1)
        self.step.zero_()
        if not params.greedy:
            if self.noise is None or self.noise.shape[1] != logits.shape[1]:
                self.noise = torch.empty(self.capacity, logits.shape[1], dtype=torch.float32,
                                         device=self.device)
                mark_static(self.noise)   # drawn into in place before every step
                self.graphs.clear()   # they read the old noise buffer
                entry = self.graph_for(lm, B, attend, key_params, stop_ids, pad_id)
            self.noise[:B].exponential_(1, generator=generator)
        self.record(logits, B, params, pad_id, entry.stops)
        del logits   # [B, V]: not kept through the decode steps

        t = checked = 1
        self.stop_strings(stop_strings, B, 0, 1, pad_id)
        while t < N and not bool(self.done[:B].all()):                  # host sync
            for _ in range(min(check_every(self.device), N - t)):
                if not params.greedy:
                    self.noise[:B].exponential_(1, generator=generator)
                # This step writes cache column P + t - 1: P + t columns are attended.
                if self.attended(P + t) != attend:
                    attend = self.attended(P + t)
                    entry = self.graph_for(lm, B, attend, key_params, stop_ids, pad_id)
                self.run_step(lm, entry, B, attend, params, pad_id)
                t += 1
            self.stop_strings(stop_strings, B, checked, t, pad_id)
            checked = t
        C = int(self.mask[:B, :t].sum(1).max())   # the longest row: where the old loop stopped
        return Samples(self.tokens[:B, :C].clone(), self.logprobs[:B, :C].clone(),
                       self.mask[:B, :C].clone(), ~self.done[:B].clone())


_DECODERS: weakref.WeakKeyDictionary = weakref.WeakKeyDictionary()


def decoder_for(lm, batch: int, length: int) -> StaticDecoder:
    """The model's decoder, grown (never shrunk) to hold `batch` rows of `length` columns."""
    device = next(lm.parameters()).device
    length = -(-length // LENGTH_BUCKET) * LENGTH_BUCKET
    decoder = _DECODERS.get(lm)
    if decoder is None or not decoder.fits(batch, length):
        if decoder is not None:
            batch, length = max(batch, decoder.capacity), max(length, decoder.length)
            del _DECODERS[lm], decoder      # its buffers and graphs go before the new ones come
        decoder = _DECODERS[lm] = StaticDecoder(lm, batch, length, device)
    return decoder


def release(lm) -> None:
    """Free the model's decoder (its KV cache, buffers and graphs)."""
    _DECODERS.pop(lm, None)


@torch.no_grad()
def decode(lm, input_ids: Tensor, attention_mask: Tensor, params, *, stop_ids: list[int],
           stop_strings, pad_id: int, generator: torch.Generator | None = None, group: int = 1) -> Samples:
    """Complete B left-padded prompts [B, P] with the static decoder (see the module docstring);
    `generate.sample` documents the arguments."""
    B, P = input_ids.shape
    decoder = decoder_for(lm, B, P + params.max_new_tokens)
    return decoder.run(lm, input_ids, attention_mask, params, stop_ids=stop_ids,
                       stop_strings=stop_strings, pad_id=pad_id, generator=generator,
                       group=group if group > 1 and B % group == 0 else 1)
