"""Declaring sweep points, big_vision `get_hyper` style: products and zips of config overrides.

A point is a dict of dotted config keys to values, e.g. {"optimizer.name": "adamw",
"model.hidden_size": 64}. Keys under `label.` name an arm for the analysis (e.g. "label.tau":
"off") without touching the config. `sweep` lists one key's values, `fixed` one value, `product`
takes the Cartesian product of point lists and `zipit` pairs them up element by element.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from typing import Any

Point = dict[str, Any]
LABEL = "label."


def sweep(key: str, values: Sequence[Any]) -> list[Point]:
  """One point per value of `key`."""
  if not values:
    raise ValueError(f"sweep({key!r}): no values")
  return [{key: v} for v in values]


def fixed(key: str, value: Any) -> list[Point]:
  """One point setting `key` to `value`."""
  return [{key: value}]


def _merge(points: Sequence[Point]) -> Point:
  merged: Point = {}
  for p in points:
    for key, value in p.items():
      if key in merged:
        raise ValueError(f"hyper: key {key!r} is set twice in one point")
      merged[key] = value
  return merged


def product(axes: Sequence[Sequence[Point]]) -> list[Point]:
  """The Cartesian product: every combination of one point from each axis, first axis slowest."""
  return [_merge(combo) for combo in itertools.product(*axes)]


def zipit(axes: Sequence[Sequence[Point]]) -> list[Point]:
  """Element-wise union of equally long point lists."""
  lengths = {len(a) for a in axes}
  if len(lengths) > 1:
    raise ValueError(f"zipit: the lists differ in length ({sorted(lengths)})")
  return [_merge(combo) for combo in zip(*axes)]


def apply(config, point: Point):
  """A copy of `config` (ml_collections) with the point's dotted keys set; unknown keys raise.

  `label.` keys are skipped.
  """
  config = config.copy_and_resolve_references()
  for key, value in point.items():
    if key.startswith(LABEL):
      continue
    *path, name = key.split(".")
    section = config
    for part in path:
      if part not in section:
        raise ValueError(f"sweep override {key!r}: config has no section {part!r}")
      section = section[part]
    if name not in section:
      raise ValueError(f"sweep override {key!r}: config has no key {name!r}")
    section[name] = value
  return config
