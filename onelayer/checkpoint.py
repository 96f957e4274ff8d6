"""Checkpoints.

A layer checkpoint (the shareable artefact, ~0.8 GB for an 8B model) is a directory with the
trained blocks' fp32 weights under their full names (layer.safetensors) and the run config.
A training checkpoint is a layer checkpoint plus what continues the run exactly: AdamW state,
step, data position, every random state and the metrics so far. Training checkpoints live in
OUTPUT/checkpoints/step-NNNNNN; each is written under a hidden temporary name, fsynced and
renamed, so a directory with a step name is always complete and a crash mid-write leaves the
previous one as it was.

    OUTPUT/checkpoints/step-000050/  layer.safetensors  run_config.json  manifest.json
                                     optimizer.pt  random_state.pt  trainer_state.json

OUTPUT itself holds the final layer checkpoint (a patch: onelayer.export), metrics and plots.
"""
from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .errors import UserError

LAYER_FILE = "layer.safetensors"
CONFIG_FILE = "run_config.json"
SCORES_FILE = "scores.json"           # a run's scores where it has no manifest (full-parameter)
MANIFEST_FILE = "manifest.json"       # base model, its revision, a digest of the replaced block
OPTIMIZER_FILE = "optimizer.pt"
RANDOM_FILE = "random_state.pt"
STATE_FILE = "trainer_state.json"
CHECKPOINTS = "checkpoints"
_STEP_DIR = re.compile(r"step-(\d+)")


def save_layer(directory: Path, tensors: dict[str, torch.Tensor], *, layer_index: int,
               base_model: str, run_config: dict, step: int, layers: str | None = None,
               manifest: dict | None = None) -> Path:
    """Write the trained weights, keyed by their full checkpoint names (model.layers.L.*), the
    run config and the patch manifest (onelayer.export.patch_manifest); each file appears whole
    or not at all (written aside, then renamed). layer_index: the first trained layer; layers:
    all of them ("3,5" or "all"; default: it)."""
    directory.mkdir(parents=True, exist_ok=True)
    named = {k: v.contiguous() for k, v in tensors.items()}
    metadata = {"format": "pt", "onelayer": "1", "base_model": base_model,
                "layer_index": str(layer_index), "layers": layers or str(layer_index),
                "dtype": "float32", "step": str(step)}
    _atomic(directory / LAYER_FILE, lambda tmp: save_file(named, tmp, metadata=metadata))
    _atomic(directory / CONFIG_FILE,
            lambda tmp: Path(tmp).write_text(json.dumps(run_config, indent=2) + "\n"))
    if manifest is not None:
        write_manifest(directory, manifest)
    return directory / LAYER_FILE


def write_manifest(directory: Path, manifest: dict) -> Path:
    path = Path(directory) / MANIFEST_FILE
    _atomic(path, lambda tmp: Path(tmp).write_text(json.dumps(manifest, indent=2) + "\n"))
    return path


def load_layer(directory: Path) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """(tensors keyed by full checkpoint name, metadata) of a saved layer (or layers)."""
    with safe_open(str(Path(directory) / LAYER_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}, f.metadata()


@dataclass
class TrainingState:
    """What a training checkpoint holds beside the layer and the run config."""
    step: int
    optimizer: dict            # torch.optim state_dict
    random: dict               # python, numpy, torch CPU / CUDA and the run's generator
    trainer: dict              # data position, scores, metrics so far, output directory


def save_checkpoint(output: Path, tensors: dict[str, torch.Tensor], *, layer_index: int,
                    base_model: str, run_config: dict, state: TrainingState, keep: int = 0,
                    layers: str | None = None, manifest: dict | None = None) -> Path:
    """OUTPUT/checkpoints/step-NNNNNN, complete or absent. keep > 0: only the newest `keep`
    checkpoints are left afterwards. An OSError (disk full, ...) leaves the earlier ones intact."""
    root = Path(output) / CHECKPOINTS
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{state.step:06d}"
    tmp = Path(tempfile.mkdtemp(dir=root, prefix=f".{final.name}."))
    os.chmod(tmp, 0o777 & ~_umask())  # mkdtemp makes it private; a checkpoint is ordinary output
    try:
        save_layer(tmp, tensors, layer_index=layer_index, base_model=base_model,
                   run_config=run_config, step=state.step, layers=layers, manifest=manifest)
        torch.save(state.optimizer, tmp / OPTIMIZER_FILE)
        torch.save(state.random, tmp / RANDOM_FILE)
        (tmp / STATE_FILE).write_text(json.dumps({"step": state.step, **state.trainer}) + "\n")
        for f in tmp.iterdir():
            fsync(f)
        fsync(tmp)
        if final.exists():  # the same step saved again (a resumed run's final save)
            shutil.rmtree(final)
        os.rename(tmp, final)
        fsync(root)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    if keep > 0:
        for old in checkpoints(output)[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def checkpoints(output: Path) -> list[Path]:
    """The complete training checkpoints under `output`, oldest first."""
    root = Path(output) / CHECKPOINTS
    found = [p for p in root.iterdir() if _STEP_DIR.fullmatch(p.name) and p.is_dir()] if root.is_dir() else []
    return sorted(found, key=lambda p: int(_STEP_DIR.fullmatch(p.name).group(1)))


def resolve_resume(spec: str, output: str | None) -> Path | None:
    """--resume: a training checkpoint, a run directory (its newest checkpoint), or "auto": the
    newest checkpoint in --output, None when it has none yet (a first start)."""
    if spec == "auto":
        if not output:
            raise UserError("--resume auto looks for checkpoints in --output: give --output too")
        found = checkpoints(Path(output))
        return found[-1] if found else None
    path = Path(spec)
    if is_training_checkpoint(path):
        return path
    found = checkpoints(path)
    if found:
        return found[-1]
    raise UserError(f"--resume {spec}: not a training checkpoint (step-N directory with "
                    f"{OPTIMIZER_FILE}) nor a run directory holding {CHECKPOINTS}/step-N")


def is_training_checkpoint(directory: Path) -> bool:
    return all((Path(directory) / f).is_file()
               for f in (LAYER_FILE, CONFIG_FILE, OPTIMIZER_FILE, RANDOM_FILE, STATE_FILE))


@dataclass
class Checkpoint:
    """A training checkpoint read back; its layer is read by `load_layer`."""
    path: Path
    run_config: dict
    state: TrainingState


def load_checkpoint(directory: Path) -> Checkpoint:
    directory = Path(directory)
    run_config = json.loads((directory / CONFIG_FILE).read_text())
    trainer = json.loads((directory / STATE_FILE).read_text())
    # Our own files: the optimizer state holds tensors and plain Python numbers only.
    optimizer = torch.load(directory / OPTIMIZER_FILE, map_location="cpu", weights_only=True)
    # Random states include numpy's (arrays, a tuple): written by `save_checkpoint` on this
    # machine, never a file shared with others (patches are safetensors + JSON only).
    random_state = torch.load(directory / RANDOM_FILE, map_location="cpu", weights_only=False)
    return Checkpoint(directory, run_config,
                      TrainingState(trainer.pop("step"), optimizer, random_state, trainer))


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def fsync(path: Path) -> None:
    """Flush a file's (or a directory's entries') writes to disk before a rename relies on them."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _atomic(path: Path, write) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    os.close(fd)
    try:
        write(tmp)
        os.chmod(tmp, 0o666 & ~_umask())
        fsync(Path(tmp))
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
