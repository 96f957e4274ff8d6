"""Layer-only checkpoints: the trained blocks' fp32 weights (safetensors) plus the run config."""
from __future__ import annotations

import json
import os
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

LAYER_FILE = "layer.safetensors"
CONFIG_FILE = "run_config.json"


def save_layer(directory: Path, tensors: dict[str, torch.Tensor], *, layer_index: int,
               base_model: str, run_config: dict, step: int, layers: str | None = None) -> Path:
    """Write the trained weights, keyed by their full checkpoint names (model.layers.L.*), and
    the run config; each file appears whole or not at all (written aside, then renamed).
    layer_index: the first trained layer; layers: all of them ("3,5" or "all"; default: it)."""
    directory.mkdir(parents=True, exist_ok=True)
    named = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", "onelayer": "1", "base_model": base_model,
                "layer_index": str(layer_index), "layers": layers or str(layer_index),
                "dtype": "float32", "step": str(step)}
    _atomic(directory / LAYER_FILE, lambda tmp: save_file(named, tmp, metadata=metadata))
    _atomic(directory / CONFIG_FILE,
            lambda tmp: Path(tmp).write_text(json.dumps(run_config, indent=2) + "\n"))
    return directory / LAYER_FILE


def load_layer(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors keyed by full checkpoint name, metadata) of a saved layer (or layers)."""
    with safe_open(str(Path(directory) / LAYER_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
