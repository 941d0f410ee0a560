"""The real sharded train step compiled for a TPU slice on this host (see k2jax.aot).

`train_step_report(cfg, tx, mesh, chip, label, batch_size=, seq_len=)` builds the abstract train
state (`init_state` under `jax.eval_shape`: no parameter is allocated) and batch, and compiles
`make_train_step` (forward, backward, the optimizer with QK-Clip, the router bias update) for
the mesh's compile-only devices.
"""

from __future__ import annotations

import math
from collections.abc import Mapping

import jax
import jax.numpy as jnp
from jax.sharding import Mesh

from k2jax import sharding
from k2jax.aot import Chip, Report, compile_report
from k2jax.config import ModelConfig
from k2jax.flops import activated_matmul_params, attention_flops_per_token, flops_per_token
from k2jax.model import expert_parallel, partitioning
from k2jax.plan import memory_plan, newton_schulz_flops_per_device
from k2jax.train.state import init_state, state_shardings
from k2jax.train.step import make_train_step


def train_step_report(cfg: ModelConfig, tx, mesh: Mesh, chip: Chip, topology_label: str, *,
                      batch_size: int, seq_len: int, muon: bool = True, early: bool = False,
                      **step_kwargs) -> Report:
  """The step for `batch_size` sequences of `seq_len` tokens, compiled for `mesh`.

  `tx` should be built with the mesh's `param_shardings` (`muon`: whether it runs
  Newton-Schulz); `early`: see `k2jax.aot.compile_report`; `step_kwargs` go to
  `make_train_step` (loss_weights, grad_accum, grad_clip, bias_update_rate, ...).
  """
  partitioning.check_config(cfg, mesh.shape, batch_size)
  state = jax.eval_shape(lambda: init_state(cfg, tx, 0))
  shardings = state_shardings(cfg, tx, mesh)
  step = make_train_step(cfg, tx, lambda s: 0.0, mesh=mesh, state_shardings=shardings,
                         **step_kwargs)
  batch = {"tokens": jax.ShapeDtypeStruct((batch_size, seq_len + 1), jnp.int32)}
  tokens = batch_size * seq_len
  report = compile_report("train step", step, (state, batch), mesh, chip, topology_label, tokens,
                          flops_per_token(cfg, seq_len) * tokens,
                          train_extra_flops(cfg, mesh.shape, tokens, seq_len, muon=muon),
                          early=early)
  plan = memory_plan(cfg, mesh.shape, batch_size // step_kwargs.get("grad_accum", 1), seq_len,
                     "muonclip" if muon else "adamw", step_kwargs.get("grad_accum", 1))
  batch_bytes = batch_size * (seq_len + 1) * 4 // math.prod(
      mesh.shape[a] for a in sharding.BATCH_AXES)
  report.planned = {"argument": plan.params + plan.optimizer + batch_bytes,
                    "temp": plan.gradients + plan.activations + plan.transient}
  return report


def train_extra_flops(cfg: ModelConfig, mesh_shape: Mapping[str, int], tokens: int, seq_len: int,
                      muon: bool = True) -> dict[str, float]:
  """Per chip, the train step's work outside `flops_per_token`: the causal mask's skipped half
  of q.k and p.v (the model computes every pair), the routed experts' padding rows (the
  dispatch's buffers, `expert_parallel.routed_rows`), remat "full"'s second forward of the
  layers, and Muon's Newton-Schulz (`plan.newton_schulz_flops_per_device`)."""
  chips = math.prod(mesh_shape.values())
  batch_ways = math.prod(mesh_shape.get(a, 1) for a in sharding.BATCH_AXES)
  remat = 4 / 3 if cfg.remat == "full" else 1.0  # forward again: 2 of the 6 FLOPs per weight.
  attention = attention_flops_per_token(cfg, seq_len)  # causal: half of the pairs.
  extra = {"unmasked attention": attention * remat * tokens / chips}
  assignments = tokens // batch_ways * cfg.num_experts_per_tok
  rows = expert_parallel.routed_rows(assignments, cfg.n_routed_experts,
                                     mesh_shape.get("expert", 1), cfg.moe_dispatch,
                                     cfg.capacity_factor, cfg.moe_block_size)
  expert_flops = 6 * 3 * cfg.hidden_size * cfg.moe_intermediate_size * cfg.num_moe_layers
  extra["expert padding"] = ((rows - assignments) * expert_flops * remat
                             / mesh_shape.get("tensor", 1))
  if cfg.remat == "full":
    head = cfg.hidden_size * cfg.vocab_size
    forward = 2 * (activated_matmul_params(cfg) - head) + attention / 3
    extra["remat forward"] = forward * tokens / chips
  if muon:
    extra["Newton-Schulz"] = newton_schulz_flops_per_device(cfg, mesh_shape)
  return extra
