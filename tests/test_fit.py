"""Fitting: recovers known exponents and multipliers from synthetic data; analysis end to end."""

import json

import numpy as np
import pytest

from k2jax.scaling import (
    PowerLaw,
    compute_multiplier,
    equal_loss_multiplier,
    fit_power_law,
    interp_compute,
)
from k2jax.scaling.analysis import analyze

MUON, ADAMW = PowerLaw(2.506, 0.052), PowerLaw(2.608, 0.054)  # Moonlight's fits [ML].


def test_fit_recovers_moonlight_exponents_under_noise():
  rng = np.random.default_rng(0)
  c = np.geomspace(1e18, 1e21, 12)
  for true in (MUON, ADAMW):
    noisy = true.loss(c) * np.exp(rng.normal(0, 1e-3, c.size))
    fit = fit_power_law(c, noisy)
    assert abs(fit.b - true.b) < 3e-3 and abs(fit.a / true.a - 1) < 0.1, (fit, true)
    assert fit.r2 > 0.99
  exact = fit_power_law(c, MUON.loss(c))
  np.testing.assert_allclose([exact.a, exact.b], [MUON.a, MUON.b], rtol=1e-9)


def test_compute_multiplier_closed_form_and_moonlight_value():
  # Equal exponents: the arm reaching the reference's loss with half the compute is 0.5 everywhere.
  ref = PowerLaw(3.0, 0.1)
  arm = PowerLaw(3.0 * 2.0**-0.1, 0.1)
  for loss in (1.5, 2.0, 2.5):
    assert compute_multiplier(arm, ref, loss) == pytest.approx(0.5, rel=1e-9)
  # Moonlight's two curves: Muon needs about half AdamW's FLOPs at losses in its range.
  m = compute_multiplier(MUON, ADAMW, 2.0)
  assert m == pytest.approx((2.506 / 2.0) ** (1 / 0.052) / (2.608 / 2.0) ** (1 / 0.054))
  assert 0.4 < m < 0.7


def test_interpolated_multiplier_matches_the_built_in_one():
  c = np.geomspace(1e10, 1e13, 6)
  ref = PowerLaw(5.0, 0.08)
  arm = PowerLaw(5.0 * 0.6**0.08, 0.08)  # reaches every loss with 0.6x the compute.
  mult, at = equal_loss_multiplier(c, arm.loss(c), c, ref.loss(c))
  assert mult == pytest.approx(0.6, rel=1e-6)
  assert min(ref.loss(c)) <= at <= max(arm.loss(c))
  assert interp_compute(c, ref.loss(c), float(ref.loss(c[2]))) == pytest.approx(c[2], rel=1e-9)
  assert interp_compute(c, ref.loss(c), 100.0) is None
  assert equal_loss_multiplier([1, 2], [5, 4], [1, 2], [2, 1]) == (None, None)  # no overlap.


def test_bad_input_names_the_culprit():
  with pytest.raises(ValueError, match="two distinct"):
    fit_power_law([1.0, 1.0], [2.0, 1.0])
  with pytest.raises(ValueError, match="loss must be"):
    fit_power_law([1.0, 2.0], [2.0, -1.0])


def _row(name, arm, flops, loss):
  return {"name": name, "overrides": {"optimizer.name": arm}, "steps": 1, "loss": loss,
          "loss_tail": loss, "eval_loss": loss, "params_total": 10, "params_activated": 5,
          "params_activated_no_embed": 4, "flops_per_token": 1.0, "tokens": 1, "flops": flops,
          "max_logit_peak": 3.0, "wall_s": 1.0, "attempts": 1}


def test_analyze_synthetic_sweep_directory(tmp_path):
  c = np.geomspace(1e12, 1e14, 4)
  rows = [_row(f"adamw{i}", "adamw", x, float(ADAMW.loss(x))) for i, x in enumerate(c)]
  rows += [_row(f"muon{i}", "muonclip", x, float(MUON.loss(x))) for i, x in enumerate(c)]
  (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  (tmp_path / "sweep.json").write_text(json.dumps({
      "title": "synthetic", "points": [{"name": r["name"]} for r in rows],
      "analysis": {"kind": "compute", "arm": "optimizer.name", "reference": "adamw"}}))
  md, numbers = analyze(tmp_path)
  fit = numbers["fits"]["muonclip"]
  assert fit["b"] == pytest.approx(0.052, rel=1e-6) and fit["a"] == pytest.approx(2.506, rel=1e-6)
  mult = numbers["multipliers"]["muonclip"]
  assert mult["fit"] == pytest.approx(compute_multiplier(MUON, ADAMW, mult["loss"]), rel=1e-6)
  assert mult["interpolated"] == pytest.approx(mult["fit"], rel=0.05)
  assert "| muonclip | 4 |" in md and (tmp_path / "loss_vs_compute.png").stat().st_size > 5000
  # Another loss field: the train loss here follows AdamW's law for both arms (multiplier 1).
  for r in rows:
    r["loss_tail"] = float(ADAMW.loss(r["flops"]))
  (tmp_path / "results.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
  _, tail = analyze(tmp_path, y="loss_tail")
  assert tail["multipliers"]["muonclip"]["fit"] == pytest.approx(1.0, rel=1e-6)
  assert (tmp_path / "analysis_loss_tail.md").exists()
  assert (tmp_path / "loss_vs_compute_loss_tail.png").exists()
  assert json.loads((tmp_path / "analysis.json").read_text()) == json.loads(json.dumps(
      numbers, default=float))  # the default analysis is left as it was
  (tmp_path / "sweep.json").write_text(json.dumps(
      {"title": "t", "points": [], "analysis": {"kind": "nope"}}))
  with pytest.raises(ValueError, match="sweep.json: analysis needs kind"):
    analyze(tmp_path)
  (tmp_path / "sweep.json").write_text(json.dumps(
      {"title": "t", "points": [], "analysis": {"kind": "curves", "arm": "tau"}}))
  with pytest.raises(ValueError, match="y='loss_tail': only a 'compute' analysis") as e:
    analyze(tmp_path, y="loss_tail")
  assert "\n" not in str(e.value)
