"""The train state: everything a step reads and writes, and all a checkpoint holds but the data."""

from __future__ import annotations

import functools
from typing import Any

import flax.struct
import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax import sharding
from k2jax.config import ModelConfig
from k2jax.model import init_variables, partitioning


@flax.struct.dataclass
class TrainState:
  step: jax.Array  # int32 [], optimizer updates done.
  params: Any
  opt_state: Any
  router: Any  # the router collection: e_score_correction_bias [Lm, E], moved by the bias rule.
  rng: jax.Array  # uint32 [2], for sampling.


def _init(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
          variables: dict | None = None) -> TrainState:
  init_key, rng = jax.random.split(jax.random.PRNGKey(seed))
  if variables is None:
    variables = init_variables(model_cfg, init_key)
  return TrainState(step=jnp.zeros((), jnp.int32), params=variables["params"],
                    opt_state=tx.init(variables["params"]), router=variables.get("router", {}),
                    rng=rng)


def init_state(model_cfg: ModelConfig, tx: optax.GradientTransformation, seed: int,
               shardings: TrainState | None = None, variables: dict | None = None) -> TrainState:
  """Step 0: fresh variables from `seed` (or the given `variables` {"params", "router"}, e.g. a
  pretrained model's), and a fresh optimizer state for them.

  With `shardings` (`state_shardings`) every leaf is created in place on its devices, so no
  device ever holds the whole state; the values are the same on any mesh.
  """
  init = jax.jit(_init, static_argnums=(0, 1, 2), out_shardings=shardings)
  return init(model_cfg, tx, seed, variables)


def state_shardings(model_cfg: ModelConfig, tx: optax.GradientTransformation,
                    mesh: Mesh) -> TrainState:
  """NamedShardings of the train state on `mesh`: parameters and router bias by the logical-axis
  rules, every optimizer-state copy of a parameter like that parameter, the rest replicated."""
  abstract = jax.eval_shape(functools.partial(_init, model_cfg, tx, 0))
  variables = partitioning.variable_shardings(model_cfg, mesh)
  replicated = NamedSharding(mesh, P())
  return TrainState(
      step=replicated, params=variables["params"],
      opt_state=sharding.tree_shardings(abstract.opt_state, abstract.params,
                                        variables["params"], mesh),
      router=variables.get("router", {}), rng=replicated)
