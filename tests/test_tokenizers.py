"""k2jax.data.tokenizers: the byte tokenizer, KimiTokenizer against a plain tiktoken.Encoding, K2's
long-input split, the K2-format BPE trainer and its files, the registry and its errors."""

import base64
import json

import numpy as np
import pytest
import tiktoken
import tiktoken.load

from k2jax import data
from k2jax.data import tokenizers

# K2's pre-tokenizer, written out again here as the reference.
K2_PATTERN = "|".join([
  r"""[\p{Han}]+""",
  r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
  r"""[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]+[\p{Ll}\p{Lm}\p{Lo}\p{M}&&[^\p{Han}]]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?""",  # noqa: E501
  r"""\p{N}{1,3}""",
  r""" ?[^\s\p{L}\p{N}]+[\r\n]*""",
  r"""\s*[\r\n]+""",
  r"""\s+(?!\S)""",
  r"""\s+""",
])
# K2's named special ids, minus its 163,584 ranks.
K2_NAMED = {0: "[BOS]", 1: "[EOS]", 2: "<|im_end|>", 3: "<|im_user|>", 4: "<|im_assistant|>",
            6: "<|start_header_id|>", 7: "<|end_header_id|>", 9: "[EOT]", 10: "<|im_system|>",
            11: "<|tool_calls_section_begin|>", 12: "<|tool_calls_section_end|>",
            13: "<|tool_call_begin|>", 14: "<|tool_call_argument_begin|>", 15: "<|tool_call_end|>",
            17: "<|im_middle|>", 254: "[UNK]", 255: "[PAD]"}
CORPUS = """def parse(line: str) -> dict[str, int]:
    \"\"\"Parses 'key=value' pairs; I'M SURE it's fine, you'll see. DON'T PANIC.\"\"\"
    return {k: int(v) for k, v in (p.split("=") for p in line.split(","))}

北京是中国的首都。東京は日本の首都です。Прага — столица Чехии. Ünïcödé Straße naïve café.
Emoji: 😀🎉👩‍💻 and 🇨🇿!   Numbers 3.14159 2718281828 1,000,000 and 0xFF.
\t\tindented\r\n   trailing   \n\n\n"""
TEXTS = [
  "", "hello world", CORPUS, "x" * 7 + " " * 33 + "\n" * 5 + "y",
  "They're here, we've gone, he'd say THEY'LL 'quote' it's", "12345678901234567890 007 1e-9",
  "中文混合English词语和数字123\n首都\r\n\n下一行 ", "👍🏽👨‍👩‍👧‍👦 ⚡︎ 🀄",
  "\u00a0\u2028\u3000 \x0b\x0c mixed\x1cspace",
  "a\r\n\r\n\tb  \t  c\u200bd", "<|im_end|> literal [EOS] text", "\x00 nul <|endoftext|>",
]
INVALID_UTF8 = [b"\xff\xfe\xc3(\xe2\x82".decode("utf-8", "surrogateescape"),
                b"ok \x80\x81 bytes".decode("utf-8", "replace")]


def _ranks(corpus: str) -> dict[bytes, int]:
  """All bytes, then every prefix of every run of 1-3 words of the corpus, with and without a
  space before: a few thousand."""
  ranks = {bytes([b]): b for b in range(256)}
  words = corpus.split()
  for piece in [" ".join(words[i:i + k]) for k in (1, 2, 3) for i in range(len(words))]:
    for raw in (piece.encode(), f" {piece}".encode()):
      for end in range(2, len(raw) + 1):
        ranks.setdefault(raw[:end], len(ranks))
  return ranks


@pytest.fixture(scope="module")
def k2_dir(tmp_path_factory):
  """A K2-layout tokenizer directory (tiktoken.model, tokenizer_config.json) and its reference."""
  path = tmp_path_factory.mktemp("kimi")
  ranks = _ranks(CORPUS * 2 + " ".join(TEXTS))
  n = len(ranks)
  (path / "tiktoken.model").write_text(
    "".join(f"{base64.b64encode(t).decode()} {r}\n" for t, r in ranks.items()))
  (path / "tokenizer_config.json").write_text(json.dumps({"added_tokens_decoder": {
    str(n + k): {"content": t, "special": True} for k, t in K2_NAMED.items()}}))
  specials = {K2_NAMED.get(k, f"<|reserved_token_{n + k}|>"): n + k for k in range(256)}
  reference = tiktoken.Encoding("ref", pat_str=K2_PATTERN, mergeable_ranks=ranks,
                                special_tokens=specials)
  return path, reference, n


def test_kimi_tokenizer_equals_tiktoken_id_for_id(k2_dir):
  path, ref, n = k2_dir
  assert n > 2000
  tok = data.KimiTokenizer.from_dir(path)
  assert (tok.vocab_size, tok.bos_id, tok.eos_id) == (n + 256, n, n + 1)
  assert {tok.special_ids[t] - n: t for t in K2_NAMED.values()} == K2_NAMED
  assert tok.special_ids[f"<|reserved_token_{n + 5}|>"] == n + 5
  for text in TEXTS + INVALID_UTF8:
    ids = tok.encode(text)
    assert ids == ref.encode(text, disallowed_special=()) == tok.encode_array(text).tolist()
    assert tok.encode(text, allow_special=True) == ref.encode(text, allowed_special="all")
    assert max(ids, default=0) < n  # specials only when allowed.
    if text not in INVALID_UTF8:
      assert tok.decode(ids) == text
      assert tok.token_bytes[ids].sum() == len(text.encode())
  assert len(tok.encode(CORPUS)) < len(CORPUS.encode()) / 2  # the ranks merge.
  im_end = tok.special_ids["<|im_end|>"]
  assert tok.encode("a<|im_end|>", allow_special=True)[-1] == im_end
  assert im_end not in tok.encode("a<|im_end|>")
  assert tok.decode([im_end, n + 7]) == "<|im_end|><|end_header_id|>"
  assert tok.decode(tok.encode("é")[:1]) == "\ufffd"  # half a character decodes replaced.
  assert tok.token_bytes[n:].sum() == 0
  with pytest.raises(ValueError, match=f"token id {n + 256} outside"):
    tok.decode([1, n + 256])


def _reference_split(s: str, max_run: int) -> list[str]:
  """K2's splitter as written there: walk the characters, count the current run."""
  pieces, run, is_space, start = [], 0, s[0].isspace() if s else False, 0
  for i, c in enumerate(s):
    if is_space ^ c.isspace():
      run, is_space = 1, c.isspace()
    else:
      run += 1
      if run > max_run:
        pieces.append(s[start:i])
        start, run = i, 1
  return pieces + [s[start:]]


def test_long_inputs_are_split_as_k2_splits_them(k2_dir):
  rng = np.random.default_rng(0)
  for _ in range(200):
    chars = rng.choice(list("ab \n\u3000\x1c\u00a0中"), size=rng.integers(1, 120),
                       p=[.3, .1, .2, .05, .05, .05, .05, .2])
    s = "".join(np.repeat(chars, rng.integers(1, 9, len(chars))))
    max_chars, max_run = int(rng.integers(5, 200)), int(rng.integers(1, 12))
    want = [p for i in range(0, len(s), max_chars)
            for p in _reference_split(s[i:i + max_chars], max_run)]
    assert tokenizers.split_long_text(s, max_chars, max_run) == want
  path, ref, _ = k2_dir
  tok = data.KimiTokenizer.from_dir(path)
  text = "ab" * 220_000 + " " * 60_000 + "cd" + "\n" * 26_000 + "end"
  pieces = [p for i in range(0, len(text), 400_000)
            for p in _reference_split(text[i:i + 400_000], 25_000)]
  assert len(pieces) == 21
  assert tok.encode(text) == [t for p in pieces for t in ref.encode_ordinary(p)]


def test_trained_bpe_is_k2_format_deterministic_and_read_back(tmp_path, monkeypatch):
  texts = [CORPUS * 3, " ".join(TEXTS) * 2, "def f(x):\n    return x + 1\n" * 50]
  tok = data.train_bpe(texts, 700, chat_template="{{ messages }}")
  again = data.train_bpe(texts, 700)
  assert tok.vocab_size == 700 and tok.eos_id == 700 - 256 + 1
  assert {tok.special_ids[t] - 444: t for t in K2_NAMED.values()} == K2_NAMED
  for text in TEXTS:
    assert again.encode(text) == tok.encode(text)
    assert tok.decode(tok.encode(text)) == text
  assert len(tok.encode(CORPUS)) < len(CORPUS.encode()) / 2
  tok.save(tmp_path)
  monkeypatch.setenv("TIKTOKEN_CACHE_DIR", "")
  ranks = tiktoken.load.load_tiktoken_bpe(str(tmp_path / "tiktoken.model"))
  assert sorted(ranks.values()) == list(range(444)) and ranks[b"A"] == 65
  back = data.KimiTokenizer.from_dir(tmp_path)
  assert back.chat_template == "{{ messages }}" and back.special_ids == tok.special_ids
  ref = tiktoken.Encoding("ref", pat_str=K2_PATTERN, mergeable_ranks=ranks,
                          special_tokens=back.special_ids)
  for text in TEXTS:
    assert back.encode(text, allow_special=True) == ref.encode(text, allowed_special="all")


def _tiktoken_pieces(text: str) -> list[bytes]:
  """tiktoken's pre-tokenization: with every substring ranked, each piece merges to one token."""
  raw = text.encode()
  subs = sorted({raw[i:j] for i in range(len(raw)) for j in range(i + 2, len(raw) + 1)},
                key=lambda b: (len(b), b))
  ranks = {bytes([b]): b for b in range(256)} | {s: 256 + k for k, s in enumerate(subs)}
  enc = tiktoken.Encoding("pieces", pat_str=K2_PATTERN, mergeable_ranks=ranks, special_tokens={})
  return [enc.decode_single_token_bytes(t) for t in enc.encode_ordinary(text)]


def test_the_trainer_pre_tokenizes_like_tiktoken():
  """The BPE trainer cuts text with Oniguruma, tiktoken with its own engine: same pieces."""
  import tokenizers as hf

  split = hf.pre_tokenizers.Split(hf.Regex(tokenizers.PATTERN), behavior="isolated")
  for text in [*TEXTS[1:], *CORPUS.splitlines(keepends=True)]:
    text = text[:60]
    assert [p.encode() for p, _ in split.pre_tokenize_str(text)] == _tiktoken_pieces(text), text


def _cfg(source, **kw):
  cfg = data.default_data_config()
  cfg.update(dict(source=str(source), val_fraction=0.25, **kw))
  return cfg


@pytest.fixture(scope="module")
def corpus_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("corpus")
  for i in range(8):
    (root / f"d{i}.txt").write_text(CORPUS.replace("parse", f"parse_{i}") * 4)
  return root


def test_registry_builds_and_caches_the_bpe_and_reads_kimi_dirs(corpus_dir, tmp_path, k2_dir,
                                                                monkeypatch):
  cfg = _cfg(corpus_dir, tokenizer="bpe", bpe_vocab_size=600, bpe_train_bytes=20_000)
  tok = data.build_tokenizer(cfg, str(tmp_path))
  assert isinstance(tok, data.KimiTokenizer) and tok.vocab_size == 600
  assert sorted(p.name for p in (tmp_path / "tokenizer").iterdir()) == [
    "chat_template.jinja", "tiktoken.model", "tokenizer_config.json"]
  assert tok.chat_template == tokenizers.k2_chat_template()
  monkeypatch.setattr(tokenizers, "train_bpe", lambda *a, **k: pytest.fail("retrained"))
  again = data.build_tokenizer(cfg, str(tmp_path))
  assert again.encode(CORPUS) == tok.encode(CORPUS) and again.eos_id == tok.eos_id
  cfg.bpe_vocab_size = 700
  with pytest.raises(ValueError, match="tokenizer has 600 ids but data.bpe_vocab_size is 700"):
    data.build_tokenizer(cfg, str(tmp_path))
  kimi = data.build_tokenizer(_cfg(corpus_dir, tokenizer="kimi", tokenizer_path=str(k2_dir[0])),
                              None)
  assert kimi.vocab_size == k2_dir[2] + 256


@pytest.mark.parametrize("field, value, match", [
  ("tokenizer", "wordpiece", r"^data.tokenizer must be one of \('byte', 'kimi', 'bpe'\)"),
  ("tokenizer_path", "", "^data.tokenizer 'kimi' needs data.tokenizer_path"),
  ("bpe_vocab_size", 512, "^data.bpe_vocab_size must be an integer >= 513"),
  ("bpe_vocab_size", 5000, "^data.bpe_vocab_size 5000: BPE training stopped at"),
])
def test_bad_tokenizer_config_is_named(corpus_dir, tmp_path, field, value, match):
  cfg = _cfg(corpus_dir, tokenizer="kimi" if field == "tokenizer_path" else "bpe")
  cfg[field] = value
  with pytest.raises(ValueError, match=match):
    data.build_tokenizer(cfg, str(tmp_path))


def test_bad_tokenizer_directories_are_named(k2_dir, tmp_path):
  good, _, n = k2_dir
  for name in ("tiktoken.model", "tokenizer_config.json"):
    (tmp_path / name).write_bytes((good / name).read_bytes())
  with pytest.raises(ValueError, match=f"{tmp_path / 'x'}: no tiktoken.model"):
    data.KimiTokenizer.from_dir(tmp_path / "x")
  (tmp_path / "tokenizer_config.json").write_text('{"added_tokens_decoder": {"7": {}}}')
  with pytest.raises(ValueError, match="added_tokens_decoder is not"):
    data.KimiTokenizer.from_dir(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text(
    json.dumps({"added_tokens_decoder": {"7": {"content": "[BOS]"}}}))
  with pytest.raises(ValueError, match=f"special id 7 is outside \\[{n}, {n + 256}\\)"):
    data.KimiTokenizer.from_dir(tmp_path)
  (tmp_path / "tokenizer_config.json").write_text("{}")
  with pytest.raises(ValueError, match="no special token \\[BOS\\]"):
    data.KimiTokenizer.from_dir(tmp_path)
  (tmp_path / "tiktoken.model").write_text("QQ== 0\nnot base64!! 1\n")
  with pytest.raises(ValueError, match="tiktoken.model line 2: not 'base64"):
    data.KimiTokenizer.from_dir(tmp_path)
  (tmp_path / "tiktoken.model").write_text("QQ== 3\n")
  with pytest.raises(ValueError, match="ranks must be 0..0 once each and include all 256"):
    data.KimiTokenizer.from_dir(tmp_path)


def test_byte_tokenizer_round_trip_and_separator():
  tok = data.ByteTokenizer()
  assert (tok.vocab_size, tok.eos_id, tok.name) == (257, 256, "byte")
  for text in TEXTS:
    ids = tok.encode(text)
    assert ids == tok.encode_array(text).tolist() == list(text.encode("utf-8"))
    assert tok.decode(ids) == text
  assert tok.decode(tok.encode("a") + [256] + tok.encode("b")) == "a<|endoftext|>b"
  assert tok.decode([0xFF, 0x41, 0xC3]) == "\ufffdA\ufffd"
  with pytest.raises(ValueError, match="token id 257"):
    tok.decode([1, 257])
