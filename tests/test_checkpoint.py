"""Layer-only checkpoints describe themselves and load back bit for bit."""
import json

import torch

from onelayer.checkpoint import CONFIG_FILE, LAYER_FILE, load_layer, save_layer


def test_layer_round_trip_with_metadata(tmp_path):
    tensors = {"model.layers.5.self_attn.q_proj.weight": torch.randn(8, 4),
               "model.layers.5.mlp.up_proj.weight": torch.randn(3, 8)}
    save_layer(tmp_path / "run", tensors, layer_index=5, base_model="Qwen/Qwen3-8B",
               run_config={"lr": 1e-5}, step=7)
    loaded, meta = load_layer(tmp_path / "run")
    assert set(loaded) == set(tensors)
    assert all(torch.equal(loaded[k], tensors[k]) for k in tensors)
    assert meta["layer_index"] == "5" and meta["base_model"] == "Qwen/Qwen3-8B"
    assert meta["step"] == "7" and meta["dtype"] == "float32"
    assert json.loads((tmp_path / "run" / CONFIG_FILE).read_text()) == {"lr": 1e-5}
    # Full checkpoint names, so that the file can be merged into the base model's weights.
    from safetensors import safe_open
    with safe_open(str(tmp_path / "run" / LAYER_FILE), framework="pt") as f:
        assert sorted(f.keys()) == sorted(tensors)
    assert sorted(p.name for p in (tmp_path / "run").iterdir()) == sorted([LAYER_FILE, CONFIG_FILE])
