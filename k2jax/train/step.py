"""The train and eval steps: named loss terms, MuonClip update, router bias update.

One train step on a batch (a dict: `tokens` int32 [B, T + 1] and optional `segment_ids`,
`positions`, `loss_mask`; see k2jax.train.losses): the loss is the weighted sum of the terms named
in `loss_weights`, each normalised by its count over the whole batch. The batch is cut into
grad_accum micro-batches (a lax.scan sums their gradients and term values, takes the max of their
max_logits and sums their expert loads), the gradient is clipped by global norm, the optimizer
updates the params with the step's max_logits (QK-Clip), and the router bias moves by the
auxiliary-loss-free rule from the step's expert load over the whole global batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax import sharding
from k2jax.config import ModelConfig
from k2jax.model import Transformer
from k2jax.model.transformer import update_router
from k2jax.optim import optimizer_metrics
from k2jax.train import losses
from k2jax.train.state import TrainState


def _micro_batches(batch: dict, n: int) -> dict:
  """[B, ...] -> [n, B/n, ...] per array, micro-batch a taking rows a, a+n, ... (even over data
  shards)."""
  return jax.tree.map(lambda x: x.reshape(x.shape[0] // n, n, *x.shape[1:]).swapaxes(0, 1), batch)


def expert_balance(load_LE: jnp.ndarray) -> jnp.ndarray:
  """max over layers of (max load / mean load): 1 when perfectly balanced."""
  if load_LE.shape[0] == 0:
    return jnp.ones((), jnp.float32)
  return jnp.max(jnp.max(load_LE, -1) / jnp.maximum(jnp.mean(load_LE, -1), 1e-9))


def make_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformationExtraArgs,
                    schedule: optax.Schedule, *, loss_weights: Mapping | None = None,
                    terms: Mapping = losses.TERMS, grad_accum: int = 1,
                    grad_clip: float = 0.0, bias_update_rate: float = 0.0,
                    bias_centered: bool = False, mesh: Mesh | None = None,
                    state_shardings: TrainState | None = None) -> Callable:
  """(state, batch) -> (state, metrics), jitted with the state donated.

  `loss_weights`: {term name: weight or schedule of the step} (default: cross-entropy alone).
  Metrics hold `loss` (the weighted sum) and every term's value under its own name.
  With `mesh` and `state_shardings` (`k2jax.train.state_shardings`) the step is compiled for the
  mesh: the state keeps its shardings, the batch is split over data x fsdp x expert, metrics are
  replicated, and the model sees the mesh (activation constraints, expert-parallel dispatch).
  GSPMD reduces the gradients, the expert load and QK-Clip's max logits over the devices.
  """
  if (mesh is None) != (state_shardings is None):
    raise ValueError("make_train_step: pass mesh and state_shardings together")
  weights = dict(loss_weights or {"cross_entropy": 1.0})
  losses.check_weights(weights, terms)
  terms = losses.for_model(weights, model_cfg, terms)
  forward = _forward(model_cfg)

  def loss_fn(params, router, batch, counts, step):
    outputs = forward(params, router, batch)
    values = losses.term_values(weights, outputs, batch, counts, terms)
    return losses.combine(weights, values, step), (values, outputs["aux"])

  grad_fn = jax.grad(loss_fn, has_aux=True)

  def micro_step(state: TrainState, batch, counts):
    grads, (values, aux) = grad_fn(state.params, state.router, batch, counts, state.step)
    return jax.tree.map(lambda g: g.astype(jnp.float32), grads), values, aux

  def step(state: TrainState, batch):
    counts = losses.counts(weights, batch, terms)
    if grad_accum == 1:
      grads, values, aux = micro_step(state, batch, counts)
    else:
      def body(carry, micro):
        out = micro_step(state, micro, counts)
        merge = lambda k: jnp.maximum if k == "max_logits" else jnp.add
        aux = {k: merge(k)(carry[2][k], v) for k, v in out[2].items()}
        return (jax.tree.map(jnp.add, carry[0], out[0]), jax.tree.map(jnp.add, carry[1], out[1]),
                aux), None

      micro = _micro_batches(batch, grad_accum)
      shapes = jax.eval_shape(micro_step, state, jax.tree.map(lambda x: x[0], micro), counts)
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
      zeros[2]["max_logits"] = jnp.full(shapes[2]["max_logits"].shape, -jnp.inf, jnp.float32)
      (grads, values, aux), _ = jax.lax.scan(body, zeros, micro)
      aux = {**aux, "dropped_frac": aux["dropped_frac"] / grad_accum}

    grad_norm = optax.global_norm(grads)
    if grad_clip > 0:
      scale = jnp.minimum(1.0, grad_clip / (grad_norm + 1e-6))
      grads = jax.tree.map(lambda g: g * scale, grads)
    grads = jax.tree.map(lambda g, p: g.astype(p.dtype), grads, state.params)
    updates, opt_state = tx.update(grads, state.opt_state, state.params,
                                   max_logits=aux["max_logits"])
    params = optax.apply_updates(state.params, updates)
    router = state.router
    if bias_update_rate > 0:
      router = update_router(router, aux["expert_load"], bias_update_rate, bias_centered)
    opt_metrics = optimizer_metrics(opt_state)
    clipped_L = opt_metrics.pop("qk_clip/clipped_heads", jnp.zeros((0,), jnp.int32))
    metrics = {
        "loss": losses.combine(weights, values, state.step),
        **values,
        "grad_norm": grad_norm,
        "lr": schedule(state.step),
        "max_logit": jnp.max(aux["max_logits"]),
        "max_logit_per_layer": jnp.max(aux["max_logits"], axis=-1),
        "expert_load_max_over_mean": expert_balance(aux["expert_load"]),
        "dropped_frac": aux["dropped_frac"],
        "clipped_heads": jnp.sum(clipped_L),
        **{k.replace("/", "_"): v for k, v in opt_metrics.items()},
    }
    new_state = state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                              router=router)
    return new_state, metrics

  if mesh is None:
    return jax.jit(step, donate_argnums=0)
  return jax.jit(_under_mesh(step, mesh), donate_argnums=0,
                 in_shardings=(state_shardings, sharding.batch_sharding(mesh)),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())))


def _forward(model_cfg: ModelConfig) -> Callable:
  """(params, router, batch) -> the outputs the loss terms read: {"logits", "aux"}, and the MTP
  layers' "mtp_logits" when the model has them (taken out of aux, which keeps the statistics the
  step reduces over micro-batches)."""
  model = Transformer(model_cfg)
  mtp = model_cfg.num_nextn_predict_layers > 0

  def forward(params, router, batch):
    logits_BTV, aux = model.apply({"params": params, "router": router},
                                  **losses.model_inputs(batch, mtp))
    return {"logits": logits_BTV, **({"mtp_logits": aux.pop("mtp_logits")} if mtp else {}),
            "aux": aux}

  return forward


def _under_mesh(fn: Callable, mesh: Mesh | None) -> Callable:
  """fn traced with `mesh` as the abstract context mesh (what the model's sharding code reads)."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return wrapped


def make_eval_step(model_cfg: ModelConfig, loss_weights: Mapping | None = None,
                   terms: Mapping = losses.TERMS, mesh: Mesh | None = None) -> Callable:
  """(params, router, batch, step=0) -> {"loss": weighted sum (weights at `step`), term name:
  value}, jitted (for `mesh`)."""
  weights = dict(loss_weights or {"cross_entropy": 1.0})
  losses.check_weights(weights, terms)
  terms = losses.for_model(weights, model_cfg, terms)
  forward = _forward(model_cfg)

  def eval_step(params, router, batch, step=0):
    values = losses.term_values(weights, forward(params, router, batch), batch,
                                losses.counts(weights, batch, terms), terms)
    return {"loss": losses.combine(weights, values, step), **values}

  return jax.jit(_under_mesh(eval_step, mesh))
