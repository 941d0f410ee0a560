"""The train and eval steps: next-token cross-entropy, MuonClip update, router bias update.

One train step on a batch {"tokens": int32 [B, T + 1]}: the batch is cut into grad_accum
micro-batches (a lax.scan sums their gradients, takes the max of their max_logits and sums their
expert loads), the mean gradient is clipped by global norm, the optimizer updates the params with
the step's max_logits (QK-Clip), and the router bias moves by the auxiliary-loss-free rule from the
step's expert load over the whole global batch.
"""

from __future__ import annotations

import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from k2jax import sharding
from k2jax.config import ModelConfig
from k2jax.model import Transformer
from k2jax.model.moe import update_router_bias
from k2jax.optim import OptimizerState, optimizer_metrics
from k2jax.train.state import TrainState


def cross_entropy(logits_BTV: jnp.ndarray, targets_BT: jnp.ndarray) -> jnp.ndarray:
  """Mean next-token cross-entropy in float32 (nats per token)."""
  return optax.softmax_cross_entropy_with_integer_labels(
      logits_BTV.astype(jnp.float32), targets_BT).mean()


def _micro_batches(tokens_BT1: jnp.ndarray, n: int) -> jnp.ndarray:
  """[B, T+1] -> [n, B/n, T+1], micro-batch a taking rows a, a+n, ... (even over data shards)."""
  B, T1 = tokens_BT1.shape
  return tokens_BT1.reshape(B // n, n, T1).swapaxes(0, 1)


def expert_balance(load_LE: jnp.ndarray) -> jnp.ndarray:
  """max over layers of (max load / mean load): 1 when perfectly balanced."""
  if load_LE.shape[0] == 0:
    return jnp.ones((), jnp.float32)
  return jnp.max(jnp.max(load_LE, -1) / jnp.maximum(jnp.mean(load_LE, -1), 1e-9))


def _optimizer_metrics(opt_state) -> dict:
  """k2jax's optimizer metrics, or none for another optax transform."""
  is_ours = lambda x: isinstance(x, OptimizerState)
  if any(is_ours(x) for x in jax.tree.leaves(opt_state, is_leaf=is_ours)):
    return optimizer_metrics(opt_state)
  return {}


def make_train_step(model_cfg: ModelConfig, tx: optax.GradientTransformationExtraArgs,
                    schedule: optax.Schedule, *, grad_accum: int = 1, grad_clip: float = 0.0,
                    bias_update_rate: float = 0.0, bias_centered: bool = False,
                    mesh: Mesh | None = None, state_shardings: TrainState | None = None
                    ) -> Callable:
  """(state, batch) -> (state, metrics), jitted with the state donated.

  With `mesh` and `state_shardings` (`k2jax.train.state_shardings`) the step is compiled for the
  mesh: the state keeps its shardings, the batch is split over data x fsdp x expert, metrics are
  replicated, and the model sees the mesh (activation constraints, expert-parallel dispatch).
  GSPMD reduces the gradients, the expert load and QK-Clip's max logits over the devices.
  """
  if (mesh is None) != (state_shardings is None):
    raise ValueError("make_train_step: pass mesh and state_shardings together")
  model = Transformer(model_cfg)

  def loss_fn(params, router, tokens_BT1):
    logits_BTV, aux = model.apply({"params": params, "router": router}, tokens_BT1[:, :-1])
    ce = cross_entropy(logits_BTV, tokens_BT1[:, 1:])
    return ce + aux["balance_loss"], (ce, aux)

  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def micro_step(state: TrainState, tokens_BT1):
    (_, (ce, aux)), grads = grad_fn(state.params, state.router, tokens_BT1)
    grads = jax.tree.map(lambda g: g.astype(jnp.float32), grads)
    return grads, ce, aux

  def step(state: TrainState, batch):
    if grad_accum == 1:
      grads, ce, aux = micro_step(state, batch["tokens"])
    else:
      micro = _micro_batches(batch["tokens"], grad_accum)

      def body(carry, tokens_BT1):
        grads, ce, aux = micro_step(state, tokens_BT1)
        aux = {k: (jnp.maximum if k == "max_logits" else jnp.add)(carry[2][k], v)
               for k, v in aux.items()}
        return (jax.tree.map(jnp.add, carry[0], grads), carry[1] + ce, aux), None

      shapes = jax.eval_shape(micro_step, state, micro[0])
      zeros = jax.tree.map(lambda x: jnp.zeros(x.shape, x.dtype), shapes)
      zeros[2]["max_logits"] = jnp.full(shapes[2]["max_logits"].shape, -jnp.inf, jnp.float32)
      (grads, ce, aux), _ = jax.lax.scan(body, zeros, micro)
      grads = jax.tree.map(lambda g: g / grad_accum, grads)
      ce = ce / grad_accum
      aux = {**aux, "balance_loss": aux["balance_loss"] / grad_accum,
             "dropped_frac": aux["dropped_frac"] / grad_accum}

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
      router = jax.tree.map(
          lambda b: update_router_bias(b, aux["expert_load"], bias_update_rate, bias_centered),
          router)
    opt_metrics = _optimizer_metrics(opt_state)
    clipped_L = opt_metrics.pop("qk_clip/clipped_heads", jnp.zeros((0,), jnp.int32))
    metrics = {
        "loss": ce,
        "balance_loss": aux["balance_loss"],
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
                 in_shardings=(state_shardings, {"tokens": sharding.batch_sharding(mesh)}),
                 out_shardings=(state_shardings, NamedSharding(mesh, P())))


def _under_mesh(fn: Callable, mesh: Mesh | None) -> Callable:
  """fn traced with `mesh` as the abstract context mesh (what the model's sharding code reads)."""
  if mesh is None:
    return fn

  @functools.wraps(fn)
  def wrapped(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return wrapped


def make_eval_step(model_cfg: ModelConfig, mesh: Mesh | None = None) -> Callable:
  """(params, router, batch) -> mean next-token cross-entropy, jitted (for `mesh` if given)."""
  model = Transformer(model_cfg)

  def eval_step(params, router, batch):
    tokens_BT1 = batch["tokens"]
    logits_BTV, _ = model.apply({"params": params, "router": router}, tokens_BT1[:, :-1])
    return cross_entropy(logits_BTV, tokens_BT1[:, 1:])

  return jax.jit(_under_mesh(eval_step, mesh))
