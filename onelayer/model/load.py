"""Loading a Hugging Face causal LM for single-layer training.

Frozen blocks in NF4 (double quantisation, bitsandbytes), bf16 or fp32; embeddings, final norm
and lm_head frozen in the compute dtype; the trained block read in full precision straight
from the checkpoint's safetensors shards (only that block's tensors are read).
"""
from __future__ import annotations

import json
import logging
import math
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open

from ..errors import UserError
from .layer import TrainableLayer
from .split import SplitModel

DEMO_MODEL = "demo"
DEMO_PATH = Path(__file__).resolve().parent.parent / "demo"
FROZEN_DTYPES = ("nf4", "bf16", "fp32")
# Fraction of depth where the paper's best single layers sit (Qwen3-8B L16/36, Qwen3-4B L16/36,
# Qwen3-1.7B L10/28, Qwen2.5-1.5B L14/28: 0.36-0.5). `--layer auto` uses it until a probe exists.
AUTO_DEPTH = 0.44


@dataclass
class Policy:
    """Everything the trainer needs of the model."""
    split: SplitModel
    layer: TrainableLayer
    tokenizer: object
    model_path: Path
    model_name: str
    device: torch.device
    compute_dtype: torch.dtype
    frozen_dtype: str


def resolve_model_path(model: str) -> Path:
    """A local directory, the built-in demo, or a hub id (downloaded once into the HF cache)."""
    if model == DEMO_MODEL:
        return DEMO_PATH
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


def resolve_layer(layer: int | str, num_layers: int) -> int:
    """An index (negative counts from the end), 'mid' (the paper's mid-1) or 'auto'."""
    if layer == "mid":
        return math.floor(num_layers / 2 - 1 / 2)
    if layer == "auto":
        return round(AUTO_DEPTH * (num_layers - 1))
    try:
        index = int(layer)
    except (TypeError, ValueError):
        raise UserError(f"--layer must be an index, 'mid' or 'auto', not {layer!r}")
    if not -num_layers <= index < num_layers:
        raise UserError(f"--layer {index} is out of range: the model has {num_layers} layers "
                        f"(0..{num_layers - 1})")
    return index % num_layers


def default_device() -> torch.device:
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def compute_dtype_for(frozen_dtype: str, device: torch.device) -> torch.dtype:
    if frozen_dtype == "fp32":
        return torch.float32
    # NF4 dequantises to the compute dtype: bf16 on GPU; fp32 on CPU, where bf16 matmuls are slow.
    return torch.bfloat16 if device.type == "cuda" or frozen_dtype == "bf16" else torch.float32


def read_layer_tensors(path: Path, layer_index: int) -> dict[str, torch.Tensor]:
    """Block `layer_index`'s tensors from the safetensors shards, keyed by name inside the block."""
    prefix = f"model.layers.{layer_index}."
    index_file = path / "model.safetensors.index.json"
    if index_file.is_file():
        weight_map = json.loads(index_file.read_text())["weight_map"]
        shards = sorted({f for k, f in weight_map.items() if k.startswith(prefix)})
    else:
        shards = [p.name for p in path.glob("*.safetensors")]
    tensors = {}
    for shard in shards:
        with safe_open(str(path / shard), framework="pt") as f:
            for key in f.keys():
                if key.startswith(prefix):
                    tensors[key[len(prefix):]] = f.get_tensor(key).float()
    if not tensors:
        raise UserError(f"{path}: no safetensors weights named {prefix}* (only safetensors "
                        "checkpoints with blocks at model.layers are supported)")
    return tensors


def load_policy(model: str = DEMO_MODEL, *, layer: int | str = "mid", frozen_dtype: str | None = None,
                device: str | torch.device | None = None, attn: str = "sdpa",
                keep_reference: bool = False) -> Policy:
    from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer

    try:
        device = torch.device(device) if device is not None else default_device()
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device (cpu, cuda, cuda:1, ...)")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise UserError("--device cuda: no CUDA device is available here")
    if device.type == "cuda" and device.index is None:  # device_map and peak stats want an index
        device = torch.device("cuda", torch.cuda.current_device())
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
    index = resolve_layer(layer, num_layers)
    attn = _attention_implementation(attn, device)
    dtype = compute_dtype_for(frozen_dtype, device)

    kwargs = dict(dtype=dtype, attn_implementation=attn)
    if frozen_dtype == "nf4":
        from transformers import BitsAndBytesConfig
        kwargs["quantization_config"] = BitsAndBytesConfig(
            load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_use_double_quant=True,
            bnb_4bit_compute_dtype=dtype,
            # The trained block stays a plain nn.Linear block; its weights are replaced below.
            llm_int8_skip_modules=["lm_head", f"model.layers.{index}"])
        kwargs["device_map"] = {"": device}
    _quiet_bitsandbytes()
    lm = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    if frozen_dtype != "nf4":
        lm = lm.to(device)
    else:
        _single_nf4_path(lm)
    lm.eval()  # no dropout anywhere: log-probs must be those of the sampling policy
    lm.requires_grad_(False)
    if not hasattr(getattr(lm, "model", None), "layers"):
        raise UserError(f"{model}: blocks are not at model.layers; this architecture is not supported")

    split = SplitModel(lm, index)
    trainable = TrainableLayer(split.layer, read_layer_tensors(path, index), dtype,
                               keep_reference=keep_reference)
    tokenizer = AutoTokenizer.from_pretrained(path, padding_side="left")
    if tokenizer.pad_token_id is None:
        tokenizer.pad_token = tokenizer.eos_token
    return Policy(split, trainable, tokenizer, path, model, device, dtype, frozen_dtype)


def _attention_implementation(attn: str, device: torch.device) -> str:
    if attn not in ("sdpa", "flash_attention_2", "eager"):
        raise UserError(f"--attn must be sdpa or flash_attention_2, not {attn!r}")
    if attn == "flash_attention_2":
        try:
            import flash_attn  # noqa: F401
        except ImportError:
            attn = "sdpa"
            logging.getLogger("onelayer").warning("flash-attn is not installed: using torch SDPA")
        if device.type != "cuda":
            attn = "sdpa"
    return attn


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
