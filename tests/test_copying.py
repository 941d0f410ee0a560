"""k2jax.data.copying: the repeated-span rows and the copy probe."""

import pathlib

import numpy as np
import pytest

from k2jax.data import copying


def _spans(tokens, mask):
  """(start, length) of each weighted run: the copy's tokens after its first."""
  runs, t = [], 0
  while t < len(mask):
    if mask[t]:
      end = t
      while end < len(mask) and mask[end]:
        end += 1
      runs.append((t, end - t))
      t = end
    else:
      t += 1
  return runs


def test_rows_weight_exactly_the_predictable_copy_tokens():
  rows = copying.repeat_rows(np.random.default_rng(0), 8, 200, (10, 60))
  tokens, mask = rows["tokens"], rows["loss_mask"]
  assert tokens.shape == mask.shape == (8, 200) and tokens.dtype == np.int32
  assert tokens.min() >= 10 and tokens.max() < 60
  for row_tokens, row_mask in zip(tokens, mask):
    # Rebuild the row from its spans: each weighted run of length n is a copy of the n + 1 ids
    # written just before the copy's first token, and unweighted tokens are first copies or a
    # copy's first token, so the row is exactly [s, s, s', s', ...] up to its last pair.
    t = 0
    for start, n in _spans(row_tokens, row_mask):
      if start + n == len(row_tokens):
        break  # a pair cut off by the row's end: its span length is unknown
      span = n + 1
      first, second = start - 1 - span, start - 1
      assert first == t and copying.SPANS[0] <= span <= copying.SPANS[1]
      np.testing.assert_array_equal(row_tokens[first:second], row_tokens[second:start + n])
      t = start + n
    assert len(row_tokens) - t < 2 * copying.SPANS[1]  # only the cut-off last pair is left


def test_rows_are_deterministic_under_the_seed():
  a = copying.repeat_rows(np.random.default_rng(3), 4, 64, (0, 512))
  b = copying.repeat_rows(np.random.default_rng(3), 4, 64, (0, 512))
  c = copying.repeat_rows(np.random.default_rng(4), 4, 64, (0, 512))
  np.testing.assert_array_equal(a["tokens"], b["tokens"])
  assert not np.array_equal(a["tokens"], c["tokens"])


@pytest.mark.parametrize("ids, spans", [((5, 5), (6, 32)), ((0, 64), (0, 8)), ((0, 64), (9, 8))])
def test_rows_reject_bad_ranges(ids, spans):
  with pytest.raises(ValueError, match="ids|spans"):
    copying.repeat_rows(np.random.default_rng(0), 1, 16, ids, spans)


def _one_hot_logits(predicted_BT, vocab):
  return np.eye(vocab, dtype=np.float32)[predicted_BT]


def test_probe_scores_a_copier_one_and_a_fixed_offset_copier_zero():
  vocab, span = 5000, copying.PROBE_SPAN

  def copier(tokens):  # predicts the token after the previous occurrence of the current one
    out = np.zeros_like(tokens)
    for b, row in enumerate(tokens):
      for t in range(len(row)):
        earlier = np.nonzero(row[:t] == row[t])[0]
        out[b, t] = row[earlier[-1] + 1] if len(earlier) else 0
    return _one_hot_logits(out, vocab)

  def offset_32(tokens):  # "copy the token 32 back", what fixed-length repeats teach
    out = np.zeros_like(tokens)
    out[:, 31:] = tokens[:, :-31]
    return _one_hot_logits(out, vocab)

  # Ids rarely repeat within a span of 40 out of 5000, so the content copier is nearly exact.
  assert copying.copy_accuracy(copier, (0, vocab), rows=4, span=span) > 0.9
  assert copying.copy_accuracy(offset_32, (0, vocab), rows=4, span=span) < 0.05
  # Trained on 32-id spans, the offset copier would pass a probe of that length.
  assert copying.copy_accuracy(offset_32, (0, vocab), rows=4, span=32) == 1.0


def _data_cfg(copy_ids=0):
  from k2jax.train import default_config
  c = default_config()
  c.data.update(dict(format="copy", copy_ids=copy_ids))
  return c.data


class _Vocab:
  vocab_size = 300


def test_iterator_resumes_and_keeps_splits_apart():
  it = copying.make_iterator(_data_cfg(), _Vocab(), "train", 4, 32, seed=0)
  first, state = next(it), it.get_state()
  second = next(it)
  assert first["tokens"].shape == (4, 33) and first["tokens"].max() < 300
  again = copying.make_iterator(_data_cfg(), _Vocab(), "train", 4, 32, seed=0)
  again.set_state(state)
  np.testing.assert_array_equal(next(again)["tokens"], second["tokens"])
  val = copying.make_iterator(_data_cfg(), _Vocab(), "validation", 4, 32, seed=0)
  assert not np.array_equal(next(val)["tokens"], first["tokens"])
  small = copying.make_iterator(_data_cfg(copy_ids=64), _Vocab(), "train", 4, 32, seed=0)
  assert next(small)["tokens"].max() < 64
  with pytest.raises(ValueError, match="data.copy_ids 301"):
    copying.make_iterator(_data_cfg(copy_ids=301), _Vocab(), "train", 4, 32, seed=0)
  with pytest.raises(ValueError, match="batch_size must be a positive integer, got 0"):
    copying.make_iterator(_data_cfg(), _Vocab(), "train", 0, 32, seed=0)


def test_training_on_copy_rows_resumes_exactly(tmp_path):
  from k2jax.train import default_config, train
  from k2jax.train.metrics import read_metrics

  def config(steps):
    c = default_config()
    c.model.update(dict(hidden_size=64, num_hidden_layers=2, n_routed_experts=8,
                        num_experts_per_tok=2))
    c.train.update(dict(steps=steps, batch_size=4, seq_len=64, log_every=1, eval_every=2,
                        eval_batches=1))
    c.checkpoint.update(dict(every_steps=2, keep=3))
    c.data.update(dict(format="copy", copy_ids=64))
    c.mesh.data = 1
    c.sample.num_tokens = 0
    return c

  train(config(4), str(tmp_path / "whole"))
  train(config(2), str(tmp_path / "split"))
  train(config(4), str(tmp_path / "split"))
  whole = {r["step"]: r for r in read_metrics(tmp_path / "whole")}
  split = {r["step"]: r for r in read_metrics(tmp_path / "split")}
  assert [whole[s]["loss"] for s in (3, 4)] == [split[s]["loss"] for s in (3, 4)]
  assert "eval_loss" in whole[2]


def test_induction_experiment_runs(tmp_path):
  import subprocess
  import sys

  script = pathlib.Path(__file__).parents[1] / "experiments" / "induction.py"
  out = subprocess.run([sys.executable, str(script), "--steps=2", "--log_every=1", "--ids=16",
                        "--hidden_size=32"], capture_output=True, text=True, timeout=300,
                       check=True).stdout
  losses = [float(line.split("copy loss ")[1].split()[0]) for line in out.splitlines()
            if line.startswith("step ")]
  assert len(losses) == 2 and all(0 < loss < 2 * np.log(16) for loss in losses)
