"""The train state: everything a step reads and writes, and all a checkpoint holds but the data."""

from __future__ import annotations

from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax

from k2jax.config import ModelConfig
from k2jax.model import init_variables


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], optimizer updates done.
  params: Any
  opt_state: Any
  router: Any  # the router collection: e_score_correction_bias [Lm, E], moved by the bias rule.
  rng: jax.Array  # uint32 [2], for sampling.


def init_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int) -> TrainState:
  """Fresh variables from `seed`, the optimizer state, step 0."""
  init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
  variables = init_variables(model_cfg, init_key)
  params = variables["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params,
                    opt_state=jax.jit(tx.init)(params), router=variables.get("router", {}),
                    rng=rng)
