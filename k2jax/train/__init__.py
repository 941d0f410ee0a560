"""Training: experiment configs, loss terms, the train step, orbax checkpoints, metrics, the loop.

Names import on first use, so `k2jax.train.step` (the train step alone) needs neither grain nor
ml_collections, as on a bare accelerator image.
"""

import importlib

_EXPORTS = {
    "ConfigError": "config", "default_config": "config", "model_config": "config",
    "validate": "config", "train": "loop", "build_optimizer": "optimizer",
    "make_schedule": "schedules", "TrainState": "state", "init_state": "state",
    "state_shardings": "state", "make_eval_step": "step", "make_train_step": "step",
}

__all__ = sorted(_EXPORTS)


def __getattr__(name):
  if name in _EXPORTS:
    return getattr(importlib.import_module(f"k2jax.train.{_EXPORTS[name]}"), name)
  raise AttributeError(f"module 'k2jax.train' has no attribute {name!r}")
