"""The memory planner against real steps: peak memory of `onelayer.single_turn.rl_step`.

CPU: a TorchDispatchMode sees every tensor an op returns; each storage is counted once when it
first appears and uncounted when it is freed (a weakref finalizer on the storage). Before the
step, the storages the planner models as resident (weights, quantisation state, the trained
layer's master, copies and gradients, AdamW state) are counted and watched the same way, so a
gradient freed by zero_grad leaves the count. The peak of the count while each stage runs
(generate, log-probs, update, optimizer) is compared with the planner's peak of that stage.
Workspaces allocated inside one kernel are invisible to a dispatch mode; the two that matter
here (logsumexp's x - max, the NF4 weight bitsandbytes dequantises) are added while their op
runs (WORKSPACES).
GPU (--gpu): torch.cuda.max_memory_allocated / max_memory_reserved of the step against the
planner's peak allocated / reserved, on the Qwen3-8B config.

Each measured step follows a short step that creates the AdamW state and gradients, as in a long
run. Random checkpoints; the tokenizer's EOS id lies outside the model's vocabulary, so every
completion runs to max-new-tokens, as the planner assumes.

    PYTHONPATH=$PWD python benchmarks/validate_memory.py            # CPU table (RESULTS.md)
    PYTHONPATH=$PWD python benchmarks/validate_memory.py --quick    # the cases tests/test_memory.py runs
    PYTHONPATH=$PWD python benchmarks/validate_memory.py --gpu      # on the GPU machine
"""
from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import json
import math
import os
import sys
import tempfile
import weakref
from dataclasses import dataclass

import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from transformers import PreTrainedTokenizerFast, Qwen3Config, Qwen3ForCausalLM

import onelayer.single_turn as engine
from onelayer.config import build_config
from onelayer.memory import ModelDims, Workload, plan_onelayer
from onelayer.model import load_policy
from onelayer.tasks import Task
from onelayer.update import build_objective

CONFIGS = {
    # small enough for seconds a step on 2 cores; big enough that activations, not weights,
    # make most of the peak. "wide": a larger vocabulary, so the loss chunks matter.
    "narrow": dict(vocab_size=8192, hidden_size=256, intermediate_size=768, num_hidden_layers=8,
                   num_attention_heads=4, num_key_value_heads=2, head_dim=64),
    "wide": dict(vocab_size=32768, hidden_size=128, intermediate_size=512, num_hidden_layers=6,
                 num_attention_heads=4, num_key_value_heads=1, head_dim=32),
    # Qwen/Qwen3-8B's config.json values
    "8b": dict(vocab_size=151936, hidden_size=4096, intermediate_size=12288, num_hidden_layers=36,
               num_attention_heads=32, num_key_value_heads=8, head_dim=128, rope_theta=1000000.0,
               rms_norm_eps=1e-6),
}


# Ops that allocate a workspace inside their kernel, which the mode cannot see, with its size
# read from their source: logsumexp's CPU kernel makes x - max(x) (the input's size);
# bitsandbytes' gemm_4bit (default / CPU kernel) dequantises the whole weight to A's dtype.
WORKSPACES = {
    "aten.logsumexp.default": lambda a: a[0].numel() * a[0].element_size(),
    "bitsandbytes.gemm_4bit.default": lambda a: math.prod(a[2]) * a[0].element_size(),
}


class LiveBytes(TorchDispatchMode):
    """Peak bytes of live tensor storage while active (see the module docstring), plus the
    known op-internal workspaces of WORKSPACES while their op runs."""

    def __init__(self, resident: list[torch.Tensor]):
        super().__init__()
        self.live = 0
        self.phase = ""
        self.peaks: dict[str, int] = {}  # phase -> peak bytes while it ran
        self._sizes: dict[int, int] = {}
        for t in resident:
            self._track(t.untyped_storage())
        self.resident = self.live

    def _track(self, storage) -> None:
        key = id(storage)  # a storage's Python object lives exactly as long as the storage
        if key in self._sizes or storage.device.type == "meta":
            return
        self._sizes[key] = storage.nbytes()
        weakref.finalize(storage, self._free, key)
        self._add(storage.nbytes())

    def _add(self, nbytes: int) -> None:
        self.live += nbytes
        if self.live > self.peaks.get(self.phase, 0):
            self.peaks[self.phase] = self.live

    def _free(self, key: int) -> None:
        self.live -= self._sizes.pop(key)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        workspace = WORKSPACES.get(str(func), lambda a: 0)(args)
        self._add(workspace)
        out = func(*args, **(kwargs or {}))
        self.live -= workspace
        for x in tree_leaves(out):
            if isinstance(x, torch.Tensor):
                self._track(x.untyped_storage())
        return out


def resident_tensors(policy, optimizer) -> list[torch.Tensor]:
    """Every tensor the planner counts as resident: parameters and buffers of the model (NF4 data
    included), bitsandbytes' quantisation state, the trained layer's master / reference, AdamW
    state and gradients."""
    lm = policy.split.lm
    tensors = [*lm.parameters(), *lm.buffers(), *policy.layer.parameters()]
    tensors += [p.grad for p in policy.layer.parameters() if p.grad is not None]
    tensors += list((policy.layer.reference or {}).values())
    tensors += [t for s in optimizer.state.values() for t in s.values() if isinstance(t, torch.Tensor)]
    for module in lm.modules():
        state = getattr(getattr(module, "weight", None), "quant_state", None)
        if state is not None:
            nested = getattr(state, "state2", None)
            tensors += [t for t in (state.absmax, state.code, getattr(state, "offset", None),
                                    getattr(nested, "absmax", None), getattr(nested, "code", None))
                        if isinstance(t, torch.Tensor)]
    return tensors


# (module, function, stage): the engine's functions that begin each stage.
STAGE_STARTS = [("onelayer.single_turn", "sample_and_score", "generate"),
                ("onelayer.single_turn", "optimize", "log-probs"), ("onelayer.update", "update", "update")]


@contextlib.contextmanager
def phase_labels(tracker: LiveBytes, optimizer):
    """Names the engine's stages on the tracker while they run."""
    patched = []
    for module_name, name, label in STAGE_STARTS:
        module = sys.modules.get(module_name)
        if module is not None and hasattr(module, name):
            patched.append((module, name, getattr(module, name)))
            setattr(module, name, _labelled(getattr(module, name), tracker, label))
    hook = optimizer.register_step_pre_hook(lambda *_: setattr(tracker, "phase", "optimizer"))
    try:
        yield
    finally:
        hook.remove()
        for module, name, fn in patched:
            setattr(module, name, fn)


def _labelled(fn, tracker: LiveBytes, label: str):
    def run(*args, **kwargs):
        tracker.phase = label
        return fn(*args, **kwargs)
    return run


@dataclass(frozen=True)
class Case:
    config: str
    frozen: str
    group_size: int
    new_tokens: int
    prompts: int = 2
    prompt_tokens: int = 24
    layer: int = 3
    padded: bool = True
    beta: float = 0.0
    micro_batch: int = 0


@dataclass(frozen=True)
class Result:
    case: Case
    measured: dict[str, int]    # "step" (and each stage, or "reserved" on CUDA) -> peak bytes
    predicted: dict[str, int]   # the same keys -> the planner's peak bytes

    def error(self, key: str = "step") -> float:
        return (self.predicted[key] - self.measured[key]) / self.measured[key]


def random_checkpoint(name: str, root: str) -> str:
    path = os.path.join(root, f"qwen3-{name}")
    if os.path.exists(os.path.join(path, "config.json")):
        return path
    config = Qwen3Config(**CONFIGS[name], max_position_embeddings=40960, tie_word_embeddings=False)
    torch.manual_seed(0)
    cuda = torch.cuda.is_available()
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16 if cuda else torch.float32)  # no fp32 copy of 8B weights
    try:
        with torch.device("cuda" if cuda else "cpu"):
            model = Qwen3ForCausalLM(config)
    finally:
        torch.set_default_dtype(default)
    model.save_pretrained(path)
    del model
    # EOS gets the id just past the model's vocabulary: the model can never sample it.
    vocab = {"<unk>": 0, "<pad>": 1, **{f"t{i}": i for i in range(2, config.vocab_size)},
             "<eos>": config.vocab_size}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="<unk>", pad_token="<pad>",
                            eos_token="<eos>").save_pretrained(path)
    return path


def prompts_for(case: Case) -> list[str]:
    """`prompts` prompts of prompt_tokens words; padded cases shorten all but the first by a
    third, so left padding (and with it explicit attention masks) appears."""
    lengths = [case.prompt_tokens if i == 0 or not case.padded else case.prompt_tokens * 2 // 3
               for i in range(case.prompts)]
    return [" ".join(f"t{(7 * j + 13 * i) % 1000 + 2}" for j in range(n)) for i, n in enumerate(lengths)]


def workload_for(case: Case, device: str = "cpu") -> Workload:
    """The planner's description of a case as the engine runs it: bf16 compute with bf16 frozen
    blocks, and with NF4 on CUDA, else fp32; the Triton loss on CUDA, the torch one on CPU."""
    cuda = device == "cuda"
    bf16 = case.frozen == "bf16" or (cuda and case.frozen == "nf4")
    return Workload(prompts=case.prompts, group_size=case.group_size, prompt_tokens=case.prompt_tokens,
                    new_tokens=case.new_tokens, layer=case.layer, micro_batch=case.micro_batch,
                    beta=case.beta, frozen=case.frozen, compute="bf16" if bf16 else "fp32",
                    device=device, loss_impl="triton" if cuda else "torch", padded=case.padded)


@contextlib.contextmanager
def one_thread():
    """One intra-op thread: on a shared 2-core machine two threads contend with other processes
    (a 4 s step took 54 s); tensor sizes, and so the peak, do not depend on it."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def measure(case: Case, root: str) -> Result:
    with one_thread():
        return _measure(case, root)


def _measure(case: Case, root: str) -> Result:
    path = random_checkpoint(case.config, root)
    rows = [{"q": p} for p in prompts_for(case)]
    task = Task("random", train=rows, test=[], prompt=lambda r: r["q"], reward=lambda c, r: float(len(c) % 7))
    cuda = torch.cuda.is_available()
    options = {"model": path, "layer": str(case.layer), "group_size": case.group_size,
               "prompts_per_step": case.prompts, "max_new_tokens": case.new_tokens,
               "frozen_dtype": case.frozen, "lr": 1e-4, "beta": case.beta, "device": "cuda" if cuda else "cpu"}
    if case.micro_batch:
        options["micro_batch"] = case.micro_batch
    cfg = build_config(options)
    objective = build_objective(cfg, torch.device(cfg.device))
    policy, optimizer = _loaded(cfg)
    # A short step creates the AdamW state and the gradients, whose sizes do not depend on it.
    engine.rl_step(policy, optimizer, task, rows, build_config({**options, "max_new_tokens": 2}), objective)

    def step() -> dict:
        return engine.rl_step(policy, optimizer, task, rows, cfg, objective)

    measured, metrics = _cuda_peaks(step) if cuda else _tracked_peaks(step, policy, optimizer)
    if metrics["completion_len"] != case.new_tokens:
        raise RuntimeError(f"completions ended early: {metrics['completion_len']} < {case.new_tokens} tokens")
    dims = ModelDims.from_config(json.load(open(os.path.join(path, "config.json"))), case.config)
    plan = plan_onelayer(dims, workload_for(case, "cuda" if cuda else "cpu"))
    predicted = {"step": plan.allocated, "reserved": plan.reserved}
    for phase in plan.phases:
        predicted[phase.stage] = max(predicted.get(phase.stage, 0), phase.allocated)
    return Result(case, measured, predicted)


_LOADED: dict = {}


def _loaded(cfg) -> tuple:
    """(policy, AdamW) for a run configuration, reused by the next case that loads the same model
    the same way (loading the 8B checkpoint takes seconds); only one is kept, so that a GPU
    measurement sees one model's memory."""
    key = (cfg.model, cfg.layer, cfg.frozen_dtype, cfg.device, cfg.beta > 0)
    if key not in _LOADED:
        _LOADED.clear()
        gc.collect()
        if torch.cuda.is_available():
            torch.cuda.empty_cache()
        torch.manual_seed(0)
        policy = load_policy(cfg.model, layer=cfg.layer, frozen_dtype=cfg.frozen_dtype, device=cfg.device,
                             keep_reference=cfg.beta > 0)
        _LOADED[key] = policy, torch.optim.AdamW(policy.layer.parameters(), lr=cfg.lr)
    return _LOADED[key]


def _tracked_peaks(step, policy, optimizer) -> tuple[dict[str, int], dict]:
    """Peak live tensor bytes of each stage and of the whole step (CPU)."""
    tracker = LiveBytes(resident_tensors(policy, optimizer))
    with phase_labels(tracker, optimizer), tracker:
        metrics = step()
    return {**tracker.peaks, "step": max(tracker.peaks.values())}, metrics


def _cuda_peaks(step) -> tuple[dict[str, int], dict]:
    """max_memory_allocated / reserved of one step, from an empty cache (an earlier case's
    blocks would count as reserved otherwise)."""
    torch.cuda.synchronize()
    torch.cuda.empty_cache()
    torch.cuda.reset_peak_memory_stats()
    metrics = step()
    torch.cuda.synchronize()
    return {"step": torch.cuda.max_memory_allocated(), "reserved": torch.cuda.max_memory_reserved()}, metrics


QUICK = [Case("narrow", "fp32", 4, 8, prompt_tokens=128), Case("narrow", "nf4", 4, 32, padded=False),
         Case("wide", "fp32", 4, 16, beta=0.1), Case("narrow", "fp32", 8, 64, micro_batch=4),
         Case("narrow", "bf16", 8, 64, micro_batch=4)]   # bf16 compute: layer L's compute copy trains

FULL = [
    *QUICK[:4], Case("narrow", "fp32", 8, 16, prompt_tokens=160), Case("narrow", "nf4", 4, 64, padded=False),
    Case("narrow", "fp32", 4, 32), Case("narrow", "fp32", 8, 96), Case("narrow", "fp32", 16, 160),
    Case("narrow", "fp32", 8, 96, padded=False), Case("narrow", "fp32", 8, 64, layer=7),
    Case("narrow", "fp32", 8, 64, layer=0, beta=0.1), Case("narrow", "nf4", 8, 96),
    Case("narrow", "nf4", 16, 160, padded=False), Case("narrow", "nf4", 8, 32, prompt_tokens=256),
    Case("wide", "fp32", 16, 64), Case("wide", "nf4", 8, 128), Case("wide", "nf4", 16, 192, layer=1, beta=0.1),
    Case("narrow", "nf4", 8, 32, prompt_tokens=128, micro_batch=3), Case("wide", "fp32", 8, 32, beta=0.1, micro_batch=8),
    *QUICK[4:], Case("narrow", "bf16", 4, 32), Case("wide", "bf16", 8, 64, beta=0.1),
    # One prompt: every micro-batch is rows of one group, whose prompt runs once (common prefix).
    Case("narrow", "fp32", 8, 32, prompts=1, prompt_tokens=160, padded=False, micro_batch=4),
    Case("narrow", "nf4", 8, 32, prompts=1, prompt_tokens=128, padded=False, micro_batch=2),
    Case("wide", "bf16", 8, 32, prompts=1, prompt_tokens=96, padded=False, beta=0.1),
]

# The workload of benchmarks/RESULTS.md's first GPU figures (1 prompt of 48 tokens x 8 x 512,
# layer 16, no padding), then padding with a reference layer, then a wider batch.
GPU = [Case("8b", "nf4", 8, 512, prompts=1, prompt_tokens=48, layer=16, padded=False),
       Case("8b", "nf4", 32, 256, prompts=1, prompt_tokens=128, layer=16, padded=False),
       Case("8b", "nf4", 8, 256, prompts=2, prompt_tokens=96, layer=16, beta=0.04)]


STAGES = ("generate", "log-probs", "update", "optimizer")


def table(results: list[Result], keys: tuple[str, ...]) -> str:
    """Measured / predicted MiB for each key (stages, or step and reserved) and the step's error."""
    head = " | ".join(f"{k} MiB" for k in keys)
    lines = [f"| config | frozen | prompts x G | prompt + new | layer | padded | beta | micro-batch | {head} "
             "| step error |", "|---" * (9 + len(keys)) + "|"]
    for r in results:
        c = r.case
        cells = " | ".join(f"{r.measured[k] / 2**20:.1f} / {r.predicted[k] / 2**20:.1f}" for k in keys)
        lines.append(f"| {c.config} | {c.frozen} | {c.prompts} x {c.group_size} | {c.prompt_tokens} + "
                     f"{c.new_tokens} | {c.layer} | {'yes' if c.padded else 'no'} | {c.beta:g} | "
                     f"{c.micro_batch or 'all'} | {cells} | "
                     f"{r.error():+.1%} |")
    return "\n".join(lines)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--quick", action="store_true", help="only the cases tests/test_memory.py runs")
    ap.add_argument("--gpu", action="store_true", help="the Qwen3-8B cases, on CUDA")
    ap.add_argument("--root", default=os.path.join(tempfile.gettempdir(), "onelayer-validate-memory"))
    a = ap.parse_args()
    if a.gpu and not torch.cuda.is_available():
        raise SystemExit("--gpu: no CUDA device")
    keys = ("step", "reserved") if a.gpu else STAGES
    results = []
    for case in GPU if a.gpu else QUICK if a.quick else FULL:
        results.append(measure(case, a.root))
        print(dataclasses.astuple(case), {k: f"{results[-1].error(k):+.1%}" for k in keys}, flush=True)
    print(table(results, keys))
    print(f"largest |error|: {', '.join(f'{k} {max(abs(r.error(k)) for r in results):.1%}' for k in keys)}")


if __name__ == "__main__":
    main()
