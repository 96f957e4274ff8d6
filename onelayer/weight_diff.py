"""Where training changed a model: per block, how far its weights moved.

    relative change of block L = ||W_tuned - W_base||_F / ||W_base||_F   (all of L's tensors)
    share of the change        = ||W_tuned - W_base||_F^2 of L / the same over the whole model
    unchanged                  = the share of L's weights whose stored value did not change

The contribution metric (docs/contribution.md) says which layer's training helps; this says
where a finished run (full-parameter RL from any trainer, or a onelayer run) actually moved
the weights. RL updates are small: in bf16 checkpoints many of them round away, which the
"unchanged" share shows. The tensors are read one pair at a time from both checkpoints'
safetensors files and compared in row chunks: memory for the largest pair (Qwen3-8B's
embeddings, 2.5 GB in bf16), not for two models.
"""
from __future__ import annotations

import csv
import json
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

import torch
from safetensors import safe_open

from .errors import UserError

PARTS = ("attention", "mlp", "norms", "other")
CHUNK_ELEMENTS = 1 << 24   # compared at a time: 64 MB in fp32 per operand
_BLOCK = re.compile(r"\.layers\.(\d+)\.")


@dataclass
class Change:
    """Sums over some tensors: ||delta||^2, ||base||^2, elements, elements left unchanged."""
    delta_sq: float = 0.0
    base_sq: float = 0.0
    elements: int = 0
    unchanged: int = 0

    def add(self, other: "Change") -> None:
        self.delta_sq += other.delta_sq
        self.base_sq += other.base_sq
        self.elements += other.elements
        self.unchanged += other.unchanged

    @property
    def relative(self) -> float:
        return (self.delta_sq / self.base_sq) ** 0.5 if self.base_sq else 0.0


@dataclass
class BlockChange:
    name: str                       # "7" for model.layers.7, else "embed", "norm", "lm_head"
    total: Change = field(default_factory=Change)
    parts: dict[str, Change] = field(default_factory=dict)


def block_of(name: str) -> str:
    found = _BLOCK.search(name)
    if found:
        return found.group(1)
    if "embed" in name:
        return "embed"
    return "lm_head" if "lm_head" in name else "norm"


def part_of(name: str) -> str:
    """By the module the tensor sits in: "attention" (its q/k norms too), "mlp", "norms" (the
    block's own: input_layernorm, post_attention_layernorm ...) or "other"."""
    modules = name.split(".")
    if {"self_attn", "attn", "attention"} & set(modules):
        return "attention"
    if {"mlp", "feed_forward"} & set(modules):
        return "mlp"
    return "norms" if "norm" in name else "other"


def weight_files(path: Path) -> dict[str, Path]:
    """Tensor name -> the safetensors file that holds it: a onelayer run or checkpoint (its
    layer.safetensors) or a Hugging Face checkpoint directory (sharded or not)."""
    from .checkpoint import LAYER_FILE

    if (path / LAYER_FILE).is_file():
        files = [path / LAYER_FILE]
    elif (path / "model.safetensors.index.json").is_file():
        try:
            weight_map = json.loads((path / "model.safetensors.index.json").read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{path}: malformed safetensors index ({exc})")
        return {name: path / shard for name, shard in weight_map.items()}
    elif (path / "model.safetensors").is_file():
        files = [path / "model.safetensors"]
    else:
        raise UserError(f"{path}: no safetensors weights (model.safetensors, its index, or a "
                        "onelayer layer.safetensors)")
    names = {}
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            names.update(dict.fromkeys(f.keys(), file))
    return names


def base_of(tuned: str) -> str:
    """The base model of a onelayer run or checkpoint (its manifest, else its run config); a
    UserError for anything else, which needs --base."""
    from .checkpoint import CONFIG_FILE, MANIFEST_FILE

    path = Path(tuned)
    if (path / MANIFEST_FILE).is_file():
        return json.loads((path / MANIFEST_FILE).read_text())["base_model"]
    if (path / CONFIG_FILE).is_file():
        return json.loads((path / CONFIG_FILE).read_text())["model"]
    raise UserError(f"{tuned} is not a onelayer run: give the model it was trained from with --base")


def tensor_change(base: torch.Tensor, tuned: torch.Tensor) -> Change:
    """The sums of one tensor pair, compared a chunk of rows at a time (sums in fp64)."""
    base, tuned = _as_rows(base), _as_rows(tuned)
    rows = max(1, CHUNK_ELEMENTS // max(base.shape[1], 1))
    change = Change(elements=base.numel())
    for start in range(0, base.shape[0], rows):
        b = base[start:start + rows].float()
        t = tuned[start:start + rows].float()
        delta = t - b
        change.delta_sq += delta.double().square().sum().item()
        change.base_sq += b.double().square().sum().item()
        # Unchanged as stored: compared in the base's own dtype, so an fp32 master that moved
        # less than the base's rounding step counts as unchanged, as it would once saved so.
        change.unchanged += (tuned[start:start + rows].to(base.dtype) ==
                             base[start:start + rows]).sum().item()
    return change


def _as_rows(x: torch.Tensor) -> torch.Tensor:
    return x.reshape(-1, x.shape[-1]) if x.dim() > 1 else x.reshape(1, -1)


@dataclass
class DiffResult:
    base: str
    tuned: str
    blocks: list[BlockChange]
    total: Change
    compared: int                   # tensors in both
    only_base: list[str]            # tensors the tuned checkpoint lacks (a patch: all but its own)
    only_tuned: list[str]

    def rows(self) -> list[dict]:
        """A row per block, in model order."""
        whole = self.total.delta_sq
        return [{"block": b.name, "relative_change": b.total.relative,
                 "share_of_change": b.total.delta_sq / whole if whole else 0.0,
                 "unchanged": b.total.unchanged / b.total.elements if b.total.elements else 0.0,
                 "parameters": b.total.elements,
                 **{f"{part}_relative": b.parts[part].relative for part in PARTS
                    if part in b.parts}}
                for b in self.blocks]


def _order(name: str) -> tuple:
    """Model order: embeddings, the blocks by index, the final norm, lm_head."""
    fixed = {"embed": (0, 0), "norm": (2, 0), "lm_head": (3, 0)}
    return fixed[name] if name in fixed else (1, int(name))


def weight_diff(base: str, tuned: str, progress: Callable | None = None) -> DiffResult:
    """Compare `tuned` (a checkpoint directory or hub id, or a onelayer run) with `base`.
    progress: called once per tensor compared."""
    from .model.load import resolve_model_path

    base_path = resolve_model_path(base)
    tuned_path = Path(tuned) if Path(tuned).is_dir() else resolve_model_path(tuned)
    base_files, tuned_files = weight_files(base_path), weight_files(tuned_path)
    shared = [n for n in tuned_files if n in base_files]
    if not shared:
        raise UserError(f"{tuned} and {base} share no tensor names: not the same architecture")
    blocks: dict[str, BlockChange] = {}
    total = Change()
    opened: dict[Path, object] = {}

    def tensor(path: Path, name: str) -> torch.Tensor:
        if path not in opened:   # each file opened once; safe_open maps it, reading on demand
            opened[path] = safe_open(str(path), framework="pt")
        return opened[path].get_tensor(name)

    for name in shared:
        b, t = tensor(base_files[name], name), tensor(tuned_files[name], name)
        if b.shape != t.shape:
            raise UserError(f"{name}: shape {tuple(t.shape)} in {tuned}, {tuple(b.shape)} in "
                            f"{base}: not the same architecture")
        change = tensor_change(b, t)
        key = block_of(name)
        block = blocks.setdefault(key, BlockChange(key))
        block.total.add(change)
        block.parts.setdefault(part_of(name), Change()).add(change)
        total.add(change)
        if progress is not None:
            progress()
    return DiffResult(base, tuned, sorted(blocks.values(), key=lambda b: _order(b.name)), total,
                      len(shared), sorted(set(base_files) - set(tuned_files)),
                      sorted(set(tuned_files) - set(base_files)))


def format_table(result: DiffResult) -> str:
    header = ("block", "relative change", "share of change", "unchanged", "attention", "mlp")
    body = [(r["block"], f"{r['relative_change']:.3e}", f"{r['share_of_change']:.1%}",
             f"{r['unchanged']:.1%}", f"{r.get('attention_relative', 0.0):.3e}",
             f"{r.get('mlp_relative', 0.0):.3e}") for r in result.rows()]
    widths = [max(len(row[i]) for row in [header, *body]) for i in range(len(header))]
    return "\n".join("  ".join(cell.rjust(w) for cell, w in zip(row, widths))
                     for row in [header, *body])


def write_outputs(result: DiffResult, out: Path) -> None:
    """diff.json (every sum), diff.csv (a row per block) and diff.png (by block)."""
    out.mkdir(parents=True, exist_ok=True)
    rows = result.rows()
    record = {"base": result.base, "tuned": result.tuned, "compared_tensors": result.compared,
              "relative_change": result.total.relative,
              "unchanged": result.total.unchanged / result.total.elements,
              "only_in_base": result.only_base, "only_in_tuned": result.only_tuned,
              "blocks": rows, "sums": [{"block": b.name, "total": asdict(b.total),
                                        "parts": {k: asdict(v) for k, v in b.parts.items()}}
                                       for b in result.blocks]}
    (out / "diff.json").write_text(json.dumps(record, indent=1) + "\n")
    columns = list(dict.fromkeys(k for r in rows for k in r))
    with open(out / "diff.csv", "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        writer.writerows(rows)
    plot(result, out / "diff.png")


def plot(result: DiffResult, path: Path) -> None:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows = result.rows()
    names = [r["block"] for r in rows]
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(max(6.0, 0.25 * len(rows) + 2), 6),
                                      sharex=True)
    top.bar(names, [r["relative_change"] for r in rows], color="tab:blue")
    top.set_ylabel("||dW|| / ||W||")
    top.set_title(f"{result.tuned} against {result.base}", fontsize=9)
    bottom.bar(names, [100 * r["unchanged"] for r in rows], color="tab:grey")
    bottom.set_ylabel("weights unchanged (%)")
    bottom.set_xlabel("block")
    bottom.tick_params(axis="x", labelrotation=90, labelsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
