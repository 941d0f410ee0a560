"""Train a K2-style model: `python experiments/train.py --config=experiments/configs/k2_nano.py
--workdir=workdirs/k2_nano [--config.train.steps=100 ...]`. Rerun on the same workdir to resume.

Multi-process (e.g. 2 hosts): run the same command on every process with
`--coordinator_address=host0:1234 --num_processes=2 --process_id=<0 or 1>`; config.mesh then
spans the devices of all processes."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from k2jax import distributed
from k2jax.train import ConfigError, train
from k2jax.train.config import parse_flags

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/k2_nano.py",
                                          "Experiment config file (ml_collections).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plot.")
flags.mark_flag_as_required("workdir")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None,
                                   "Multi-process: host:port of process 0's coordinator.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Multi-process: how many.")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "Multi-process: this one's index.")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  try:
    distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  except ValueError as e:
    sys.exit(f"error: {e}")
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, FloatingPointError) as e:
    sys.exit(f"error: {e}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
