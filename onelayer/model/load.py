"""Loading a Hugging Face causal LM for single-layer (or several-layer, or full-parameter)
training.

Frozen blocks in NF4 (double quantisation, bitsandbytes), bf16 or fp32; embeddings, final norm
and lm_head frozen in the compute dtype; the trained blocks read in full precision straight
from the checkpoint's safetensors shards (only their tensors are read). `--layer all` trains
every weight: nothing is quantised, every tensor is read in full precision.
"""
from __future__ import annotations

import json
import logging
import math
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Iterable

import torch
from safetensors import safe_open

from ..errors import UserError
from .arch import attention_for, check_prefix_sharing, check_split, model_class, split_scalings
from .layer import TrainableLayer
from .split import SplitModel

DEMO_MODEL = "demo"
DEMO_PATH = Path(__file__).resolve().parent.parent / "demo"
# The packaged agent demo (scripts/make_agent_demo.py): byte-level BPE, imitation-trained part
# of the way on the built-in environments; the model of `onelayer train --env NAME`.
DEMO_AGENT_MODEL = "demo-agent"
DEMO_AGENT_PATH = Path(__file__).resolve().parent.parent / "demo_agent"
DEMO_MODELS = {DEMO_MODEL: DEMO_PATH, DEMO_AGENT_MODEL: DEMO_AGENT_PATH}
# `--env` without `--model`: the agent demo on a 2-core CPU (docs/agentic-demo.md). One row per
# decision seeing the current observation only (what the demo was taught on), short actions,
# 12 turns (a 5x5 maze needs 4 to 12 moves), plain text (the demo has no chat template).
DEMO_ENV_PRESET = dict(model=DEMO_AGENT_MODEL, algo="gigpo", steps=60, prompts_per_step=4,
                       group_size=8, lr=1e-3, epochs=2, max_new_tokens=8, max_turns=12,
                       history_turns=0, eval_samples=32, chat=False, save_every=0)
# Per environment (docs/agentic-demo.md): sokoban and household steps cost 2.5-3x a gridworld
# one (longer observations and episodes), and they show their gain in 40 and 30 steps; a
# household task takes the demo's teacher 11 turns on average (at most 20), its longest actions
# ("put tomato 2 on countertop 1") are 8 tokens + <eos>, and groups of 4 play half the rows.
DEMO_ENV_SPECIFIC = {"sokoban": dict(steps=40),
                     "household": dict(steps=30, group_size=4, max_turns=20, max_new_tokens=12)}


def demo_env_preset(env: str) -> dict:
    """The agent-demo preset for `env` (a built-in name, options after '?' allowed)."""
    return {**DEMO_ENV_PRESET, **DEMO_ENV_SPECIFIC.get(env.partition("?")[0].strip(), {})}


def env_demo_values(values: dict) -> dict:
    """Run options with the agent-demo preset underneath when an environment is given without a
    model (the user's own values win); `values` unchanged otherwise."""
    if values.get("env") and not values.get("model"):
        return {**demo_env_preset(values["env"]), **values}
    return values


FROZEN_DTYPES = ("nf4", "bf16", "fp32")
# Fraction of depth where the paper's best single layers sit (Qwen3-8B L16/36, Qwen3-4B L16/36,
# Qwen3-1.7B L10/28, Qwen2.5-1.5B L14/28: 0.36-0.5). `--layer auto` is the layer probe's choice
# (onelayer.probe.probe_choice, run by `train` before loading); this prior is its fallback where
# the probe cannot run.
AUTO_DEPTH = 0.44


@dataclass
class Policy:
    """Everything the trainer needs of the model."""
    split: SplitModel
    layer: TrainableLayer         # the trained tensors (one block, several, or all parameters)
    tokenizer: object
    model_path: Path
    model_name: str
    device: torch.device
    compute_dtype: torch.dtype
    frozen_dtype: str
    layer_indices: list[int]      # the trained blocks, sorted (all of them for --layer all)


def resolve_model_path(model: str) -> Path:
    """A local directory, the built-in demo, or a hub id (downloaded once into the HF cache)."""
    if model in DEMO_MODELS:
        return DEMO_MODELS[model]
    path = Path(model).expanduser()
    if path.is_dir():
        if not (path / "config.json").is_file():
            raise UserError(f"{model}: no config.json in this directory")
        return path
    if path.exists() or model.count("/") != 1 or model.startswith((".", "/")):
        raise UserError(f"model {model!r} is neither a model directory nor a hub id (owner/name)")
    from huggingface_hub import snapshot_download
    try:
        return Path(snapshot_download(model, allow_patterns=[
            "*.json", "*.safetensors", "*.model", "*.txt", "*.jinja", "tokenizer*"]))
    except Exception as exc:  # hub errors have many types; all mean "cannot get this model"
        raise UserError(f"cannot get model {model!r} from the hub: {str(exc).splitlines()[0]}")


LAYER_GRAMMAR = "an index, a list (3,5,7), 'mid', 'mid-k', 'auto', 'top-k' or 'all'"


def full_parameter(layer: int | str) -> bool:
    """`--layer all`: every parameter of the model is trained."""
    return isinstance(layer, str) and layer.strip().lower() == "all"


def resolve_layers(layer: int | str, num_layers: int) -> list[int]:
    """The trained blocks, sorted. `layer` is an index (negative counts from the end), a list
    "a,b,c", 'mid' (the paper's mid-1), 'mid-k' (the k middle blocks: [floor(N/2 - k/2),
    floor(N/2 + k/2)), so 'mid-1' is 'mid'), 'auto' or 'all' (every block, and with it every
    other parameter: see `full_parameter`). 'auto' here is the depth prior: `train` replaces
    'auto' and 'top-k' by the probe's choice (onelayer.probe.probe_choice) before loading."""
    spec = layer.strip().lower() if isinstance(layer, str) else layer
    if spec == "mid":
        return [math.floor(num_layers / 2 - 1 / 2)]
    if spec == "auto" or (isinstance(spec, str) and spec.startswith("auto:")):
        return [round(AUTO_DEPTH * (num_layers - 1))]
    if spec == "all":
        return list(range(num_layers))
    if isinstance(spec, str) and spec.startswith(("mid-", "top-")):
        kind, _, count = spec.partition("-")
        k = _count(layer, count, num_layers)
        if kind == "top":
            raise UserError(f"--layer {layer}: top-k is the layer probe's choice, which `onelayer "
                            "train` makes before loading (onelayer.probe.probe_choice); here name the "
                            "layers (a list of indices) or use mid-k")
        return list(range(math.floor(num_layers / 2 - k / 2), math.floor(num_layers / 2 + k / 2)))
    parts = spec.split(",") if isinstance(spec, str) else [spec]
    indices = [_index(layer, part, num_layers) for part in parts]
    twice = sorted({i for i in indices if indices.count(i) > 1})
    if twice:
        raise UserError(f"--layer {layer}: layer {twice[0]} is named twice")
    return sorted(indices)


def resolve_layer(layer: int | str, num_layers: int) -> int:
    """The first trained block of `resolve_layers` (where the prefix ends): the single-layer
    view that the memory planner takes."""
    return resolve_layers(layer, num_layers)[0]


def _index(layer, part, num_layers: int) -> int:
    try:
        index = int(part)
    except (TypeError, ValueError):
        raise UserError(f"--layer must be {LAYER_GRAMMAR}, not {layer!r}")
    if not -num_layers <= index < num_layers:
        raise UserError(f"--layer {index} is out of range: the model has {num_layers} layers "
                        f"(0..{num_layers - 1})")
    return index % num_layers


def _count(layer, count: str, num_layers: int) -> int:
    try:
        k = int(count)
    except ValueError:
        raise UserError(f"--layer must be {LAYER_GRAMMAR}, not {layer!r}")
    if not 1 <= k <= num_layers:
        raise UserError(f"--layer {layer}: k must be 1..{num_layers} (the model has {num_layers} layers)")
    return k


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype_for(frozen_dtype: str, device: torch.device) -> torch.dtype:
    if frozen_dtype == "fp32":
        return torch.float32
    # NF4 dequantises to the compute dtype: bf16 on GPU; fp32 on CPU, where bf16 matmuls are slow.
    return torch.bfloat16 if device.type == "cuda" or frozen_dtype == "bf16" else torch.float32


def read_tensors(path: Path, wanted: Iterable[str]) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors whose full names start with one of `wanted` ("" for all), in
    fp32, keyed by full name; only the shards that hold them are opened."""
    wanted = tuple(wanted)
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = sorted({f for k, f in weight_map.items() if k.startswith(wanted)})
    else:
        shards = [p.name for p in path.glob("*.safetensors")]
    tensors = {}
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as f:
            for key in f.keys():
                if key.startswith(wanted):
                    tensors[key] = f.get_tensor(key).float()
    return tensors


def read_layer_tensors(path: Path, layer_index: int) -> dict[str, torch.Tensor]:
    """Block `layer_index`'s tensors from the safetensors shards, keyed by name inside the block
    (buffers too, if the checkpoint stored any: see `layer_parameters`)."""
    prefix = f"model.layers.{layer_index}."
    tensors = {k[len(prefix):]: t for k, t in read_tensors(path, [prefix]).items()}
    if not tensors:
        raise UserError(f"{path}: no safetensors weights named {prefix}* (only safetensors "
                        "checkpoints with blocks at model.layers are supported)")
    return tensors


def layer_parameters(block: torch.nn.Module, tensors: dict[str, torch.Tensor], name: str,
                     layer_index: int) -> dict[str, torch.Tensor]:
    """The checkpoint's tensors that are parameters of the block: those alone are trained.
    Other tensors stored under the block (rotary `inv_freq` buffers of older checkpoints) are
    ignored with a warning; a parameter the checkpoint lacks refuses the model."""
    params = dict(block.named_parameters())
    missing = sorted(set(params) - set(tensors))
    if missing:
        raise UserError(f"{name}: this architecture is not supported: block {layer_index}'s parameters "
                        f"{', '.join(missing[:3])}{' ...' if len(missing) > 3 else ''} are not stored under "
                        "those names in the checkpoint")
    extra = sorted(set(tensors) - set(params))
    if extra:
        logging.getLogger("onelayer").warning(
            "ignoring %d tensor(s) stored under model.layers.%d. that are not parameters of the block: %s",
            len(extra), layer_index, ", ".join(extra))
    return {n: tensors[n] for n in params}


def trained_tensors(split: SplitModel, path: Path, name: str) -> dict[str, torch.Tensor]:
    """fp32 master weights from the checkpoint, keyed by full name: the trained blocks'
    parameters, or (full) every parameter of the model, a tied matrix once."""
    if not split.full:
        return {f"model.layers.{i}.{n}": t for i in split.layer_indices
                for n, t in layer_parameters(split.blocks[i], read_layer_tensors(path, i), name, i).items()}
    outside = [n for n, _ in split.lm.named_parameters()
               if not n.startswith(("model.embed_tokens.", "model.layers.", "model.norm.", "lm_head."))]
    if outside:
        raise UserError(f"{name}: --layer all is not supported for this architecture: it keeps "
                        f"parameters outside the embedding, blocks, final norm and lm_head ({outside[0]})")
    stored = read_tensors(path, [""])
    aliases: dict[int, list[str]] = {}
    for n, p in split.lm.named_parameters(remove_duplicate=False):
        aliases.setdefault(id(p), []).append(n)
    master = {}
    for names in aliases.values():
        found = next((n for n in names if n in stored), None)
        if found is None:
            raise UserError(f"{name}: this architecture is not supported: the checkpoint does not "
                            f"store {names[0]} under that name")
        master[names[0]] = stored[found]
    return master


def load_policy(model: str = DEMO_MODEL, *, layer: int | str = "mid", frozen_dtype: str | None = None,
                device: str | torch.device | None = None, attn: str = "sdpa",
                keep_reference: bool = False) -> Policy:
    """Load `model` for training block `layer`; refuses (UserError) what the split cannot train
    exactly (see `onelayer.model.arch`)."""
    from transformers import AutoConfig, AutoTokenizer

    try:
        device = torch.device(device) if device is not None else default_device()
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    if device.type == "cuda" and device.index is None:  # device_map and peak stats want an index
        device = torch.device("cuda", torch.cuda.current_device())
    if full_parameter(layer):   # every weight is trained: none can be held in 4 bits
        if frozen_dtype == "nf4":
            raise UserError("--layer all trains every weight, which NF4 cannot hold: use --frozen-dtype "
                            "bf16 or fp32")
        frozen_dtype = frozen_dtype or ("bf16" if device.type == "cuda" else "fp32")
    frozen_dtype = frozen_dtype or ("nf4" if device.type == "cuda" else "fp32")
    if frozen_dtype not in FROZEN_DTYPES:
        raise UserError(f"--frozen-dtype must be one of {', '.join(FROZEN_DTYPES)}")
    path = resolve_model_path(model)
    try:
        config = AutoConfig.from_pretrained(path)
    except Exception as exc:
        raise UserError(f"{model}: cannot read the model config: {str(exc).splitlines()[0]}")
    num_layers = getattr(config, "num_hidden_layers", None)
    if not num_layers:
        raise UserError(f"{model}: not a decoder-only model with blocks at model.layers")
    indices = resolve_layers(layer, num_layers)
    full = full_parameter(layer)
    cls = model_class(config)
    attn = attention_for(attn, cls, config, device)
    dtype = compute_dtype_for(frozen_dtype, device)

    lm = _load_frozen(cls, path, indices, frozen_dtype, dtype, attn, device)
    _check_layout(lm, config.model_type)
    embed_scale, logits = split_scalings(config)
    split = SplitModel(lm, indices, full=full, embed_scale=embed_scale, logits=logits)
    master = trained_tensors(split, path, config.model_type)
    if frozen_dtype == "nf4":
        _check_quantized(lm, indices, config.model_type)
    trainable = TrainableLayer(lm, master, dtype, layer_indices=indices, full=full,
                               keep_reference=keep_reference)
    del master
    check_split(split, dtype)
    split.shares_prefixes = check_prefix_sharing(split, dtype)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Policy(split, trainable, tokenizer, path, model, device, dtype, frozen_dtype, indices)


def _load_frozen(cls: type, path: Path, indices: list[int], frozen_dtype: str, dtype: torch.dtype,
                 attn: str, device: torch.device):
    """The model with every block but `indices` (and lm_head) in `frozen_dtype`, frozen, eval mode."""
    kwargs = dict(dtype=dtype, attn_implementation=attn)
    if frozen_dtype == "nf4":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype, llm_int8_skip_modules=["lm_head", *map(_skip_pattern, indices)])
        kwargs["device_map"] = {"": device}
    _quiet_bitsandbytes()
    lm = cls.from_pretrained(path, **kwargs)
    if frozen_dtype != "nf4":
        lm = lm.to(device)
    else:
        _single_nf4_path(lm)
    lm.eval()  # no dropout anywhere: log-probs must be those of the sampling policy
    lm.requires_grad_(False)
    return lm


def _skip_pattern(index: int) -> str:
    """The trained block's modules, for bitsandbytes' skip list: an escaped regex ending in a dot.
    transformers 5.20 tries each entry with re.match as a bare prefix, so "model.layers.1" also
    skipped blocks 10-19; 5.24 adds a module boundary but still reads the entry as a regex
    ("." matches any character). The escaped dot form matches block `index` alone under both;
    `_check_quantized` verifies it after every load."""
    return re.escape(f"model.layers.{index}.")


def _check_layout(lm, name: str) -> None:
    base = getattr(lm, "model", None)
    if any(getattr(base, a, None) is None for a in ("embed_tokens", "layers", "norm", "rotary_emb")):
        raise UserError(f"{name}: this architecture is not supported: it does not keep model.embed_tokens, "
                        "model.layers, model.norm and model.rotary_emb")


def _check_quantized(lm, indices: list[int], name: str) -> None:
    """The trained blocks hold no 4-bit linear and every other block holds its weight matrices
    in 4-bit linears only: one frozen network whichever layers are trained (a layer sweep
    compares like with like), and the memory the design counts on."""
    import bitsandbytes as bnb
    for i, block in enumerate(lm.model.layers):
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        nf4 = [m for m in linears if isinstance(m, bnb.nn.Linear4bit)]
        trained = i in indices
        if (trained and nf4) or (not trained and len(nf4) != len(linears)):
            raise RuntimeError(f"internal error: block {i} has {len(nf4)} of {len(linears)} linears in NF4 "
                               f"while training blocks {indices} (bitsandbytes skip list "
                               f"{[_skip_pattern(j) for j in indices]!r})")
        if not trained:
            packed = {id(p) for m in nf4 for p in m.parameters()}
            loose = [n for n, p in block.named_parameters() if p.dim() >= 2 and id(p) not in packed]
            if loose:
                raise UserError(f"{name}: block {i}'s weights {', '.join(loose[:3])} are not linear layers, "
                                "which NF4 cannot hold; use --frozen-dtype bf16")


def _single_nf4_path(lm) -> None:
    # On CPUs with AVX512-BF16, bitsandbytes repacks a 4-bit weight the first time it sees a
    # no-grad input, and then computes no-grad and grad passes on different paths. Old and new
    # log-probs must come from the same arithmetic (ratio exactly 1 before the first update).
    import bitsandbytes as bnb
    for module in lm.modules():
        if isinstance(module, bnb.nn.Linear4bit):
            module.support_avx512bf16_for_cpu = False


def _quiet_bitsandbytes() -> None:
    # bitsandbytes logs an error on CPU when the optional `kernels` package is missing, then
    # falls back to its own CPU path; the message is noise for our users.
    logging.getLogger("bitsandbytes").setLevel(logging.CRITICAL)
