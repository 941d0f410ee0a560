"""Learning-rate schedules: warm-up, plateau, decay end points."""

import numpy as np
import pytest

from k2jax.train.schedules import make_schedule


def _values(name, **kw):
  sched = make_schedule(name, peak=2e-4, steps=100, warmup_steps=10, **kw)
  return np.array([float(sched(s)) for s in range(100)])


def test_wsd_k2_shape():
  lr = _values("wsd", decay_fraction=0.2, final_fraction=0.1)
  np.testing.assert_allclose(lr[:10], 2e-4 * np.arange(1, 11) / 10, rtol=1e-6)
  np.testing.assert_allclose(lr[10:81], 2e-4, rtol=1e-6)
  assert np.all(np.diff(lr[80:]) < 0)
  assert lr[-1] == pytest.approx(2e-5, rel=1e-5)


def test_cosine_decays_from_end_of_warmup():
  lr = _values("cosine")
  assert lr[9] == pytest.approx(2e-4, rel=1e-6)
  assert np.all(np.diff(lr[10:]) < 0)
  assert lr[-1] == pytest.approx(2e-5, rel=1e-5)
  # A half cosine is point-symmetric about its middle: lr[10 + k] + lr[99 - k] = peak + final.
  np.testing.assert_allclose(lr[10:100] + lr[99:9:-1], 2.2e-4, rtol=1e-5)


def test_constant_after_warmup():
  lr = _values("constant")
  assert lr[0] == pytest.approx(2e-5, rel=1e-6)
  np.testing.assert_allclose(lr[9:], 2e-4, rtol=1e-6)


def test_unknown_schedule():
  with pytest.raises(ValueError, match="config.optimizer.schedule"):
    make_schedule("linear", 1e-3, 10, 0)
