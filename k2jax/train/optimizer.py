"""The optimizer of an experiment config, with its learning-rate schedule: one builder for the
train loop, exports and tests."""

from __future__ import annotations

import jax.numpy as jnp
import optax
from jax.sharding import Mesh

from k2jax import optim
from k2jax.config import ModelConfig
from k2jax.model import partitioning
from k2jax.train.schedules import make_schedule


def build_optimizer(config, model_cfg: ModelConfig, mesh: Mesh | None = None
                    ) -> tuple[optax.GradientTransformationExtraArgs, optax.Schedule]:
  """(tx, schedule) from config.optimizer and config.train.steps; QK-Clip only for muonclip.

  On a mesh that splits parameters (fsdp, expert or tensor > 1), Muon's Newton-Schulz runs
  sharded (Distributed Muon); on a data-parallel mesh the replicated matrices are batched.
  """
  o = config.optimizer
  schedule = make_schedule(o.schedule, o.lr, config.train.steps, o.warmup_steps,
                           o.decay_fraction, o.final_lr_fraction)
  splits = mesh is not None and any(mesh.shape[a] > 1 for a in ("fsdp", "expert", "tensor"))
  shardings = partitioning.variable_shardings(model_cfg, mesh)["params"] if splits else None
  if o.name == "muonclip":
    tx = optim.muonclip(schedule, weight_decay=o.weight_decay, qk_clip_tau=o.qk_clip_tau,
                        model_config=model_cfg, ns_dtype=jnp.dtype(o.ns_dtype),
                        param_shardings=shardings)
  elif o.name == "muon":
    tx = optim.muon(schedule, weight_decay=o.weight_decay, ns_dtype=jnp.dtype(o.ns_dtype),
                    param_shardings=shardings)
  else:
    tx = optim.adamw(schedule, weight_decay=o.weight_decay)
  return tx, schedule
