"""MuonClip training under four meshes = the single-device run; checkpoints move between meshes.

Five steps of the real train step (QK-Clip firing, router bias moving, gradient clipping) on 8
simulated devices against the unsharded run. Parameters are compared leaf by leaf in norm: a
few AdamW elements whose gradient is at rounding level flip the sign of their first update
(AdamW normalises each element), which an element-wise maximum would flag.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax import optim, presets, sharding
from k2jax.model import partitioning
from k2jax.train.checkpoint import Checkpointer
from k2jax.train.state import init_state, state_shardings
from k2jax.train.step import make_train_step

CFG = presets.get("k2_nano", num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                  moe_intermediate_size=32, n_routed_experts=8, num_experts_per_tok=2,
                  routed_scaling_factor=1.4, vocab_size=256, q_lora_rank=32, kv_lora_rank=32,
                  moe_block_size=8)
B, T, STEPS, TAU = 8, 8, 5, 0.05
BATCHES = [np.asarray(jax.random.randint(jax.random.key(i), (B, T + 1), 0, CFG.vocab_size))
           for i in range(STEPS)]
# make test-fast keeps the FSDP x expert mesh; the other three are `slow` (make test runs them).
MESHES = [pytest.param(s, marks=pytest.mark.slow) for s in [(8, 1, 1, 1), (2, 4, 1, 1)]] + [
    (1, 2, 4, 1), pytest.param((2, 1, 2, 2), marks=pytest.mark.slow)]


@functools.cache
def setup(shape=None):
  """(mesh or None, optimizer, state shardings or None, jitted step) for a mesh shape."""
  mesh = None if shape is None else sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))
  param_sh = None if mesh is None else partitioning.variable_shardings(CFG, mesh)["params"]
  tx = optim.muonclip(1e-2, model_config=CFG, qk_clip_tau=TAU, ns_dtype=jnp.float32,
                      param_shardings=param_sh)
  state_sh = None if mesh is None else state_shardings(CFG, tx, mesh)
  step = make_train_step(CFG, tx, lambda s: 1e-2, grad_clip=1.0, bias_update_rate=1e-3,
                         mesh=mesh, state_shardings=state_sh)
  return mesh, tx, state_sh, step


@functools.cache
def initial_state():
  return init_state(CFG, setup(None)[1], 0)


def fresh_state(shape=None):
  """The initial state laid out for `shape` (a copy: the step donates its input)."""
  state = jax.tree.map(jnp.copy, initial_state())  # device_put may alias device 0's shard
  state_sh = setup(shape)[2]
  return state if state_sh is None else jax.device_put(state, state_sh)


def run(shape, state, batches):
  """Trains on `batches`; returns (state, [loss], [clipped heads])."""
  mesh, _, _, step = setup(shape)
  losses, clipped = [], []
  with jax.set_mesh(mesh) if mesh is not None else _nothing():
    for b in batches:
      if mesh is not None:
        b = jax.device_put(b, sharding.batch_sharding(mesh))
      state, m = step(state, {"tokens": b})
      losses.append(float(m["loss"]))
      clipped.append(int(m["clipped_heads"]))
  return state, losses, clipped


class _nothing:
  def __enter__(self):
    return self

  def __exit__(self, *exc):
    return False


@functools.cache
def reference():
  return run(None, fresh_state(), BATCHES)


def assert_same_params(a, b, rtol=1e-5):
  for (path, x), y in zip(jax.tree_util.tree_leaves_with_path(a), jax.tree.leaves(b)):
    x, y = np.asarray(x, np.float64), np.asarray(y, np.float64)
    err = np.linalg.norm(x - y) / np.linalg.norm(y)
    assert err < rtol, (jax.tree_util.keystr(path), err)


@pytest.mark.parametrize("shape", MESHES)
def test_five_muonclip_steps_match_one_device(shape):
  ref_state, ref_losses, ref_clipped = reference()
  assert sum(ref_clipped) > 0, "QK-Clip should fire in this test"
  mesh, _, state_sh, _ = setup(shape)
  state, losses, clipped = run(shape, fresh_state(shape), BATCHES)
  np.testing.assert_allclose(losses, ref_losses, rtol=1e-5)
  assert clipped == ref_clipped
  assert_same_params(state.params, ref_state.params)
  assert_same_params(state.router, ref_state.router, rtol=1e-6)
  # Every parameter and every optimizer-state copy of it is laid out as the rules say.
  specs = partitioning.variable_specs(CFG, mesh.shape)["params"]
  for x, spec in zip(jax.tree.leaves(state.params),
                     jax.tree.leaves(specs, is_leaf=lambda s: isinstance(s, P))):
    assert x.sharding.is_equivalent_to(NamedSharding(mesh, spec), x.ndim)
  for x, sh in zip(jax.tree.leaves(state), jax.tree.leaves(state_sh)):
    assert x.sharding.is_equivalent_to(sh, x.ndim)
  if mesh.shape["expert"] > 1:
    gate = state.params["moe_layers"]["moe"]["experts"]["gate"]
    assert gate.sharding.spec[1] == "expert"


@pytest.mark.slow
def test_checkpoint_saved_on_one_mesh_restores_on_another_and_on_one_device(tmp_path):
  _, ref_losses, _ = reference()
  state, losses, _ = run((2, 4, 1, 1), fresh_state((2, 4, 1, 1)), BATCHES[:2])
  ckpt = Checkpointer(tmp_path / "checkpoints", keep=2, async_save=False)
  assert ckpt.save(2, state, {"position": 2})
  ckpt.wait()
  for shape in [(1, 2, 4, 1), None]:
    mesh, tx, state_sh, _ = setup(shape)
    # The restore target: a fresh state made in place on the new mesh (same values as unsharded).
    with jax.set_mesh(mesh) if mesh is not None else _nothing():
      target = init_state(CFG, tx, 0, shardings=state_sh)
    for x, y in zip(jax.tree.leaves(target), jax.tree.leaves(initial_state())):
      np.testing.assert_array_equal(x, y)
    step, restored, data = Checkpointer(tmp_path / "checkpoints", keep=2).restore_latest(target)
    assert step == 2 and data == {"position": 2}
    for x, y in zip(jax.tree.leaves(restored), jax.tree.leaves(target)):
      assert x.sharding.is_equivalent_to(y.sharding, x.ndim)
    _, more, _ = run(shape, restored, BATCHES[2:])
    np.testing.assert_allclose(losses + more, ref_losses, rtol=1e-5)
