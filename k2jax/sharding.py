"""Scale-out with jax.sharding: the mesh, the logical-axis rules and the shardings they give.

The mesh has four axes, (data, fsdp, expert, tensor), sized by `config.mesh` (one size may be -1:
the devices left over). It is built by `jax.make_mesh` with every axis `AxisType.Auto`, on purpose:
Auto is GSPMD, where XLA propagates shardings from the parameters, the batch and a few `constrain`
calls and inserts the collectives itself. JAX's default, Explicit, carries shardings in the array
types and wants an out_sharding on every op whose operands disagree (every FSDP matmul), which the
model code does not spell out. The one place that needs hand-placed collectives, the
expert-parallel dispatch, runs inside `jax.shard_map` (`k2jax.model.expert_parallel`).

RULES maps every logical axis name, of parameters (`k2jax.model.logical_axes`) and of activations,
to mesh axes. A dimension takes the mesh axes of its rule that are larger than 1 and not already
taken by an earlier dimension of the same array (so an expert weight [E, D, F] is (expert, fsdp,
tensor), and an activation's batch dimension is (data, fsdp, expert)). Parameters must divide
evenly (one-line ValueError naming the leaf or the config field); activations drop the mesh axes
their dimension does not divide (a one-token decode batch stays whole).

The expert axis also carries the batch: as in DeepSeek-V3 and K2, expert-parallel ranks are
data-parallel ranks for everything but the routed experts (otherwise all_to_all would exchange
copies of the same tokens). So the global batch divides by data x fsdp x expert.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence

import jax
import numpy as np
from jax.sharding import AxisType, Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

MESH_AXES = ("data", "fsdp", "expert", "tensor")
BATCH_AXES = ("data", "fsdp", "expert")

# logical axis   mesh axes                    what it shards
RULES: tuple[tuple[str, tuple[str, ...]], ...] = (
    ("batch",     BATCH_AXES),                # activations: sequences of the batch
    ("length",    ()),                        # activations: positions (no sequence parallelism)
    ("act_embed", ()),                        # activations: the residual stream's width
    ("embed",     ("fsdp",)),                 # parameters: the model width (FSDP / ZeRO-3)
    ("q_lora",    ("fsdp",)),                 # q_b's input (q_a's output takes fsdp from embed)
    ("kv_lora",   ("fsdp",)),                 # kv_b's input
    ("heads",     ("tensor",)),               # attention heads (parameters and activations)
    ("mlp",       ("tensor",)),               # dense FFN and shared-expert width
    ("moe_mlp",   ("tensor",)),               # routed-expert width
    ("vocab",     ("tensor",)),               # embedding rows, LM head columns, logits
    ("expert",    ("expert",)),               # routed experts (expert-parallel dispatch)
    ("router",    ()),                        # router columns: every token scores every expert
    ("norm",      ()),
    ("layers",    ()),                        # the scanned-layers axis
)
_RULES = dict(RULES)


def mesh_sizes(mesh_cfg: Mapping[str, int], num_devices: int) -> dict[str, int]:
  """{axis: size} with a -1 resolved; ValueError naming the field unless the product = devices."""
  unknown = sorted(set(mesh_cfg) - set(MESH_AXES))
  if unknown:
    raise ValueError(f"config.mesh: unknown axis {unknown[0]!r} (axes: {', '.join(MESH_AXES)})")
  sizes = {a: mesh_cfg.get(a, 1) for a in MESH_AXES}
  for a, v in sizes.items():
    if isinstance(v, bool) or not isinstance(v, (int, np.integer)) or (v < 1 and v != -1):
      raise ValueError(f"config.mesh.{a} must be a positive integer or -1, got {v!r}")
  fill = [a for a, v in sizes.items() if v == -1]
  if len(fill) > 1:
    raise ValueError(f"config.mesh: only one axis may be -1, got {', '.join(fill)}")
  fixed = math.prod(v for v in sizes.values() if v != -1)
  if fill:
    if num_devices % fixed:
      raise ValueError(f"config.mesh.{fill[0]} = -1: the other axes ({fixed} devices) do not "
                       f"divide the {num_devices} devices")
    sizes[fill[0]] = num_devices // fixed
  elif fixed != num_devices:
    raise ValueError(f"config.mesh: data x fsdp x expert x tensor = {fixed} but there are "
                     f"{num_devices} devices")
  return {a: int(v) for a, v in sizes.items()}


def make_mesh(mesh_cfg: Mapping[str, int], devices: Sequence[jax.Device] | None = None) -> Mesh:
  """The (data, fsdp, expert, tensor) mesh over `devices` (default: all), every axis Auto."""
  devices = jax.devices() if devices is None else list(devices)
  sizes = mesh_sizes(mesh_cfg, len(devices))
  return jax.make_mesh(tuple(sizes.values()), MESH_AXES,
                       axis_types=(AxisType.Auto,) * len(MESH_AXES), devices=devices)


def logical_spec(axes: Sequence[str | None], shape: Sequence[int], mesh_shape: Mapping[str, int],
                 what: str | None = None) -> P:
  """PartitionSpec of an array with logical `axes` by RULES.

  With `what` (a name for the error), a dimension its mesh axes do not divide raises ValueError;
  without, those mesh axes are dropped from that dimension.
  """
  if len(axes) != len(shape):
    raise ValueError(f"{what or 'array'}: {len(axes)} logical axes {tuple(axes)} for shape "
                     f"{tuple(shape)}")
  used: set[str] = set()
  spec = []
  for dim, (name, size) in enumerate(zip(axes, shape)):
    if name is not None and name not in _RULES:
      raise ValueError(f"{what or 'array'}: logical axis {name!r} has no sharding rule "
                       f"(known: {', '.join(_RULES)})")
    mesh_axes = [a for a in _RULES.get(name, ()) if mesh_shape.get(a, 1) > 1 and a not in used]
    ways = math.prod(mesh_shape[a] for a in mesh_axes)
    if size % ways:
      if what is not None:
        raise ValueError(f"{what}: dimension {dim} ({name}) of size {size} is not divisible by "
                         f"mesh axes {'x'.join(mesh_axes)} = {ways}")
      mesh_axes = _dividing_prefix(mesh_axes, size, mesh_shape)
    used.update(mesh_axes)
    spec.append(None if not mesh_axes else mesh_axes[0] if len(mesh_axes) == 1
                else tuple(mesh_axes))
  return P(*spec)


def _dividing_prefix(mesh_axes: list[str], size: int, mesh_shape: Mapping[str, int]) -> list[str]:
  kept, ways = [], 1
  for a in mesh_axes:
    if size % (ways * mesh_shape[a]) == 0:
      kept.append(a)
      ways *= mesh_shape[a]
  return kept


def batch_sharding(mesh: Mesh) -> NamedSharding:
  """Leading (batch) dimension over data x fsdp x expert, the rest whole."""
  return NamedSharding(mesh, P(BATCH_AXES))


def tree_shardings(abstract_tree, params, param_shardings, mesh: Mesh):
  """Shardings for a tree holding copies of the parameters (optimizer or train state).

  A leaf whose key path ends with a parameter's path and has its shape takes that parameter's
  sharding (momentum, Adam moments, gradients); every other leaf is replicated.
  """
  by_path = {}
  for (path, x), sh in zip(jax.tree_util.tree_leaves_with_path(params), jax.tree.leaves(
      param_shardings, is_leaf=lambda s: isinstance(s, NamedSharding))):
    by_path[tuple(path)] = (tuple(x.shape), sh)
  longest = max((len(k) for k in by_path), default=0)
  replicated = NamedSharding(mesh, P())

  def pick(path, leaf):
    keys = tuple(path)
    for n in range(min(longest, len(keys)), 0, -1):
      shape, sh = by_path.get(keys[-n:], (None, None))
      if sh is not None and shape == tuple(np.shape(leaf)):
        return sh
    return replicated

  return jax.tree_util.tree_map_with_path(pick, abstract_tree)


def context_mesh():
  """The k2jax mesh set by `jax.set_mesh` (or `use_abstract_mesh`), or None: none is set, it
  lacks k2jax's axes, or we are inside a shard_map (an axis is Manual)."""
  mesh = jax.sharding.get_abstract_mesh()
  if (mesh.empty or not set(MESH_AXES) <= set(mesh.axis_names)
      or any(t == AxisType.Manual for t in mesh.axis_types)):
    return None
  return mesh


def constrain(x: jax.Array, axes: Sequence[str | None]) -> jax.Array:
  """with_sharding_constraint by RULES when a k2jax mesh is set (`context_mesh`); else x."""
  mesh = context_mesh()
  if mesh is None:
    return x
  return jax.lax.with_sharding_constraint(x, logical_spec(axes, x.shape, mesh.shape))


def per_device_bytes(abstract_tree, shardings) -> int:
  """Bytes one device holds of a tree of ShapeDtypeStructs under `shardings` (the largest shard)."""
  total = 0
  for x, sh in zip(jax.tree.leaves(abstract_tree), jax.tree.leaves(
      shardings, is_leaf=lambda s: isinstance(s, NamedSharding))):
    total += math.prod(sh.shard_shape(x.shape)) * np.dtype(x.dtype).itemsize
  return total
