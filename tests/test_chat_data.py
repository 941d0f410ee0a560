"""data.format "chat": conversations rendered in K2's format, masked to the assistant's tokens,
packed whole with segment ids; no attention across conversations; resume; drops and errors."""

import json
import logging

import jax
import numpy as np
import pytest

import k2jax
from k2jax import agentic, chat, data
from k2jax.data import sources
from k2jax.train import chat_data, losses

SEQ = 767  # rows of 768 tokens: two or three conversations each.


@pytest.fixture(scope="module")
def conversations(tmp_path_factory):
  """(JSONL path, its records, a K2-format BPE trained on them): expert conversations of every
  kind, tool calls with dict arguments, and one external-style record (string arguments, no
  tools field, a content-less tool-call turn, non-ASCII)."""
  root = tmp_path_factory.mktemp("chats")
  path = root / "chats.jsonl"
  agentic.write_jsonl(str(path), agentic.make_tasks("train", 60, seed=1))
  external = {"messages": [
    {"role": "user", "content": "Jaké je počasí v Praze?"},
    {"role": "assistant", "content": None, "tool_calls": [{"id": "call_7", "type": "function",
     "function": {"name": "get_weather", "arguments": '{"city": "Praha"}'}}]},
    {"role": "tool", "tool_call_id": "call_7", "content": "12 °C"},
    {"role": "assistant", "content": "V Praze je 12 °C."}]}
  with open(path, "a", encoding="utf-8") as f:
    f.write(json.dumps(external, ensure_ascii=False) + "\n")
  records = [json.loads(line) for line in path.read_text().splitlines()]
  texts = [chat.render(r["messages"], r.get("tools")) for r in records]
  tok = data.train_bpe(texts, 1024)
  return path, records, tok


def _cfg(path, **kw):
  cfg = data.default_data_config()
  cfg.update({**dict(source=str(path), format="chat", val_fraction=0.3, read_threads=0,
                     prefetch_batches=0), **kw})
  return cfg


def _segments(batch):
  """(tokens, loss_mask, positions) of each conversation of each row, in order."""
  out = []
  for toks, seg, pos, mask in zip(batch["tokens"], batch["segment_ids"], batch["positions"],
                                  batch["loss_mask"]):
    for s in range(1, seg.max() + 1):
      where = seg == s
      out.append((toks[where], mask[where], pos[where]))
  return out


def _epoch(cfg, tok, split, batch_size=2):
  it = chat_data.make_iterator(cfg, tok, split, batch_size, SEQ, 0, num_epochs=1)
  return [b for b in it]


def test_a_packed_epoch_decodes_back_to_each_conversation_once(conversations):
  path, records, tok = conversations
  cfg = _cfg(path)
  docs = sources.list_documents(cfg, "validation")
  expected = {sources.location(d): records[d.line - 1] for d in docs}
  batches = _epoch(cfg, tok, "validation", batch_size=1)  # batch 1: no row is left out.
  got = [seg for b in batches for seg in _segments(b)]
  rendered = sorted(chat.render(r["messages"], r.get("tools")) + chat.END
                    for r in expected.values())
  assert sorted(tok.decode(ids) for ids, _, _ in got) == rendered
  for ids, _, pos in got:
    np.testing.assert_array_equal(pos, np.arange(len(ids)))  # positions restart per conversation
  for b in batches:
    assert set(b) == {"tokens", "segment_ids", "positions", "loss_mask"}
    assert all(v.dtype == np.int32 and v.shape == (1, SEQ + 1) for v in b.values())
    padding = b["segment_ids"] == 0
    assert not b["loss_mask"][padding].any() and not b["tokens"][padding].any()
    assert (np.diff(b["segment_ids"][~padding]) >= 0).all()


def test_the_mask_covers_exactly_the_assistant_turns(conversations):
  path, records, tok = conversations
  batches = _epoch(_cfg(path), tok, "train")
  header = tok.encode(chat.GENERATION_PROMPT, allow_special=True)
  by_text = {chat.render(r["messages"], r.get("tools")) + chat.END: r for r in records}
  n = 0
  for ids, mask, _ in (seg for b in batches for seg in _segments(b)):
    record = by_text[tok.decode(ids)]
    edges = np.flatnonzero(np.diff(np.concatenate([[0], mask, [0]])))
    spans = [tok.decode(ids[a:b]) for a, b in zip(edges[::2], edges[1::2])]
    assistant = [m for m in record["messages"] if m["role"] == "assistant"]
    want = [chat.render_continuation([m], add_generation_prompt=False) for m in assistant]
    assert [tok.decode(header) + s for s in spans] == want
    n += 1
  assert n > 30


def test_no_attention_crosses_conversations_and_the_loss_sees_only_assistant_targets(
    conversations):
  """The logits of a packed row equal those of each of its conversations run alone, and the
  masked cross-entropy of the row is the mean over the conversations' assistant targets (a
  float64 reference from the lone runs)."""
  path, _, tok = conversations
  batch = next(chat_data.make_iterator(_cfg(path), tok, "train", 1, SEQ, 0))
  seg = batch["segment_ids"][0]
  n = seg.max()
  assert n >= 2
  # One call: row 0 the packed row, row s each conversation alone (right-padded: causal).
  tokens = np.zeros((n + 1, SEQ + 1), np.int32)
  tokens[0] = batch["tokens"][0]
  for s in range(1, n + 1):
    tokens[s, :np.sum(seg == s)] = batch["tokens"][0, seg == s]
  positions = np.broadcast_to(np.arange(SEQ + 1), tokens.shape).copy()
  positions[0] = batch["positions"][0]
  segments = np.ones_like(tokens)
  segments[0] = seg
  cfg = k2jax.presets.get("k2_nano").replace(vocab_size=1024, num_hidden_layers=2)
  variables = k2jax.init_variables(cfg, 0)
  logits, _ = jax.jit(k2jax.Transformer(cfg).apply)(variables, tokens, positions, segments)
  logits = np.asarray(logits, np.float64)
  total, count = 0.0, 0
  for s in range(1, n + 1):
    length = np.sum(seg == s)
    np.testing.assert_allclose(logits[0, seg == s], logits[s, :length], atol=2e-5, rtol=2e-5)
    x = logits[s, :length - 1]
    logp = x - np.log(np.exp(x - x.max(-1, keepdims=True)).sum(-1, keepdims=True)) - x.max(
      -1, keepdims=True)
    mask = batch["loss_mask"][0, seg == s][1:]
    total -= float(np.sum(logp[np.arange(length - 1), tokens[s, 1:length]] * mask))
    count += int(mask.sum())
  term, outputs = losses.TERMS["cross_entropy"], {"logits": logits[:1, :-1]}
  np.testing.assert_allclose(float(term.total(outputs, batch) / term.count(batch)),
                             total / count, rtol=1e-4)


def test_long_conversations_are_dropped_and_counted_never_cut(conversations, caplog):
  path, records, tok = conversations
  cfg = _cfg(path)
  docs = sources.list_documents(cfg, "train")
  lengths = {sources.location(d): len(chat.encode_chat(
    tok, records[d.line - 1]["messages"], records[d.line - 1].get("tools")).ids) for d in docs}
  seq = int(np.median(list(lengths.values())))
  long = sorted(k for k, n in lengths.items() if n > seq + 1)
  with caplog.at_level(logging.WARNING):
    it = chat_data.make_iterator(cfg, tok, "train", 1, seq, 0, num_epochs=1)
    kept = sum(b["segment_ids"].max() for b in it)
  drops = [r.getMessage() for r in caplog.records if "chat data: dropped" in r.getMessage()]
  assert kept == len(docs) - len(long) and len(drops) == len(long) > 0
  assert sorted(d.split("dropped ")[1].split(",")[0] for d in drops) == long
  assert drops[-1].endswith(f"({len(long)} dropped so far)")


@pytest.mark.parametrize("threads, prefetch", [(0, 0), (2, 2)])
def test_resume_from_json_state_yields_the_same_batches(conversations, threads, prefetch):
  path, _, tok = conversations
  cfg = _cfg(path, read_threads=threads, prefetch_batches=prefetch)
  it = chat_data.make_iterator(cfg, tok, "train", 2, SEQ, 5)
  states, reference = [], []
  for _ in range(40):  # several packing rounds and epochs.
    states.append(json.dumps(it.get_state()))
    reference.append(next(it))
  for start in (0, 3, 17, 33):
    fresh = chat_data.make_iterator(cfg, tok, "train", 2, SEQ, 5)
    next(fresh)
    fresh.set_state(json.loads(states[start]))
    for want in reference[start:start + 5]:
      got = next(fresh)
      for key in want:
        np.testing.assert_array_equal(got[key], want[key])


def test_train_order_depends_on_the_seed_validation_does_not(conversations):
  path, _, tok = conversations
  cfg = _cfg(path)
  first = lambda split, seed: next(chat_data.make_iterator(cfg, tok, split, 2, SEQ, seed))["tokens"]
  assert not np.array_equal(first("train", 0), first("train", 1))
  np.testing.assert_array_equal(first("validation", 0), first("validation", 1))


def test_bad_inputs_raise_one_line_errors(conversations, tmp_path):
  path, _, tok = conversations
  with pytest.raises(ValueError, match="needs a K2-format tokenizer"):
    chat_data.make_iterator(_cfg(path), data.ByteTokenizer(), "train", 2, SEQ, 0)
  (tmp_path / "a.jsonl").write_text(path.read_text())
  (tmp_path / "notes.txt").write_text("not a conversation")
  with pytest.raises(ValueError, match=r"notes\.txt is not a \.jsonl file"):
    chat_data.make_iterator(_cfg(tmp_path), tok, "train", 2, SEQ, 0)
  bad = tmp_path / "bad"
  bad.mkdir()
  lines = path.read_text().splitlines()
  lines[7] = json.dumps({"messages": [{"role": "tool", "tool_call_id": "x", "content": "1"}]})
  (bad / "b.jsonl").write_text("\n".join(lines) + "\n")
  it = chat_data.make_iterator(_cfg(bad, val_fraction=0.01), tok, "train", 1, SEQ, 0,
                               num_epochs=1)
  with pytest.raises(ValueError, match=r"b\.jsonl line 8: message 0: tool_call_id 'x' names no "):
    list(it)
  (bad / "b.jsonl").write_text('{"text": "plain"}\n' * 3)
  with pytest.raises(ValueError, match=r"b\.jsonl line \d: no list field 'messages'"):
    chat_data.make_iterator(_cfg(bad), tok, "train", 1, SEQ, 0)
