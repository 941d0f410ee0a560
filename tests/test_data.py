"""k2jax.data: sources and split, packing, determinism, resume, errors (tokenizers:
test_tokenizers.py)."""

import json
import os
import shutil

import numpy as np
import pytest

from k2jax import data
from k2jax.data import sources

SEQ = 31  # rows of 32 tokens.


def _write_corpus(root, n=40, seed=0):
  """n text files of 1..3000 characters (some span many rows), ASCII and wider code points."""
  rng = np.random.default_rng(seed)
  alphabet = list("abcdefghij klmnop\n\tdef():=+") + ["é", "ß", "→", "😀", "中"]
  texts = {}
  for i in range(n):
    length = int(rng.choice([1, 5, 40, 300, 3000]))
    text = "".join(rng.choice(alphabet, size=length))
    path = os.path.join(root, f"d{i // 10}", f"f{i:02d}.txt")
    os.makedirs(os.path.dirname(path), exist_ok=True)
    with open(path, "w", encoding="utf-8") as f:
      f.write(text)
    texts[os.path.relpath(path, root)] = text
  return texts


def _cfg(source, **kw):
  cfg = data.default_data_config()
  cfg.source = str(source)
  cfg.val_fraction = 0.25
  cfg.shuffle_window = 64  # grain index_shuffle costs ~50 ms per window, whatever its size.
  cfg.update(kw)
  return cfg


@pytest.fixture(scope="module")
def corpus(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  return root, _write_corpus(str(root))


def _take(it, n):
  return [next(it)["tokens"] for _ in range(n)]


def _stream(tok, texts):
  """Documents tokenised and joined, each followed by the separator."""
  return np.concatenate([np.append(tok.encode_array(t), tok.eos_id) for t in texts])


# Sources and split.


def test_split_is_disjoint_deterministic_and_location_independent(corpus, tmp_path):
  root, texts = corpus
  train = sources.list_documents(_cfg(root), "train")
  val = sources.list_documents(_cfg(root), "validation")
  keys_t, keys_v = [d.key for d in train], [d.key for d in val]
  assert sorted(keys_t + keys_v) == sorted(texts) and not set(keys_t) & set(keys_v)
  assert keys_v == sorted(keys_v) and 0 < len(val) < len(texts) // 2
  moved = tmp_path / "elsewhere"
  shutil.copytree(root, moved)
  assert [d.key for d in sources.list_documents(_cfg(moved), "validation")] == keys_v
  for doc in val:
    assert sources.read_document(doc, "text") == texts[doc.key]


def test_stdlib_source_lists_without_reading():
  cfg = data.default_data_config()
  train = sources.list_documents(cfg, "train")
  val = sources.list_documents(cfg, "validation")
  assert all(d.path.endswith(".py") and "site-packages" not in d.path for d in train + val)
  assert len(train) > 100 and 1 <= len(val) <= 0.05 * (len(train) + len(val))


def test_jsonl_records_blank_lines_and_bad_bytes(tmp_path):
  lines = [json.dumps({"text": f"record {i} é", "id": i}) for i in range(5)]
  lines.insert(2, "   ")
  lines.append('{"text": "lone \\ud800 surrogate"}')
  (tmp_path / "a.jsonl").write_bytes(("\n".join(lines) + "\n").encode())
  (tmp_path / "b.jsonl").write_bytes(b'{"text": "bad \xff byte"}')  # no final newline.
  docs = sources.list_documents(_cfg(tmp_path), "train") + sources.list_documents(
    _cfg(tmp_path), "validation"
  )
  got = sorted(sources.read_document(d, "text") for d in docs)
  want = sorted([f"record {i} é" for i in range(5)] + ["lone ? surrogate", "bad \ufffd byte"])
  assert got == want
  assert sorted(d.line for d in docs if d.path.endswith("a.jsonl")) == [1, 2, 4, 5, 6, 7]


def test_undecodable_file_is_replaced_not_fatal(tmp_path):
  (tmp_path / "a.txt").write_bytes(b"ok \xff\xfe then \xc3")
  (tmp_path / "b.txt").write_bytes(b"fine")
  cfg = _cfg(tmp_path, val_fraction=0.5)
  docs = sources.list_documents(cfg, "train") + sources.list_documents(cfg, "validation")
  assert sorted(sources.read_document(d, "text") for d in docs) == [
    "fine",
    "ok \ufffd\ufffd then \ufffd",
  ]
  batch = next(data.make_iterator(cfg, data.ByteTokenizer(), "train", 1, 4, 0))["tokens"]
  assert batch.shape == (1, 5) and batch.max() <= 256


# Errors: one line, naming the culprit.


def _touch(root, names, content):
  for name in names:
    (root / name).write_bytes(content)
  return str(root)


@pytest.mark.parametrize(
  "make, culprit",
  [
    (lambda p: str(p / "missing_dir"), "matches no file"),
    (lambda p: str(p / "*.nothing"), "matches no file"),
    (lambda p: _touch(p, ["e1.txt", "e2.txt"], b""), "all 2 matching files are empty"),
    (lambda p: _touch(p, ["only.txt"], b"x"), "holds 1 document(s)"),
    (lambda p: _touch(p, ["r.jsonl"], b'{"body": "x"}\n'), "r.jsonl line 1: no string field"),
    (lambda p: _touch(p, ["s.jsonl"], b"{oops\n"), "s.jsonl line 1: not valid JSON"),
  ],
)
def test_bad_sources_raise_one_line_errors(tmp_path, make, culprit):
  source = make(tmp_path)
  with pytest.raises(ValueError) as e:
    sources.list_documents(_cfg(source), "train")
  msg = str(e.value)
  assert "\n" not in msg and culprit in msg and source in msg


@pytest.mark.parametrize("threads", [0, 2])
def test_bad_record_inside_jsonl_names_file_and_line(tmp_path, threads):
  (tmp_path / "a.jsonl").write_text('{"text": "a"}\n' + '{"text": 3}\n' * 5)
  cfg = _cfg(tmp_path, val_fraction=0.01, read_threads=threads)
  it = data.make_iterator(cfg, data.ByteTokenizer(), "train", 1, 1, 0)
  with pytest.raises(ValueError, match=r"a\.jsonl line [2-6]: no string field 'text'"):
    _take(it, 10)


@pytest.mark.parametrize(
  "field, value",
  [
    ("tokenizer", "wordpiece"),
    ("bpe_vocab_size", 100),
    ("val_fraction", 1.0),
    ("shuffle_window", -1),
    ("source", ""),
  ],
)
def test_bad_config_fields_are_named(corpus, tmp_path, field, value):
  cfg = _cfg(corpus[0])
  cfg[field] = value
  with pytest.raises(ValueError, match=f"^data.{field} must be"):
    if field in ("tokenizer", "bpe_vocab_size"):
      cfg.tokenizer = "bpe" if field == "bpe_vocab_size" else cfg.tokenizer
      data.build_tokenizer(cfg, str(tmp_path))
    else:
      data.make_iterator(cfg, data.ByteTokenizer(), "train", 2, SEQ, 0)


# Packing.


def test_validation_packs_documents_in_order_with_separators(corpus):
  root, texts = corpus
  cfg = _cfg(root)
  tok = data.ByteTokenizer()
  val = sources.list_documents(cfg, "validation")
  stream = _stream(tok, [texts[d.key] for d in val])
  rows = stream[: len(stream) // (SEQ + 1) * (SEQ + 1)].reshape(-1, SEQ + 1)
  got = np.concatenate(
    list(b["tokens"] for b in data.make_iterator(cfg, tok, "validation", 2, SEQ, 0, num_epochs=1))
  )
  assert got.dtype == np.int32 and got.shape[1] == SEQ + 1
  np.testing.assert_array_equal(got, rows[: len(rows) // 2 * 2])
  forever = data.make_iterator(cfg, tok, "validation", 2, SEQ, 123)
  np.testing.assert_array_equal(np.concatenate(_take(forever, len(got) // 2)), got)


def test_segment_attention_marks_each_document_piece(corpus):
  """With data.segment_attention every row carries segment ids and positions: a segment is one
  document piece (its separator included), positions restart at 0 in each, and the same tokens
  come out as without the switch."""
  root, _ = corpus
  tok = data.ByteTokenizer()
  plain = next(data.make_iterator(_cfg(root), tok, "validation", 4, SEQ, 0))
  batch = next(data.make_iterator(_cfg(root, segment_attention=True), tok, "validation", 4, SEQ,
                                  0))
  assert set(batch) == {"tokens", "segment_ids", "positions"}
  np.testing.assert_array_equal(batch["tokens"], plain["tokens"])
  for toks, seg, pos in zip(batch["tokens"], batch["segment_ids"], batch["positions"]):
    assert seg[0] == 1 and np.all(np.diff(seg) >= 0) and np.all(seg > 0)
    starts = np.flatnonzero(np.diff(seg)) + 1
    np.testing.assert_array_equal(pos[starts], 0)
    # a new piece starts right after a separator (or continues a split document at row start)
    assert np.all(toks[starts - 1] == tok.eos_id)
    np.testing.assert_array_equal(np.diff(pos)[np.diff(seg) == 0], 1)


def test_train_epoch_holds_every_document_once_then_reshuffles(corpus):
  root, texts = corpus
  cfg = _cfg(root, shuffle_window=0)
  tok = data.ByteTokenizer()
  train = [texts[d.key] for d in sources.list_documents(cfg, "train")]
  n_tokens = sum(len(t.encode()) + 1 for t in train)
  it = data.make_iterator(cfg, tok, "train", 1, SEQ, 7)
  stream = np.concatenate(_take(it, 2 * n_tokens // (SEQ + 1) + 1)).reshape(-1)
  epoch1, epoch2 = stream[:n_tokens], stream[n_tokens : 2 * n_tokens]
  docs1 = tok.decode(epoch1).split("<|endoftext|>")[:-1]
  docs2 = tok.decode(epoch2).split("<|endoftext|>")[:-1]
  assert sorted(docs1) == sorted(docs2) == sorted(train)
  assert docs1 != train and docs1 != docs2


# Determinism and resume.


def test_iterators_are_deterministic_per_seed(corpus):
  cfg = _cfg(corpus[0])
  tok = data.ByteTokenizer()
  a = _take(data.make_iterator(cfg, tok, "train", 4, SEQ, 3), 6)
  b = _take(data.make_iterator(cfg, tok, "train", 4, SEQ, 3), 6)
  c = _take(data.make_iterator(cfg, tok, "train", 4, SEQ, 4), 6)
  np.testing.assert_array_equal(np.stack(a), np.stack(b))
  assert not np.array_equal(np.stack(a), np.stack(c))


@pytest.mark.parametrize("prefetch, threads", [(2, 2), (0, 0)])
@pytest.mark.parametrize("split, num_epochs", [("train", None), ("validation", 1)])
def test_resume_from_json_state_yields_the_same_batches(
  corpus, prefetch, threads, split, num_epochs
):
  root, texts = corpus
  cfg = _cfg(root, prefetch_batches=prefetch, read_threads=threads)
  tok = data.ByteTokenizer()
  batch = 3
  epoch_tokens = sum(len(texts[d.key].encode()) + 1 for d in sources.list_documents(cfg, split))
  epoch_batches = epoch_tokens // (batch * (SEQ + 1))
  # Start, inside the first window, across windows, and (train) into the second epoch.
  stops = [0, 1, 5, 13, epoch_batches - 6]
  if num_epochs is None:
    stops.append(epoch_batches + 3)
  it = data.make_iterator(cfg, tok, split, batch, SEQ, 11, num_epochs)
  states, reference = [], []
  for _ in range(stops[-1] + 5):
    states.append(json.dumps(it.get_state()))
    reference.append(next(it)["tokens"])
  assert any('"remainder_slices": {"tokens": [-1, -1]}' not in s for s in states)
  for start in stops:
    fresh = data.make_iterator(cfg, tok, split, batch, SEQ, 11, num_epochs)
    _take(fresh, 2)  # a used iterator must forget its own position.
    fresh.set_state(json.loads(states[start]))
    np.testing.assert_array_equal(np.stack(_take(fresh, 5)), np.stack(reference[start : start + 5]))


def test_bytes_per_token_counts_utf8_bytes_over_tokens(corpus, tmp_path):
  root, texts = corpus
  cfg = _cfg(root)
  val = [texts[d.key] for d in sources.list_documents(cfg, "validation")]
  n_bytes = sum(len(t.encode()) for t in val)
  assert data.bytes_per_token(cfg, data.ByteTokenizer()) == pytest.approx(
    n_bytes / (n_bytes + len(val))
  )
  bpe_cfg = _cfg(root, tokenizer="bpe", bpe_vocab_size=600)
  bpe = data.build_tokenizer(bpe_cfg, str(tmp_path))
  n_tokens = sum(len(bpe.encode(t)) + 1 for t in val)
  assert data.bytes_per_token(bpe_cfg, bpe) == pytest.approx(n_bytes / n_tokens)
