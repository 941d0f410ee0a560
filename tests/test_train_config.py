"""Experiment configs: every shipped config validates; bad keys and values give one-line errors."""

import importlib.util
import pathlib

import pytest

from k2jax.rl import config as rl_config
from k2jax.train import ConfigError, default_config, model_config, validate

CONFIGS = sorted((pathlib.Path(__file__).parents[1] / "experiments" / "configs").glob("*.py"))


def _load(path):
  spec = importlib.util.spec_from_file_location(path.stem, path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config()


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_shipped_configs_validate(path):
  config = _load(path)
  rl = "rl" in config  # an RL config: experiments/rl.py's
  (rl_config.validate if rl else validate)(config)
  script = "rl.py" if rl else "train.py"
  assert path.read_text().splitlines()[2].strip().startswith(f"python experiments/{script}")
  cfg = model_config(config, 257)
  assert cfg.vocab_size % 64 == 0 and cfg.vocab_size >= 257


def test_model_overrides_and_vocab():
  c = default_config()
  c.model.hidden_size = 96
  c.model.dtype = "bfloat16"
  cfg = model_config(c, 300)
  assert (cfg.hidden_size, cfg.dtype, cfg.vocab_size) == (96, "bfloat16", 320)
  assert cfg.num_hidden_layers == 4  # from the k2_nano preset.


def _bad(**changes):
  c = default_config()
  for key, value in changes.items():
    section, name = key.split("__")
    c[section][name] = value
  return c


@pytest.mark.parametrize("changes, culprit", [
    (dict(train__steps=0), "config.train.steps"),
    (dict(train__batch_size=6, train__grad_accum=4), "config.train.batch_size"),
    (dict(optimizer__name="sgd"), "config.optimizer.name"),
    (dict(optimizer__schedule="linear"), "config.optimizer.schedule"),
    (dict(optimizer__lr=0.0), "config.optimizer.lr"),
    (dict(optimizer__lr=float("inf")), "config.optimizer.lr must be a number > 0.0, got inf"),
    (dict(optimizer__qk_clip_tau=-1.0), "config.optimizer.qk_clip_tau"),
    (dict(optimizer__ns_dtype="float16"), "config.optimizer.ns_dtype"),
    (dict(optimizer__decay_fraction=1.5), "config.optimizer.decay_fraction"),
    (dict(router__bias_update_rate=-0.1), "config.router.bias_update_rate"),
    (dict(checkpoint__keep=0), "config.checkpoint.keep"),
    (dict(mesh__data=0), "config.mesh.data"),
    (dict(mesh__data=16), "config.mesh"),
    (dict(mesh__fsdp=-1, mesh__data=-1), "config.mesh"),
    (dict(mesh__data=2, mesh__fsdp=4, train__batch_size=4), "config.train.batch_size"),
    (dict(model__preset="k3"), "config.model.preset"),
])
def test_bad_values(changes, culprit):
  with pytest.raises(ConfigError) as e:
    validate(_bad(**changes))
  assert str(e.value).startswith(culprit) and "\n" not in str(e.value)


@pytest.mark.parametrize("axis, size, culprit", [
    ("tensor", 3, "config.model.num_attention_heads"),
    ("expert", 3, "config.model.n_routed_experts"),
    ("fsdp", 5, "config.model.hidden_size")])
def test_model_does_not_split_over_mesh(axis, size, culprit):
  c = default_config()
  c.mesh.data, c.train.batch_size = 1, 15
  c.mesh[axis] = size
  validate(c)
  with pytest.raises(ConfigError) as e:
    model_config(c, 256)
  assert str(e.value).startswith(culprit) and f"mesh axis {axis}" in str(e.value)


def test_unknown_key():
  c = default_config()
  c.train.stepz = 3
  with pytest.raises(ConfigError, match=r"^config\.train\.stepz is not a known key"):
    validate(c)


def test_bad_model_field_names_it():
  c = default_config()
  c.model.num_experts_per_tok = 99
  with pytest.raises(ConfigError, match=r"^config\.model\.num_experts_per_tok"):
    model_config(c, 257)
  c = default_config()
  c.train.seq_len = 10_000
  with pytest.raises(ConfigError, match=r"^config\.train\.seq_len"):
    model_config(c, 257)
