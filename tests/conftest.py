"""Tiny models and tokenizers built locally: nothing is downloaded at test time."""
import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
# The kernel tests run Triton on CPU tensors through its interpreter, which must be chosen before
# transformers (imported below) imports Triton.
os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import (LlamaConfig, LlamaForCausalLM, MistralConfig, MistralForCausalLM,
                          PreTrainedTokenizerFast, Qwen2Config, Qwen2ForCausalLM, Qwen3Config,
                          Qwen3ForCausalLM)

torch.set_num_threads(2)

VOCAB = ["<pad>", "<eos>"] + list("0123456789+-*= abcdefghijklmnopqrstuvwxyz")
COMMON = dict(vocab_size=64, hidden_size=64, intermediate_size=128, num_hidden_layers=4,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
              tie_word_embeddings=False, pad_token_id=0, eos_token_id=1)
ARCHS = {
    "qwen3": (Qwen3Config, Qwen3ForCausalLM, dict(head_dim=16)),
    "qwen2": (Qwen2Config, Qwen2ForCausalLM, {}),
    "llama": (LlamaConfig, LlamaForCausalLM, {}),
    "mistral": (MistralConfig, MistralForCausalLM, dict(sliding_window=8)),
}


def char_tokenizer() -> PreTrainedTokenizerFast:
    tok = Tokenizer(models.WordLevel({c: i for i, c in enumerate(VOCAB)}, unk_token="<pad>"))
    tok.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="<eos>")


def make_tiny_model(path, arch: str = "qwen3", seed: int = 0, **overrides) -> str:
    config_cls, model_cls, extra = ARCHS[arch]
    torch.manual_seed(seed)
    model = model_cls(config_cls(**{**COMMON, **extra, **overrides}))
    model.save_pretrained(path)
    char_tokenizer().save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_models(tmp_path_factory):
    """arch -> directory of a saved tiny random model with a character tokenizer."""
    root = tmp_path_factory.mktemp("models")
    return {arch: make_tiny_model(root / arch, arch) for arch in ARCHS}


def run_cli(args, capsys):
    """(exit code, stdout, stderr) of `onelayer ARGS`, run in this process."""
    from onelayer.cli import main

    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = exc.code
    captured = capsys.readouterr()
    return code, captured.out, captured.err
