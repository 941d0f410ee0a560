"""k2jax.hlo on programs compiled for the 8 simulated CPU devices: FLOPs and collective bytes
counted with loop trip counts, against the exact numbers of the program."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax import hlo

L, B, D = 6, 64, 128


def _compiled_text(fn, args, in_specs, mesh):
  shardings = tuple(NamedSharding(mesh, s) for s in in_specs)
  return jax.jit(fn, in_shardings=shardings).lower(*args).compile().as_text()


def test_scan_of_matmuls_counts_every_trip():
  mesh = Mesh(np.array(jax.devices()[:4]), ("a",))

  def f(x_BD, w_LDD, e_EMK):
    def body(x, w):
      return jnp.tanh(x @ w), None
    y_BD = jax.lax.scan(body, x_BD, w_LDD)[0]
    return y_BD, jnp.einsum("emk,enk->emn", e_EMK, e_EMK)

  args = (jax.ShapeDtypeStruct((B, D), jnp.float32), jax.ShapeDtypeStruct((L, D, D), jnp.float32),
          jax.ShapeDtypeStruct((8, 32, 16), jnp.float32))
  text = _compiled_text(f, args, (P("a"), P(), P("a")), mesh)
  # Per device: L matmuls of [B/4, D] @ [D, D] and 8/4 products [32, 16] @ [16, 32].
  want = L * 2 * (B // 4) * D * D + 2 * 2 * 32 * 32 * 16
  assert hlo.matmul_flops(text) == pytest.approx(want, rel=1e-6)


def test_collectives_by_kind_with_trip_counts():
  mesh = Mesh(np.array(jax.devices()), ("a",))

  def f(x_BD, w_LDD):
    def body(x, w):  # w sharded on its rows: each layer gathers it (all-gather) inside the loop.
      w = jax.lax.with_sharding_constraint(w, NamedSharding(mesh, P()))
      return x @ w, None
    y_BD = jax.lax.scan(body, x_BD, w_LDD)[0]
    return jnp.sum(y_BD)  # batch-sharded rows: an all-reduce of one float.

  args = (jax.ShapeDtypeStruct((B, D), jnp.float32), jax.ShapeDtypeStruct((L, D, D), jnp.float32))
  text = _compiled_text(f, args, (P("a"), P(None, "a")), mesh)
  got = hlo.collective_bytes(text, 8)
  # Each trip gathers the [D, D] float32 layer from 8 shards: 7/8 of it arrives.
  assert got["all-gather"] == pytest.approx(L * D * D * 4 * 7 / 8)
  assert got["all-reduce"] == pytest.approx(4 * 2 * 7 / 8)
  assert got["all-to-all"] == got["reduce-scatter"] == got["collective-permute"] == 0


def test_trip_count_from_the_loop_condition_when_not_annotated():
  """The TPU compiler writes no known_trip_count: N comes from the condition `i < N`."""
  text = """HloModule m

%body (p: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %p = (s32[], f32[4,8]) parameter(0)
  %x = f32[4,8] get-tuple-element(%p), index=1
  %w = f32[8,8] constant({...})
  %d = f32[4,8] dot(%x, %w), lhs_contracting_dims={1}, rhs_contracting_dims={0}
  %i = s32[] get-tuple-element(%p), index=0
  ROOT %t = (s32[], f32[4,8]) tuple(%i, %d)
}

%cond (p.1: (s32[], f32[4,8])) -> pred[] {
  %p.1 = (s32[], f32[4,8]) parameter(0)
  %n = s32[] constant(7)
  %i.1 = s32[] get-tuple-element(%p.1), index=0
  ROOT %lt = pred[] compare(%i.1, %n), direction=LT
}

ENTRY %main (a: (s32[], f32[4,8])) -> (s32[], f32[4,8]) {
  %a = (s32[], f32[4,8]) parameter(0)
  ROOT %w.1 = (s32[], f32[4,8]) while(%a), condition=%cond, body=%body
}
"""
  assert hlo.matmul_flops(text) == 7 * 2 * 4 * 8 * 8


@pytest.mark.skipif(importlib.util.find_spec("libtpu") is None, reason="needs libtpu")
def test_tpu_grouped_matmul_kernels_are_counted():
  """On TPU, ragged_dot and its input gradient are grouped-matmul custom calls; its weight
  gradient is a dense masked product over every group (G times the FLOPs)."""
  from k2jax import aot

  devices, _ = aot.topology("v5p:2x2x1")
  mesh = Mesh(np.array(devices), ("a",))
  M, K, N, G = 512, 256, 384, 4

  def loss(x_MK, w_GKN, sizes_G):
    return jnp.sum(jax.lax.ragged_dot(x_MK, w_GKN, sizes_G, preferred_element_type=jnp.float32))

  args = (jax.ShapeDtypeStruct((M, K), jnp.bfloat16), jax.ShapeDtypeStruct((G, K, N), jnp.bfloat16),
          jax.ShapeDtypeStruct((G,), jnp.int32))
  text = _compiled_text(jax.value_and_grad(loss, argnums=(0, 1)), args, (P(), P(), P()), mesh)
  assert hlo.matmul_flops(text) == (2 + G) * 2 * M * K * N
