"""Patches and exports: a trained layer checkpoint checked against its base, merged into a full
Hugging Face checkpoint, described by a model card and pushed to the hub.

A patch is a layer checkpoint directory (onelayer.checkpoint) plus `manifest.json`, which names
the base model and holds a digest of each patched block's ORIGINAL weights, so that a patch is
never merged into (or evaluated on) a model it was not trained from:

    patch/                               export/
      layer.safetensors   ─┐               model-00001-of-0000N.safetensors  (frozen: the base's own
      run_config.json      ├─ merge ──▶    ...                                bytes; patched: the
      manifest.json       ─┘               model.safetensors.index.json       trained weights)
    base/ (hub or local)  ─┘               config.json, tokenizer*, generation_config.json, README.md

The export streams: one source shard open at a time, output shards flushed at a size cap, so peak
memory is about one shard (plus the patch), never the model.
"""
from __future__ import annotations

import hashlib
import json
import os
import re
import shutil
import struct
import tempfile
from pathlib import Path

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from .checkpoint import CONFIG_FILE, LAYER_FILE, MANIFEST_FILE, fsync
from .errors import UserError

PATCH_FORMAT = "onelayer-patch"
PATCH_VERSION = 1
INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"
DEFAULT_SHARD_BYTES = 5 * 10**9   # the hub's own default ("5GB"): files the hub and loaders handle well
EXPORT_DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16, "fp32": torch.float32}
# Files of the base model an export carries over besides the weights (config.json is rewritten).
AUX_PATTERNS = ("*.json", "tokenizer*", "*.model", "*.txt", "*.jinja")
_LAYER_NAME = re.compile(r"model\.layers\.(\d+)\.")
_SNAPSHOT = re.compile(r"[0-9a-f]{40}")


# ---- safetensors headers: names, dtypes, shapes and byte ranges without reading any tensor ----

def _header(path: Path) -> tuple[dict, int]:
    """(tensor name -> {dtype, shape, data_offsets}, byte offset of the data) of one file.
    Format: 8-byte little-endian header length, the JSON header, then the raw tensor bytes."""
    try:
        with open(path, "rb") as f:
            (length,) = struct.unpack("<Q", f.read(8))
            if length > 100 * 2**20:  # safetensors' own limit: a larger value is a corrupt file
                raise ValueError(f"header length {length}")
            header = json.loads(f.read(length))
    except (OSError, struct.error, ValueError) as exc:
        raise UserError(f"{path}: not a readable safetensors file ({exc})")
    header.pop("__metadata__", None)
    return header, 8 + length


def _source_shards(model_path: Path) -> list[str]:
    """The checkpoint's weight files, in the index's order. Without an index only
    model.safetensors counts: hub repos may hold other *.safetensors (Mistral's consolidated
    weights) under other names."""
    index = model_path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (ValueError, KeyError, TypeError) as exc:
            raise UserError(f"{index}: malformed safetensors index ({exc})")
        return list(dict.fromkeys(weight_map.values()))
    if (model_path / SINGLE_FILE).is_file():
        return [SINGLE_FILE]
    raise UserError(f"{model_path}: no {SINGLE_FILE} or {INDEX_FILE} (only safetensors "
                    "checkpoints can be patched)")


def layer_digest(model_path: Path, layer_index: int) -> str:
    """sha256 of block `layer_index` as stored: for each tensor in sorted name order, a JSON line
    [name, dtype, shape] then its raw bytes. Read by byte range, one chunk at a time: neither the
    model nor the block is loaded, and nothing is upcast, so bf16 and fp32 copies of a model differ."""
    prefix = f"model.layers.{layer_index}."
    entries = []  # (name, file, info, data start)
    for shard in _source_shards(model_path):
        header, start = _header(model_path / shard)
        entries += [(k, model_path / shard, v, start) for k, v in header.items() if k.startswith(prefix)]
    if not entries:
        raise UserError(f"{model_path}: no safetensors weights named {prefix}*")
    digest = hashlib.sha256()
    for name, path, info, start in sorted(entries, key=lambda e: e[0]):
        digest.update(json.dumps([name, info["dtype"], info["shape"]]).encode() + b"\n")
        begin, end = info["data_offsets"]
        with open(path, "rb") as f:
            f.seek(start + begin)
            for offset in range(begin, end, 1 << 20):
                digest.update(f.read(min(1 << 20, end - offset)))
    return digest.hexdigest()


# ---- the manifest ----

def hub_revision(model_path: Path) -> str | None:
    """The commit of an HF cache snapshot (.../models--o--n/snapshots/<sha>/), else None."""
    path = Path(model_path)
    return path.name if path.parent.name == "snapshots" and _SNAPSHOT.fullmatch(path.name) else None


def patch_manifest(model_name: str, model_path: Path, layer_indices: list[int]) -> dict:
    layers = sorted(set(int(i) for i in layer_indices))
    return {"format": PATCH_FORMAT, "version": PATCH_VERSION, "base_model": model_name,
            "base_revision": hub_revision(model_path), "layers": layers,
            "base_digest": {str(i): layer_digest(Path(model_path), i) for i in layers}}


def read_manifest(patch_dir: Path) -> dict:
    path = Path(patch_dir) / MANIFEST_FILE
    if not path.is_file():
        raise UserError(f"{patch_dir}: no {MANIFEST_FILE}, so nothing says which model this layer "
                        "was trained on (not a onelayer patch, or saved before patches had manifests)")
    try:
        manifest = json.loads(path.read_text())
        ok = (manifest["format"] == PATCH_FORMAT and isinstance(manifest["base_model"], str)
              and all(isinstance(manifest["base_digest"][str(i)], str) for i in manifest["layers"])
              and all(isinstance(i, int) for i in manifest["layers"]) and manifest["layers"])
    except (ValueError, KeyError, TypeError) as exc:
        raise UserError(f"{path}: malformed patch manifest ({type(exc).__name__}: {exc})")
    if not ok:
        raise UserError(f"{path}: malformed patch manifest (format, base_model, layers, base_digest)")
    if manifest.get("version") != PATCH_VERSION:
        raise UserError(f"{path}: patch format version {manifest.get('version')!r}; this onelayer "
                        f"reads version {PATCH_VERSION}")
    return manifest


def patch_layers(patch_dir: Path) -> list[int]:
    """The blocks a patch holds, from its tensor names (model.layers.<i>.*)."""
    path = Path(patch_dir) / LAYER_FILE
    if not path.is_file():
        raise UserError(f"{patch_dir}: no {LAYER_FILE}")
    header, _ = _header(path)
    matches = [_LAYER_NAME.match(k) for k in header]
    if None in matches or not matches:
        raise UserError(f"{path}: holds tensors outside model.layers.<i>. (not a layer patch)")
    return sorted({int(m.group(1)) for m in matches})


def patch_base_model(patch_dir: Path) -> str | None:
    """The base model a patch names: its manifest, else its run config, else the layer file's
    metadata (layer checkpoints saved before manifests existed)."""
    patch_dir = Path(patch_dir)
    for read in (lambda: json.loads((patch_dir / MANIFEST_FILE).read_text())["base_model"],
                 lambda: json.loads((patch_dir / CONFIG_FILE).read_text())["model"],
                 lambda: _layer_metadata(patch_dir)["base_model"]):
        try:
            return str(read())
        except (OSError, ValueError, KeyError, TypeError):
            continue
    return None


def check_patch(patch_dir: Path, model_path: Path, model_name: str) -> dict:
    """The patch's manifest, once its layers' digests match `model_path`'s own blocks; a patch for
    another model (or another revision or dtype of it) is refused."""
    manifest = read_manifest(patch_dir)
    held = patch_layers(patch_dir)
    if held != sorted(manifest["layers"]):
        raise UserError(f"{patch_dir}: the manifest names layers {manifest['layers']} but "
                        f"{LAYER_FILE} holds layers {held}")
    for i in manifest["layers"]:
        if layer_digest(Path(model_path), i) != manifest["base_digest"][str(i)]:
            raise UserError(f"{patch_dir} was trained on {manifest['base_model']} but layer {i} of "
                            f"{model_name} differs from that model's: refusing a patch for another model")
    return manifest


# ---- export: the patch merged into a full checkpoint ----

def export_model(patch_dir: Path, output: Path, *, dtype: str | None = None, model: str | None = None,
                 progress: bool = True, max_shard_bytes: int = DEFAULT_SHARD_BYTES) -> Path:
    """Write `output`: the base checkpoint with the patched blocks replaced, loadable with
    AutoModelForCausalLM. dtype None keeps each tensor's stored dtype (the trained fp32 weights are
    rounded to it); bf16/fp16/fp32 cast every floating tensor."""
    from .model import resolve_model_path

    patch_dir, output = Path(patch_dir), Path(output)
    if dtype is not None and dtype not in EXPORT_DTYPES:
        raise UserError(f"--dtype must be one of {', '.join(EXPORT_DTYPES)}, not {dtype!r}")
    if output.exists() and (not output.is_dir() or any(output.iterdir())):
        raise UserError(f"{output} exists and is not empty; choose a new output directory")
    name = model or patch_base_model(patch_dir)
    if name is None:
        raise UserError(f"{patch_dir}: no base model recorded; name it with --model")
    base = resolve_model_path(name)
    manifest = check_patch(patch_dir, base, name)
    config = json.loads((base / "config.json").read_text())
    if "quantization_config" in config:  # our fp32 block cannot go among packed weights
        raise UserError(f"{name} is a pre-quantized checkpoint; export needs the full-precision model")
    patch = _read_patch(patch_dir)
    shards = _source_shards(base)
    _check_patch_shapes(patch, base, shards)

    output.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=output.parent, prefix=f".{output.name}.tmp-"))
    try:
        _merge_shards(base, shards, patch, tmp, EXPORT_DTYPES.get(dtype), max_shard_bytes, progress)
        _copy_aux_files(base, tmp)
        if dtype is not None:
            config["dtype"] = str(EXPORT_DTYPES[dtype]).removeprefix("torch.")
            if "torch_dtype" in config:  # the key transformers < 5 reads
                config["torch_dtype"] = config["dtype"]
        _write_atomic(tmp / "config.json", (json.dumps(config, indent=2) + "\n").encode())
        card = model_card(manifest, _read_json(patch_dir / CONFIG_FILE), None, repo=str(output))
        _write_atomic(tmp / "README.md", card.encode())
        if output.exists():
            output.rmdir()  # empty, checked above
        os.rename(tmp, output)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return output


def _read_patch(patch_dir: Path) -> dict[str, torch.Tensor]:
    # The patch is a few blocks in fp32 (Qwen3-8B: 0.8 GB a block): read whole, once.
    with safe_open(str(patch_dir / LAYER_FILE), framework="pt") as f:
        return {k: f.get_tensor(k) for k in f.keys()}


def _layer_metadata(patch_dir: Path) -> dict:
    with safe_open(str(patch_dir / LAYER_FILE), framework="pt") as f:
        return f.metadata() or {}


def _check_patch_shapes(patch: dict[str, torch.Tensor], base: Path, shards: list[str]) -> None:
    """Every patched tensor replaces a base tensor of the same shape (headers only)."""
    stored = {}
    for shard in shards:
        stored.update(_header(base / shard)[0])
    for name, tensor in patch.items():
        if name not in stored:
            raise UserError(f"the patch holds {name}, which the base checkpoint {base} does not")
        if list(tensor.shape) != stored[name]["shape"]:
            raise UserError(f"the patch's {name} has shape {list(tensor.shape)}, the base's "
                            f"{stored[name]['shape']}")


def _merge_shards(base: Path, shards: list[str], patch: dict[str, torch.Tensor], out: Path,
                  dtype: torch.dtype | None, max_shard_bytes: int, progress: bool) -> None:
    """Stream the base's tensors in stored order into output shards of at most `max_shard_bytes`
    (a larger tensor gets a shard of its own): one source file open at a time, and no more than
    one output shard's tensors held, so peak memory is about one shard."""
    from tqdm.auto import tqdm

    written: list[tuple[str, list[str]]] = []  # (file, tensor names)
    pending: dict[str, torch.Tensor] = {}
    pending_bytes = total_bytes = 0

    def flush():
        nonlocal pending, pending_bytes
        path = out / f".shard-{len(written):05d}"
        save_file(pending, str(path), metadata={"format": "pt"})  # "pt": transformers checks it
        fsync(path)
        written.append((path.name, list(pending)))
        pending, pending_bytes = {}, 0

    for shard in tqdm(shards, desc="export", unit="shard", disable=not progress):
        with safe_open(str(base / shard), framework="pt") as f:
            for name in f.keys():
                tensor = f.get_tensor(name)
                # Cast once, from the best copy: the trained fp32 weights go straight to the
                # target dtype (never through the base's bf16), else to the stored dtype.
                target = dtype if dtype is not None and tensor.is_floating_point() else tensor.dtype
                tensor = _cast(name, patch.get(name, tensor), target)
                if pending and pending_bytes + tensor.nbytes > max_shard_bytes:
                    flush()
                pending[name] = tensor.contiguous()
                pending_bytes += tensor.nbytes
                total_bytes += tensor.nbytes
    if pending or not written:
        flush()
    _name_shards(out, written, total_bytes)


def _cast(name: str, tensor: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    cast = tensor.to(dtype)
    # fp16 tops out at 65504: a weight beyond it would load as inf and poison every output.
    if dtype == torch.float16 and tensor.dtype != dtype and not torch.isfinite(cast).all() \
            and torch.isfinite(tensor).all():
        raise UserError(f"{name} has values beyond fp16's range (65504); export in bf16 or fp32")
    return cast


def _name_shards(out: Path, written: list[tuple[str, list[str]]], total_bytes: int) -> None:
    """The hub's names: model.safetensors alone, else model-0000k-of-0000n + the index (the count
    is known only at the end of the stream)."""
    if len(written) == 1:
        os.rename(out / written[0][0], out / SINGLE_FILE)
        return
    weight_map = {}
    for k, (tmp_name, names) in enumerate(written, 1):
        final = f"model-{k:05d}-of-{len(written):05d}.safetensors"
        os.rename(out / tmp_name, out / final)
        weight_map.update(dict.fromkeys(names, final))
    index = {"metadata": {"total_size": total_bytes}, "weight_map": dict(sorted(weight_map.items()))}
    _write_atomic(out / INDEX_FILE, (json.dumps(index, indent=2) + "\n").encode())


def _copy_aux_files(base: Path, out: Path) -> None:
    # Copies content, not HF-cache symlinks (which point into the cache's blobs).
    for pattern in AUX_PATTERNS:
        for path in base.glob(pattern):
            if path.is_file() and path.name not in (INDEX_FILE, "config.json", MANIFEST_FILE):
                shutil.copyfile(path, out / path.name)


# ---- model card and hub ----

def model_card(manifest: dict, run_config: dict | None, scores: dict | None, *, kind: str = "export",
               repo: str | None = None) -> str:
    """Markdown with YAML front matter. `scores`: {"before": x, "after": y} (fractions), optional
    "metric" and "task". kind "export" (a full model) or "patch" (layer.safetensors + manifest)."""
    run = run_config or {}
    base, layers = manifest["base_model"], ", ".join(map(str, manifest["layers"]))
    noun = "layers" if len(manifest["layers"]) > 1 else "layer"
    hub_base = base.count("/") == 1 and not base.startswith((".", "/")) and not Path(base).exists()
    front = ["---", "library_name: transformers" if kind == "export" else "library_name: onelayer"]
    if hub_base:  # the hub checks base_model against its model ids; local paths would be refused
        front.append(f"base_model: {base}")
    front += ["tags:", "- onelayer", "- grpo", "---", ""]
    revision = f" (revision `{manifest['base_revision']}`)" if manifest.get("base_revision") else ""
    body = [f"# {base} + onelayer {noun} {layers}", "",
            f"{base}{revision} with {noun} {layers} trained by reinforcement learning with onelayer "
            "(single-layer GRPO): every other weight is the base model's own.", "",
            "| | |", "|---|---|", f"| base model | {base}{revision} |", f"| trained {noun} | {layers} |"]
    for key, label in (("task", "task"), ("algo", "algorithm"), ("steps", "steps")):
        if run.get(key) is not None:
            body.append(f"| {label} | {run[key]} |")
    if scores and scores.get("before") is not None and scores.get("after") is not None:
        metric = scores.get("metric", "score")
        task = scores.get("task") or run.get("task", "")
        body.append(f"| held-out {metric}{' on ' + task if task else ''} | "
                    f"{scores['before']:.1%} before, {scores['after']:.1%} after |")
    where = repo or "THIS_REPO"
    body += ["", "## Use", ""]
    if kind == "export":
        body += ["```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                 f'model = AutoModelForCausalLM.from_pretrained("{where}")',
                 f'tokenizer = AutoTokenizer.from_pretrained("{where}")', "```"]
    else:
        body += ["A patch: only the trained layer's weights and a manifest that checks the base "
                 "model. Evaluate it on its base, or merge it into a full checkpoint:", "",
                 "```bash", f"hf download {where} --local-dir patch",
                 f"onelayer eval --model {base} --patch patch",
                 "onelayer export --checkpoint patch --output merged", "```"]
    return "\n".join(front + body) + "\n"


def push_to_hub(directory: Path, repo: str, card: str, *, private: bool = False) -> str:
    """Write README.md (the card) into `directory` and upload the directory to the model repo
    `repo` (created if missing); returns the commit URL."""
    from huggingface_hub import HfApi

    directory = Path(directory)
    _write_atomic(directory / "README.md", card.encode())
    api = HfApi()
    try:
        api.create_repo(repo, private=private, exist_ok=True, repo_type="model")
        commit = api.upload_folder(repo_id=repo, folder_path=str(directory), repo_type="model",
                                   commit_message="onelayer: upload",
                                   # A run directory's training checkpoints stay local.
                                   ignore_patterns=[".*", "**/.*", "checkpoints/**"])
    except Exception as exc:  # token missing, no rights, network: many types, one meaning
        first = (str(exc).strip().splitlines() or [type(exc).__name__])[0]
        raise UserError(f"cannot push {directory} to the hub as {repo}: {first} "
                        "(log in with `hf auth login` or set HF_TOKEN)")
    return str(getattr(commit, "commit_url", commit))


def export_to(checkpoint: str, output: str | None, *, dtype: str | None, model: str | None,
              repo: str | None, private: bool = False, progress: bool = True, echo=print) -> None:
    """The `onelayer export` command: a full checkpoint in `output`, and/or a hub upload of it
    (or of the patch itself when there is no `output`)."""
    if not output and not repo:
        raise UserError("give --output (a full checkpoint) and/or --push-to-hub REPO")
    patch = Path(checkpoint)
    manifest = read_manifest(patch)
    run_config = _read_json(patch / CONFIG_FILE)
    if output:
        out = export_model(patch, Path(output), dtype=dtype, model=model, progress=progress)
        echo(f"wrote {out}: {manifest['base_model']} with layer(s) "
             f"{', '.join(map(str, manifest['layers']))} merged in")
    if repo:
        kind = "export" if output else "patch"
        card = model_card(manifest, run_config, manifest.get("scores"), kind=kind, repo=repo)
        url = push_to_hub(Path(output) if output else patch, repo, card, private=private)
        echo(f"pushed the {kind} to {repo}: {url}")


# ---- files ----

def _write_atomic(path: Path, data: bytes) -> None:
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def _read_json(path: Path) -> dict | None:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None
