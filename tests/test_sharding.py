"""The mesh, the logical-axis rules, the mismatch errors and the expert-parallel dispatch."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax import hlo, presets, sharding
from k2jax.model import partitioning
from k2jax.model.dispatch import routed_experts
from k2jax.model.expert_parallel import expert_parallel_experts

MESHES = [(8, 1, 1, 1), (2, 4, 1, 1), (1, 2, 4, 1), (2, 1, 2, 2)]


def mesh_of(shape):
  return sharding.make_mesh(dict(zip(sharding.MESH_AXES, shape)))


def test_mesh_is_auto_and_fills_minus_one():
  mesh = sharding.make_mesh({"data": -1, "expert": 2})
  assert dict(mesh.shape) == {"data": 4, "fsdp": 1, "expert": 2, "tensor": 1}
  assert all(t == jax.sharding.AxisType.Auto for t in mesh.axis_types)
  assert dict(sharding.make_mesh({"tensor": 1}, jax.devices()[:1]).shape)["data"] == 1


@pytest.mark.parametrize("mesh_cfg, match", [
    ({"data": 2, "fsdp": 2}, r"config.mesh: data x fsdp x expert x tensor = 4 but there are 8"),
    ({"data": -1, "fsdp": -1}, r"only one axis may be -1"),
    ({"data": -1, "expert": 3}, r"config.mesh.data = -1: the other axes \(3 devices\)"),
    ({"pipeline": 2}, r"config.mesh: unknown axis 'pipeline'"),
    ({"fsdp": 0}, r"config.mesh.fsdp must be a positive integer or -1"),
])
def test_mesh_errors_name_the_field(mesh_cfg, match):
  with pytest.raises(ValueError, match=match):
    sharding.make_mesh(mesh_cfg)


@pytest.mark.parametrize("overrides, mesh_cfg, match", [
    ({"n_routed_experts": 12, "num_experts_per_tok": 2}, {"expert": 8},
     r"ModelConfig.n_routed_experts \(12\) is not divisible by mesh axis expert \(8\)"),
    ({"num_attention_heads": 6}, {"tensor": 4, "data": 2},
     r"ModelConfig.num_attention_heads \(6\) is not divisible by mesh axis tensor \(4\)"),
    ({"hidden_size": 132}, {"fsdp": 8},
     r"ModelConfig.hidden_size \(132\) is not divisible by mesh axis fsdp \(8\)"),
])
def test_config_mismatch_errors(overrides, mesh_cfg, match):
  cfg = presets.get("k2_nano", **overrides)
  with pytest.raises(ValueError, match=match):
    partitioning.variable_specs(cfg, sharding.make_mesh(mesh_cfg).shape)


def test_batch_mismatch_error():
  with pytest.raises(ValueError, match=r"global batch \(12\) is not divisible by mesh axes "
                     r"data x fsdp x expert \(8\)"):
    partitioning.check_config(presets.get("k2_nano"), {"data": 2, "fsdp": 2, "expert": 2}, 12)


def test_rules_give_the_documented_parameter_layout():
  cfg = presets.get("k2_nano")
  specs = partitioning.variable_specs(cfg, {"data": 1, "fsdp": 2, "expert": 2, "tensor": 2})
  p = specs["params"]
  assert p["embed"]["embedding"] == P("tensor", "fsdp")
  assert p["lm_head"]["kernel"] == P("fsdp", "tensor")
  assert p["moe_layers"]["moe"]["experts"]["gate"] == P(None, "expert", "fsdp", "tensor")
  assert p["moe_layers"]["moe"]["experts"]["down"] == P(None, "expert", "tensor", "fsdp")
  assert p["moe_layers"]["attn"]["q_a"]["kernel"] == P(None, "fsdp", None)  # q_lora: fsdp taken
  assert p["moe_layers"]["attn"]["q_b"]["kernel"] == P(None, "fsdp", "tensor")
  assert p["moe_layers"]["attn"]["o"]["kernel"] == P(None, "tensor", "fsdp")
  assert p["moe_layers"]["moe"]["router"]["kernel"] == P(None, "fsdp", None)
  assert p["dense_layers"]["mlp"]["down"]["kernel"] == P(None, "tensor", "fsdp")
  assert p["final_norm"]["scale"] == P(None)
  assert specs["router"]["moe_layers"]["moe"]["e_score_correction_bias"] == P(None, None)


def test_activation_specs_drop_axes_that_do_not_divide():
  shape = {"data": 2, "fsdp": 2, "expert": 2, "tensor": 1}
  assert sharding.logical_spec(("batch", "length", "act_embed"), (8, 5, 16), shape) == P(
      ("data", "fsdp", "expert"), None, None)
  assert sharding.logical_spec(("batch", "length"), (2, 5), shape) == P("data", None)
  assert sharding.logical_spec(("batch", "length"), (1, 5), shape) == P(None, None)
  with pytest.raises(ValueError, match=r"w: dimension 0 \(batch\) of size 2 is not divisible"):
    sharding.logical_spec(("batch",), (2,), shape, "w")


def test_tree_shardings_follow_parameter_paths():
  mesh = mesh_of((1, 2, 4, 1))
  params = {"a": jax.ShapeDtypeStruct((8, 4), jnp.float32),
            "b": jax.ShapeDtypeStruct((3,), jnp.float32)}
  ps = {"a": NamedSharding(mesh, P("fsdp", None)), "b": NamedSharding(mesh, P(None))}
  state = {"mu": params, "count": jax.ShapeDtypeStruct((), jnp.int32),
           "other": {"a": jax.ShapeDtypeStruct((2,), jnp.float32)}}
  out = sharding.tree_shardings(state, params, ps, mesh)
  assert out["mu"]["a"].spec == P("fsdp", None)
  assert out["count"].spec == P() and out["other"]["a"].spec == P()


def _expert_problem(T=64, D=16, F=8, E=8, K=2, seed=0):
  ks = jax.random.split(jax.random.key(seed), 6)
  idx = jnp.stack([jax.random.permutation(k, E)[:K] for k in jax.random.split(ks[1], T)])
  return (jax.random.normal(ks[0], (T, D)), idx, jax.random.uniform(ks[2], (T, K)),
          jax.random.normal(ks[3], (E, D, F)) * 0.3, jax.random.normal(ks[4], (E, D, F)) * 0.3,
          jax.random.normal(ks[5], (E, F, D)) * 0.3)


def _loss_and_grads(fn, x, idx, w, wg, wu, wd):
  def loss(x, w, wg, wu, wd):
    y, dropped = fn(x, idx, w, wg, wu, wd)
    return jnp.sum(y * jnp.sin(jnp.arange(y.shape[-1]))), (y, dropped)
  return jax.value_and_grad(loss, argnums=(0, 1, 2, 3, 4), has_aux=True)(x, w, wg, wu, wd)


@pytest.mark.parametrize("shape", MESHES)
def test_expert_parallel_dispatch_matches_single_device(shape):
  x, idx, w, wg, wu, wd = _expert_problem()
  plain = lambda *a: routed_experts(*a, dispatch="sort", block_size=4)
  (_, (y_ref, _)), g_ref = jax.jit(lambda *a: _loss_and_grads(plain, *a))(x, idx, w, wg, wu, wd)
  mesh = mesh_of(shape)
  put = lambda a, axes: jax.device_put(a, NamedSharding(
      mesh, sharding.logical_spec(axes, a.shape, mesh.shape)))
  args = (put(x, ("batch", None)), put(idx, ("batch", None)), put(w, ("batch", None)),
          put(wg, ("expert", "embed", "moe_mlp")), put(wu, ("expert", "embed", "moe_mlp")),
          put(wd, ("expert", "moe_mlp", "embed")))
  ep = lambda *a: expert_parallel_experts(*a, mesh=mesh, dispatch="sort", block_size=4)
  with jax.set_mesh(mesh):
    (_, (y, dropped)), g = jax.jit(lambda *a: _loss_and_grads(ep, *a))(*args)
  assert float(dropped) == 0.0
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  for a, b in zip(g, g_ref):
    np.testing.assert_allclose(a, b, rtol=1e-5, atol=2e-6)
  assert g[2].sharding.is_equivalent_to(args[3].sharding, 3)  # expert grads keep their layout


def test_expert_parallel_capacity_drops_what_overflows_each_destination():
  """Capacity C per (source device, destination shard); assignments beyond C in token order."""
  x, idx, w, wg, wu, wd = _expert_problem(T=32, E=8, K=2, seed=3)
  idx = idx.at[:12].set(jnp.array([0, 1]))  # pile the first tokens onto shard 0's experts
  mesh = sharding.make_mesh({"expert": 4}, jax.devices()[:4])
  cf = 1.0
  with jax.set_mesh(mesh):
    y, dropped = jax.jit(lambda *a: expert_parallel_experts(
        *a, mesh=mesh, dispatch="capacity", capacity_factor=cf, block_size=4))(
            x, idx, w, wg, wu, wd)
  # Reference: each device's 8 tokens x 2 assignments, C = ceil(1.0 * 16 / 4) = 4 per shard.
  keep = np.zeros(idx.shape, bool)
  idx_np = np.asarray(idx)
  for dev in range(4):
    used = np.zeros(4, int)
    for t in range(dev * 8, dev * 8 + 8):
      for k in range(2):
        s = idx_np[t, k] // 2
        keep[t, k] = used[s] < 4
        used[s] += 1
  np.testing.assert_allclose(float(dropped), 1 - keep.mean(), rtol=1e-6)
  w_kept = jnp.where(jnp.asarray(keep), w, 0.0)
  y_ref, _ = routed_experts(x, idx, w_kept, wg, wu, wd, dispatch="sort", block_size=4)
  np.testing.assert_allclose(y, y_ref, rtol=1e-5, atol=1e-6)
  assert 0 < float(dropped) < 1


@pytest.mark.parametrize("mesh_shape, shape, spec", [
    ((1, 2, 4, 1), (3, 16, 8, 8), P(None, "expert", "fsdp", None)),  # experts: fsdp a2a only
    ((1, 2, 4, 1), (3, 3, 8, 8), P(None, None, "fsdp", "expert")),  # both matrix dims split
    ((2, 2, 2, 1), (5, 8, 12), P(None, "fsdp", None)),  # replicated over data and expert
    ((8, 1, 1, 1), (7, 6, 10), P()),  # replicated everywhere: 7 matrices dealt to 8 devices
])
def test_sharded_newton_schulz_matches_and_does_each_matrix_once(mesh_shape, shape, spec):
  from k2jax.optim.muon import newton_schulz_layout, orthogonalize_sharded
  from k2jax.optim.newton_schulz import newton_schulz, newton_schulz_flops

  mesh = mesh_of(mesh_shape)
  u = jax.random.normal(jax.random.key(0), shape)
  sh = NamedSharding(mesh, spec)
  for dtype in (jnp.float32, jnp.bfloat16):
    fn = jax.jit(lambda x, dt=dtype: orthogonalize_sharded(x, sh, dtype=dt), in_shardings=sh,
                 out_shardings=sh)
    with jax.set_mesh(mesh):
      compiled = fn.lower(u).compile()
      out = compiled(jax.device_put(u, sh))
    want = newton_schulz(u, dtype=dtype)
    if dtype == jnp.bfloat16:  # each matrix alone, as on one device: bit for bit.
      np.testing.assert_array_equal(out, want)
    else:
      np.testing.assert_allclose(out, want, rtol=2e-5, atol=2e-6)
  # No device repeats another's matrices: its share is ceil(matrices / devices).
  lay = newton_schulz_layout(spec, shape, dict(mesh.shape))
  n = math.prod(shape[:-2])
  assert lay.per_device == -(-n // 8)
  flops = hlo.matmul_flops(compiled.as_text())
  assert flops == pytest.approx(lay.per_device * newton_schulz_flops(shape[-2:]), rel=1e-6)


def test_one_decoding_row_under_expert_sharding_moves_activations_not_weights():
  """One token cannot split over the batch axes: each device runs its own experts' share of it
  and a psum adds them (not GSPMD's all-reduce of every token's gathered expert weights)."""
  from k2jax.model import Transformer, init_variables
  from k2jax.model.transformer import init_cache

  cfg = presets.get("k2_nano", num_hidden_layers=3)
  variables = init_variables(cfg, 0)
  cache = init_cache(cfg, 1, 16)
  tokens_BT, positions_BT = jnp.array([[7]]), jnp.array([[3]])

  def logits(v, c, t, p):
    return Transformer(cfg).apply({**v, "cache": c}, t, p, decode=True, mutable=["cache"])[0][0]

  want = jax.jit(logits)(variables, cache, tokens_BT, positions_BT)
  mesh = mesh_of((1, 2, 2, 2))
  var_sh = partitioning.variable_shardings(cfg, mesh)
  with jax.set_mesh(mesh):
    compiled = jax.jit(logits).lower(jax.device_put(variables, var_sh), cache, tokens_BT,
                                     positions_BT).compile()
    got = compiled(jax.device_put(variables, var_sh), cache, tokens_BT, positions_BT)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  # All the step's all-reduces (attention over tensor, the head, the experts' psums of [1, D]).
  expert_bytes = 3 * cfg.hidden_size * cfg.moe_intermediate_size * 4
  moved = hlo.collective_bytes(compiled.as_text(), 8)["all-reduce"]
  assert moved < expert_bytes / 5, moved  # 10 KB here; 109 KB by the weight all-reduce
