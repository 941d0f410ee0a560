"""Scaling sweeps: declaring points, the resumable runner, power-law fits and plots."""

from k2jax.scaling import hyper
from k2jax.scaling.fit import (
    PowerLaw,
    compute_multiplier,
    equal_loss_multiplier,
    fit_power_law,
    interp_compute,
)
from k2jax.scaling.sweep import read_results, run_sweep, run_sweep_file

__all__ = [
    "PowerLaw",
    "compute_multiplier",
    "equal_loss_multiplier",
    "fit_power_law",
    "hyper",
    "interp_compute",
    "read_results",
    "run_sweep",
    "run_sweep_file",
]
