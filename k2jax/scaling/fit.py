"""Power laws of loss against compute, and the compute multiplier at equal loss between two arms.

`fit_power_law(C, L)` fits L = a * C^-b by least squares in log-log space (the form Moonlight
reports: 2.506 * C^-0.052 for Muon). `compute_multiplier(arm, ref, loss)` is C_arm / C_ref to reach
`loss` on the fitted curves: Muon vs AdamW at ~0.52 means Muon needs 52% of AdamW's FLOPs.
`equal_loss_multiplier` gives the same ratio without a parametric form, by log-log interpolation
of the measured points, at a loss both arms reach.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence

import numpy as np
from scipy import stats


@dataclasses.dataclass(frozen=True)
class PowerLaw:
  """loss = a * compute^-b, with the fit's r^2 in log-log space."""

  a: float
  b: float
  r2: float = float("nan")

  def loss(self, compute):
    return self.a * np.asarray(compute, dtype=float) ** -self.b

  def compute(self, loss):
    """The compute at which the curve reaches `loss`."""
    return (self.a / np.asarray(loss, dtype=float)) ** (1.0 / self.b)

  def __str__(self) -> str:
    return f"{self.a:.4g} * C^{-self.b:.4g}"


def _positive(name: str, values: Sequence[float]) -> np.ndarray:
  x = np.asarray(values, dtype=float)
  if x.ndim != 1 or not np.all(np.isfinite(x)) or np.any(x <= 0):
    raise ValueError(f"{name} must be a 1-D sequence of finite positive numbers, got {values!r}")
  return x


def fit_power_law(compute: Sequence[float], loss: Sequence[float]) -> PowerLaw:
  """Least-squares fit of log L = log a - b log C; needs two distinct compute values."""
  c, l = _positive("compute", compute), _positive("loss", loss)
  if c.shape != l.shape:
    raise ValueError(f"fit_power_law: {c.size} compute values but {l.size} losses")
  if np.unique(c).size < 2:
    raise ValueError("fit_power_law: needs at least two distinct compute values")
  fit = stats.linregress(np.log(c), np.log(l))
  return PowerLaw(a=float(np.exp(fit.intercept)), b=float(-fit.slope), r2=float(fit.rvalue**2))


def compute_multiplier(arm: PowerLaw, ref: PowerLaw, loss: float) -> float:
  """C_arm / C_ref at equal `loss` on the fitted curves (< 1: the arm needs less compute)."""
  return float(arm.compute(loss) / ref.compute(loss))


def interp_compute(compute: Sequence[float], loss: Sequence[float], target: float) -> float | None:
  """The compute at which the measured curve reaches `target`, interpolated in log-log space.

  The points are sorted by compute and made monotone (running minimum of the loss, as a
  compute-optimal frontier); None when `target` lies outside the measured losses.
  """
  c, l = _positive("compute", compute), _positive("loss", loss)
  order = np.argsort(c)
  c, l = np.log(c[order]), np.log(np.minimum.accumulate(l[order]))
  t = np.log(target)
  if t > l[0] or t < l[-1]:
    return None
  # np.interp needs increasing x: interpolate log C over decreasing log L, reversed.
  return float(np.exp(np.interp(-t, -l, c)))


def equal_loss_multiplier(arm_compute: Sequence[float], arm_loss: Sequence[float],
                          ref_compute: Sequence[float], ref_loss: Sequence[float],
                          loss: float | None = None) -> tuple[float | None, float | None]:
  """(C_arm / C_ref, the loss it is taken at), by interpolating both measured curves.

  Without `loss`, takes the geometric middle of the loss range both curves cover; (None, None)
  when they do not overlap.
  """
  if loss is None:
    lo = max(min(arm_loss), min(ref_loss))
    hi = min(max(arm_loss), max(ref_loss))
    if lo > hi:
      return None, None
    loss = float(np.sqrt(lo * hi))
  c_arm = interp_compute(arm_compute, arm_loss, loss)
  c_ref = interp_compute(ref_compute, ref_loss, loss)
  if c_arm is None or c_ref is None:
    return None, None
  return c_arm / c_ref, loss
