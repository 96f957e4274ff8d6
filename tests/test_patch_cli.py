"""A trained run's directory is a patch: `onelayer export` merges it into a full Hugging Face
checkpoint whose logits are onelayer's own with the trained layer; `--patch` applies it to its
base model only."""
import json
import shutil

import pytest
import torch

from onelayer.checkpoint import MANIFEST_FILE
from onelayer.config import build_config
from onelayer.model import load_policy
from onelayer.model.load import DEMO_PATH
from onelayer.evaluate import load_trained_layer
from onelayer.train import train
from conftest import run_cli


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("patch") / "run"
    cfg = build_config(dict(steps=2, prompts_per_step=4, group_size=4, eval_samples=4,
                            lr=1e-2, output=str(out)))
    train(cfg, progress=False, echo=lambda line: None)
    return out


def test_the_run_directory_carries_a_manifest_with_scores(trained):
    manifest = json.loads((trained / MANIFEST_FILE).read_text())
    assert manifest["base_model"] == "demo" and manifest["layers"] == [3]
    assert set(manifest["scores"]) >= {"before", "after", "metric", "steps"}
    assert (trained / "checkpoints" / "step-000002" / MANIFEST_FILE).is_file()


def test_export_round_trip_matches_onelayers_forward(trained, tmp_path, capsys):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    code, out, err = run_cli(["export", "--checkpoint", str(trained), "--output",
                          str(tmp_path / "merged"), "--dtype", "fp32", "--quiet"], capsys)
    assert code == 0, err
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").eval()
    AutoTokenizer.from_pretrained(tmp_path / "merged")
    policy = load_policy("demo", layer=3, device="cpu")
    ids = torch.tensor([[5, 9, 12, 7, 3, 10, 11]])
    with torch.no_grad():
        base_logits = policy.split.lm(ids).logits
        load_trained_layer(policy, trained)
        ours = policy.split.lm(ids).logits
        theirs = exported(ids).logits
    assert not torch.allclose(ours, base_logits, atol=1e-4)  # the layer did change
    torch.testing.assert_close(theirs, ours, rtol=0, atol=1e-5)


def test_a_patch_on_another_base_is_refused(trained, tmp_path, tiny_models, capsys):
    other = tmp_path / "other"
    shutil.copytree(DEMO_PATH, other)
    from safetensors.torch import load_file, save_file
    weights = load_file(other / "model.safetensors")
    weights["model.layers.3.mlp.up_proj.weight"] += 0.01
    save_file(weights, other / "model.safetensors", metadata={"format": "pt"})
    code, _, err = run_cli(["eval", "--model", str(other), "--patch", str(trained), "--quiet",
                        "--output", str(tmp_path / "e.json")], capsys)
    assert code == 2 and "refusing a patch for another model" in err
    code, _, err = run_cli(["train", "--model", str(other), "--patch", str(trained), "--steps", "1",
                        "--output", str(tmp_path / "t"), "--quiet"], capsys)
    assert code == 2 and "refusing a patch for another model" in err
    assert not (tmp_path / "t").exists()


def test_training_continues_from_a_patch(trained, tmp_path, capsys):
    code, out, err = run_cli(["train", "--patch", str(trained), "--steps", "1", "--prompts-per-step", "2",
                          "--group-size", "2", "--eval-samples", "4", "--output", str(tmp_path / "more"),
                          "--quiet"], capsys)
    assert code == 0, err
    assert "starting from the trained layer" in out
    assert json.loads((tmp_path / "more" / MANIFEST_FILE).read_text())["layers"] == [3]


def test_export_needs_an_output_or_a_repo(trained, capsys):
    code, _, err = run_cli(["export", "--checkpoint", str(trained)], capsys)
    assert code == 2 and "--output" in err
