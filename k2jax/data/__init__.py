"""Data: documents from the stdlib, text files or JSONL, tokenised and packed with grain."""

from k2jax.data.pipeline import DataIterator, bytes_per_token, make_iterator
from k2jax.data.sources import default_data_config
from k2jax.data.tokenizers import (
  ByteTokenizer,
  KimiTokenizer,
  Tokenizer,
  build_tokenizer,
  train_bpe,
)

__all__ = [
  "ByteTokenizer",
  "DataIterator",
  "KimiTokenizer",
  "Tokenizer",
  "build_tokenizer",
  "bytes_per_token",
  "default_data_config",
  "make_iterator",
  "train_bpe",
]
