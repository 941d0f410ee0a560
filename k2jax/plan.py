"""Per-device memory of a training step, analytically, and whether it fits a device.

`memory_plan(cfg, mesh_shape, micro_batch, seq_len)` adds up, per device:
- params, optimizer state, gradients: from the variables' shapes and the sharding rules
  (k2jax.sharding.RULES), so exact for k2jax's layout. Muon keeps one momentum buffer per matrix,
  AdamW two moments (both in the parameter dtype); gradients are float32 (the train step casts
  them), twice with gradient accumulation (the running sum and the micro-batch's).
- activations: what the backward pass keeps, float32 between matmuls as the model computes:
  per layer the norms' inputs and outputs, every projection's output, q and k after RoPE, the
  attention logits and probabilities [b, H, T, T] (no flash attention here), the router's logits
  and scores, the routed rows and their gate|up outputs (padded as the dispatch pads them), the
  shared expert's and dense FFN's hidden; plus the LM head's logits and their gradient. With
  remat "full" a layer keeps only its input and one layer at a time is rebuilt; its cotangents
  double that layer's share.
- transient: one layer's weights gathered over the FSDP axes (and their float32 gradient before
  the reduce-scatter), or Newton-Schulz's work space (four float32 copies of the largest chunk
  of whole matrices a device orthogonalises at once), whichever is larger.
Cross-checked against XLA's compiled memory analysis in tests/test_plan.py (XLA:CPU) and
tests/test_aot.py (the TPU compiler; k2jax.train.aot prints both for any config).
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Mapping

import jax
import numpy as np

from k2jax import sharding
from k2jax.config import ModelConfig
from k2jax.model import abstract_variables, expert_parallel, partitioning
from k2jax.optim.muon import newton_schulz_layout
from k2jax.optim.newton_schulz import newton_schulz_flops
from k2jax.optim.roles import param_roles

GB = 1e9
DEVICES = {"A100/H800 80GB": 80 * GB, "H200 141GB": 141 * GB}
F32 = 4


@dataclasses.dataclass(frozen=True)
class MemoryPlan:
  """Bytes per device of one training step."""

  mesh: dict[str, int]
  sequences_per_device: int
  params: int
  optimizer: int
  gradients: int
  activations: int
  transient: int

  @property
  def states(self) -> int:
    """Parameters, optimizer state and gradients: what ZeRO-style sharding splits."""
    return self.params + self.optimizer + self.gradients

  @property
  def total(self) -> int:
    return self.states + self.activations + self.transient

  def fits(self, device_bytes: float) -> bool:
    return self.total <= device_bytes


def _leaf_ways(spec, mesh_shape) -> int:
  axes = [a for e in spec if e is not None for a in ((e,) if isinstance(e, str) else e)]
  return math.prod(mesh_shape[a] for a in axes)


def memory_plan(cfg: ModelConfig, mesh_shape: Mapping[str, int], micro_batch: int, seq_len: int,
                optimizer: str = "muonclip", grad_accum: int = 1) -> MemoryPlan:
  """The plan for `micro_batch` sequences of `seq_len` per micro-step over the whole mesh."""
  mesh = {a: int(mesh_shape.get(a, 1)) for a in sharding.MESH_AXES}
  if optimizer not in ("muonclip", "muon", "adamw"):
    raise ValueError(f"optimizer must be muonclip, muon or adamw, got {optimizer!r}")
  partitioning.check_config(cfg, mesh, micro_batch)
  variables = abstract_variables(cfg)
  specs = partitioning.variable_specs(cfg, mesh)
  params, pspecs = variables["params"], specs["params"]
  roles = jax.tree.leaves(param_roles(params))
  leaves = jax.tree.leaves(params)
  spec_leaves = jax.tree.leaves(pspecs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec))
  local = [x.size // _leaf_ways(s, mesh) for x, s in zip(leaves, spec_leaves)]
  pbytes = np.dtype(cfg.param_dtype).itemsize
  router = variables.get("router", {})  # none without MoE layers
  router_bytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(router))
  param_bytes = sum(local) * pbytes + router_bytes
  copies = {"muon": 2 if optimizer == "adamw" else 1, "adamw": 2, "frozen": 0}
  opt_bytes = sum(n * copies[r] for n, r in zip(local, roles)) * pbytes
  grad_bytes = sum(local) * F32 * (2 if grad_accum > 1 else 1)

  b = micro_batch // math.prod(mesh[a] for a in sharding.BATCH_AXES)
  act = _activation_bytes(cfg, mesh, b, seq_len)
  gathered = _layer_gather_bytes(cfg, mesh, leaves, spec_leaves, pbytes)
  ns = 0 if optimizer == "adamw" else max(
      (_newton_schulz_bytes(x.shape, s, mesh) for x, s, r in zip(leaves, spec_leaves, roles)
       if r == "muon"), default=0)
  return MemoryPlan(mesh=mesh, sequences_per_device=b, params=param_bytes, optimizer=opt_bytes,
                    gradients=grad_bytes, activations=act, transient=max(gathered, ns))


def _newton_schulz_bytes(shape, spec, mesh) -> int:
  """Four float32 copies of one chunk of Newton-Schulz's matrices on a device
  (k2jax.optim.muon.orthogonalize_sharded)."""
  return 4 * F32 * newton_schulz_layout(spec, shape, mesh).per_chunk * shape[-2] * shape[-1]


def newton_schulz_flops_per_device(cfg: ModelConfig, mesh_shape: Mapping[str, int]) -> float:
  """Newton-Schulz FLOPs one device runs per Muon update on `mesh_shape`: its share of the
  matrices (`NewtonSchulzLayout.per_device`, zero padding included)."""
  mesh = {a: int(mesh_shape.get(a, 1)) for a in sharding.MESH_AXES}
  params = abstract_variables(cfg)["params"]
  specs = partitioning.variable_specs(cfg, mesh)["params"]
  total = 0.0
  for x, s, r in zip(jax.tree.leaves(params), jax.tree.leaves(
      specs, is_leaf=lambda x: isinstance(x, jax.sharding.PartitionSpec)),
                     jax.tree.leaves(param_roles(params))):
    if r == "muon":
      total += (newton_schulz_layout(s, x.shape, mesh).per_device
                * newton_schulz_flops(x.shape[-2:]))
  return total


def _layer_gather_bytes(cfg, mesh, leaves, spec_leaves, pbytes) -> int:
  """One layer's weights with the fsdp axis gathered, plus their float32 gradient."""
  fsdp = mesh["fsdp"]
  per_stack: dict[int, int] = {}
  for x, s in zip(leaves, spec_leaves):
    if x.ndim < 3:  # embedding / head / final norm: whole-model leaves, not per layer.
      continue
    per_stack[x.shape[0]] = per_stack.get(x.shape[0], 0) + (
        x.size // x.shape[0] * fsdp // _leaf_ways(s, mesh))
  return max(per_stack.values(), default=0) * (pbytes + F32)


def _activation_bytes(cfg: ModelConfig, mesh: dict[str, int], b: int, T: int) -> int:
  """Saved-for-backward activations per device, plus one layer's cotangents (see module doc)."""
  n = b * T
  tp, ep = mesh["tensor"], mesh["expert"]
  D, H = cfg.hidden_size, cfg.num_attention_heads // tp
  dn, dr, dv, C = cfg.qk_nope_head_dim, cfg.qk_rope_head_dim, cfg.v_head_dim, cfg.kv_lora_rank
  dq = dn + dr
  q_lora = 2 * cfg.q_lora_rank if cfg.q_lora_rank else 0
  attn = n * (2 * D + q_lora + H * dq + (C + dr) + C + H * (dn + dv) + 2 * H * dq + H * dv + D)
  attn += 2 * b * H * T * T
  dense = n * (2 * D + 3 * cfg.intermediate_size // tp)
  K, E, F = cfg.num_experts_per_tok, cfg.n_routed_experts, cfg.moe_intermediate_size // tp
  rows = expert_parallel.routed_rows(n * K, E, ep, cfg.moe_dispatch, cfg.capacity_factor,
                                     cfg.moe_block_size)
  moe = (n * (2 * D + 2 * E + 3 * cfg.n_shared_experts * cfg.moe_intermediate_size // tp)
         + rows * (D + 2 * F) + n * K * D)
  layers = [attn + dense] * cfg.num_dense_layers + [attn + moe] * cfg.num_moe_layers
  if not layers:
    return 0
  if cfg.remat == "full":
    saved = len(layers) * n * D + max(layers)
  else:  # "none"; "dots" saves the matmul outputs, most of the same set.
    saved = sum(layers)
  head = 2 * n * cfg.vocab_size // tp + 2 * n * D
  return (saved + max(layers) + head) * F32


def format_plan(p: MemoryPlan) -> str:
  """One line: mesh, tokens, GB per category, total and fit per device kind."""
  mesh = "x".join(f"{p.mesh[a]}" for a in sharding.MESH_AXES)
  fits = ", ".join(f"{name}: {'fits' if p.fits(cap) else 'NO'}" for name, cap in DEVICES.items())
  return (f"mesh {mesh:>12} | {p.sequences_per_device} seq/dev | params {p.params / GB:6.1f} | "
          f"opt {p.optimizer / GB:6.1f} | grads {p.gradients / GB:6.1f} | "
          f"act {p.activations / GB:6.1f} | transient {p.transient / GB:5.1f} | "
          f"total {p.total / GB:6.1f} GB | {fits}")
