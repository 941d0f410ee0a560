"""A training run's directory: the names of its files, the checks before writing into it, and
loading the latest checkpoint back.

<workdir>/
  config.json         the experiment config (ml_collections, JSON)
  run.json            the model shapes and optimizer the checkpoints hold (resume guard)
  metrics.jsonl       one record per logged step (k2jax.train.metrics)
  training.png        loss and max attention logit (k2jax.train.plot)
  tensorboard/        TensorBoard events
  checkpoints/<step>  orbax checkpoints (k2jax.train.checkpoint); checkpoints.corrupt/ beside
  tiktoken.model, tokenizer_config.json   a trained tokenizer (k2jax.data.tokenizers)
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import ml_collections

from k2jax import data as data_lib
from k2jax.train.checkpoint import Checkpointer
from k2jax.train.config import ConfigError, model_config
from k2jax.train.optimizer import build_optimizer
from k2jax.train.state import init_state

CONFIG_FILE = "config.json"
RUN_FILE = "run.json"
METRICS_FILE = "metrics.jsonl"
PLOT_FILE = "training.png"
TENSORBOARD_DIR = "tensorboard"
CHECKPOINT_DIR = "checkpoints"

# ModelConfig fields that change numerics but not the shapes of the state a checkpoint holds.
NUMERICS_FIELDS = ("dtype", "moe_dispatch", "capacity_factor", "moe_block_size", "remat",
                   "scan_layers")


def check_writable(workdir: str | pathlib.Path) -> pathlib.Path:
  """The workdir, created; ConfigError (one line) when it cannot be written."""
  path = pathlib.Path(workdir)
  try:
    path.mkdir(parents=True, exist_ok=True)
    probe = path / f".write_test.{os.getpid()}"
    probe.write_text("ok")
    probe.unlink()
  except OSError as e:
    raise ConfigError(f"workdir {workdir}: not writable ({e.strerror or e})") from e
  return path


def check_same_run(workdir: pathlib.Path, config, cfg, write: bool) -> None:
  """A workdir resumes only the run it holds: same model shapes and optimizer."""
  now = {"optimizer": config.optimizer.name,
         **{k: v for k, v in cfg.to_dict().items() if k not in NUMERICS_FIELDS}}
  path = workdir / RUN_FILE
  has_checkpoints = any(p.name.isdigit() for p in (workdir / CHECKPOINT_DIR).glob("*"))
  if path.exists() and has_checkpoints:
    before = json.loads(path.read_text())
    diff = sorted(k for k in set(now) | set(before) if now.get(k) != before.get(k))
    if diff:
      k = diff[0]
      raise ConfigError(f"workdir {workdir} holds a run with {k}={before.get(k)!r}, this config "
                        f"has {now.get(k)!r} ({len(diff)} field(s) differ); use another workdir")
  if write:
    path.write_text(json.dumps(now, indent=2))


def read_config(workdir: str | pathlib.Path) -> ml_collections.ConfigDict:
  """The experiment config a run wrote to its workdir."""
  path = pathlib.Path(workdir) / CONFIG_FILE
  if not path.exists():
    raise ValueError(f"{path}: not found (is {workdir} a training workdir?)")
  return ml_collections.ConfigDict(json.loads(path.read_text()))


def load_latest(workdir: str | pathlib.Path):
  """(model config, variables {"params", "router"}, tokenizer, experiment config) of the latest
  loadable checkpoint of a training run."""
  workdir = pathlib.Path(workdir)
  config = read_config(workdir)
  tokenizer = data_lib.build_tokenizer(config.data, str(workdir))
  cfg = model_config(config, tokenizer.vocab_size)
  tx, _ = build_optimizer(config, cfg)
  target = jax.eval_shape(lambda: init_state(cfg, tx, config.seed))
  ckpt = Checkpointer(workdir / CHECKPOINT_DIR, keep=config.checkpoint.keep, async_save=False)
  try:
    restored = ckpt.restore_latest(target)
  finally:
    ckpt.close()
  if restored is None:
    raise ValueError(f"{workdir / CHECKPOINT_DIR}: no loadable checkpoint")
  step, state, _ = restored
  print(f"restored step {step} of {workdir}", flush=True)
  return cfg, {"params": state.params, "router": state.router}, tokenizer, config
