"""`onelayer diff`: where a trained model's weights moved, block by block, against sums
computed here from whole state dicts."""
import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from onelayer.weight_diff import weight_diff

from conftest import make_tiny_model, run_cli


@pytest.fixture(scope="module")
def pair(tmp_path_factory, tiny_models):
    """(base dir, tuned dir sharded in bf16, the deltas added): block 2's q_proj and down_proj
    and the final norm moved; some of block 2's moves too small to survive bf16."""
    root = tmp_path_factory.mktemp("diff")
    base = AutoModelForCausalLM.from_pretrained(tiny_models["qwen3"], dtype=torch.bfloat16)
    base.save_pretrained(root / "base")
    torch.manual_seed(0)
    tuned = AutoModelForCausalLM.from_pretrained(root / "base", dtype=torch.bfloat16)
    with torch.no_grad():
        for name in ("model.layers.2.self_attn.q_proj.weight", "model.layers.2.mlp.down_proj.weight",
                     "model.norm.weight"):
            p = tuned.get_parameter(name)
            step = 0.05 * torch.randn_like(p)
            if p.dim() > 1:
                step[:, :3] = 1e-6   # far below bf16's rounding step at these weights
            p.add_(step)
    tuned.save_pretrained(root / "tuned", max_shard_size="100KB")   # several shards, an index
    return root / "base", root / "tuned"


def sums(base_dir, tuned_dir):
    """||delta||^2, ||base||^2 and unchanged counts per block, from whole state dicts."""
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.bfloat16).state_dict()
    out = {}
    for name, b in base.items():
        if name == "lm_head.weight" and name not in tuned:
            continue
        key = name.split(".")[2] if ".layers." in name else (
            "embed" if "embed" in name else "lm_head" if "lm_head" in name else "norm")
        d, n, u, e = out.get(key, (0.0, 0.0, 0, 0))
        delta = tuned[name].double() - b.double()
        out[key] = (d + delta.square().sum().item(), n + b.double().square().sum().item(),
                    u + (tuned[name] == b).sum().item(), e + b.numel())
    return out


def test_each_block_matches_sums_over_the_whole_state_dicts(pair):
    base_dir, tuned_dir = pair
    result = weight_diff(str(base_dir), str(tuned_dir))
    expected = sums(base_dir, tuned_dir)
    rows = {r["block"]: r for r in result.rows()}
    assert list(rows) == ["embed", "0", "1", "2", "3", "norm", "lm_head"]
    whole = sum(d for d, _, _, _ in expected.values())
    for block, (d, n, u, e) in expected.items():
        assert rows[block]["relative_change"] == pytest.approx((d / n) ** 0.5, rel=1e-9)
        assert rows[block]["share_of_change"] == pytest.approx(d / whole, rel=1e-9)
        assert rows[block]["unchanged"] == u / e and rows[block]["parameters"] == e
    moved = {b for b, r in rows.items() if r["relative_change"] > 0}
    assert moved == {"2", "norm"}
    # Block 2: the 1e-6 steps rounded away in bf16, the rest of q_proj and down_proj moved.
    assert 0 < rows["2"]["unchanged"] < 1 and rows["0"]["unchanged"] == 1.0
    # The attention / MLP split of block 2, from its own tensors.
    base = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.bfloat16).state_dict()
    tuned = AutoModelForCausalLM.from_pretrained(tuned_dir, dtype=torch.bfloat16).state_dict()
    for part, key in (("attention", "self_attn"), ("mlp", "mlp")):
        names = [n for n in base if n.startswith("model.layers.2.") and key in n]
        d = sum((tuned[n].double() - base[n].double()).square().sum().item() for n in names)
        norm = sum(base[n].double().square().sum().item() for n in names)
        assert rows["2"][f"{part}_relative"] == pytest.approx((d / norm) ** 0.5, rel=1e-9)


def test_a_onelayer_run_is_compared_on_its_own_layer(tmp_path, capsys):
    from safetensors.torch import load_file

    from onelayer.model.load import read_tensors, resolve_model_path

    run = tmp_path / "run"
    code, _, stderr = run_cli(["train", "--steps", "2", "--eval-samples", "4", "--output",
                               str(run), "--quiet"], capsys)
    assert code == 0, stderr
    out = tmp_path / "diff"
    code, stdout, stderr = run_cli(["diff", "--tuned", str(run), "--output", str(out), "--quiet"],
                                   capsys)   # the base model comes from the run's manifest
    assert code == 0, stderr
    record = json.loads((out / "diff.json").read_text())
    trained = load_file(run / "layer.safetensors")
    assert record["base"] == "demo" and record["compared_tensors"] == len(trained)
    assert [b["block"] for b in record["blocks"]] == ["3"] and record["only_in_base"]
    base = read_tensors(resolve_model_path("demo"), ["model.layers.3."])
    d = sum((trained[n].double() - base[n].double()).square().sum().item() for n in trained)
    n = sum(base[k].double().square().sum().item() for k in trained)
    assert record["blocks"][0]["relative_change"] == pytest.approx((d / n) ** 0.5, rel=1e-9)
    assert 0 < record["relative_change"] < 1
    assert (out / "diff.csv").read_text().startswith("block,relative_change")
    assert (out / "diff.png").stat().st_size > 0
    assert stdout.splitlines()[1].split()[0] == "3" and "tensors of the base" in stdout


def test_bad_input_exits_2(pair, tmp_path, capsys):
    base_dir, tuned_dir = pair
    other = make_tiny_model(tmp_path / "wide", intermediate_size=96)
    empty = tmp_path / "empty"
    empty.mkdir()
    cases = [(["--tuned", str(tuned_dir)], "give the model it was trained from with --base"),
             (["--tuned", str(empty), "--base", str(base_dir)], "no safetensors weights"),
             (["--tuned", other, "--base", str(base_dir)], "not the same architecture"),
             (["--tuned", str(tmp_path / "nowhere"), "--base", "demo"], "neither")]
    for args, message in cases:
        code, _, stderr = run_cli(["diff", *args, "--output", str(tmp_path / "d"), "--quiet"],
                                  capsys)
        assert code == 2 and message in stderr and len(stderr.strip().splitlines()) == 1, stderr
    assert not (tmp_path / "d").exists()
