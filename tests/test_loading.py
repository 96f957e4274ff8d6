"""Loading tiny Qwen3, Qwen2, Llama and Mistral models in nf4, bf16 and fp32."""
import json

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM

from conftest import ARCHS, make_tiny_model
from onelayer.errors import UserError
from onelayer.model import load_policy, resolve_layer
from onelayer.model.load import read_layer_tensors

PROMPTS = ["12+34=", "5-123456789="]


def split_forward(policy):
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    split = policy.split
    ctx = split.context(enc.attention_mask, policy.compute_dtype)
    ours = split.from_layer(split.prefix(enc.input_ids, ctx), ctx)
    theirs = split.lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                            position_ids=ctx.position_ids).last_hidden_state
    real = enc.attention_mask.bool()
    return ours[real], theirs[real]


@pytest.mark.parametrize("arch", sorted(ARCHS))
@pytest.mark.parametrize("frozen_dtype", ["nf4", "bf16", "fp32"])
def test_load_split_and_trainable_state(tiny_models, arch, frozen_dtype):
    layer = 2
    policy = load_policy(tiny_models[arch], layer=layer, frozen_dtype=frozen_dtype, device="cpu")
    lm = policy.split.lm
    quantized = [n for n, m in lm.named_modules() if isinstance(m, bnb.nn.Linear4bit)]
    if frozen_dtype == "nf4":
        # Every linear of every block but layer L is 4-bit; layer L and lm_head are not.
        assert len(quantized) == 7 * (policy.split.num_layers - 1)
        assert not any(n.startswith(f"model.layers.{layer}.") for n in quantized)
        assert all(m.weight.quant_state.nested for m in lm.modules()
                   if isinstance(m, bnb.nn.Linear4bit))  # double quantisation
    else:
        assert not quantized
    # The master weights are the checkpoint's own tensors, in fp32.
    saved = load_file(f"{tiny_models[arch]}/model.safetensors")
    prefix = f"model.layers.{layer}."
    expected = {k[len(prefix):]: v for k, v in saved.items() if k.startswith(prefix)}
    assert set(policy.layer.master) == set(expected)
    for name, p in policy.layer.master.items():
        assert p.dtype == torch.float32 and p.requires_grad
        assert torch.equal(p.detach(), expected[name].float())
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    if policy.layer.shares_storage:
        assert trainable == {prefix + n for n in expected}
    else:
        assert trainable == set()  # the block holds a no-grad compute copy
    # The split forward equals the model's own forward.
    ours, theirs = split_forward(policy)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=0)


def test_reference_copy_is_kept_only_when_asked(tiny_models):
    assert load_policy(tiny_models["qwen3"], layer=1, device="cpu").layer.reference is None
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu", keep_reference=True)
    for name, ref in policy.layer.reference.items():
        assert torch.equal(ref, policy.layer.master[name].detach()) and not ref.requires_grad
        assert ref.data_ptr() != policy.layer.master[name].data_ptr()


@pytest.mark.parametrize("layer,expected", [(0, 0), (3, 3), (-1, 3), ("-4", 0), ("mid", 1),
                                            ("auto", 1)])
def test_resolve_layer(layer, expected):
    assert resolve_layer(layer, 4) == expected


def test_resolve_layer_matches_the_paper_positions():
    assert resolve_layer("mid", 36) == 17   # mid-1 of Qwen3-8B: [floor(17.5), floor(18.5))
    assert resolve_layer("auto", 36) == 15
    assert resolve_layer("auto", 28) == 12


@pytest.mark.parametrize("layer", [4, -5, "x", "1.5"])
def test_resolve_layer_rejects(layer):
    with pytest.raises(UserError):
        resolve_layer(layer, 4)


def test_sharded_checkpoint_reads_only_the_trained_layer(tmp_path):
    path = make_tiny_model(tmp_path / "sharded", "qwen3", seed=1)
    AutoModelForCausalLM.from_pretrained(path).save_pretrained(path, max_shard_size="60KB")
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    shards = set(index["weight_map"].values())
    assert len(shards) > 2
    tensors = read_layer_tensors(tmp_path / "sharded", 3)
    lm = AutoModelForCausalLM.from_pretrained(path)
    expected = dict(lm.model.layers[3].named_parameters())
    assert set(tensors) == set(expected)
    for name, t in tensors.items():
        assert torch.equal(t, expected[name].float())
