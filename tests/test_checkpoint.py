"""Checkpointer: exact round trip, async save vs. donation, corrupt fallback, NaN/step guards."""

import logging

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from k2jax.train.checkpoint import Checkpointer, all_finite


def _state(seed):
  params = {"w": jax.random.normal(jax.random.key(seed), (8, 4)), "b": jnp.zeros(4)}
  tx = optax.adam(1e-3)
  opt_state = tx.update(params, tx.init(params), params)[1]
  return {"params": params, "opt_state": opt_state, "step": jnp.int32(seed),
          "rng": jax.random.PRNGKey(seed)}


def _assert_same(a, b):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    assert x.dtype == y.dtype
    np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_round_trip_survives_donation(tmp_path):
  ckpt = Checkpointer(tmp_path / "checkpoints", keep=2)
  state = _state(1)
  expected = jax.tree.map(np.array, state)
  assert ckpt.save(1, state, {"pos": 7})
  # The async save must not read buffers that the next step donates and overwrites.
  bump = jax.jit(lambda s: jax.tree.map(lambda x: x + 1, s), donate_argnums=0)
  state = bump(state)
  ckpt.wait()
  step, restored, data = Checkpointer(tmp_path / "checkpoints", keep=2).restore_latest(state)
  assert step == 1 and data == {"pos": 7}
  _assert_same(restored, expected)


def test_keep_and_existing_step(tmp_path):
  ckpt = Checkpointer(tmp_path / "ck", keep=2)
  for s in (1, 2, 3):
    assert ckpt.save(s, _state(s), {"s": s})
  assert not ckpt.save(3, _state(9), {"s": 9})
  ckpt.wait()
  assert ckpt.steps() == [2, 3]
  step, restored, data = ckpt.restore_latest(_state(0))
  assert (step, data) == (3, {"s": 3})
  _assert_same(restored, _state(3))


def test_nan_state_is_never_saved(tmp_path):
  ckpt = Checkpointer(tmp_path / "ck", keep=3)
  assert ckpt.save(1, _state(1), {})
  bad = _state(2)
  bad["params"]["w"] = bad["params"]["w"].at[0, 0].set(jnp.nan)
  assert not all_finite(bad)
  assert not ckpt.save(2, bad, {})
  ckpt.wait()
  assert ckpt.steps() == [1]


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_corrupt_latest_falls_back(tmp_path, caplog, damage):
  ckpt = Checkpointer(tmp_path / "ck", keep=3)
  for s in (1, 2):
    ckpt.save(s, _state(s), {"s": s})
  ckpt.wait()
  files = [p for p in (tmp_path / "ck" / "2" / "state").rglob("*") if p.is_file()]
  for p in files:
    if damage == "truncate":
      p.write_bytes(p.read_bytes()[: len(p.read_bytes()) // 3])
    else:
      p.unlink()
  with caplog.at_level(logging.WARNING):
    step, restored, data = Checkpointer(tmp_path / "ck", keep=3).restore_latest(_state(0))
  assert (step, data) == (1, {"s": 1})
  _assert_same(restored, _state(1))
  assert "step 2 is unreadable" in caplog.text
  assert (tmp_path / "ck.corrupt").exists() and not (tmp_path / "ck" / "2").exists()


def test_empty_directory(tmp_path):
  assert Checkpointer(tmp_path / "ck", keep=1).restore_latest(_state(0)) is None
