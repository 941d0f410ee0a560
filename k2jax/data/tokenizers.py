"""Tokenizers: a small protocol, a registry of builders, and Kimi K2's tiktoken BPE.

Every tokenizer has `name`, `vocab_size`, `eos_id` (the separator the pipeline appends after each
document), `token_bytes` (UTF-8 bytes of each id, 0 for special tokens), `encode(text)`,
`encode_array(text)` (int32) and `decode(ids)` (invalid UTF-8 replaced). `BUILDERS` maps
`data.tokenizer` to a builder(data_cfg, workdir); adding a tokenizer adds an entry here:

  byte  UTF-8 bytes are ids 0..255, id 256 separates documents.
  kimi  Kimi K2's tokenizer, read from the checkpoint directory `data.tokenizer_path`.
  bpe   a K2-format byte-level BPE of `data.bpe_vocab_size` ids trained on the training split,
        saved to (and reused from) <workdir>/tokenizer/.

K2's tokenizer (K2 report, arXiv 2507.20534) is a tiktoken BPE. A directory holds `tiktoken.model`,
one "base64(token bytes) rank" line for each rank 0..n-1, and `tokenizer_config.json`, whose
`added_tokens_decoder` names special ids. The 256 ids after the ranks are special: [BOS] = n,
[EOS] = n + 1, <|im_end|> = n + 2, ... (KIMI_SPECIALS), an unnamed one is `<|reserved_token_{id}|>`.
Text is cut by K2's pre-tokenizer pattern (PATTERN) before BPE, and long inputs are split first as
K2's own tokenizer splits them (`split_long_text`), which keeps tiktoken from stalling. A K2-format
BPE trained here has the same files and special layout, so a tiny model and the real K2 share
one code path.
"""

from __future__ import annotations

import base64
import functools
import json
import os
import pathlib
import re
from collections.abc import Iterable, Sequence
from typing import Any, Protocol

import numpy as np
import tiktoken
import tokenizers
from tokenizers import models, pre_tokenizers, trainers

from k2jax.data import sources

EOS_TEXT = "<|endoftext|>"  # how ByteTokenizer decodes its separator.
MODEL_FILE = "tiktoken.model"
CONFIG_FILE = "tokenizer_config.json"
TEMPLATE_FILE = "chat_template.jinja"
BYTE_FILE = "byte_tokenizer.json"  # marks a checkpoint directory of a byte-level model.
BPE_DIR = "tokenizer"  # a trained BPE's directory inside the workdir.
NUM_SPECIAL = 256  # special ids after the BPE ranks.
# K2's named special tokens, as offsets from the number of ranks.
KIMI_SPECIALS = {
  0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
  6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
  11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>", 13: "<|tool_call_begin|>",
  14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>", 17: "<|im_middle|>", 254: "[UNK]",
  255: "[PAD]",
}
# K2's pre-tokenizer: Han runs; words (no Han) with an optional leading non-letter and English
# contraction; 1-3 digits; punctuation runs; newlines; whitespace. `&&` is class intersection,
# which tiktoken's regex engine (and Oniguruma, used for training) support and Python's `re` not.
PATTERN = "|".join([
  r"[\p{Han}]+",
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*"
  r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
  r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+"
  r"[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?",
  r"\p{N}{1,3}",
  r" ?[^\s\p{L}\p{N}]+[\r\n]*",
  r"\s*[\r\n]+",
  r"\s+(?!\S)",
  r"\s+",
])
MAX_CHARS = 400_000  # K2 encodes at most this many characters per tiktoken call...
MAX_RUN = 25_000  # ...and at most this many consecutive (non-)whitespace characters.


class Tokenizer(Protocol):
  """What the data pipeline, training and generation use of a tokenizer."""

  name: str
  vocab_size: int
  eos_id: int
  token_bytes: np.ndarray  # int32 [vocab_size]

  def encode(self, text: str) -> list[int]: ...

  def encode_array(self, text: str) -> np.ndarray: ...

  def decode(self, ids: Sequence[int] | np.ndarray) -> str: ...


class ByteTokenizer:
  """UTF-8 bytes as ids 0..255; id 256 separates documents."""

  name = "byte"
  vocab_size = 257
  bos_id = None
  eos_id = 256

  def __init__(self):
    self.token_bytes = np.array([1] * 256 + [0], dtype=np.int32)

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

  def save(self, path: str | os.PathLike):
    """Marks a checkpoint directory as byte-level (`from_dir` reads it back)."""
    pathlib.Path(path).mkdir(parents=True, exist_ok=True)
    _write(pathlib.Path(path) / BYTE_FILE, json.dumps({"tokenizer": self.name}))


class KimiTokenizer:
  """Kimi K2's tokenizer (or a K2-format one): tiktoken BPE ranks, then 256 special ids.

  `special_ids` maps every special token's name to its id; `bos_id` / `eos_id` are [BOS] / [EOS].
  `chat_template` is the directory's jinja chat template (None without one).
  """

  name = "kimi"

  def __init__(self, ranks: dict[bytes, int], named: dict[int, str],
               chat_template: str | None = None, where: str = "<memory>"):
    n = len(ranks)
    if sorted(ranks.values()) != list(range(n)) or not all(bytes([b]) in ranks for b in range(256)):
      raise ValueError(f"{where}: ranks must be 0..{n - 1} once each and include all 256 bytes")
    bad = [i for i in named if not n <= i < n + NUM_SPECIAL]
    if bad:
      raise ValueError(f"{where}: special id {bad[0]} is outside [{n}, {n + NUM_SPECIAL}), the "
                       f"{NUM_SPECIAL} ids after the {n} ranks")
    self.special_ids = {named.get(i, f"<|reserved_token_{i}|>"): i
                        for i in range(n, n + NUM_SPECIAL)}
    if len(self.special_ids) != NUM_SPECIAL:
      raise ValueError(f"{where}: special token names are not unique")
    for token in ("[BOS]", "[EOS]"):
      if token not in self.special_ids:
        raise ValueError(f"{where}: no special token {token}")
    self._enc = tiktoken.Encoding(where, pat_str=PATTERN, mergeable_ranks=ranks,
                                  special_tokens=self.special_ids)
    self._ranks = ranks
    self.vocab_size = n + NUM_SPECIAL
    self.bos_id, self.eos_id = self.special_ids["[BOS]"], self.special_ids["[EOS]"]
    self.chat_template = chat_template
    self.token_bytes = np.zeros(self.vocab_size, np.int32)
    for token, rank in ranks.items():
      self.token_bytes[rank] = len(token)

  @classmethod
  def from_dir(cls, path: str | os.PathLike) -> KimiTokenizer:
    """Reads tiktoken.model, tokenizer_config.json and the chat template of a directory."""
    path = pathlib.Path(path)
    for file in (MODEL_FILE, CONFIG_FILE):
      if not (path / file).is_file():
        raise ValueError(f"{path}: no {file} (a K2-format tokenizer directory holds {MODEL_FILE} "
                         f"and {CONFIG_FILE})")
    try:
      config = json.loads((path / CONFIG_FILE).read_text())
      named = {int(i): t["content"] for i, t in config.get("added_tokens_decoder", {}).items()}
    except json.JSONDecodeError as e:
      raise ValueError(f"{path / CONFIG_FILE}: invalid JSON ({e})") from None
    except (ValueError, TypeError, KeyError, AttributeError):
      raise ValueError(f"{path / CONFIG_FILE}: added_tokens_decoder is not "
                       '{"<id>": {"content": <token>}, ...}') from None
    template = config.get("chat_template")
    if (path / TEMPLATE_FILE).exists():
      template = (path / TEMPLATE_FILE).read_text()
    elif isinstance(template, list):  # named templates: [{"name": ..., "template": ...}].
      template = {t.get("name"): t.get("template") for t in template}.get("default")
    return cls(_read_ranks(path / MODEL_FILE), named, template, str(path))

  def save(self, path: str | os.PathLike):
    """Writes tiktoken.model, tokenizer_config.json and (when set) chat_template.jinja."""
    path = pathlib.Path(path)
    path.mkdir(parents=True, exist_ok=True)
    n = self.vocab_size - NUM_SPECIAL
    lines = sorted((r, base64.b64encode(t).decode()) for t, r in self._ranks.items())
    _write(path / MODEL_FILE, "".join(f"{b64} {r}\n" for r, b64 in lines))
    named = {i: t for t, i in self.special_ids.items() if t != f"<|reserved_token_{i}|>"}
    config = {
      "added_tokens_decoder": {
        str(i): dict(content=t, lstrip=False, normalized=False, rstrip=False, single_word=False,
                     special=True) for i, t in sorted(named.items())},
      "bos_token": "[BOS]", "eos_token": "[EOS]",
      "unk_token": named.get(n + 254), "pad_token": named.get(n + 255),
      "tokenizer_class": "TikTokenTokenizer",
    }
    _write(path / CONFIG_FILE, json.dumps(config, indent=2, ensure_ascii=False))
    if self.chat_template is not None:
      _write(path / TEMPLATE_FILE, self.chat_template)

  def encode(self, text: str, allow_special: bool = False) -> list[int]:
    """Ids of `text`; special-token text becomes its special id only when `allow_special`."""
    if allow_special:
      return [t for p in split_long_text(text) for t in self._enc.encode(p, allowed_special="all")]
    return [t for p in split_long_text(text) for t in self._enc.encode_ordinary(p)]

  def encode_array(self, text: str) -> np.ndarray:
    """int32 ids of `text` (no separator; special-token text is plain text)."""
    return np.asarray(self.encode(text), dtype=np.int32)

  def decode_bytes(self, ids: Sequence[int] | np.ndarray) -> bytes:
    """The bytes of `ids`; a special id gives its name."""
    return self._enc.decode_bytes(_check_ids(ids, self.vocab_size).tolist())

  def decode(self, ids: Sequence[int] | np.ndarray) -> str:
    return self.decode_bytes(ids).decode("utf-8", errors="replace")


def split_long_text(text: str, max_chars: int = MAX_CHARS, max_run: int = MAX_RUN) -> list[str]:
  """K2's cut of a text before tiktoken: pieces of at most `max_chars` characters, each cut again
  after every `max_run` characters of a longer run of whitespace (or of non-whitespace)."""
  pieces = []
  for chunk in (text[i:i + max_chars] for i in range(0, len(text), max_chars)):
    start = 0
    for run in _long_runs(max_run).finditer(chunk):
      for cut in range(run.start() + max_run, run.end(), max_run):
        pieces.append(chunk[start:cut])
        start = cut
    pieces.append(chunk[start:])
  return pieces


@functools.cache
def _long_runs(max_run: int) -> re.Pattern:
  """Maximal runs of more than `max_run` whitespace or non-whitespace characters (the
  lookbehinds start a match only at a run's first character: linear time)."""
  n = max_run + 1
  return re.compile(rf"(?<!\S)\S{{{n},}}|(?<!\s)\s{{{n},}}")


def train_bpe(texts: Iterable[str], vocab_size: int,
              chat_template: str | None = None) -> KimiTokenizer:
  """A K2-format byte-level BPE of `vocab_size` ids: 256 byte ranks, merges, K2's 256 specials.

  Hugging Face `tokenizers` learns the merges (deterministically) on `texts` cut by K2's
  pattern; the merged tokens become tiktoken ranks in the order they were learned.
  """
  n_ranks = vocab_size - NUM_SPECIAL
  tok = tokenizers.Tokenizer(models.BPE())
  tok.pre_tokenizer = pre_tokenizers.Sequence([
    pre_tokenizers.Split(tokenizers.Regex(PATTERN), behavior="isolated"),
    pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
  ])
  trainer = trainers.BpeTrainer(vocab_size=n_ranks, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
  tok.train_from_iterator(texts, trainer)
  vocab = tok.get_vocab()
  if len(vocab) != n_ranks:
    raise ValueError(f"BPE training stopped at {len(vocab) + NUM_SPECIAL} ids (with the "
                     f"{NUM_SPECIAL} special ones) of {vocab_size}")
  byte_of = {c: b for b, c in enumerate(_byte_chars())}
  merged = sorted((i, t) for t, i in vocab.items() if len(t) > 1)
  ranks = {bytes([b]): b for b in range(256)}
  ranks.update({bytes(byte_of[c] for c in t): 256 + k for k, (_, t) in enumerate(merged)})
  named = {n_ranks + offset: t for offset, t in KIMI_SPECIALS.items()}
  return KimiTokenizer(ranks, named, chat_template)


def k2_chat_template() -> str:
  """The jinja chat template of K2's format shipped with k2jax (K2-Instruct-0905's layout)."""
  return (pathlib.Path(__file__).parent / "kimi_chat_template.jinja").read_text()


def from_dir(path: str | os.PathLike) -> Tokenizer | None:
  """The tokenizer a checkpoint directory holds (K2-format files, or the byte-level marker a
  saved byte-level model carries); None when it holds none."""
  path = pathlib.Path(path)
  if (path / MODEL_FILE).exists():
    return KimiTokenizer.from_dir(path)
  return ByteTokenizer() if (path / BYTE_FILE).exists() else None


def build_tokenizer(data_cfg: Any, workdir: str | None) -> Tokenizer:
  """The tokenizer named by data.tokenizer (see BUILDERS)."""
  name = sources.field(data_cfg, "tokenizer")
  if name not in BUILDERS:
    raise ValueError(f"data.tokenizer must be one of {tuple(BUILDERS)}, got {name!r}")
  return BUILDERS[name](data_cfg, workdir)


def _kimi(data_cfg: Any, workdir: str | None) -> KimiTokenizer:
  path = sources.field(data_cfg, "tokenizer_path")
  if not path:
    raise ValueError("data.tokenizer 'kimi' needs data.tokenizer_path: a directory holding "
                     f"{MODEL_FILE} and {CONFIG_FILE}")
  return KimiTokenizer.from_dir(path)


def _bpe(data_cfg: Any, workdir: str | None) -> KimiTokenizer:
  """The workdir's trained BPE, or a new one trained on data.bpe_train_bytes of the training
  split and saved there."""
  vocab_size = sources.field(data_cfg, "bpe_vocab_size")
  if not workdir:
    raise ValueError("data.tokenizer 'bpe' needs a workdir to keep its trained tokenizer in")
  path = os.path.join(workdir, BPE_DIR)
  if os.path.exists(os.path.join(path, CONFIG_FILE)):
    tok = KimiTokenizer.from_dir(path)
    if tok.vocab_size != vocab_size:
      raise ValueError(f"{path} has {tok.vocab_size} ids but data.bpe_vocab_size is {vocab_size}; "
                       "delete it to retrain")
    return tok
  if sources.field(data_cfg, "format") != "text":
    raise ValueError(f"data.tokenizer 'bpe' trains on text documents; with data.format "
                     f"{sources.field(data_cfg, 'format')!r} use a K2-format tokenizer directory "
                     "(data.tokenizer 'kimi') or config.init_from")
  try:
    tok = train_bpe(training_sample(data_cfg), vocab_size, k2_chat_template())
  except ValueError as e:
    raise ValueError(f"data.bpe_vocab_size {vocab_size}: {e} on data.source "
                     f"{sources.field(data_cfg, 'source')!r}; lower it or add data") from None
  tok.save(path)
  return tok


BUILDERS = {
  "byte": lambda data_cfg, workdir: ByteTokenizer(),
  "kimi": _kimi,
  "bpe": _bpe,
}


def training_sample(data_cfg: Any):
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


def _byte_chars() -> list[str]:
  """The printable character that byte-level BPE (GPT-2's) writes for each byte 0..255."""
  keep = [*range(33, 127), *range(161, 173), *range(174, 256)]
  moved = [b for b in range(256) if b not in keep]
  chars = {b: chr(b) for b in keep} | {b: chr(256 + k) for k, b in enumerate(moved)}
  return [chars[b] for b in range(256)]


def _read_ranks(file: pathlib.Path) -> dict[bytes, int]:
  ranks = {}
  with open(file, "rb") as f:
    for lineno, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        token, rank = line.split()
        ranks[base64.b64decode(token, validate=True)] = int(rank)
      except ValueError:
        raise ValueError(f"{file} line {lineno}: not 'base64(token) rank'") from None
  return ranks


def _write(file: pathlib.Path, text: str):
  """Writes atomically: concurrent writers of the same content never expose a partial file."""
  tmp = file.with_name(f"{file.name}.tmp.{os.getpid()}")
  tmp.write_text(text)
  os.replace(tmp, file)


def _check_ids(ids: Sequence[int] | np.ndarray, vocab_size: int) -> np.ndarray:
  ids = np.asarray(ids, dtype=np.int64).reshape(-1)
  if ids.size and (ids.min() < 0 or ids.max() >= vocab_size):
    bad = ids[(ids < 0) | (ids >= vocab_size)][0]
    raise ValueError(f"token id {bad} outside the vocabulary [0, {vocab_size})")
  return ids
