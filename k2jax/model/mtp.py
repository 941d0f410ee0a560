"""DeepSeek-V3's multi-token prediction (MTP): D sequential modules after the main model.

Depth k = 1..D at position i (DeepSeek-V3 technical report, §2.2):

  h'^k_i = eh_proj([enorm(Emb(t_{i+k})) ; hnorm(g^{k-1}_i)])   (embedding first, as released)
  g^k_i = norm(Block(h'^k_i))       (Block: MLA + DeepSeekMoE, the main model's MoE block)
  logits^k_i = head(g^k_i)          predicting t_{i+k+1}

g^0 is the main model's last hidden state after its final norm: the input of its output head. The
report's figure leaves open which side of that norm the MTP taps; transformers' MtpModel, vLLM
and SGLang, which run DeepSeek-V3's released MTP weights, feed the normed state, and so does
k2jax (each depth likewise passes on its own normed output, as transformers does). The embedding
and the output head are the main model's (shared, as in the report); `norm` is each module's own
(DeepSeek's `shared_head.norm`). The depths are stacked like the main model's layers: one scan
over a leading `layers` axis (parameters `mtp_layers/...`), carrying g^k to depth k + 1.
Depth k needs the token k ahead of each position (`lookahead`); where it lies past the row or in
another packed segment, the position becomes padding (segment 0) for the depth's block: it neither
attends nor is attended and routes no expert load, so no prediction reads across a boundary.

`Transformer(cfg)(..., next_tokens_BT=...)` runs every depth (training). Speculative decoding
applies the first depth alone on the main model's normed hidden states (`draft_logits`), with its
own MLA cache (`init_cache`).
"""

from __future__ import annotations

import flax.linen as nn
import jax
import jax.numpy as jnp

from k2jax.config import ModelConfig
from k2jax.model.attention import mla_cache
from k2jax.model.block import block_class
from k2jax.model.layers import Dense, RMSNorm, dense


def lookahead(next_tokens_BT: jnp.ndarray, depth: int, segment_ids_BT: jnp.ndarray | None = None,
              next_segment_ids_BT: jnp.ndarray | None = None):
  """(tokens_KBT, segment_ids_KBT) for depths k = 1..depth.

  `next_tokens_BT` holds the token after each position, t_{i+1} (a train batch's targets), and
  `next_segment_ids_BT` their segment ids when the rows are packed. Depth k reads t_{i+k} (0 past
  the row) and sees position i in its segment (1 when not packed) where t_{i+k} exists in the same
  segment, else as padding (0).
  """
  if (segment_ids_BT is None) != (next_segment_ids_BT is None):
    raise ValueError("MTP: give segment_ids_BT and next_segment_ids_BT together (packed rows)")
  own_BT = (jnp.ones(next_tokens_BT.shape, jnp.int32) if segment_ids_BT is None
            else segment_ids_BT)
  ahead_BT = own_BT if next_segment_ids_BT is None else next_segment_ids_BT
  tokens = [_shift(next_tokens_BT, k - 1) for k in range(1, depth + 1)]
  segments = [jnp.where(_shift(ahead_BT, k - 1) == own_BT, own_BT, 0) for k in range(1, depth + 1)]
  return jnp.stack(tokens), jnp.stack(segments)


def _shift(x_BT: jnp.ndarray, n: int) -> jnp.ndarray:
  """x moved n positions left along T, zeros entering at the end."""
  return jnp.pad(x_BT[:, n:], ((0, 0), (0, n)))


class MTPLayer(nn.Module):
  """One depth. Scan body: (g^{k-1}, (Emb(t_{i+k}), segment ids), positions) ->
  (g^k, (g^k, the block's aux))."""

  cfg: ModelConfig
  decode: bool = False

  @nn.compact
  def __call__(self, g_BTD: jnp.ndarray, inputs, positions_BT: jnp.ndarray):
    cfg = self.cfg
    emb_BTD, segment_ids_BT = inputs
    x_BTD = jnp.concatenate([RMSNorm(cfg, cfg.rms_norm_eps, name="enorm")(emb_BTD),
                             RMSNorm(cfg, cfg.rms_norm_eps, name="hnorm")(g_BTD)], axis=-1)
    x_BTD = Dense(cfg, cfg.hidden_size, ("embed", "embed"), name="eh_proj")(x_BTD)
    h_BTD, aux = block_class(cfg)(cfg, True, self.decode, name="block")(
        x_BTD, positions_BT, segment_ids_BT)
    g_BTD = RMSNorm(cfg, cfg.rms_norm_eps, name="norm")(h_BTD)
    return g_BTD, (g_BTD, aux)


def mtp_stack(cfg: ModelConfig, decode: bool = False, name: str | None = None) -> nn.Module:
  """The cfg.num_nextn_predict_layers depths as one scan over a leading `layers` axis:
  (g^0 [B, T, D], (embeddings [K, B, T, D], segment ids [K, B, T]), positions [B, T]) ->
  (g^K, (g^k [K, B, T, D], aux stacked over the depths))."""
  scanned = nn.scan(MTPLayer, variable_axes={"params": 0, "router": 0, "cache": 0},
                    split_rngs={"params": True}, in_axes=(0, nn.broadcast),
                    length=cfg.num_nextn_predict_layers,
                    unroll=1 if cfg.scan_layers else cfg.num_nextn_predict_layers,
                    metadata_params={nn.PARTITION_NAME: "layers"})
  return scanned(cfg, decode, name=name)


def init_cache(cfg: ModelConfig, batch: int, length: int) -> dict:
  """The zeroed decode cache of the first MTP layer alone (what `draft_logits` reads): its MLA
  cache, latent [B, length, kv_lora] and rotated key [B, length, dr]."""
  return {"block": {"attn": jax.tree.map(lambda x: x[0], mla_cache(cfg, 1, batch, length))}}


def draft_logits(cfg: ModelConfig, variables: dict, cache: dict, hidden_BTD: jnp.ndarray,
                 next_tokens_BT: jnp.ndarray, positions_BT: jnp.ndarray):
  """The first MTP layer in decode mode: (logits_BTV of the token two ahead of each position,
  cache). `hidden_BTD`: the main model's normed hidden states at `positions_BT` (its
  "intermediates" `hidden_BTD`); `next_tokens_BT`: the token after each position. Writes the cache
  at `positions_BT` and attends over the cached positions up to each. The layer runs on its own,
  out of the depths' scan."""
  params, first = variables["params"], lambda tree: jax.tree.map(lambda x: x[0], tree)
  tokens_1BT, segments_1BT = lookahead(next_tokens_BT, 1)
  emb_BTD = jnp.take(params["embed"]["embedding"], tokens_1BT[0], axis=0).astype(jnp.float32)
  layer = {"params": first(params["mtp_layers"]), "cache": cache,
           "router": first(variables["router"]["mtp_layers"])}
  (g_BTD, _), mutated = MTPLayer(cfg, decode=True).apply(
      layer, hidden_BTD, (emb_BTD, segments_1BT[0]), positions_BT, mutable=["cache"])
  return dense(g_BTD, params["lm_head"]["kernel"], cfg.dtype), mutated["cache"]
