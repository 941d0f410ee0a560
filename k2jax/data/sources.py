"""Where documents come from: the data config, listing documents, the train/validation split.

A document is one text file, or one record of a JSONL file (its `text_key` field). Listing only
walks directories and stats files (JSONL files are scanned for line offsets); the text is read
lazily, one document at a time, by `read_document`. Bytes that are not valid UTF-8 decode with
errors="replace".

Data config fields (`default_data_config()`):
  source: "python_stdlib" (the .py files of the running interpreter's standard library), a file,
    a directory (all files below it), or a glob (`**` recursive). Files ending in .jsonl are read
    as JSON lines, every other file as one text document.
  text_key: the field of a JSONL record holding its text.
  val_fraction: share of documents in the validation split (at least one document each side).
    A document's split is decided by a hash of its path relative to the source's root (plus its
    line number for JSONL), so it is the same on every machine and does not move when files
    are added.
  tokenizer: a name in k2jax.data.tokenizers.BUILDERS: "byte" (ids 0..255 bytes, 256 the
    separator), "kimi" (Kimi K2's tokenizer from tokenizer_path) or "bpe" (a K2-format byte-level
    BPE trained on the training split, kept in <workdir>/tokenizer/).
  tokenizer_path: the directory (tiktoken.model, tokenizer_config.json) of the "kimi" tokenizer,
    e.g. a Kimi K2 checkpoint.
  bpe_vocab_size: vocabulary of the "bpe" tokenizer: byte ranks + merges + K2's 256 special ids.
  bpe_train_bytes: bytes of the training split (a fixed pseudo-random sample of its documents)
    the "bpe" tokenizer is trained on.
  shuffle_window: training rows are shuffled within windows of this many packed rows (documents
    are shuffled too, every epoch); 0 or 1 turns the row shuffle off.
  read_threads: threads reading and tokenising documents ahead of the packer (0: inline).
  prefetch_batches: batches assembled ahead in a background thread (0: none).
  segment_attention: batches carry `segment_ids` and `positions`, so packed documents never
    attend to each other and each starts at position 0. Off for pretraining (the common choice:
    documents are separated by an end-of-text token and a row is one context, which is also what
    the reported runs used); on for chat and SFT data, whose conversations are independent.
  format: "text" (documents of text, this package's pipeline), "chat" (JSONL files of
    conversations with tools, one per line: k2jax.train.chat_data renders, masks and packs them)
    or "copy" (no source read: synthetic rows of random spans each written twice, the loss on
    the copies; k2jax.data.copying).
  copy_ids: with format "copy", the rows' ids are [0, copy_ids); 0: the tokenizer's vocabulary.
"""

from __future__ import annotations

import functools
import glob
import hashlib
import json
import os
import sysconfig
from typing import Any, NamedTuple

import ml_collections
import numpy as np

STDLIB = "python_stdlib"
SPLITS = ("train", "validation")
FORMATS = ("text", "chat", "copy")

_DEFAULTS = dict(
  source=STDLIB,
  text_key="text",
  val_fraction=0.02,
  tokenizer="byte",
  tokenizer_path="",
  bpe_vocab_size=4096,
  bpe_train_bytes=4_000_000,
  shuffle_window=1024,
  read_threads=2,
  prefetch_batches=2,
  segment_attention=False,
  format="text",
  copy_ids=0,
)


def default_data_config() -> ml_collections.ConfigDict:
  """The data config with every field at its default (see the module docstring)."""
  return ml_collections.ConfigDict(dict(_DEFAULTS))


def field(data_cfg: Any, name: str) -> Any:
  """`data_cfg.<name>`, its default when absent, checked; a bad value raises a ValueError."""
  value = getattr(data_cfg, name, _DEFAULTS[name])
  if name in ("source", "text_key", "tokenizer"):
    ok, want = isinstance(value, str) and bool(value), "a non-empty string"
  elif name == "tokenizer_path":
    ok, want = isinstance(value, str), "a string"
  elif name == "val_fraction":
    ok, want = isinstance(value, (int, float)) and 0 < value < 1, "in (0, 1)"
  elif name == "bpe_vocab_size":
    ok, want = is_int(value) and value >= 513, "an integer >= 513 (256 bytes + 256 specials + 1)"
  elif name == "bpe_train_bytes":
    ok, want = is_int(value) and value > 0, "a positive integer"
  elif name == "segment_attention":
    ok, want = isinstance(value, bool), "True or False"
  elif name == "format":
    ok, want = value in FORMATS, f"one of {FORMATS}"
  else:
    ok, want = is_int(value) and value >= 0, "a non-negative integer"
  if not ok:
    raise ValueError(f"data.{name} must be {want}, got {value!r}")
  return value


def is_int(value: Any) -> bool:
  return isinstance(value, (int, np.integer)) and not isinstance(value, bool)


def check_batching(batch_size: Any, seq_len: Any, seed: Any, num_epochs: Any = None):
  """A ValueError naming the first bad argument of a batch iterator (every data.format's)."""
  for name, value in (("batch_size", batch_size), ("seq_len", seq_len)):
    if not is_int(value) or value <= 0:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if not is_int(seed) or seed < 0:
    raise ValueError(f"seed must be a non-negative integer, got {seed!r}")
  if num_epochs is not None and (not is_int(num_epochs) or num_epochs <= 0):
    raise ValueError(f"num_epochs must be None or a positive integer, got {num_epochs!r}")


class Document(NamedTuple):
  """A whole file (start is None) or the bytes [start, stop) of line `line` of a JSONL file."""

  path: str
  key: str  # machine-independent name: path relative to the source root (+ ":line").
  start: int | None = None
  stop: int | None = None
  line: int | None = None


def list_documents(data_cfg: Any, split: str) -> tuple[Document, ...]:
  """The documents of `split` ("train" | "validation"), sorted by key. With data.format "chat"
  a document is one JSONL record (a conversation), and every file must be JSONL."""
  if split not in SPLITS:
    raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
  text_key = field(data_cfg, "text_key") if field(data_cfg, "format") == "text" else None
  splits = _split_documents(
    field(data_cfg, "source"), text_key, float(field(data_cfg, "val_fraction"))
  )
  return splits[SPLITS.index(split)]


def read_document(doc: Document, text_key: str) -> str:
  """The text of `doc`; invalid UTF-8 is replaced, a bad JSONL record raises a ValueError."""
  if doc.start is None:
    with open(doc.path, "rb") as f:
      return f.read().decode("utf-8", errors="replace")
  return _record_text(read_record(doc), text_key, location(doc))


def read_record(doc: Document) -> Any:
  """The JSON value of a JSONL document; a line that is not JSON raises a ValueError."""
  with open(doc.path, "rb") as f:
    f.seek(doc.start)
    raw = f.read(doc.stop - doc.start)
  return _parse_record(raw, location(doc))


def location(doc: Document) -> str:
  """'path line n' (a JSONL record) or 'path': how errors name a document."""
  return doc.path if doc.line is None else f"{doc.path} line {doc.line}"


def _parse_record(raw: bytes, where: str) -> Any:
  try:
    return json.loads(raw.decode("utf-8", errors="replace"))
  except json.JSONDecodeError as e:
    raise ValueError(f"{where}: not valid JSON ({e.msg})") from None


def _record_text(record: Any, text_key: str, where: str) -> str:
  if not isinstance(record, dict) or not isinstance(record.get(text_key), str):
    raise ValueError(f"{where}: no string field {text_key!r} (data.text_key)")
  text = record[text_key]
  try:
    text.encode("utf-8")
  except UnicodeEncodeError:  # lone surrogates from \ud800-style escapes.
    text = text.encode("utf-8", errors="replace").decode("utf-8")
  return text


@functools.lru_cache(maxsize=8)
def _split_documents(
  source: str, text_key: str | None, val_fraction: float
) -> tuple[tuple[Document, ...], tuple[Document, ...]]:
  docs = _documents(source, text_key)
  if len(docs) < 2:
    raise ValueError(
      f"data.source {source!r} holds {len(docs)} document(s); need at least 2 to split "
      "train/validation by document"
    )
  u = np.array([_unit_hash(d.key) for d in docs])
  is_val = u < val_fraction
  if not is_val.any():
    is_val[np.argmin(u)] = True
  if is_val.all():
    is_val[np.argmax(u)] = False
  train = tuple(d for d, v in zip(docs, is_val) if not v)
  val = tuple(d for d, v in zip(docs, is_val) if v)
  return train, val


def _unit_hash(key: str) -> float:
  return int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "big") / 2**64


def _documents(source: str, text_key: str | None) -> list[Document]:
  """The documents of a source; text_key None: conversations (JSONL only, records not read)."""
  root, paths = _stdlib_files() if source == STDLIB else _source_files(source)
  docs = []
  for path in paths:
    key = os.path.relpath(path, root)
    if path.endswith(".jsonl"):
      docs.extend(_jsonl_documents(path, key, text_key))
    elif text_key is None:
      raise ValueError(f"data.source {source!r}: {path} is not a .jsonl file (data.format 'chat' "
                       "reads JSONL files of conversations)")
    else:
      docs.append(Document(path, key))
  if not docs:
    raise ValueError(f"data.source {source!r}: its {len(paths)} files hold no document")
  return sorted(docs, key=lambda d: d.key)


def _stdlib_files() -> tuple[str, list[str]]:
  root = sysconfig.get_paths()["stdlib"]
  skip = {"site-packages", "dist-packages", "__pycache__"}
  paths = []
  for dirpath, dirnames, filenames in os.walk(root):
    dirnames[:] = [d for d in dirnames if d not in skip]
    paths += [os.path.join(dirpath, f) for f in filenames if f.endswith(".py")]
  paths = [p for p in paths if os.path.getsize(p) > 0]
  if not paths:
    raise ValueError(f"data.source {STDLIB!r}: no non-empty .py file under {root}")
  return root, paths


def _source_files(source: str) -> tuple[str, list[str]]:
  """(root, non-empty regular files) of a file, a directory or a glob."""
  pattern = os.path.expanduser(source)
  if os.path.isdir(pattern):
    pattern = os.path.join(pattern, "**", "*")
  matches = sorted(glob.glob(pattern, recursive=True))
  files = [p for p in matches if os.path.isfile(p)]
  if not files:
    raise ValueError(f"data.source {source!r} matches no file")
  nonempty = [p for p in files if os.path.getsize(p) > 0]
  if not nonempty:
    raise ValueError(f"data.source {source!r}: all {len(files)} matching files are empty")
  dirs = [os.path.dirname(os.path.abspath(p)) for p in nonempty]
  return os.path.commonpath(dirs), [os.path.abspath(p) for p in nonempty]


def _jsonl_documents(path: str, key: str, text_key: str | None) -> list[Document]:
  """One document per non-blank line; the first record is parsed to fail early on bad files
  (its text read too, unless text_key is None)."""
  data = np.fromfile(path, dtype=np.uint8)
  ends = np.flatnonzero(data == ord("\n")) + 1
  if not len(ends) or ends[-1] != len(data):
    ends = np.append(ends, len(data))
  starts = np.concatenate([[0], ends[:-1]])
  docs = []
  for line, (start, stop) in enumerate(zip(starts.tolist(), ends.tolist()), 1):
    if data[start:stop].tobytes().strip():
      docs.append(Document(path, f"{key}:{line}", start, stop, line))
  if docs:
    first = docs[0]
    record = _parse_record(data[first.start : first.stop].tobytes(), location(first))
    if text_key is not None:
      _record_text(record, text_key, location(first))
  return docs
