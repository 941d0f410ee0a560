"""Training: experiment configs, the train step, orbax checkpoints, metrics, and the loop."""

from k2jax.train.config import ConfigError, default_config, model_config, validate
from k2jax.train.loop import build_optimizer, train
from k2jax.train.sample import sample_tokens
from k2jax.train.schedules import make_schedule
from k2jax.train.state import TrainState, init_state, state_shardings
from k2jax.train.step import make_eval_step, make_train_step

__all__ = [
  "ConfigError",
  "TrainState",
  "build_optimizer",
  "default_config",
  "init_state",
  "make_eval_step",
  "make_schedule",
  "make_train_step",
  "model_config",
  "sample_tokens",
  "state_shardings",
  "train",
  "validate",
]
