"""DeepSeekMoE: sigmoid router with bias-corrected (group-limited) top-k, routed + shared experts.

Selection uses scores + e_score_correction_bias; the weights are the UNBIASED scores of the chosen
experts, renormalised and times routed_scaling_factor (DeepSeek-V3's "noaux_tc"). The bias lives
in the `router` variable collection, is never trained by gradient, and is moved between steps by
`update_router_bias` (auxiliary-loss-free balancing).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax import sharding
from k2jax.config import ModelConfig
from k2jax.model import expert_parallel
from k2jax.model.dispatch import routed_experts
from k2jax.model.layers import MLP, Dense, matmul, normal_init


def select_experts(scores_TE: jnp.ndarray, bias_E: jnp.ndarray, cfg: ModelConfig):
  """Returns (expert indices [T, k], combine weights [T, k]) — the noaux_tc router."""
  T, E = scores_TE.shape
  choice_TE = scores_TE + bias_E
  if cfg.n_group > 1:
    grouped_TGe = choice_TE.reshape(T, cfg.n_group, E // cfg.n_group)
    group_scores_TG = jax.lax.top_k(grouped_TGe, 2)[0].sum(-1)
    _, keep_TK = jax.lax.top_k(group_scores_TG, cfg.topk_group)
    group_mask_TG = jnp.zeros((T, cfg.n_group), bool).at[jnp.arange(T)[:, None], keep_TK].set(True)
    expert_mask_TE = jnp.repeat(group_mask_TG, E // cfg.n_group, axis=1)
    choice_TE = jnp.where(expert_mask_TE, choice_TE, -jnp.inf)
  _, idx_TK = jax.lax.top_k(choice_TE, cfg.num_experts_per_tok)
  w_TK = jnp.take_along_axis(scores_TE, idx_TK, axis=-1)
  if cfg.norm_topk_prob:
    w_TK = w_TK / (w_TK.sum(-1, keepdims=True) + 1e-20)
  return idx_TK, w_TK * cfg.routed_scaling_factor


def balance_loss(scores_BSE: jnp.ndarray, idx_BSK: jnp.ndarray, valid_BS: jnp.ndarray,
                 cfg: ModelConfig) -> jnp.ndarray:
  """Sequence-wise balance loss sum_i f_i P_i of each sequence [B] (DS-V3), before its weight.

  f_i = E / (k S) * (tokens of the sequence routed to i), P_i = mean over the sequence of
  s_i / sum_j s_j, both over its `valid` (non-padding) tokens, S of them.
  """
  B, S, E = scores_BSE.shape
  k = cfg.num_experts_per_tok
  counts_BE = jax.vmap(lambda idx, v: jnp.zeros(E).at[idx.reshape(-1)].add(
      jnp.repeat(v, k)))(idx_BSK, valid_BS)
  tokens_B1 = jnp.maximum(jnp.sum(valid_BS, axis=1, keepdims=True), 1.0)
  f_BE = counts_BE * E / (k * tokens_B1)
  p_BE = jnp.sum(scores_BSE / scores_BSE.sum(-1, keepdims=True) * valid_BS[..., None],
                 axis=1) / tokens_B1
  return jnp.sum(f_BE * p_BE, axis=-1)


def update_router_bias(bias_LE: jnp.ndarray, load_LE: jnp.ndarray, rate: float,
                       centered: bool = False) -> jnp.ndarray:
  """Auxiliary-loss-free balancing: b += rate * sign(mean load - load) (DS-V3).

  `centered` is Moonlight's variant, which subtracts the mean sign so the biases keep a zero mean.
  """
  sign_LE = jnp.sign(jnp.mean(load_LE, axis=-1, keepdims=True) - load_LE)
  if centered:
    sign_LE = sign_LE - jnp.mean(sign_LE, axis=-1, keepdims=True)
  return bias_LE + rate * sign_LE


def gathered_experts(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD, dtype) -> jnp.ndarray:
  """Each token through the gathered weights of its own K experts (float32 out).

  Reads K experts per token rather than all E: the decoding path, where T*K <= E. x is
  broadcast over the K experts so that every matmul is batched over (token, expert) with the
  gathered weights in their stored [in, out] layout (no transposed copy of them).
  """
  x_TKD = jnp.broadcast_to(x_TD[:, None], idx_TK.shape + x_TD.shape[-1:])
  h_TKF = (jax.nn.silu(matmul("tkd,tkdf->tkf", x_TKD, wg_EDF[idx_TK], dtype))
           * matmul("tkd,tkdf->tkf", x_TKD, wu_EDF[idx_TK], dtype))
  y_TKD = matmul("tkf,tkfd->tkd", h_TKF, wd_EFD[idx_TK], dtype)
  return jnp.einsum("tkd,tk->td", y_TKD, w_TK.astype(jnp.float32))


def expert_sharded_gathered(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD, *, mesh,
                            dtype) -> jnp.ndarray:
  """`gathered_experts` with the experts split over `mesh` and the few tokens not (one decoding
  row): every device runs all the tokens' assignments to its own experts, and psums over the
  expert and width axes add the parts. [T, D] activations move, not expert weights (GSPMD's
  gather from the split weights all-reduced a copy of each token's experts: 76 GiB a step for
  one K2 row on 32 v5p chips)."""
  wi_spec = sharding.logical_spec(("expert", "embed", "moe_mlp"), wg_EDF.shape, mesh.shape,
                                  "experts/gate")
  wo_spec = sharding.logical_spec(("expert", "moe_mlp", "embed"), wd_EFD.shape, mesh.shape,
                                  "experts/down")
  axes = lambda e: () if e is None else (e,) if isinstance(e, str) else tuple(e)
  expert_axes, embed_axes, width_axes = (axes(e) for e in wi_spec)

  def body(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD):
    if embed_axes:  # the FSDP-split model width, gathered as the expert-parallel path does.
      wg_EDF, wu_EDF = (jax.lax.all_gather(w, embed_axes, axis=1, tiled=True)
                        for w in (wg_EDF, wu_EDF))
      wd_EFD = jax.lax.all_gather(wd_EFD, embed_axes, axis=2, tiled=True)
    El = wg_EDF.shape[0]
    first = jax.lax.axis_index(expert_axes) * El if expert_axes else 0
    mine_TK = (idx_TK >= first) & (idx_TK < first + El)
    y_TD = gathered_experts(x_TD, jnp.where(mine_TK, idx_TK - first, 0),
                            jnp.where(mine_TK, w_TK, 0.0), wg_EDF, wu_EDF, wd_EFD, dtype)
    return jax.lax.psum(y_TD, expert_axes + width_axes) if expert_axes + width_axes else y_TD

  replicated = jax.sharding.PartitionSpec()
  return jax.shard_map(body, mesh=mesh,
                       in_specs=(replicated,) * 3 + (wi_spec, wi_spec, wo_spec),
                       out_specs=replicated, check_vma=False)(x_TD, idx_TK, w_TK, wg_EDF,
                                                              wu_EDF, wd_EFD)


class Experts(nn.Module):
  """The routed experts' stacked SwiGLU weights, applied through the configured dispatch.

  Under a k2jax mesh (`jax.set_mesh`) the dispatch runs per device, expert-parallel
  (k2jax.model.expert_parallel); otherwise on the whole batch. When decoding with at most E
  assignments and no expert parallelism, each token's experts are gathered instead
  (`gathered_experts`).
  """

  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, x_TD, idx_TK, w_TK):
    cfg = self.cfg
    E, D, F = cfg.n_routed_experts, x_TD.shape[-1], cfg.moe_intermediate_size
    pdt = jnp.dtype(cfg.param_dtype)
    wg_EDF = self.param("gate", normal_init(cfg, ("expert", "embed", "moe_mlp")), (E, D, F), pdt)
    wu_EDF = self.param("up", normal_init(cfg, ("expert", "embed", "moe_mlp")), (E, D, F), pdt)
    wd_EFD = self.param("down", normal_init(cfg, ("expert", "moe_mlp", "embed")), (E, F, D), pdt)
    mesh = expert_parallel.active_mesh(x_TD.shape[0])
    # Only without expert parallelism: gathering copies each token's expert weights ([T, K, D,
    # F]: 7.5 GB of gate weights per chip for 32 K2 tokens on 32 chips, compiled for TPU).
    if self.decode and idx_TK.size <= E and mesh is None:
      context = sharding.context_mesh()
      if context is not None and context.size > 1:
        return (expert_sharded_gathered(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD,
                                        mesh=context, dtype=cfg.dtype),
                jnp.zeros((), jnp.float32))
      return (gathered_experts(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD, cfg.dtype),
              jnp.zeros((), jnp.float32))
    kwargs = dict(dispatch=cfg.moe_dispatch, capacity_factor=cfg.capacity_factor,
                  block_size=cfg.moe_block_size, dtype=jnp.dtype(cfg.dtype))
    if mesh is not None:  # under a k2jax mesh: per-device dispatch, all_to_all over `expert`.
      return expert_parallel.expert_parallel_experts(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD,
                                                     mesh=mesh, **kwargs)
    return routed_experts(x_TD, idx_TK, w_TK, wg_EDF, wu_EDF, wd_EFD, **kwargs)


class MoE(nn.Module):
  cfg: ModelConfig
  decode: bool = False  # generation: few tokens per call (see Experts).

  @nn.compact
  def __call__(self, x_BSD: jnp.ndarray, valid_BS: jnp.ndarray | None = None):
    """Returns (out_BSD, aux): expert_load [E] (tokens routed to each expert, padding excluded:
    `valid_BS` is 0 on padding), balance_loss [B] (per sequence, unweighted), dropped_frac."""
    cfg = self.cfg
    B, S, D = x_BSD.shape
    E = cfg.n_routed_experts
    bias_E = self.variable("router", "e_score_correction_bias",
                           nn.with_logical_partitioning(jnp.zeros, ("router",)), (E,), jnp.float32)
    x_TD = x_BSD.reshape(B * S, D)
    logits_TE = Dense(cfg.replace(dtype="float32"), E, ("embed", "router"), name="router")(x_TD)
    scores_TE = jax.nn.sigmoid(logits_TE)
    idx_TK, w_TK = select_experts(scores_TE, jax.lax.stop_gradient(bias_E.value), cfg)
    routed_TD, dropped_frac = Experts(cfg, self.decode, name="experts")(x_TD, idx_TK, w_TK)
    out_BSD = routed_TD.reshape(B, S, D)
    if cfg.n_shared_experts:
      out_BSD = out_BSD + MLP(cfg, cfg.n_shared_experts * cfg.moe_intermediate_size,
                              name="shared")(x_BSD)
    if valid_BS is None:
      valid_BS = jnp.ones((B, S), jnp.float32)
    valid_BS = valid_BS.astype(jnp.float32)
    k = cfg.num_experts_per_tok
    aux = {
        "expert_load": jnp.zeros(E, jnp.float32).at[idx_TK.reshape(-1)].add(
            jnp.repeat(valid_BS.reshape(-1), k)),
        "balance_loss": balance_loss(scores_TE.reshape(B, S, E), idx_TK.reshape(B, S, -1),
                                     valid_BS, cfg),
        "dropped_frac": dropped_frac,
    }
    return out_BSD, aux
