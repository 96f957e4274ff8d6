"""Loading: NF4 on every block but the trained one, the split against the model's own forward
and its sampler, the architectures verified exact and those refused."""
import json
import logging

import bitsandbytes as bnb
import pytest
import torch
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModelForCausalLM

from conftest import ARCHS, char_tokenizer, make_tiny_model
from onelayer.cli import main
from onelayer.errors import UserError
from onelayer.model import LogitTransform, load_policy, resolve_layer
from onelayer.model import arch
from onelayer.model.load import _skip_pattern, read_layer_tensors

PROMPTS = ["12+34=", "5-123456789="]  # the first is left-padded by 6


def nf4_blocks(lm) -> list[tuple[int, int]]:
    """(4-bit linears, linears) of every block."""
    counts = []
    for block in lm.model.layers:
        linears = [m for m in block.modules() if isinstance(m, torch.nn.Linear)]
        counts.append((sum(isinstance(m, bnb.nn.Linear4bit) for m in linears), len(linears)))
    return counts


def assert_only_layer_unquantized(lm, layer):
    counts = nf4_blocks(lm)
    assert counts[layer][0] == 0 and counts[layer][1] > 0
    assert all(nf4 == n > 0 for i, (nf4, n) in enumerate(counts) if i != layer), counts
    assert not isinstance(lm.lm_head, bnb.nn.Linear4bit)
    assert all(m.weight.quant_state.nested for m in lm.modules()
               if isinstance(m, bnb.nn.Linear4bit))  # double quantisation


def split_and_own_logprobs(policy, prompts=PROMPTS):
    """Next-token log-probs at real positions: (split, the model's own forward given only
    input_ids and attention_mask, as a user calls it), and the padding mask."""
    enc = policy.tokenizer(prompts, return_tensors="pt", padding=True)
    split = policy.split
    with torch.no_grad():
        ours = arch.split_logprobs(split, enc.input_ids, enc.attention_mask, policy.compute_dtype)
        logits = split.lm(input_ids=enc.input_ids, attention_mask=enc.attention_mask).logits
    predicts = enc.attention_mask[:, :-1].bool()
    theirs = torch.log_softmax(logits[:, :-1].float(), -1).gather(-1, enc.input_ids[:, 1:, None])[..., 0]
    return ours, theirs[predicts], predicts


@pytest.mark.parametrize("arch_name", sorted(ARCHS))
@pytest.mark.parametrize("frozen_dtype", ["nf4", "bf16", "fp32"])
def test_load_split_and_trainable_state(tiny_models, arch_name, frozen_dtype):
    layer = 2
    policy = load_policy(tiny_models[arch_name], layer=layer, frozen_dtype=frozen_dtype, device="cpu")
    lm = policy.split.lm
    if frozen_dtype == "nf4":
        assert_only_layer_unquantized(lm, layer)
    else:
        assert not any(isinstance(m, bnb.nn.Linear4bit) for m in lm.modules())
    # The master weights are the checkpoint's own tensors, in fp32.
    saved = load_file(f"{tiny_models[arch_name]}/model.safetensors")
    prefix = f"model.layers.{layer}."
    expected = {k: v for k, v in saved.items() if k.startswith(prefix)}
    assert set(policy.layer.master) == set(expected)
    for name, p in policy.layer.master.items():
        assert p.dtype == torch.float32 and p.requires_grad
        assert torch.equal(p.detach(), expected[name].float())
    trainable = {n for n, p in lm.named_parameters() if p.requires_grad}
    if policy.layer.shares_storage:
        assert trainable == set(expected)
    else:
        assert trainable == set()  # the block holds a no-grad compute copy
    # The split against the model's own forward. HF numbers a padded row's positions from its
    # first pad, the sampler (and so the split) from its first token: rotary attention sees
    # only differences, so the padded row agrees up to rounding and the full row exactly.
    ours, theirs, predicts = split_and_own_logprobs(policy)
    full_row = predicts[0].sum().item()  # the first row is padded, the second is not
    torch.testing.assert_close(ours[full_row:], theirs[full_row:], rtol=0, atol=1e-6)
    torch.testing.assert_close(ours[:full_row], theirs[:full_row], rtol=0,
                               atol=1e-5 if policy.compute_dtype == torch.float32 else 0.05)


def test_split_logprobs_are_the_samplers(tiny_models):
    """What the trainer computes for sampled tokens is what HF generate sampled them from: the
    logits generate reports for a left-padded batch (prefill, then cached decoding)."""
    policy = load_policy(tiny_models["qwen3"], layer=1, device="cpu")
    enc = policy.tokenizer(PROMPTS, return_tensors="pt", padding=True)
    out = policy.split.lm.generate(**enc, max_new_tokens=5, do_sample=False, output_logits=True,
                                   return_dict_in_generate=True, min_new_tokens=5)
    new = out.sequences[:, enc.input_ids.shape[1]:]
    sampler = torch.stack([torch.log_softmax(step.float(), -1) for step in out.logits], 1)
    sampler = sampler.gather(-1, new[..., None])[..., 0]                       # [B, 5]
    mask = torch.cat([enc.attention_mask, torch.ones_like(new)], 1)
    with torch.no_grad():
        ours = arch.split_logprobs(policy.split, out.sequences, mask, policy.compute_dtype)
    prompt_len = enc.input_ids.shape[1]
    ours = ours.split(mask[:, :-1].sum(1).tolist())                             # per row
    ours = torch.stack([row[-5:] for row in ours])
    assert prompt_len > 1 and new.numel() == 10
    torch.testing.assert_close(ours, sampler, rtol=0, atol=1e-5)


# ---------------------------------------------------------------------------------------------
# Every layer choice: exactly block L unquantised (transformers 5.20 matched the skip entry
# "model.layers.1" as a prefix, which also kept blocks 10 and 11 in full precision)
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="session")
def twelve_layers(tmp_path_factory):
    return make_tiny_model(tmp_path_factory.mktemp("deep") / "qwen3", "qwen3", num_hidden_layers=12,
                           hidden_size=32, intermediate_size=64, head_dim=8)


def test_every_layer_choice_quantizes_every_other_block(twelve_layers):
    for layer in range(12):
        policy = load_policy(twelve_layers, layer=layer, frozen_dtype="nf4", device="cpu")
        assert_only_layer_unquantized(policy.split.lm, layer)


def test_skip_pattern_names_one_block_under_the_installed_transformers():
    # transformers' own matcher of skip entries (internal: imported here, not for the module)
    from transformers.quantizers.quantizers_utils import should_convert_module
    for layer in (1, 2, 10):
        skip = ["lm_head", _skip_pattern(layer)]
        kept = {i for i in range(120) if not should_convert_module(f"model.layers.{i}.mlp.up_proj", skip)}
        assert kept == {layer}
        assert should_convert_module(f"model.layers.{layer}", skip)  # the block itself holds no weight


# ---------------------------------------------------------------------------------------------
# Architectures: exact or refused
# ---------------------------------------------------------------------------------------------

FAMILIES = {  # beyond conftest's four; what each does outside its blocks, at real magnitudes
    "phi3": {},
    "gemma": dict(head_dim=16),                                   # sqrt(hidden) embedding scale
    "granite": dict(embedding_multiplier=12.0, logits_scaling=8.0, residual_multiplier=0.22,
                    attention_multiplier=0.0625),
    "cohere": dict(logit_scale=0.0625),
    "gemma2": dict(head_dim=16, final_logit_softcapping=30.0, attn_logit_softcapping=50.0,
                   sliding_window=8, query_pre_attn_scalar=16),
    "gemma3_text": dict(head_dim=16, final_logit_softcapping=30.0, sliding_window=8,
                        query_pre_attn_scalar=16),                # one rotary table per layer type
    "olmo3": dict(sliding_window=8),
}
TINY = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
            num_key_value_heads=2, max_position_embeddings=128, tie_word_embeddings=False, pad_token_id=0,
            bos_token_id=1, eos_token_id=1)


def make_family_model(path, model_type, **overrides) -> str:
    """A tiny random checkpoint whose logits have the spread of a real model's (std ~8):
    random init gives ~0.1, where a missed scaling or cap would hardly show."""
    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(AutoConfig.for_model(
        model_type, **{**TINY, **FAMILIES.get(model_type, {}), **overrides}))
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
        std = model(input_ids=torch.arange(24).view(2, 12)).logits.std()
        model.lm_head.weight.mul_(8 / std)
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def family_models(tmp_path_factory):
    root = tmp_path_factory.mktemp("families")
    return {name: make_family_model(root / name, name) for name in FAMILIES}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_verified_families_are_exact(family_models, family):
    policy = load_policy(family_models[family], layer=1, device="cpu")
    ours, theirs, _ = split_and_own_logprobs(policy)
    assert theirs.std() > 0.5  # logits of a real spread: scalings matter here
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("family, expected", [
    ("granite", (12.0, LogitTransform(0.125, None))),
    ("cohere", (1.0, LogitTransform(0.0625, None))),
    ("gemma2", (1.0, LogitTransform(1.0, 30.0))),
])
def test_scaled_families_are_refused_without_their_scalings(family_models, monkeypatch, family, expected):
    """The load-time check is what stands between an unknown scaling and silent training on
    wrong log-probs: each scaling is needed here, and its absence is caught."""
    assert arch.split_scalings(AutoConfig.from_pretrained(family_models[family])) == expected
    monkeypatch.setattr("onelayer.model.load.split_scalings", lambda config: (1.0, LogitTransform()))
    with pytest.raises(UserError, match=rf"^{family}: this architecture is not supported: the split "
                                        r"forward's log-probs differ from the model's own by [0-9.]+ nats"):
        load_policy(family_models[family], layer=1, device="cpu")


def test_gemma2_gets_eager_attention(family_models):
    """SDPA has no attention soft-cap: Gemma2 loads with eager attention (and is exact, above)."""
    policy = load_policy(family_models["gemma2"], layer=1, device="cpu", attn="sdpa")
    assert policy.split.lm.config._attn_implementation == "eager"
    policy = load_policy(family_models["phi3"], layer=1, device="cpu", attn="sdpa")
    assert policy.split.lm.config._attn_implementation == "sdpa"


def test_unknown_attention_says_what_is_supported(tiny_models):
    with pytest.raises(UserError, match="--attn must be one of sdpa, eager, flash_attention_2, not 'flash'"):
        load_policy(tiny_models["qwen3"], attn="flash", device="cpu")


@pytest.mark.parametrize("model_type, message", [
    ("qwen3_moe", "qwen3_moe: this architecture is not supported: block 1's parameters mlp.experts"),
    ("phi", "phi: this architecture is not supported: it does not keep model.embed_tokens"),
])
def test_unsupported_architecture_is_one_line_exit_2(tmp_path, capsys, model_type, message):
    extra = dict(num_experts=4, num_experts_per_tok=2, moe_intermediate_size=32, head_dim=16)
    path = make_family_model(tmp_path / model_type, model_type, **(extra if model_type == "qwen3_moe" else {}))
    capsys.readouterr()  # the progress bars of saving it
    with pytest.raises(SystemExit) as exit_info:
        main(["train", "--model", path, "--layer", "1", "--output", str(tmp_path / "out"), "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert exit_info.value.code == 2 and len(err) == 1 and message in err[0], err


def test_tensors_stored_beside_the_block_parameters_are_ignored(tmp_path, caplog):
    """Older checkpoints store rotary inv_freq buffers under model.layers.L.: not trained."""
    path = make_tiny_model(tmp_path / "old", "qwen3")
    tensors = load_file(f"{path}/model.safetensors")
    tensors["model.layers.2.self_attn.rotary_emb.inv_freq"] = torch.rand(8)
    save_file(tensors, f"{path}/model.safetensors", metadata={"format": "pt"})
    with caplog.at_level(logging.WARNING, logger="onelayer"):
        policy = load_policy(path, layer=2, device="cpu")
    assert set(policy.layer.master) == {f"model.layers.2.{n}" for n, _ in policy.split.layer.named_parameters()}
    assert "self_attn.rotary_emb.inv_freq" in caplog.text and "ignoring 1 tensor" in caplog.text


# ---------------------------------------------------------------------------------------------
# Layer indices and sharded checkpoints
# ---------------------------------------------------------------------------------------------

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


def test_a_hub_id_loads_from_the_hub_cache_and_names_its_revision(tmp_path, monkeypatch, capsys):
    """`--model owner/name` goes through huggingface_hub.snapshot_download, as for users with
    internet; here the model sits in a local hub cache (HF_HUB_OFFLINE=1: nothing is fetched).
    The patch manifest names the hub id and the snapshot's commit; a hub id in no cache is a
    one-line error."""
    import huggingface_hub
    from conftest import run_cli
    revision = "0123456789abcdef0123456789abcdef01234567"
    repo = tmp_path / "hub" / "models--acme--tiny-qwen3"
    make_tiny_model(repo / "snapshots" / revision)
    (repo / "refs").mkdir()
    (repo / "refs" / "main").write_text(revision)
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    out = tmp_path / "run"
    code, _, stderr = run_cli(["train", "--model", "acme/tiny-qwen3", "--layer", "1", "--steps", "1",
                               "--prompts-per-step", "2", "--group-size", "2", "--max-new-tokens", "2",
                               "--eval-samples", "0", "--output", str(out), "--quiet"], capsys)
    assert code == 0, stderr
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["base_model"] == "acme/tiny-qwen3" and manifest["base_revision"] == revision
    code, _, stderr = run_cli(["train", "--model", "acme/not-cached", "--output", str(tmp_path / "no"),
                               "--quiet"], capsys)
    assert code == 2 and stderr.startswith("onelayer: error: cannot get model 'acme/not-cached' from the hub")
    assert stderr.count("\n") == 1 and not (tmp_path / "no").exists()
