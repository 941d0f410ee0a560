"""Parameter counts from shapes alone (jax.eval_shape: nothing is allocated)."""

from __future__ import annotations

import math

import jax

from k2jax.config import ModelConfig
from k2jax.model.transformer import abstract_variables


def count_params(cfg: ModelConfig) -> dict[str, int]:
  """Total and activated parameters, with and without the embedding and LM head.

  Activated counts every weight a token touches: all but the (E - k) / E unused share of the
  routed experts. The router's correction bias is a buffer, not a parameter.
  """
  params = abstract_variables(cfg)["params"]
  sizes = {jax.tree_util.keystr(path): math.prod(leaf.shape)
           for path, leaf in jax.tree_util.tree_leaves_with_path(params)}
  total = sum(sizes.values())
  routed = sum(n for name, n in sizes.items() if "'experts'" in name)
  embed_head = sum(n for name, n in sizes.items() if "'embed'" in name or "'lm_head'" in name)
  inactive = routed * (cfg.n_routed_experts - cfg.num_experts_per_tok) // cfg.n_routed_experts
  return {
      "total": total,
      "activated": total - inactive,
      "total_no_embed": total - embed_head,
      "activated_no_embed": total - inactive - embed_head,
  }
