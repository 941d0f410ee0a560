"""In-context copying by content: rows of random spans each written twice, and a probe for it.

Each span's second copy is predictable, after its first token, only by finding the earlier token
that matches the current one and copying the token after it (an induction head). Span lengths
vary, so no fixed offset finds the copy. `data.format = "copy"` trains on these rows (the agentic
SFT demo's base model, experiments/configs/k2_nano_sft.py), as does experiments/induction.py;
`copy_accuracy` scores any model's copying (REPORT.md, "Why values were not copied").
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import numpy as np

from k2jax.data import sources

SPANS = (6, 32)  # span lengths of the training rows, both ends included
PROBE_SPAN = 40  # longer than any training span: a copy at a learned fixed offset fails it


def repeat_rows(rng: np.random.Generator, rows: int, length: int, ids: tuple[int, int],
                spans: tuple[int, int] = SPANS) -> dict[str, np.ndarray]:
  """{"tokens", "loss_mask"} [rows, length] int32: spans of ids uniform in [ids[0], ids[1]),
  lengths uniform in `spans`, each followed by its copy; loss_mask 1 on the copy's tokens after
  its first (the tokens predictable from the ones before)."""
  lo, hi = ids
  if not 0 <= lo < hi:
    raise ValueError(f"ids must be a range [lo, hi) with 0 <= lo < hi, got {ids}")
  if not 1 <= spans[0] <= spans[1]:
    raise ValueError(f"spans must be (min, max) with 1 <= min <= max, got {spans}")
  tokens, mask = np.zeros((rows, length), np.int32), np.zeros((rows, length), np.int32)
  for r in range(rows):
    t = 0
    while t < length:
      span = rng.integers(lo, hi, size=int(rng.integers(spans[0], spans[1] + 1)))
      pair = np.concatenate([span, span])[:length - t]
      tokens[r, t:t + len(pair)] = pair
      mask[r, t + len(span) + 1:t + len(pair)] = 1
      t += len(pair)
  return {"tokens": tokens, "loss_mask": mask}


def copy_accuracy(logits_fn: Callable[[np.ndarray], np.ndarray], ids: tuple[int, int],
                  rows: int = 16, span: int = PROBE_SPAN, seed: int = 7) -> float:
  """Argmax next-token accuracy on the second copy of `rows` spans of `span` ids uniform in
  [ids[0], ids[1]), each written twice (the copy's first token, unpredictable, excluded).
  `logits_fn`: tokens [B, T] -> logits [B, T, V]. About 1 for a model that copies, 0 for one
  that does not."""
  rng = np.random.default_rng(seed)
  first = rng.integers(ids[0], ids[1], size=(rows, span), dtype=np.int32)
  tokens = np.concatenate([first, first], axis=1)
  predicted = np.asarray(logits_fn(tokens)).argmax(-1)
  return float((predicted[:, span:-1] == tokens[:, span + 1:]).mean())


class CopyIterator:
  """Endless batches of `repeat_rows`; batch n is drawn from (seed, split, n) alone, so the
  iterator's state is n and a resumed run reads the same batches."""

  def __init__(self, split: str, batch_size: int, length: int, ids: tuple[int, int], seed: int):
    self._key = (seed, sources.SPLITS.index(split))
    self._shape, self._ids, self._n = (batch_size, length), ids, 0

  def __iter__(self) -> CopyIterator:
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    rng = np.random.default_rng([*self._key, self._n])
    self._n += 1
    return repeat_rows(rng, *self._shape, self._ids)

  def get_state(self) -> dict[str, Any]:
    return {"batches": self._n}

  def set_state(self, state: dict[str, Any]):
    self._n = int(state["batches"])

  def close(self):
    pass


def make_iterator(data_cfg: Any, tokenizer, split: str, batch_size: int, seq_len: int,
                  seed: int) -> CopyIterator:
  """`data.format = "copy"`: batches of {"tokens", "loss_mask"} [batch_size, seq_len + 1] over
  ids [0, data.copy_ids), or the tokenizer's whole vocabulary when data.copy_ids is 0. The
  "validation" split is another stream of the same rows."""
  if split not in sources.SPLITS:
    raise ValueError(f"split must be one of {sources.SPLITS}, got {split!r}")
  sources.check_batching(batch_size, seq_len, seed)
  ids = sources.field(data_cfg, "copy_ids") or tokenizer.vocab_size
  if ids > tokenizer.vocab_size:
    raise ValueError(f"data.copy_ids {ids} exceeds the tokenizer's {tokenizer.vocab_size} ids")
  return CopyIterator(split, batch_size, seq_len + 1, (0, ids), seed)
