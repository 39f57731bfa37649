"""Tokenizers for text in and out: a checkpoint directory's own, or one the user names (`--tokenizer-dir`).

A tokenizer is loaded with Hugging Face's `AutoTokenizer` from a directory holding `tokenizer.json` or
`tokenizer_config.json` (what `save_pretrained` writes). It must fit the model: a token id the embedding table does
not have would index out of range, so a vocabulary larger than the model's is refused up front.
"""

from __future__ import annotations

import os
from pathlib import Path
from typing import Any

from compiler.errors import MoecError

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "tokenizer.model")


class TokenizerError(MoecError):
    """A tokenizer is missing, unreadable, or does not fit the model."""


def has_tokenizer(directory: str | os.PathLike[str] | None) -> bool:
    return directory is not None and any((Path(directory) / name).is_file() for name in TOKENIZER_FILES)


def load_tokenizer(directory: str | os.PathLike[str], vocab_size: int) -> Any:
    """The tokenizer saved in `directory`, checked against a model of `vocab_size` tokens."""
    from transformers import AutoTokenizer

    path = Path(directory)
    if not path.is_dir():
        raise TokenizerError(f"tokenizer directory {path} does not exist")
    if not has_tokenizer(path):
        raise TokenizerError(f"{path} holds no tokenizer (none of {', '.join(TOKENIZER_FILES)})")
    try:
        tokenizer = AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, KeyError) as error:
        raise TokenizerError(f"cannot load the tokenizer in {path}: {error}") from error
    if len(tokenizer) > vocab_size:
        raise TokenizerError(
            f"the tokenizer in {path} has {len(tokenizer)} tokens but the model's vocabulary has {vocab_size}: "
            "its ids would index past the embedding table (is it the tokenizer of another model?)"
        )
    if tokenizer.pad_token_id is None and tokenizer.eos_token_id is not None:
        # Like TensorRT-LLM's run.py: batches of prompts are padded with EOS when the tokenizer has no pad token.
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def encode_prompts(tokenizer: Any, prompts: list[str]) -> list[list[int]]:
    """Token ids of each prompt, with the tokenizer's special tokens (e.g. a leading <s>); refuses empty prompts."""
    if not prompts:
        raise MoecError("no prompts given")
    encoded = []
    for index, prompt in enumerate(prompts):
        if not prompt.strip():
            raise MoecError(f"prompt {index} is empty")
        encoded.append(list(tokenizer(prompt)["input_ids"]))
    return encoded
