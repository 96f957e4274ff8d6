"""Whether a model's tokenizer can write down a task's or an environment's text at all.

A tokenizer without a token for some character either raises while encoding (a WordLevel
vocabulary with no unknown token: "Missing [UNK] token") or turns the character into its unknown
token, which the model cannot read. When it raises, or when unknown tokens stand for more than
MAX_UNKNOWN of the text's characters, training would be meaningless, so the run stops before it
starts with one line that names the model, the text and the characters. (A few unknown
characters, a newline or a symbol a small vocabulary lacks, leave the text readable.)
"""
from __future__ import annotations

from ..errors import UserError

SHOWN = 8           # characters named in the error
MAX_UNKNOWN = 0.25  # share of a text's characters that may be unknown


def unencodable(tokenizer, text: str) -> list[str]:
    """The distinct characters of `text` (in order of appearance) the tokenizer maps to its
    unknown token; raises whatever the tokenizer raises on text it cannot encode."""
    unk = unknown_id(tokenizer)
    ids = tokenizer(text, add_special_tokens=False).input_ids
    if unk is None or unk not in ids:
        return []
    # Only characters that are unknown on their own count: a special token written in the
    # text (e.g. "<|endoftext|>" where unk is that token) is no missing character.
    return [c for c in dict.fromkeys(text)
            if unk in tokenizer(c, add_special_tokens=False).input_ids]


def unknown_id(tokenizer) -> int | None:
    """The id the tokenizer gives a character it has no token for: its unk_token, else the
    unknown token of its `tokenizers` model (a wrapper may leave unk_token unset)."""
    if getattr(tokenizer, "unk_token_id", None) is not None:
        return tokenizer.unk_token_id
    backend = getattr(tokenizer, "backend_tokenizer", None)
    token = getattr(getattr(backend, "model", None), "unk_token", None)
    return backend.token_to_id(token) if token else None


def check_encodes(tokenizer, text: str, *, what: str, model: str) -> None:
    """UserError when the tokenizer raises on `text` or has no token for more than MAX_UNKNOWN
    of its characters. what: e.g. "the text of --env
    gridworld"; model: the --model the user gave."""
    try:
        missing = unencodable(tokenizer, text)
    except Exception as exc:  # tokenizers raise plain Exceptions from Rust
        raise UserError(f"model {model}: its tokenizer cannot encode {what} "
                        f"({str(exc).splitlines()[0]}); choose a model whose vocabulary covers it")
    share = sum(c in set(missing) for c in text) / max(len(text), 1)
    if share > MAX_UNKNOWN:
        shown = " ".join(repr(c) for c in missing[:SHOWN])
        more = f" and {len(missing) - SHOWN} more" if len(missing) > SHOWN else ""
        raise UserError(f"model {model}: its tokenizer has no token for {share:.0%} of the "
                        f"characters of {what} ({shown}{more}); choose a model whose "
                        "vocabulary covers it")
