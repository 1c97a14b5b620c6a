"""Tiny word-level tokenizers the engine tests build their readers with (no downloads)."""

from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast


def word_tokenizer(words: list[str], *, unk: str, **special: str) -> PreTrainedTokenizerFast:
    """A whitespace-split word-level tokenizer; word i gets id i, unknown words `unk`. `special` are the
    special-token arguments of PreTrainedTokenizerFast (pad_token, bos_token, unk_token, ...)."""
    model = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token=unk))
    model.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=model, **special)
