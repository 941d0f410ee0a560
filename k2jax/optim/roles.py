"""Which optimizer updates which parameter: regex rules on '/'-joined parameter paths.

Rules are (regex, role) pairs, big_vision style: the first rule whose regex `re.search`es a leaf's
path decides its role. User rules come before the defaults, so they override them. A leaf no rule
matches gets Muon when it has two or more axes, AdamW otherwise.
Roles: "muon" (last two axes are the [in, out] matrix, leading axes a batch), "adamw", "frozen"
(zero update, no state).
"""

from __future__ import annotations

import re
from collections.abc import Sequence

import jax

from k2jax.paths import path_str

ROLES = ("muon", "adamw", "frozen")

# Moonlight / K2: embeddings, LM head, norm gains and biases get AdamW; every other matrix Muon.
DEFAULT_RULES: tuple[tuple[str, str], ...] = (
  (r"e_score_correction_bias$", "frozen"),
  (r"(^|/)embed(/|$)", "adamw"),
  (r"(^|/)lm_head(/|$)", "adamw"),
  (r"(^|/)(scale|bias)$", "adamw"),
)

Rules = Sequence[tuple[str, str]]


def compile_rules(roles: Rules | None) -> list[tuple[re.Pattern, str]]:
  """User rules then DEFAULT_RULES, compiled; a malformed rule raises ValueError."""
  rules = list(roles or ()) + list(DEFAULT_RULES)
  compiled = []
  for rule in rules:
    if not (isinstance(rule, (tuple, list)) and len(rule) == 2):
      raise ValueError(f"roles: each rule must be a (regex, role) pair, got {rule!r}")
    pattern, role = rule
    if role not in ROLES:
      raise ValueError(f"roles: rule {pattern!r} has unknown role {role!r}; expected {ROLES}")
    try:
      compiled.append((re.compile(pattern), role))
    except (re.error, TypeError) as e:
      raise ValueError(f"roles: rule regex {pattern!r} does not compile: {e}") from None
  return compiled


def _role(path: str, leaf, compiled) -> str:
  role = next((r for pattern, r in compiled if pattern.search(path)), None)
  if role is None:
    role = "muon" if leaf.ndim >= 2 else "adamw"
  if role == "muon" and leaf.ndim < 2:
    raise ValueError(f"roles: {path!r} of shape {leaf.shape} is assigned Muon but is not a matrix")
  return role


def param_roles(params, roles: Rules | None = None):
  """Tree like `params` with the role string of every leaf."""
  compiled = compile_rules(roles)
  return jax.tree_util.tree_map_with_path(lambda p, x: _role(path_str(p), x, compiled), params)


def describe_roles(params, roles: Rules | None = None) -> dict[str, str]:
  """{path: role} of every leaf, plus the matrix batch for Muon leaves, e.g. 'muon 3x[64, 32]'."""
  compiled = compile_rules(roles)
  out = {}
  for path, leaf in jax.tree_util.tree_flatten_with_path(params)[0]:
    name = path_str(path)
    role = _role(name, leaf, compiled)
    if role == "muon":
      batch = "x".join(str(d) for d in leaf.shape[:-2])
      role = f"muon {batch + 'x' if batch else ''}[{leaf.shape[-2]}, {leaf.shape[-1]}]"
    out[name] = role
  return out
