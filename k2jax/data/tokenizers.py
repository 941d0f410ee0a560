"""Tokenizers: byte-level (ids 0..255 are bytes, 256 the separator) and byte-level BPE.

Both decode the separator as EOS_TEXT and invalid UTF-8 with errors="replace". The BPE is trained
with Hugging Face `tokenizers` on a fixed sample of the training split, saved to
<workdir>/tokenizer.json and reused from there when present.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import decoders, models, pre_tokenizers, trainers

from k2jax.data import sources

EOS_TEXT = "<|endoftext|>"
TOKENIZER_FILE = "tokenizer.json"


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; id 256 separates documents."""

  name = "byte"
  vocab_size = 257
  eos_id = 256

  def __init__(self):
    self.token_bytes = np.array([1] * 256 + [0], dtype=np.int32)  # UTF-8 bytes of each id.

  def encode_array(self, text: str) -> np.ndarray:
    """int32 ids of `text` (no separator)."""
    return np.frombuffer(text.encode("utf-8", errors="replace"), np.uint8).astype(np.int32)

  def encode(self, text: str) -> list[int]:
    return list(text.encode("utf-8", errors="replace"))

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = _check_ids(ids, self.vocab_size)
    cuts = np.flatnonzero(ids == self.eos_id)
    pieces = np.split(ids, cuts)
    pieces = [pieces[0]] + [p[1:] for p in pieces[1:]]
    return EOS_TEXT.join(p.astype(np.uint8).tobytes().decode("utf-8", "replace") for p in pieces)


class BpeTokenizer:
  """A byte-level BPE `tokenizers.Tokenizer` whose special token EOS_TEXT separates documents."""

  name = "bpe"

  def __init__(self, tok: tokenizers.Tokenizer, path: str = "<memory>"):
    eos_id = tok.token_to_id(EOS_TEXT)
    if eos_id is None:
      raise ValueError(f"{path}: no {EOS_TEXT} token")
    tok.encode_special_tokens = True  # a literal EOS_TEXT inside a document is plain text.
    self._tok = tok
    self.vocab_size = tok.get_vocab_size()
    self.eos_id = eos_id
    special = {t.content for t in tok.get_added_tokens_decoder().values()}
    # A byte-level token string holds one character per byte.
    self.token_bytes = np.array(
      [0 if t in special else len(t) for t in map(tok.id_to_token, range(self.vocab_size))],
      dtype=np.int32,
    )

  def encode_array(self, text: str) -> np.ndarray:
    """int32 ids of `text` (no separator)."""
    return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, dtype=np.int32)

  def encode(self, text: str) -> list[int]:
    return self._tok.encode(text, add_special_tokens=False).ids

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    ids = _check_ids(ids, self.vocab_size)
    return self._tok.decode(ids.tolist(), skip_special_tokens=False)

  def save(self, path: str):
    self._tok.save(path)


Tokenizer = ByteTokenizer | BpeTokenizer


def _check_ids(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = ids[(ids < 0) | (ids >= vocab_size)][0]
    raise ValueError(f"token id {bad} outside the vocabulary [0, {vocab_size})")
  return ids


def build_tokenizer(data_cfg: Any, workdir: str | None) -> Tokenizer:
  """The tokenizer named by data.tokenizer; a BPE one is loaded from or trained into `workdir`."""
  if sources.field(data_cfg, "tokenizer") == "byte":
    return ByteTokenizer()
  vocab_size = sources.field(data_cfg, "bpe_vocab_size")
  if not workdir:
    raise ValueError("data.tokenizer 'bpe' needs a workdir to cache tokenizer.json in")
  path = os.path.join(workdir, TOKENIZER_FILE)
  if os.path.exists(path):
    tok = BpeTokenizer(tokenizers.Tokenizer.from_file(path), path)
    if tok.vocab_size != vocab_size:
      raise ValueError(
        f"{path} has {tok.vocab_size} tokens but data.bpe_vocab_size is {vocab_size}; "
        "delete the file to retrain"
      )
    return tok
  tok = train_bpe(data_cfg)
  os.makedirs(workdir, exist_ok=True)
  tmp = f"{path}.tmp.{os.getpid()}"
  tok.save(tmp)
  os.replace(tmp, path)
  return tok


def train_bpe(data_cfg: Any) -> BpeTokenizer:
  """Trains a byte-level BPE on about data.bpe_train_bytes of the training split."""
  vocab_size = sources.field(data_cfg, "bpe_vocab_size")
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  tok.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(
    vocab_size=vocab_size,
    special_tokens=[EOS_TEXT],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    show_progress=False,
  )
  tok.train_from_iterator(_training_sample(data_cfg), trainer)
  if tok.get_vocab_size() != vocab_size:
    raise ValueError(
      f"data.bpe_vocab_size {vocab_size}: BPE training on data.source "
      f"{sources.field(data_cfg, 'source')!r} stopped at {tok.get_vocab_size()} tokens; "
      "lower it or add data"
    )
  return BpeTokenizer(tok)


def _training_sample(data_cfg: Any):
  """Texts of training documents in a fixed pseudo-random order, up to data.bpe_train_bytes."""
  docs = sources.list_documents(data_cfg, "train")
  budget = sources.field(data_cfg, "bpe_train_bytes")
  text_key = sources.field(data_cfg, "text_key")
  for i in np.random.default_rng(0).permutation(len(docs)):
    text = sources.read_document(docs[i], text_key)
    yield text
    budget -= len(text)
    if budget <= 0:
      return
