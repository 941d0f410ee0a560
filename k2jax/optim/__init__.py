"""MuonClip (K2's Algorithm 1 + QK-Clip), Muon and the AdamW baseline as optax transforms."""

from k2jax.optim.muon import orthogonalize, scale_by_muon, scale_by_rms_match
from k2jax.optim.muonclip import OptimizerState, adamw, muon, muonclip, optimizer_metrics
from k2jax.optim.newton_schulz import newton_schulz, newton_schulz_flops
from k2jax.optim.qk_clip import QKClipTarget, mha_targets, mla_targets
from k2jax.optim.roles import DEFAULT_RULES, describe_roles, param_roles

__all__ = [
  "DEFAULT_RULES",
  "OptimizerState",
  "QKClipTarget",
  "adamw",
  "describe_roles",
  "mha_targets",
  "mla_targets",
  "muon",
  "muonclip",
  "newton_schulz",
  "newton_schulz_flops",
  "optimizer_metrics",
  "orthogonalize",
  "param_roles",
  "scale_by_muon",
  "scale_by_rms_match",
]
