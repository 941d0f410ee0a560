"""A training run's directory: the names of its files, the checks before writing into it, its
tokenizer, loading the latest checkpoint back, and what `config.init_from` starts a run from.

<workdir>/
  config.json         the experiment config (ml_collections, JSON)
  run.json            the model shapes and optimizer the checkpoints hold (resume guard)
  metrics.jsonl       one record per logged step (k2jax.train.metrics)
  training.png        loss and max attention logit (k2jax.train.plot)
  tensorboard/        TensorBoard events
  checkpoints/<step>  orbax checkpoints (k2jax.train.checkpoint); checkpoints.corrupt/ beside
  tokenizer/          tiktoken.model, tokenizer_config.json: a trained BPE (data.tokenizer
                      "bpe"), or the tokenizer of config.init_from, copied there
"""

from __future__ import annotations

import json
import os
import pathlib

import jax
import ml_collections

from k2jax import data as data_lib
from k2jax import hf
from k2jax.config import ModelConfig
from k2jax.data import tokenizers
from k2jax.model import abstract_variables
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


def run_tokenizer(workdir: str | pathlib.Path, config, write: bool = False
                  ) -> tokenizers.Tokenizer:
  """The tokenizer of the run `config` in `workdir`: config.data's; with config.init_from, the
  one in <workdir>/tokenizer/, else init_from's (saved there when `write`)."""
  if not config.get("init_from"):
    return data_lib.build_tokenizer(config.data, str(workdir))
  path = pathlib.Path(workdir) / tokenizers.BPE_DIR
  tok = tokenizers.from_dir(path)
  if tok is None:
    tok = _init_tokenizer(pathlib.Path(config.init_from))
    if write:
      tok.save(path)
  return tok


def _is_workdir(path: pathlib.Path) -> bool:
  return (path / CONFIG_FILE).is_file() and (path / CHECKPOINT_DIR).is_dir()


def _init_tokenizer(path: pathlib.Path) -> tokenizers.Tokenizer:
  if _is_workdir(path):
    return run_tokenizer(path, read_config(path))
  tok = tokenizers.from_dir(path)
  if tok is None:
    raise ValueError(f"config.init_from {path}: neither a training workdir ({CONFIG_FILE} and "
                     f"{CHECKPOINT_DIR}/) nor a checkpoint directory with a tokenizer "
                     f"({tokenizers.MODEL_FILE})")
  return tok


# ModelConfig fields a run started from init_from may set differently from the init's model.
_FREE_FIELDS = (*NUMERICS_FIELDS, "param_dtype", "init_std")


def load_init(path: str | pathlib.Path, cfg: ModelConfig) -> dict:
  """The variables {"params", "router"} that config.init_from gives a model `cfg`: the latest
  checkpoint of a training workdir, or the weights of a Hugging Face directory, cast to cfg's
  parameter dtypes. A ValueError (one line) when the init's model differs from cfg (other than
  in numerics) or its tokenizer has more ids than cfg's vocabulary."""
  path = pathlib.Path(path)
  if _is_workdir(path):
    init_cfg, variables, tok, _ = load_latest(path)
  else:
    tok = _init_tokenizer(path)
    init_cfg, variables = hf.load(path)
  if tok.vocab_size > cfg.vocab_size:
    raise ValueError(f"config.init_from {path}: its tokenizer has {tok.vocab_size} ids, more "
                     f"than the model's vocab_size {cfg.vocab_size}")
  ours, theirs = cfg.to_dict(), init_cfg.to_dict()
  diff = [k for k in ours if k not in _FREE_FIELDS and ours[k] != theirs[k]]
  if diff:
    k = diff[0]
    raise ValueError(f"config.init_from {path}: its model has {k}={theirs[k]!r}, this config "
                     f"{ours[k]!r} ({len(diff)} field(s) differ); set config.model to match")
  target = abstract_variables(cfg)
  return jax.tree.map(lambda x, t: jax.numpy.asarray(x, t.dtype),
                      {k: variables[k] for k in target}, target)


def load_latest(workdir: str | pathlib.Path):
  """(model config, variables {"params", "router"}, tokenizer, experiment config) of the latest
  loadable checkpoint of a training run."""
  workdir = pathlib.Path(workdir)
  config = read_config(workdir)
  tokenizer = run_tokenizer(workdir, config)
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
