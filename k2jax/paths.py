"""Names of pytree leaves: the '/'-joined key path every k2jax module matches rules against."""

from __future__ import annotations

import jax


def path_str(path) -> str:
  """'/'-joined names of a jax key path, e.g. 'moe_layers/attn/q_b/kernel'."""
  parts = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      parts.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      parts.append(key.name)
    elif isinstance(key, jax.tree_util.SequenceKey):
      parts.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      parts.append(str(key.key))
    else:
      parts.append(str(key))
  return "/".join(parts)
