"""RL experiment configs: the training config (k2jax.train.config) plus an `rl` section.

config.train.steps counts optimizer steps (rl.grad_steps per batch of rollouts, so
steps / grad_steps updates), config.train.batch_size the PTX rows added to each update's batch,
config.train.seq_len + 1 the row length (a conversation that would outgrow it ends as
"max_tokens"), config.train.eval_every the updates between held-out agent evaluations.
config.data is the PTX stream (e.g. the SFT conversations, data.format "chat"), config.init_from
the SFT checkpoint. config.loss holds extra terms (e.g. "balance"); the policy objective and the
PTX cross-entropy are weighted by the rl section. See k2jax.rl for the fields' meaning.
"""

from __future__ import annotations

import math

import ml_collections

from k2jax import sharding
from k2jax.train import config as config_lib
from k2jax.train import losses

OBJECTIVES = ("kimi", "grpo")


def default_config() -> ml_collections.ConfigDict:
  """The training defaults with config.loss = {"balance": 0} and the rl section."""
  c = config_lib.default_config()
  c.loss = ml_collections.ConfigDict(dict(balance=0.0))
  c.rl = ml_collections.ConfigDict(dict(
      objective="kimi",  # "kimi" (K1.5 / K2) or "grpo" (clipped surrogate).
      tau=1.0,  # kimi: the log-ratio regulariser.
      clip_eps=0.2,  # grpo: the ratio clip.
      prompts=8,  # tasks per update.
      samples=4,  # K responses per task.
      grad_steps=1,  # optimizer steps per batch of rollouts (pi_old: the sampling policy).
      task_seed=1,  # the stream of train-split tasks.
      max_turns=6,
      max_new_tokens=96,  # per reply.
      top_p=1.0,
      temperature=1.0,  # at update 0,
      final_temperature=1.0,  # reached linearly after temperature_decay_steps updates.
      temperature_decay_steps=0,  # 0: no decay.
      budget=0,  # the policy's tokens per sample; beyond: truncated, reward budget_penalty.
      budget_penalty=-0.5,
      ptx_weight=0.0,  # the cross-entropy on config.data's batches; 0: no PTX rows.
      eval_heldout=48,  # greedy held-out tasks of the seen domains per evaluation,
      eval_heldout_domain=12,  # and of the held-out domain.
      eval_seed=0,
  ))
  return c


def _fail(key: str, msg: str):
  raise config_lib.ConfigError(f"config.rl.{key} {msg}")


def validate(config) -> None:
  """ConfigError (one line, naming the key) for an invalid training part or rl section."""
  config_lib.validate(config, default_config())
  r = config.rl
  if r.objective not in OBJECTIVES:
    _fail("objective", f"must be one of {OBJECTIVES}, got {r.objective!r}")
  for key in ("prompts", "samples", "grad_steps", "max_turns", "max_new_tokens"):
    config_lib.check_int(config, f"rl.{key}", 1)
  for key in ("temperature_decay_steps", "budget", "eval_heldout", "eval_heldout_domain",
              "task_seed", "eval_seed"):
    config_lib.check_int(config, f"rl.{key}", 0)
  for key in ("tau", "temperature", "final_temperature"):
    config_lib.check_real(config, f"rl.{key}", 0.0, open_low=True)
  config_lib.check_real(config, "rl.top_p", 0.0, 1.0, open_low=True)
  config_lib.check_real(config, "rl.clip_eps", 0.0, 1.0, open_low=True, open_high=True)
  config_lib.check_real(config, "rl.ptx_weight", 0.0)
  config_lib.check_real(config, "rl.budget_penalty")
  for name in ("cross_entropy", *OBJECTIVES):
    if name in config.loss:
      raise config_lib.ConfigError(f"config.loss.{name}: in RL set config.rl.ptx_weight and "
                                   "config.rl.objective instead")
  t = config.train
  if t.steps % r.grad_steps:
    raise config_lib.ConfigError(f"config.train.steps ({t.steps}) must be a multiple of "
                                 f"config.rl.grad_steps ({r.grad_steps})")
  if config.checkpoint.every_steps % r.grad_steps:
    raise config_lib.ConfigError(f"config.checkpoint.every_steps ({config.checkpoint.every_steps})"
                                 f" must be a multiple of config.rl.grad_steps ({r.grad_steps})")
  mesh = config_lib.mesh_shape(config)
  shards = t.grad_accum * math.prod(mesh[a] for a in sharding.BATCH_AXES)
  if rows(config) % shards:
    raise config_lib.ConfigError(f"the RL batch ({rows(config)} rows: rl.prompts x rl.samples"
                                 f"{' + train.batch_size' if r.ptx_weight else ''}) must be "
                                 f"divisible by train.grad_accum x mesh data x fsdp x expert "
                                 f"({shards})")


def rows(config) -> int:
  """Rows of an update's batch: the rollouts, and the PTX rows when the PTX loss is on."""
  r = config.rl
  return r.prompts * r.samples + (config.train.batch_size if r.ptx_weight else 0)


def loss_terms(config) -> tuple[dict, dict]:
  """(weights, terms) of the RL update: the objective (weight 1), the PTX cross-entropy (weight
  rl.ptx_weight, when on) and config.loss's extra terms."""
  r = config.rl
  policy = (losses.kimi_policy_term(r.tau) if r.objective == "kimi"
            else losses.grpo_term(r.clip_eps))
  weights = {r.objective: 1.0, **({"cross_entropy": r.ptx_weight} if r.ptx_weight else {}),
             **config.loss}
  return weights, {**losses.TERMS, r.objective: policy}


def temperature(config, update: int) -> float:
  """The sampling temperature of update `update` (0-based): rl.temperature, moving linearly to
  rl.final_temperature over rl.temperature_decay_steps updates, then constant."""
  r = config.rl
  if not r.temperature_decay_steps:
    return float(r.temperature)
  frac = min(update / r.temperature_decay_steps, 1.0)
  return float(r.temperature + frac * (r.final_temperature - r.temperature))
