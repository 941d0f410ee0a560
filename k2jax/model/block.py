"""The decoder block, and a stack of identical blocks as one scan over a leading `layers` axis.

Pre-norm: h = x + attn(norm(x)); out = h + ffn(norm(h)), the FFN dense (SwiGLU) or DeepSeekMoE.
The main model's dense and MoE stacks and the multi-token-prediction layers use this one block.
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax import sharding
from k2jax.config import ModelConfig
from k2jax.model.attention import MLA
from k2jax.model.layers import MLP, RMSNorm
from k2jax.model.moe import MoE

REMAT_POLICIES = {"full": None, "dots": jax.checkpoint_policies.dots_with_no_batch_dims_saveable}


class Block(nn.Module):
  """Pre-norm block: h = x + attn(norm(x)); out = h + ffn(norm(h)).
  Scan body: (x, positions, segment_ids) -> x."""

  cfg: ModelConfig
  moe: bool
  decode: bool = False

  @nn.compact
  def __call__(self, x_BTD: jnp.ndarray, positions_BT: jnp.ndarray,
               segment_ids_BT: jnp.ndarray | None):
    cfg = self.cfg
    x_BTD = sharding.constrain(x_BTD, ("batch", "length", "act_embed"))  # under a mesh only
    attn_BTD, max_logits_H = MLA(cfg, self.decode, name="attn")(
        RMSNorm(cfg, cfg.rms_norm_eps, name="attn_norm")(x_BTD), positions_BT, segment_ids_BT)
    h_BTD = x_BTD + attn_BTD
    y_BTD = RMSNorm(cfg, cfg.rms_norm_eps, name="ffn_norm")(h_BTD)
    aux = {"max_logits": max_logits_H}
    if self.moe:
      valid_BT = None if segment_ids_BT is None else segment_ids_BT > 0
      ffn_BTD, moe_aux = MoE(cfg, self.decode, name="moe")(y_BTD, valid_BT)
      aux.update(moe_aux)
    else:
      ffn_BTD = MLP(cfg, cfg.intermediate_size, name="mlp")(y_BTD)
    return h_BTD + ffn_BTD, aux


def block_class(cfg: ModelConfig) -> type[nn.Module]:
  """Block, rematerialised in the backward pass as cfg.remat says."""
  if cfg.remat == "none":
    return Block
  return nn.remat(Block, policy=REMAT_POLICIES[cfg.remat], prevent_cse=False)


def block_stack(cfg: ModelConfig, moe: bool, length: int, name: str,
                decode: bool = False) -> nn.Module:
  """`length` Blocks as one scan over a leading `layers` axis (unrolled when not scan_layers)."""
  scanned = nn.scan(block_class(cfg), variable_axes={"params": 0, "router": 0, "cache": 0},
                    split_rngs={"params": True},
                    in_axes=nn.broadcast, length=length, unroll=1 if cfg.scan_layers else length,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(cfg, moe, decode, name=name)
