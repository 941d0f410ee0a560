"""Conversations as training data (`data.format = "chat"`): K2's chat format, the assistant loss
mask, whole conversations packed into rows.

data.source names JSONL files, one conversation per line: `{"messages": [...], "tools": [...]}`,
OpenAI-style (what k2jax.agentic.write_jsonl writes, and what chat datasets with tools hold).
MapDataset of conversations -> shuffle (train; reshuffled every epoch) -> repeat -> map(check,
render and tokenise with `chat.encode_chat`) -> drop conversations longer than a row (each drop
logged with a running count; a conversation is never cut) -> to_iter_dataset (read-ahead
threads) -> first-fit packing of whole conversations into rows of seq_len + 1 (PACKING_BINS rows
at a time, their order shuffled for train), the rest of a row padded -> batch -> prefetch.

A batch holds int32 [batch_size, seq_len + 1] arrays: `tokens`; `segment_ids` (1, 2, ... per
conversation in a row, 0 on padding) and `positions` (from 0 in each conversation), so no
conversation attends to another (whatever data.segment_attention says: that switch is for text);
`loss_mask`, 1 on what the assistant wrote (its content, tool calls and closing <|im_end|>), so
the cross-entropy is the SFT loss on the assistant's tokens only. The iterator's state is a small
JSON-serialisable dict, as for text.
"""

from __future__ import annotations

import threading
from typing import Any

import grain
import numpy as np
from absl import logging

from k2jax import chat
from k2jax.data import sources
from k2jax.data.pipeline import DataIterator
from k2jax.data.tokenizers import Tokenizer

PACKING_BINS = 32  # rows filled at once by first-fit packing: more bins, less padding.
_READ_BUFFER = 16  # conversations read ahead per thread.


class _Encode:
  """Conversation document -> {"tokens", "loss_mask"} (int32 [n]), or None when n > max_len."""

  def __init__(self, tokenizer: Tokenizer, max_len: int):
    self._tokenizer, self._max_len = tokenizer, max_len
    self._dropped, self._lock = 0, threading.Lock()

  def __call__(self, doc: sources.Document) -> dict[str, np.ndarray] | None:
    record = sources.read_record(doc)
    problem = chat.conversation_problem(record)
    if problem is not None:
      raise ValueError(f"{sources.location(doc)}: {problem}")
    ids, mask = chat.encode_chat(self._tokenizer, record["messages"], record.get("tools"))
    if len(ids) > self._max_len:
      with self._lock:
        self._dropped += 1
        dropped = self._dropped
      logging.warning("chat data: dropped %s, %d tokens > seq_len + 1 = %d (%d dropped so far)",
                      sources.location(doc), len(ids), self._max_len, dropped)
      return None
    return {"tokens": ids, "loss_mask": mask}


def make_iterator(data_cfg: Any, tokenizer: Tokenizer, split: str, batch_size: int, seq_len: int,
                  seed: int, num_epochs: int | None = None) -> DataIterator:
  """Batches of packed conversations of `split` (see the module docstring): forever, or
  `num_epochs` passes. "train" shuffles conversations every epoch and the rows of each packing
  round, from `seed`; "validation" is read in order, identical for every seed."""
  sources.check_batching(batch_size, seq_len, seed, num_epochs)
  if "<|im_end|>" not in getattr(tokenizer, "special_ids", {}):
    raise ValueError(f"data.format 'chat' needs a K2-format tokenizer (data.tokenizer 'kimi' or "
                     f"'bpe', or config.init_from's), not {tokenizer.name!r}")
  docs = sources.list_documents(data_cfg, split)
  problem = chat.conversation_problem(sources.read_record(docs[0]))
  if problem is not None:  # fail before anything compiles on a file of another shape.
    raise ValueError(f"{sources.location(docs[0])}: {problem}")
  doc_seed, bin_seed = (int(s) for s in np.random.SeedSequence(seed).generate_state(2) >> 1)
  train = split == "train"

  ds = grain.MapDataset.source(docs)
  if train:
    ds = ds.shuffle(seed=doc_seed)
  ds = ds.repeat(num_epochs).map(_Encode(tokenizer, seq_len + 1))
  read_threads = sources.field(data_cfg, "read_threads")
  convs = ds.to_iter_dataset(  # skips the None of a dropped conversation.
    grain.ReadOptions(num_threads=read_threads, prefetch_buffer_size=_READ_BUFFER * read_threads))
  rows = grain.experimental.FirstFitPackIterDataset(
    convs, length_struct={"tokens": seq_len + 1, "loss_mask": seq_len + 1},
    num_packing_bins=PACKING_BINS, seed=bin_seed, shuffle_bins=train, meta_features=("loss_mask",))
  rows = rows.map(lambda r: {"tokens": r["tokens"], "segment_ids": r["tokens_segment_ids"],
                             "positions": r["tokens_positions"], "loss_mask": r["loss_mask"]})
  batches = rows.batch(batch_size, drop_remainder=True)
  prefetch = sources.field(data_cfg, "prefetch_batches")
  if prefetch:
    batches = grain.experimental.ThreadPrefetchIterDataset(batches, prefetch_buffer_size=prefetch)
  return DataIterator(iter(batches))
