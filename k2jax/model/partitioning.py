"""The model's sharding policy: which config field each mesh axis splits, and the variables'
PartitionSpecs by `k2jax.sharding.RULES` (the mechanism lives there, the model-specific part here).

FIELD_AXES names the logical axis of every ModelConfig size that a parameter dimension carries;
the mesh axes that split it come from RULES alone, so each field is mapped to a mesh axis in one
place. `check_config` turns an uneven split into a one-line error naming the field and the axis.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax import sharding
from k2jax.config import ModelConfig
from k2jax.model.transformer import abstract_variables, logical_axes
from k2jax.paths import path_str

# ModelConfig field -> the logical axis of the parameter dimensions it sizes.
FIELD_AXES = (
    ("n_routed_experts", "expert"),
    ("num_attention_heads", "heads"),
    ("intermediate_size", "mlp"),
    ("moe_intermediate_size", "moe_mlp"),
    ("vocab_size", "vocab"),
    ("hidden_size", "embed"),
    ("kv_lora_rank", "kv_lora"),
    ("q_lora_rank", "q_lora"),
)


def check_config(cfg: ModelConfig, mesh_shape: Mapping[str, int],
                 global_batch: int | None = None) -> None:
  """One-line ValueError naming the field and the mesh axis for any size the mesh cannot split.

  `mesh_shape`: {axis: size}, e.g. `mesh.shape`.
  """
  rules = dict(sharding.RULES)
  for field, axis in FIELD_AXES:
    value = getattr(cfg, field)
    if value is None:  # q_lora_rank None: no q_a / q_b.
      continue
    axes = [a for a in rules[axis] if mesh_shape.get(a, 1) > 1]
    ways = math.prod(mesh_shape[a] for a in axes)
    if value % ways:
      raise ValueError(f"ModelConfig.{field} ({value}) is not divisible by mesh axis "
                       f"{'x'.join(axes)} ({ways})")
  if global_batch is not None:
    ways = math.prod(mesh_shape.get(a, 1) for a in sharding.BATCH_AXES)
    if global_batch % ways:
      raise ValueError(f"global batch ({global_batch}) is not divisible by mesh axes "
                       f"{' x '.join(sharding.BATCH_AXES)} ({ways})")


def variable_specs(cfg: ModelConfig, mesh_shape: Mapping[str, int]) -> dict:
  """PartitionSpecs of k2jax.Transformer(cfg)'s variables, by RULES (ValueError if uneven)."""
  check_config(cfg, mesh_shape)
  return jax.tree_util.tree_map_with_path(
      lambda path, axes, x: sharding.logical_spec(axes, x.shape, mesh_shape, path_str(path)),
      logical_axes(cfg), abstract_variables(cfg), is_leaf=lambda x: isinstance(x, tuple))


def variable_shardings(cfg: ModelConfig, mesh: Mesh) -> dict:
  """NamedShardings of the variables {"params", "router"}."""
  return jax.tree.map(lambda p: NamedSharding(mesh, p), variable_specs(cfg, mesh.shape),
                      is_leaf=lambda x: isinstance(x, P))
