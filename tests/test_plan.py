"""The analytic memory plan: K2's sharded states by hand, and XLA's compiled memory analysis."""

import math

import jax
import jax.numpy as jnp
import pytest

from k2jax import optim, presets, sharding
from k2jax.model import partitioning
from k2jax.model.counting import count_params
from k2jax.plan import GB, memory_plan
from k2jax.train.state import init_state, state_shardings
from k2jax.train.step import make_train_step


def test_k2_states_on_256_devices_match_a_hand_count():
  cfg = presets.get("kimi_k2", remat="full", dtype="bfloat16", moe_dispatch="capacity")
  p = memory_plan(cfg, {"fsdp": 16, "expert": 16}, micro_batch=256, seq_len=4096)
  routed = cfg.num_moe_layers * cfg.n_routed_experts * 3 * cfg.hidden_size * (
      cfg.moe_intermediate_size)
  rest = count_params(cfg)["total"] - routed
  # Experts split 256 ways (expert x fsdp), everything else 16 ways (fsdp; norms are tiny).
  want = (routed / 256 + rest / 16) * 4
  assert p.params == pytest.approx(want, rel=2e-3)
  assert p.gradients == pytest.approx(want, rel=2e-3)
  embed_head = 2 * cfg.vocab_size * cfg.hidden_size / 16 * 4  # AdamW's second moment on top
  assert p.optimizer == pytest.approx(want + embed_head, rel=2e-3)
  assert p.sequences_per_device == 1
  assert 50 * GB < p.states < 60 * GB
  assert p.fits(141 * GB) and not p.fits(80 * GB)
  # More FSDP ways shrink the states in proportion; activations do not move.
  q = memory_plan(cfg, {"fsdp": 64, "expert": 16}, micro_batch=1024, seq_len=4096)
  assert q.states == pytest.approx(p.states / 4, rel=1e-2)
  assert q.activations == p.activations


def test_plan_errors_name_the_mismatch():
  cfg = presets.get("k2_nano")
  with pytest.raises(ValueError, match=r"global batch \(6\) is not divisible by mesh axes "
                     r"data x fsdp x expert \(8\)"):
    memory_plan(cfg, {"fsdp": 2, "expert": 4}, micro_batch=6, seq_len=64)
  with pytest.raises(ValueError, match=r"ModelConfig.n_routed_experts \(16\) is not divisible by "
                     r"mesh axis expert \(32\)"):
    memory_plan(cfg, {"expert": 32}, micro_batch=32, seq_len=64)


@pytest.mark.slow
@pytest.mark.parametrize("mesh_shape, remat", [((1, 2, 4, 1), "full"), ((2, 1, 2, 2), "none")])
def test_plan_matches_xla_memory_analysis(mesh_shape, remat):
  """The real train step at reduced depth, compiled on the simulated 8-device mesh."""
  cfg = presets.get("k2_nano", num_hidden_layers=3, remat=remat)
  B, T = 16, 64
  mesh = sharding.make_mesh(dict(zip(sharding.MESH_AXES, mesh_shape)))
  param_sh = partitioning.variable_shardings(cfg, mesh)["params"]
  tx = optim.muonclip(1e-3, model_config=cfg, param_shardings=param_sh)
  state = jax.eval_shape(lambda: init_state(cfg, tx, 0))
  state_sh = state_shardings(cfg, tx, mesh)
  step = make_train_step(cfg, tx, lambda s: 1e-3, mesh=mesh, state_shardings=state_sh)
  with jax.set_mesh(mesh):
    mem = step.lower(state, {"tokens": jax.ShapeDtypeStruct((B, T + 1), jnp.int32)}).compile(
        ).memory_analysis()
  plan = memory_plan(cfg, mesh.shape, micro_batch=B, seq_len=T)
  batch_bytes = B * (T + 1) * 4 // math.prod(mesh.shape[a] for a in sharding.BATCH_AXES)
  # Arguments: exactly the sharded parameters and optimizer state (+ batch, step, rng, metrics).
  assert mem.argument_size_in_bytes == pytest.approx(
      plan.params + plan.optimizer + batch_bytes, rel=0.02)
  # Temporaries: gradients, activations and the transient buffers, within the model's accuracy.
  ratio = (plan.gradients + plan.activations + plan.transient) / mem.temp_size_in_bytes
  assert 0.6 < ratio < 1.3, (ratio, plan, mem.temp_size_in_bytes)
