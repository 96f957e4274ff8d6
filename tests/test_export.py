"""Patches and exports: the manifest checks the base, the export equals the base model with the
trained block swapped in (logits and bytes), streams one shard at a time, and pushes a card."""
import json
import re
import shutil
import weakref
from pathlib import Path

import pytest
import safetensors
import safetensors.torch
import torch
from safetensors import safe_open
from transformers import AutoModelForCausalLM, AutoTokenizer

from conftest import ARCHS, COMMON
from onelayer import export
from onelayer.checkpoint import MANIFEST_FILE, save_layer, write_manifest
from onelayer.errors import UserError
from onelayer.export import (INDEX_FILE, check_patch, export_model, hub_revision, layer_digest,
                             model_card, patch_manifest, push_to_hub)
from onelayer.model.load import DEMO_PATH, read_layer_tensors

LAYER = 2
SOURCE_SHARD = "100KB"   # the tiny model (~620 kB in fp32) saved as ~7 shards
INPUT = torch.tensor([[3, 5, 7, 11, 2, 9, 4, 13]])


def tiny_qwen3(path: Path, *, seed: int = 0, dtype=torch.float32, shard: str = SOURCE_SHARD) -> Path:
    """A tiny Qwen3 with tied embeddings, sharded safetensors, the demo's tokenizer, a chat
    template file."""
    config_cls, model_cls, extra = ARCHS["qwen3"]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **extra, "tie_word_embeddings": True}))
    model.to(dtype).save_pretrained(path, max_shard_size=shard)
    for name in ("tokenizer.json", "tokenizer_config.json"):
        shutil.copyfile(DEMO_PATH / name, path / name)
    (path / "chat_template.jinja").write_text("{{ messages }}")
    return path


def make_patch(path: Path, base: Path, *, seed: int = 1, manifest: bool = True, scale=0.05) -> dict:
    """A patch of block LAYER with random fp32 weights; returns them under their full names."""
    generator = torch.Generator().manual_seed(seed)
    tensors = {f"model.layers.{LAYER}.{k}": torch.randn(v.shape, generator=generator) * scale
               for k, v in read_layer_tensors(base, LAYER).items()}
    save_layer(path, tensors, layer_index=LAYER, base_model=str(base),
               run_config={"model": str(base), "layer": str(LAYER), "task": "arithmetic",
                           "algo": "grpo", "steps": 3}, step=3)
    if manifest:
        write_manifest(path, patch_manifest(str(base), base, [LAYER]))
    return tensors


def reference_logits(base: Path, patch: dict, dtype=torch.float32) -> tuple[torch.Tensor, dict]:
    """The base model with block LAYER's weights replaced in torch: (logits, state dict)."""
    lm = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    with torch.no_grad():
        params = dict(lm.named_parameters())
        for name, value in patch.items():
            params[name].copy_(value)
    lm.to(dtype).eval()
    with torch.no_grad():
        return lm(INPUT).logits.float(), lm.state_dict()


def stored(directory: Path) -> dict[str, torch.Tensor]:
    tensors = {}
    for path in sorted(directory.glob("*.safetensors")):
        tensors.update(safetensors.torch.load_file(path))
    return tensors


@pytest.fixture(scope="module")
def base(tmp_path_factory) -> Path:
    return tiny_qwen3(tmp_path_factory.mktemp("base"))


@pytest.fixture(scope="module")
def patch(base, tmp_path_factory) -> tuple[Path, dict]:
    directory = tmp_path_factory.mktemp("patch")
    return directory, make_patch(directory, base)


def test_manifest_describes_base_and_layers(base, patch, tmp_path):
    manifest = json.loads((patch[0] / MANIFEST_FILE).read_text())
    assert manifest["format"] == "onelayer-patch" and manifest["version"] == 1
    assert manifest["base_model"] == str(base) and manifest["base_revision"] is None
    assert manifest["layers"] == [LAYER] and set(manifest["base_digest"]) == {str(LAYER)}
    # The digest is of the stored block, whatever the sharding; another block or dtype differs.
    single = tiny_qwen3(tmp_path / "single", shard="50MB")
    assert not (single / INDEX_FILE).exists()
    assert layer_digest(single, LAYER) == manifest["base_digest"][str(LAYER)]
    assert layer_digest(single, LAYER - 1) != manifest["base_digest"][str(LAYER)]
    half = tiny_qwen3(tmp_path / "half", dtype=torch.bfloat16, shard="50MB")
    assert layer_digest(half, LAYER) != layer_digest(single, LAYER)
    sha = "0123456789abcdef0123456789abcdef01234567"
    assert hub_revision(Path(f"/c/hub/models--o--n/snapshots/{sha}")) == sha
    assert hub_revision(Path(f"/c/hub/models--o--n/{sha}")) is None
    assert check_patch(patch[0], base, "tiny") == manifest


def test_export_equals_patched_model(base, patch, tmp_path):
    out = export_model(patch[0], tmp_path / "out", progress=False, max_shard_bytes=200_000)
    # Every tensor of the base is in the export, listed in the index under the file holding it.
    index = json.loads((out / INDEX_FILE).read_text())["weight_map"]
    files = {p.name for p in out.glob("*.safetensors")}
    assert len(files) > 1 and set(index.values()) == files
    for name in files:
        with safe_open(str(out / name), framework="pt") as f:
            assert {k for k, v in index.items() if v == name} == set(f.keys())
    ours, original = stored(out), stored(base)
    assert set(ours) == set(original) == set(index)
    assert "lm_head.weight" not in ours  # tied: stored once, as in the base
    # Patched tensors are the trained weights; every other tensor is the base's, bit for bit.
    for name, value in ours.items():
        expected = patch[1].get(name, original[name])
        assert value.dtype == original[name].dtype
        assert torch.equal(value.view(torch.uint8), expected.contiguous().view(torch.uint8)), name
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert lm.lm_head.weight.data_ptr() == lm.model.embed_tokens.weight.data_ptr()
    with torch.no_grad():
        logits = lm.eval()(INPUT).logits
    expected, _ = reference_logits(base, patch[1])
    torch.testing.assert_close(logits, expected, atol=1e-6, rtol=1e-6)
    # Tokenizer, generation config and chat template come along; a card describes the export.
    assert AutoTokenizer.from_pretrained(out)("12+3").input_ids == \
        AutoTokenizer.from_pretrained(base)("12+3").input_ids
    for name in ("generation_config.json", "tokenizer.json", "tokenizer_config.json", "chat_template.jinja"):
        assert (out / name).read_bytes() == (base / name).read_bytes()
    assert f"layer {LAYER}" in (out / "README.md").read_text()
    assert not list(tmp_path.glob(".out*"))  # the temp directory was renamed into place


def test_export_casts_to_bf16(base, patch, tmp_path):
    out = export_model(patch[0], tmp_path / "out", dtype="bf16", progress=False)
    assert (out / "model.safetensors").is_file() and not (out / INDEX_FILE).exists()  # one shard
    assert json.loads((out / "config.json").read_text())["dtype"] == "bfloat16"
    ours = stored(out)
    assert {v.dtype for v in ours.values()} == {torch.bfloat16}
    expected, state = reference_logits(base, patch[1], torch.bfloat16)
    for name, value in ours.items():
        assert torch.equal(value, state[name]), name
    lm = AutoModelForCausalLM.from_pretrained(out)
    assert lm.dtype == torch.bfloat16
    with torch.no_grad():
        logits = lm.eval()(INPUT).logits.float()
    torch.testing.assert_close(logits, expected, atol=2e-2, rtol=2e-2)


def test_export_keeps_each_stored_dtype(tmp_path):
    # A bf16 base without dtype: the trained fp32 weights are rounded to the base's bf16.
    half = tiny_qwen3(tmp_path / "half", dtype=torch.bfloat16)
    trained = make_patch(tmp_path / "patch", half)
    out = export_model(tmp_path / "patch", tmp_path / "out", model=str(half), progress=False)
    ours, original = stored(out), stored(half)
    assert {v.dtype for v in ours.values()} == {torch.bfloat16}
    for name, value in ours.items():
        assert torch.equal(value, trained[name].bfloat16() if name in trained else original[name])
    fp32 = export_model(tmp_path / "patch", tmp_path / "out32", dtype="fp32", progress=False)
    for name, value in stored(fp32).items():
        assert value.dtype == torch.float32
        assert torch.equal(value, trained[name] if name in trained else original[name].float())


def test_wrong_base_refused(base, patch, tmp_path):
    other = tiny_qwen3(tmp_path / "other", seed=7)
    with pytest.raises(UserError, match=f"trained on {re.escape(str(base))}.*layer {LAYER} of other-model") as err:
        check_patch(patch[0], other, "other-model")
    assert "\n" not in str(err.value)
    with pytest.raises(UserError, match="refusing a patch for another model"):
        export_model(patch[0], tmp_path / "out", model=str(other), progress=False)
    assert not (tmp_path / "out").exists() and not list(tmp_path.glob(".out*"))


def test_missing_or_malformed_manifest_refused(base, tmp_path):
    make_patch(tmp_path / "patch", base, manifest=False)
    with pytest.raises(UserError, match="no manifest.json"):
        export_model(tmp_path / "patch", tmp_path / "out", progress=False)
    (tmp_path / "patch" / MANIFEST_FILE).write_text("{not json")
    with pytest.raises(UserError, match="malformed patch manifest"):
        check_patch(tmp_path / "patch", base, "tiny")
    manifest = patch_manifest(str(base), base, [LAYER + 1])  # names a layer the patch lacks
    write_manifest(tmp_path / "patch", manifest)
    with pytest.raises(UserError, match=r"names layers \[3\] but layer.safetensors holds layers \[2\]"):
        check_patch(tmp_path / "patch", base, "tiny")


def test_bad_output_and_dtype_refused(base, patch, tmp_path):
    (tmp_path / "full").mkdir()
    (tmp_path / "full" / "x").write_text("keep me")
    with pytest.raises(UserError, match="exists and is not empty"):
        export_model(patch[0], tmp_path / "full", progress=False)
    assert (tmp_path / "full" / "x").read_text() == "keep me"
    with pytest.raises(UserError, match="--dtype must be one of"):
        export_model(patch[0], tmp_path / "new", dtype="int8", progress=False)
    make_patch(tmp_path / "huge", base, scale=1e6)  # weights fp16 cannot hold
    with pytest.raises(UserError, match="beyond fp16's range"):
        export_model(tmp_path / "huge", tmp_path / "new", dtype="fp16", progress=False)
    assert not (tmp_path / "new").exists() and not list(tmp_path.glob(".new*"))
    (tmp_path / "empty").mkdir()  # an empty directory is fine: it is replaced
    assert (export_model(patch[0], tmp_path / "empty", progress=False) / "config.json").is_file()


def test_export_streams_one_shard_at_a_time(base, patch, tmp_path, monkeypatch):
    """Source files are opened one at a time, and the base's tensors alive at any moment fit in
    one source shard plus one output shard: loading every shard first fails this."""
    real_open, live, opened = safe_open, [], {"now": 0, "max": 0, "files": 0}
    base_dir = str(base.resolve())

    class Tracked:
        def __init__(self, filename, *args, **kwargs):
            self.inner = real_open(filename, *args, **kwargs)
            self.source = str(Path(filename).resolve()).startswith(base_dir)
            if self.source:
                opened["now"] += 1
                opened["files"] += 1
                opened["max"] = max(opened["max"], opened["now"])

        def __enter__(self):
            return self

        def __exit__(self, *exc):
            opened["now"] -= self.source
            return self.inner.__exit__(*exc)

        def get_tensor(self, name):
            tensor = self.inner.get_tensor(name)
            if self.source:
                live.append((weakref.ref(tensor), tensor.nbytes))
                alive = sum(n for ref, n in live if ref() is not None)
                opened["peak"] = max(opened.get("peak", 0), alive)
            return tensor

        def __getattr__(self, name):
            return getattr(self.inner, name)

    for module in (export, safetensors, safetensors.torch):
        monkeypatch.setattr(module, "safe_open", Tracked)
    cap = 60_000
    export_model(patch[0], tmp_path / "out", model=str(base), progress=False, max_shard_bytes=cap)
    shards = sorted(base.glob("*.safetensors"))
    largest = max(p.stat().st_size for p in shards)
    total = sum(p.stat().st_size for p in shards)
    assert len(shards) >= 4 and opened["files"] == len(shards) and opened["max"] == 1
    assert largest + cap < total / 2  # the bound below is a real constraint
    assert 0 < opened["peak"] <= largest + cap, opened


def test_model_card_and_push(base, patch, tmp_path, monkeypatch):
    import huggingface_hub

    calls = {}

    class FakeApi:
        def create_repo(self, repo_id, **kwargs):
            calls["create"] = (repo_id, kwargs)

        def upload_folder(self, *, repo_id, folder_path, **kwargs):
            folder = Path(folder_path)
            names = sorted(p.name for p in folder.iterdir() if not p.name.startswith("."))
            calls["upload"] = (repo_id, names, (folder / "README.md").read_text())
            return type("Commit", (), {"commit_url": f"https://hf.co/{repo_id}/commit/1"})()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    manifest = json.loads((patch[0] / MANIFEST_FILE).read_text())
    run = json.loads((patch[0] / "run_config.json").read_text())
    card = model_card({**manifest, "base_model": "Qwen/Qwen3-8B"}, run,
                      {"before": 0.25, "after": 0.5, "metric": "accuracy"}, kind="patch", repo="me/p")
    assert card.startswith("---\n") and "base_model: Qwen/Qwen3-8B" in card
    assert "- onelayer\n- grpo" in card and "25.0% before, 50.0% after" in card
    assert "onelayer eval --model Qwen/Qwen3-8B --patch" in card
    out = export_model(patch[0], tmp_path / "out", progress=False)
    card = model_card(manifest, run, None, repo="me/merged")
    assert "base_model:" not in card  # a local path is no hub id
    assert 'AutoModelForCausalLM.from_pretrained("me/merged")' in card
    assert push_to_hub(out, "me/merged", card, private=True) == "https://hf.co/me/merged/commit/1"
    repo, files, readme = calls["upload"]
    assert repo == "me/merged" and calls["create"] == ("me/merged", {"private": True, "exist_ok": True,
                                                                     "repo_type": "model"})
    assert {"README.md", "config.json", "model.safetensors"} <= set(files)
    assert str(base) in readme and f"| trained layer | {LAYER} |" in readme and "| steps | 3 |" in readme

    class NoToken(FakeApi):
        def create_repo(self, repo_id, **kwargs):
            raise OSError("Token is required (`token=True`), but no token found.\nmore")

    monkeypatch.setattr(huggingface_hub, "HfApi", NoToken)
    with pytest.raises(UserError, match="cannot push .* as me/merged: Token is required") as err:
        push_to_hub(out, "me/merged", card)
    assert "\n" not in str(err.value)


def test_export_demo_patch_finds_its_base(tmp_path):
    # The base comes from the manifest ("demo", resolved to the packaged model); layer checkpoints
    # saved before manifests still name theirs in run_config.json.
    from onelayer.export import patch_base_model

    generator = torch.Generator().manual_seed(0)
    tensors = {f"model.layers.3.{k}": torch.randn(v.shape, generator=generator)
               for k, v in read_layer_tensors(DEMO_PATH, 3).items()}
    save_layer(tmp_path / "patch", tensors, layer_index=3, base_model="demo",
               run_config={"model": "demo"}, step=1)
    assert patch_base_model(tmp_path / "patch") == "demo"
    write_manifest(tmp_path / "patch", patch_manifest("demo", DEMO_PATH, [3]))
    out = export_model(tmp_path / "patch", tmp_path / "out", progress=False)
    merged = safetensors.torch.load_file(out / "model.safetensors")
    assert all(torch.equal(merged[k], v) for k, v in tensors.items())
    assert "| base model | demo |" in (out / "README.md").read_text()
