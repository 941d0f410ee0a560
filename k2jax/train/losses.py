"""The loss terms a train step can sum, by name: `config.loss` maps names to weights.

A batch is a dict: `tokens` int32 [B, T+1] (inputs tokens[:, :-1], targets tokens[:, 1:]) and
optionally `segment_ids` and `positions` [B, T+1] (packed sequences, 1, 2, ... per row, 0 for
padding; positions restart at 0 in each) and `loss_mask` float [B, T+1]: the weight of each token
as a prediction target (column 0 is never a target). The model's outputs reach a term as
`{"logits": [B, T, V] float32, "aux": the model's aux}`, plus "mtp_logits" [K, B, T, V] when the
model has K multi-token-prediction layers.

A term is two functions: `total(outputs, batch)`, its sum over the units of the batch (weighted
target tokens, sequences, ...), and `count(batch)`, how many units it averages over. The step
minimises sum_name weight * total / count, taking each count over the whole batch before gradient
accumulation splits it, so micro-batches with more or fewer masked tokens weigh exactly as in the
full batch. A term with no units (an all-zero loss mask) is 0, not NaN. A term may have parts
(total and count vectors, e.g. one per MTP depth): its value is the mean over the parts of
total / count. New terms go into TERMS without touching the step; a term that depends on the
model is a function of the ModelConfig there ("mtp", built for the model by `for_model`); terms
with other parameters (the policy objectives `kimi_policy_term(tau)`, `grpo_term(clip_eps)`) are
built by their caller and passed to the step with the others.

A weight is a number >= 0, a function of the step, or (value, final, switch_step): value before
step switch_step, final from it on (DeepSeek-V3's MTP weight, 0.3 then 0.1).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import NamedTuple

import jax
import jax.numpy as jnp

from k2jax.config import ModelConfig


class Term(NamedTuple):
  total: Callable[[dict, dict], jax.Array]  # (outputs, batch) -> sum over the batch's units
  count: Callable[[dict], jax.Array]  # batch -> the number of units (float32 scalar)


def model_inputs(batch: Mapping[str, jax.Array], mtp: bool = False) -> dict[str, jax.Array | None]:
  """The Transformer's keyword inputs: tokens, positions and segment ids of the input positions;
  with `mtp` also the token after each (the targets) and its segment id, for the MTP layers."""
  cut = lambda key: batch[key][:, :-1] if key in batch else None
  inputs = {"tokens_BT": batch["tokens"][:, :-1], "positions_BT": cut("positions"),
            "segment_ids_BT": cut("segment_ids")}
  if mtp:
    inputs["next_tokens_BT"] = batch["tokens"][:, 1:]
    inputs["next_segment_ids_BT"] = batch["segment_ids"][:, 1:] if "segment_ids" in batch else None
  return inputs


def _ahead(x_BS: jax.Array, ahead: int) -> jax.Array:
  """[B, S - 1]: at input position i the value at i + ahead of a [B, S] row, 0 past its end."""
  return jnp.pad(x_BS[:, ahead:], ((0, 0), (0, ahead - 1)))


def targets(batch: Mapping[str, jax.Array], ahead: int = 1) -> jax.Array:
  """[B, T] the token `ahead` positions after each input position (0 past the row's end)."""
  return _ahead(batch["tokens"], ahead)


def target_weights(batch: Mapping[str, jax.Array], ahead: int = 1) -> jax.Array:
  """[B, T] weight of the target `ahead` positions after each input position: its loss mask, 0
  past the row's end, and with packed segments 0 where it lies in another segment or is padding
  (no prediction across a boundary)."""
  tokens = batch["tokens"]
  mask = (batch["loss_mask"].astype(jnp.float32) if "loss_mask" in batch
          else jnp.ones(tokens.shape, jnp.float32))
  w_BT = _ahead(mask, ahead)
  if "segment_ids" in batch:
    seg = batch["segment_ids"]
    seg_ahead = _ahead(seg, ahead)
    w_BT = w_BT * ((seg_ahead == seg[:, :-1]) & (seg_ahead > 0))
  return w_BT


def token_log_probs(logits_BTV: jax.Array, targets_BT: jax.Array) -> jax.Array:
  """log softmax(logits)[target] per position, float32 [B, T]."""
  logits_BTV = logits_BTV.astype(jnp.float32)
  picked_BT = jnp.take_along_axis(logits_BTV, targets_BT[..., None], axis=-1)[..., 0]
  return picked_BT - jax.nn.logsumexp(logits_BTV, axis=-1)


def _cross_entropy_total(outputs, batch) -> jax.Array:
  logp_BT = token_log_probs(outputs["logits"], batch["tokens"][:, 1:])
  return -jnp.sum(target_weights(batch) * logp_BT)


def _rows(batch) -> jax.Array:
  return jnp.float32(batch["tokens"].shape[0])


def mtp_term(cfg: ModelConfig) -> Term:
  """DeepSeek-V3's multi-token-prediction loss for cfg's K MTP depths: the mean over k of depth
  k's cross-entropy on the token k + 1 ahead (outputs["mtp_logits"][k - 1]), each over its own
  weighted targets; with weight lambda, the report's L_MTP = lambda / K sum_k L_k."""
  depths = range(1, cfg.num_nextn_predict_layers + 1)
  if not depths:
    raise ValueError("config.loss.mtp needs model.num_nextn_predict_layers >= 1 (the model has no "
                     "MTP layers)")

  def total(outputs, batch) -> jax.Array:
    logits_KBTV = outputs["mtp_logits"]
    return jnp.stack([-jnp.sum(target_weights(batch, k + 1)
                               * token_log_probs(logits_KBTV[k - 1], targets(batch, k + 1)))
                      for k in depths])

  return Term(total, lambda b: jnp.stack([jnp.sum(target_weights(b, k + 1)) for k in depths]))


def _policy_tokens(outputs, batch) -> tuple[jax.Array, jax.Array, jax.Array]:
  """(mask [B, T] of the targets the policy sampled, log pi_theta and log pi_old of them)."""
  mask_BT = batch["policy_mask"][:, 1:].astype(jnp.float32)
  logp_BT = token_log_probs(outputs["logits"], batch["tokens"][:, 1:])
  return mask_BT, logp_BT * mask_BT, batch["old_logprobs"][:, 1:] * mask_BT


def _policy_rows(batch) -> jax.Array:
  return jnp.any(batch["policy_mask"] > 0, axis=-1).astype(jnp.float32)


def kimi_policy_term(tau: float) -> Term:
  """Kimi K1.5 / K2's policy objective, per sampled response y_i of a prompt x:
  (r_i - mean_j r_j - tau * log(pi_theta(y_i | x) / pi_old(y_i | x)))^2, the log-ratio summed over
  the policy's tokens, averaged over responses. The batch carries `advantage` [B] (r_i minus the
  mean reward of its prompt's samples), `policy_mask` and `old_logprobs` [B, T+1] (the sampled
  tokens as targets, and their log-probs when sampled). At theta = pi_old its gradient is
  -2 tau / N sum_i (r_i - mean r) grad log pi_theta(y_i): REINFORCE with the group-mean baseline."""
  if not tau > 0:
    raise ValueError(f"rl.tau must be > 0, got {tau!r}")

  def total(outputs, batch):
    _, logp_BT, old_BT = _policy_tokens(outputs, batch)
    ratio_B = jnp.sum(logp_BT - old_BT, axis=-1)
    return jnp.sum(_policy_rows(batch) * jnp.square(batch["advantage"] - tau * ratio_B))

  return Term(total, lambda b: jnp.sum(_policy_rows(b)))


def grpo_term(clip_eps: float) -> Term:
  """GRPO's clipped surrogate, -min(rho_t A_i, clip(rho_t, 1 - eps, 1 + eps) A_i) per sampled
  token, rho_t = pi_theta / pi_old of that token, A_i the response's group-normalised advantage
  (`advantage` [B]), averaged over the policy's tokens of the batch (no KL term)."""
  if not 0 < clip_eps < 1:
    raise ValueError(f"rl.clip_eps must be in (0, 1), got {clip_eps!r}")

  def total(outputs, batch):
    mask_BT, logp_BT, old_BT = _policy_tokens(outputs, batch)
    rho_BT = jnp.exp(logp_BT - old_BT)
    adv_B1 = batch["advantage"][:, None]
    surrogate_BT = jnp.minimum(rho_BT * adv_B1,
                               jnp.clip(rho_BT, 1 - clip_eps, 1 + clip_eps) * adv_B1)
    return -jnp.sum(mask_BT * surrogate_BT)

  return Term(total, lambda b: jnp.sum(b["policy_mask"][:, 1:].astype(jnp.float32)))


TERMS: dict[str, Term | Callable[[ModelConfig], Term]] = {
    # Next-token cross-entropy (nats) over the weighted targets.
    "cross_entropy": Term(_cross_entropy_total, lambda b: jnp.sum(target_weights(b))),
    # DeepSeek-V3's sequence-wise balance loss (sum_i f_i P_i per sequence, summed over MoE
    # layers); its weight is DS-V3's alpha (1e-4).
    "balance": Term(lambda out, b: jnp.sum(out["aux"]["balance_loss"]), _rows),
    # DeepSeek-V3's multi-token prediction (needs MTP layers); its weight is lambda (0.3 -> 0.1).
    "mtp": mtp_term,
}


def check_weights(weights: Mapping, terms: Mapping = TERMS) -> None:
  """ValueError naming the culprit for an unknown term or a weight that is not a number >= 0, a
  function of the step or a (value, final, switch_step) triple."""
  if not weights:
    raise ValueError("config.loss names no loss term")
  number = lambda x: isinstance(x, (int, float)) and not isinstance(x, bool) and x >= 0
  for name, w in weights.items():
    if name not in terms:
      raise ValueError(f"config.loss.{name} is not a loss term (known: {', '.join(terms)})")
    if isinstance(w, (tuple, list)):
      if not (len(w) == 3 and number(w[0]) and number(w[1]) and isinstance(w[2], int)
              and number(w[2])):
        raise ValueError(f"config.loss.{name} as a schedule must be (value >= 0, final >= 0, "
                         f"switch_step >= 0 an integer), got {tuple(w)!r}")
    elif not callable(w) and not number(w):
      raise ValueError(f"config.loss.{name} must be a number >= 0, got {w!r}")


def for_model(weights: Mapping, cfg: ModelConfig, terms: Mapping = TERMS) -> dict[str, Term]:
  """{name: Term} of the weighted terms, those that depend on the model built for `cfg`."""
  return {name: terms[name] if isinstance(terms[name], Term) else terms[name](cfg)
          for name in weights}


def counts(weights: Mapping, batch, terms: Mapping[str, Term]) -> dict:
  """{name: count} of every weighted term over `batch` (the whole batch)."""
  return {name: terms[name].count(batch) for name in weights}


def term_values(weights: Mapping, outputs, batch, counts_: Mapping[str, jax.Array],
                terms: Mapping[str, Term]) -> dict[str, jax.Array]:
  """{name: total / count} of each weighted term on `batch`, a part of the batch the counts were
  taken on (their sum over the parts is the value on the whole batch); the mean over its parts
  for a term with parts."""
  values = {}
  for name in weights:
    n = counts_[name]
    v = jnp.where(n > 0, terms[name].total(outputs, batch) / jnp.maximum(n, 1e-30), 0.0)
    values[name] = jnp.mean(v) if v.ndim else v
  return values


def weight_at(w, step) -> jax.Array | float:
  """A term's weight at `step` (see the module docstring for the forms)."""
  if callable(w):
    return w(step)
  if isinstance(w, (tuple, list)):
    value, final, switch = w
    return jnp.where(jnp.asarray(step) < switch, value, final)
  return w


def combine(weights: Mapping, values: Mapping[str, jax.Array], step) -> jax.Array:
  """sum_name weight(step) * value. A term whose weight is the number 0 is left out, not added
  times 0: it is reported but takes no part in the gradient (nor perturbs its rounding)."""
  return sum((weight_at(w, step) * values[name] for name, w in weights.items()
              if callable(w) or isinstance(w, (tuple, list)) or w != 0), jnp.float32(0))
