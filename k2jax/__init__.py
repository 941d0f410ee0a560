"""k2jax: Kimi K2 (the DeepSeek-V3 architecture) and the MuonClip optimizer in JAX/Flax.

    import k2jax
    cfg = k2jax.presets.get("k2_nano")
    variables = k2jax.init_variables(cfg, 0)
    logits, aux = k2jax.Transformer(cfg).apply(variables, tokens)
    tx = k2jax.muonclip(3e-3, model_config=cfg)

The heavier subpackages (`k2jax.train`, `k2jax.hf`, `k2jax.data`, `k2jax.sharding`,
`k2jax.scaling`) import on first use.
"""

import importlib

from k2jax import presets
from k2jax.config import ModelConfig
from k2jax.decode import generate
from k2jax.flops import flops_per_token
from k2jax.model import Transformer, abstract_variables, init_variables, logical_axes
from k2jax.model.counting import count_params
from k2jax.optim import adamw, muon, muonclip

_LAZY = ("train", "hf", "data", "sharding", "scaling")

__all__ = [
    "ModelConfig",
    "Transformer",
    "abstract_variables",
    "adamw",
    "count_params",
    "flops_per_token",
    "generate",
    "init_variables",
    "logical_axes",
    "muon",
    "muonclip",
    "presets",
    *_LAZY,
]


def __getattr__(name):
  if name in _LAZY:
    return importlib.import_module(f"k2jax.{name}")
  raise AttributeError(f"module 'k2jax' has no attribute {name!r}")
