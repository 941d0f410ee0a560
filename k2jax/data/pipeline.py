"""The grain pipeline: documents -> tokens -> packed rows of seq_len + 1 -> batches.

MapDataset of documents -> shuffle (train; reshuffled every epoch) -> repeat -> map(read and
tokenise, separator appended) -> to_iter_dataset (read-ahead threads) -> ConcatThenSplit packing
into rows of seq_len + 1 tokens -> window shuffle of rows (train) -> batch -> background prefetch.
With `data.segment_attention` the batches also carry the packer's `segment_ids` (1, 2, ... per
document piece in a row, 0 for padding) and `positions` (restarting at 0 in each piece).
A document is read and tokenised only when the packer reaches it. The iterator's state is a small
JSON-serialisable dict: restoring it re-reads at most the current window's documents.
"""

from __future__ import annotations

import json
import weakref
from typing import Any

import grain
import numpy as np

from k2jax.data import sources
from k2jax.data.tokenizers import Tokenizer

_READ_BUFFER = 16  # documents read ahead.


class _ReadAndTokenize:
  """Document -> {"tokens": int32 [n + 1]}: its tokens, then the separator."""

  def __init__(self, tokenizer: Tokenizer, text_key: str):
    self._tokenizer = tokenizer
    self._text_key = text_key

  def __call__(self, doc: sources.Document) -> dict[str, np.ndarray]:
    ids = self._tokenizer.encode_array(sources.read_document(doc, self._text_key))
    return {"tokens": np.append(ids, np.int32(self._tokenizer.eos_id))}


class DataIterator:
  """Yields {"tokens": int32 [batch_size, seq_len + 1]} (plus "segment_ids" and "positions" of
  the same shape with data.segment_attention); get_state() is JSON-serialisable."""

  def __init__(self, it: grain.DatasetIterator):
    self._holder = [it]  # the finalizer's reference too: it empties it.
    # Closes and frees grain's iterators before interpreter teardown, which they trip over.
    self._close = weakref.finalize(self, _close_and_free, self._holder)

  def __iter__(self) -> DataIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    return next(self._holder[0])

  def get_state(self) -> dict[str, Any]:
    return json.loads(json.dumps(self._holder[0].get_state()))

  def set_state(self, state: dict[str, Any]):
    self._holder[0].set_state(_slices_as_tuples(state))

  def close(self):
    self._close()


def _close_and_free(holder: list[grain.DatasetIterator]):
  holder.pop().close()


def _slices_as_tuples(state: Any) -> Any:
  """Undoes JSON's tuple -> list on ConcatThenSplit's slices, which it compares to tuples."""
  if isinstance(state, dict):
    return {
      k: {f: tuple(s) for f, s in v.items()} if k == "remainder_slices" else _slices_as_tuples(v)
      for k, v in state.items()
    }
  if isinstance(state, list):
    return [_slices_as_tuples(v) for v in state]
  return state


def make_iterator(
  data_cfg: Any,
  tokenizer: Tokenizer,
  split: str,
  batch_size: int,
  seq_len: int,
  seed: int,
  num_epochs: int | None = None,
) -> DataIterator:
  """Batches of packed rows of `split`: forever, or `num_epochs` passes without a partial row.

  "train" shuffles documents every epoch and rows within windows, from `seed`; "validation" is
  read in order, identical for every seed.
  """
  sources.check_batching(batch_size, seq_len, seed, num_epochs)
  docs = sources.list_documents(data_cfg, split)
  doc_seed, row_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2) >> 1)
  train = split == "train"

  ds = grain.MapDataset.source(docs)
  if train:
    ds = ds.shuffle(seed=doc_seed)
  ds = ds.repeat(num_epochs).map(_ReadAndTokenize(tokenizer, sources.field(data_cfg, "text_key")))
  read_threads = sources.field(data_cfg, "read_threads")
  rows = ds.to_iter_dataset(
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=_READ_BUFFER * read_threads)
  )
  rows = grain.experimental.ConcatThenSplitIterDataset(rows, length_struct={"tokens": seq_len + 1})
  if num_epochs is not None:  # the last row of a finite stream is zero-padded: drop it.
    rows = rows.filter(lambda r: r["tokens_segment_ids"][-1] != 0)
  if sources.field(data_cfg, "segment_attention"):
    rows = rows.map(lambda r: {"tokens": r["tokens"], "segment_ids": r["tokens_segment_ids"],
                               "positions": r["tokens_positions"]})
  else:
    rows = rows.map(lambda r: {"tokens": r["tokens"]})
  window = sources.field(data_cfg, "shuffle_window")
  if train and window > 1:
    rows = grain.experimental.WindowShuffleIterDataset(rows, window_size=window, seed=row_seed)
  batches = rows.batch(batch_size, drop_remainder=True)
  prefetch = sources.field(data_cfg, "prefetch_batches")
  if prefetch:
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
  return DataIterator(iter(batches))


def bytes_per_token(data_cfg: Any, tokenizer: Tokenizer, split: str = "validation") -> float:
  """UTF-8 bytes per token over `split`, separators counted as tokens of 0 bytes.

  Converts a loss in nats per token to bits per byte: bpb = loss / ln(2) / bytes_per_token.
  """
  text_key = sources.field(data_cfg, "text_key")
  n_tokens = n_bytes = 0
  for doc in sources.list_documents(data_cfg, split):
    ids = tokenizer.encode_array(sources.read_document(doc, text_key))
    n_tokens += len(ids) + 1
    n_bytes += int(tokenizer.token_bytes[ids].sum())
  return n_bytes / n_tokens
