"""PNG plots of a sweep: loss against compute with fitted power laws, loss against an arm value,
and a metric's curves over training steps."""

from __future__ import annotations

import pathlib
from collections.abc import Mapping, Sequence

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402

from k2jax.scaling.fit import PowerLaw  # noqa: E402


def loss_vs_compute(arms: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                    fits: Mapping[str, PowerLaw], path: str | pathlib.Path,
                    ylabel: str = "eval loss", title: str = "") -> pathlib.Path:
  """Log-log scatter per arm (compute, loss) with its fitted power law."""
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for i, (arm, (c, l)) in enumerate(arms.items()):
    color = f"C{i}"
    ax.scatter(c, l, color=color, label=f"{arm}" + (f": {fits[arm]}" if arm in fits else ""))
    if arm in fits:
      grid = np.geomspace(min(c), max(c), 50)
      ax.plot(grid, fits[arm].loss(grid), color=color, lw=1)
  ax.set(xscale="log", yscale="log", xlabel="training FLOPs", ylabel=ylabel, title=title)
  ax.grid(True, which="both", alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def loss_vs_value(groups: Mapping[str, tuple[Sequence[float], Sequence[float]]],
                  path: str | pathlib.Path, xlabel: str, ylabel: str = "eval loss",
                  title: str = "", logx: bool = True) -> pathlib.Path:
  """One line per group (e.g. per compute budget) of loss against an arm value (e.g. sparsity)."""
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for group, (x, y) in groups.items():
    order = np.argsort(x)
    ax.plot(np.asarray(x)[order], np.asarray(y)[order], marker="o", label=group)
  ax.set(xlabel=xlabel, ylabel=ylabel, title=title)
  if logx:
    ax.set_xscale("log", base=2)
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def curves(series: Mapping[str, tuple[Sequence[float], Sequence[float]]],
           path: str | pathlib.Path, ylabel: str, title: str = "", logy: bool = False,
           hlines: Sequence[float] = ()) -> pathlib.Path:
  """One line per run of a metric against the training step."""
  fig, ax = plt.subplots(figsize=(6, 4.2))
  for name, (steps, values) in series.items():
    ax.plot(steps, values, label=name, lw=1.2)
  for y in hlines:
    ax.axhline(y, color="gray", ls="--", lw=0.8)
  ax.set(xlabel="step", ylabel=ylabel, title=title)
  if logy:
    ax.set_yscale("log")
  ax.grid(True, alpha=0.3)
  ax.legend(fontsize=8)
  return _save(fig, path)


def _save(fig, path) -> pathlib.Path:
  path = pathlib.Path(path)
  fig.tight_layout()
  fig.savefig(path, dpi=110)
  plt.close(fig)
  return path
