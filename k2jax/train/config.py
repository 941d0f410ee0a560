"""Experiment configs: defaults, validation with one-line errors, and the resolved ModelConfig.

An experiment config is an ml_collections ConfigDict with sections model, train, loss, optimizer,
router, checkpoint, data, mesh, sample, a seed and `init_from`. `config.model.preset` names a
k2jax preset; every other field of config.model is a ModelConfig field that overrides it when set
(None keeps the preset's). `config.loss` maps loss-term names (k2jax.train.losses.TERMS) to their
weights. `config.init_from` is "" (random weights) or a training workdir or a Hugging Face
checkpoint directory whose weights (params and router bias) and tokenizer the run starts from,
with a fresh optimizer state (fine-tuning, e.g. SFT; see k2jax.train.workdir.load_init).
"""

from __future__ import annotations

import dataclasses
import math
import sys

import jax
import ml_collections
from absl import app
from ml_collections import config_dict

from k2jax import data as data_lib
from k2jax import presets, sharding
from k2jax.config import ModelConfig
from k2jax.model import partitioning
from k2jax.train import losses
from k2jax.train.schedules import SCHEDULES

OPTIMIZERS = ("muonclip", "muon", "adamw")
NS_DTYPES = ("bfloat16", "float32")  # Muon's Newton-Schulz iteration
VOCAB_MULTIPLE = 64


class ConfigError(ValueError):
  """A bad experiment config, data source or workdir, found before compiling."""


def _model_section() -> ml_collections.ConfigDict:
  section = ml_collections.ConfigDict({"preset": "k2_nano"})
  for f in dataclasses.fields(ModelConfig):
    kind = type(f.default) if f.default is not None else dict
    section[f.name] = config_dict.placeholder(kind)
  return section


def default_config() -> ml_collections.ConfigDict:
  """Every key an experiment config may set, with its default."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.init_from = ""
  c.model = _model_section()
  c.train = ml_collections.ConfigDict(dict(
      steps=600, batch_size=16, seq_len=256, grad_accum=1, log_every=10, eval_every=100,
      eval_batches=4))
  # Term weights; "balance" is DeepSeek-V3's sequence-wise balance loss (DS-V3: 1e-4). A config
  # for a model with MTP layers adds "mtp" (DS-V3: 0.3 then 0.1, as (0.3, 0.1, switch_step)).
  c.loss = ml_collections.ConfigDict(dict(cross_entropy=1.0, balance=0.0))
  c.optimizer = ml_collections.ConfigDict(dict(
      name="muonclip", lr=2e-3, schedule="wsd", warmup_steps=50, decay_fraction=0.2,
      final_lr_fraction=0.1, weight_decay=0.1, qk_clip_tau=100.0, grad_clip=1.0,
      ns_dtype="bfloat16"))
  c.router = ml_collections.ConfigDict(dict(bias_update_rate=1e-3, centered=False))
  c.checkpoint = ml_collections.ConfigDict(dict(every_steps=200, keep=3, async_save=True))
  c.data = data_lib.default_data_config()
  c.mesh = ml_collections.ConfigDict(dict(data=-1, fsdp=1, expert=1, tensor=1))
  c.sample = ml_collections.ConfigDict(dict(prompt="def ", num_tokens=200, temperature=0.8))
  return c


def _fail(key: str, msg: str):
  raise ConfigError(f"config.{key} {msg}")


FREE_SECTIONS = ("loss",)  # their keys are checked against a registry instead.


def _check_keys(cfg, ref, prefix: str = "") -> None:
  for key in cfg.keys():
    if prefix + key in FREE_SECTIONS:
      continue
    if key not in ref:
      _fail(prefix + key, f"is not a known key (known: {', '.join(sorted(ref.keys()))})")
    if isinstance(ref[key], ml_collections.ConfigDict):
      if not isinstance(cfg[key], ml_collections.ConfigDict):
        _fail(prefix + key, "must be a section")
      _check_keys(cfg[key], ref[key], f"{prefix}{key}.")


def check_int(cfg, key: str, low: int) -> None:
  """ConfigError unless config.<section>.<name> (`key`) is an integer >= low."""
  section, name = key.split(".")
  v = cfg[section][name]
  if isinstance(v, bool) or not isinstance(v, int) or v < low:
    _fail(key, f"must be an integer >= {low}, got {v!r}")


def check_real(cfg, key: str, low: float = -math.inf, high: float = math.inf,
               open_low: bool = False, open_high: bool = False) -> None:
  """ConfigError unless config.<section>.<name> (`key`) is a finite number within the bounds
  (`open_low` / `open_high`: the bound itself excluded)."""
  section, name = key.split(".")
  v = cfg[section][name]
  ok = (isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
        and low <= v <= high and not (open_low and v == low) and not (open_high and v == high))
  if not ok:
    bounds = []
    if low > -math.inf:
      bounds.append(f"{'>' if open_low else '>='} {low}")
    if high < math.inf:
      bounds.append(f"{'<' if open_high else '<='} {high}")
    what = "a number " + " and ".join(bounds) if bounds else "a finite number"
    _fail(key, f"must be {what}, got {v!r}")


def mesh_shape(config) -> dict[str, int]:
  """{axis: size} of config.mesh over this run's devices (one axis may be -1: the rest).

  Without a -1 the mesh may use fewer devices than there are (the first ones, one process only).
  """
  sizes = {a: config.mesh[a] for a in sharding.MESH_AXES}
  n = jax.device_count()
  if jax.process_count() == 1 and all(type(v) is int and v > 0 for v in sizes.values()):
    n = min(n, math.prod(sizes.values()))
  try:
    return sharding.mesh_sizes(sizes, n)
  except ValueError as e:
    raise ConfigError(str(e)) from e


def validate(config, defaults: ml_collections.ConfigDict | None = None) -> None:
  """Raises ConfigError (one line, naming the key) for unknown keys and invalid values; the known
  keys are those of `defaults` (default_config(); a config with more sections, e.g. RL's, passes
  its own and checks them itself)."""
  _check_keys(config, default_config() if defaults is None else defaults)
  if not isinstance(config.seed, int):
    _fail("seed", f"must be an integer, got {config.seed!r}")
  if not isinstance(config.init_from, str):
    _fail("init_from", f"must be a directory path or '', got {config.init_from!r}")
  for key in ("train.steps", "train.batch_size", "train.seq_len", "train.grad_accum",
              "train.log_every", "train.eval_batches", "checkpoint.keep"):
    check_int(config, key, 1)
  for key in ("train.eval_every", "checkpoint.every_steps", "optimizer.warmup_steps",
              "sample.num_tokens"):
    check_int(config, key, 0)
  t = config.train
  mesh = mesh_shape(config)
  batch_shards = math.prod(mesh[a] for a in sharding.BATCH_AXES)
  if t.batch_size % (t.grad_accum * batch_shards):
    _fail("train.batch_size", f"({t.batch_size}) must be divisible by train.grad_accum "
          f"({t.grad_accum}) times mesh data x fsdp x expert ({batch_shards})")
  o = config.optimizer
  if o.name not in OPTIMIZERS:
    _fail("optimizer.name", f"must be one of {OPTIMIZERS}, got {o.name!r}")
  if o.schedule not in SCHEDULES:
    _fail("optimizer.schedule", f"must be one of {SCHEDULES}, got {o.schedule!r}")
  if o.ns_dtype not in NS_DTYPES:
    _fail("optimizer.ns_dtype", f"must be one of {NS_DTYPES}, got {o.ns_dtype!r}")
  check_real(config, "optimizer.lr", 0.0, open_low=True)
  check_real(config, "optimizer.qk_clip_tau", 0.0, open_low=True)
  for key in ("optimizer.weight_decay", "optimizer.grad_clip", "router.bias_update_rate",
              "sample.temperature"):
    check_real(config, key, 0.0)
  for key in ("optimizer.decay_fraction", "optimizer.final_lr_fraction"):
    check_real(config, key, 0.0, 1.0)
  if not isinstance(config.router.centered, bool):
    _fail("router.centered", f"must be True or False, got {config.router.centered!r}")
  if not isinstance(config.checkpoint.async_save, bool):
    _fail("checkpoint.async_save", f"must be True or False, got {config.checkpoint.async_save!r}")
  try:
    losses.check_weights(loss_weights(config))
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.model.preset not in presets.names():
    _fail("model.preset", f"must be one of {presets.names()}, got {config.model.preset!r}")


def loss_weights(config) -> dict:
  """{term name: weight} of config.loss."""
  return dict(config.loss.items())


def model_config(config, vocab_size: int) -> ModelConfig:
  """The preset with config.model's overrides; vocab rounded up to a multiple of 64.

  Changing the expert count or top-k without routed_scaling_factor re-derives it (presets.get).
  """
  overrides = {k: v for k, v in config.model.items() if k != "preset" and v is not None}
  if "vocab_size" in overrides:
    _fail("model.vocab_size", "is set by the tokenizer; leave it unset")
  vocab = -(-vocab_size // VOCAB_MULTIPLE) * VOCAB_MULTIPLE
  try:
    cfg = presets.get(config.model.preset, vocab_size=vocab, **overrides)
  except ValueError as e:
    raise ConfigError(str(e).replace("ModelConfig.", "config.model.", 1)) from e
  try:
    partitioning.check_config(cfg, mesh_shape(config))
  except ValueError as e:
    raise ConfigError(str(e).replace("ModelConfig.", "config.model.", 1)) from e
  try:
    losses.for_model(loss_weights(config), cfg)
  except ValueError as e:
    raise ConfigError(str(e)) from None
  if config.train.seq_len > cfg.max_position_embeddings:
    _fail("train.seq_len", f"({config.train.seq_len}) exceeds model.max_position_embeddings "
          f"({cfg.max_position_embeddings})")
  return cfg


def parse_flags(argv):
  """absl's flag parsing; a bad --config.* override is a one-line error, not a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raw = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\n", " ")
    message = " ".join(raw.replace("\\", "").replace("'", "").split())
    sys.exit(f"error: bad config override: {message}")
