"""Train a K2-style model: `python experiments/train.py --config=experiments/configs/k2_nano.py
--workdir=workdirs/k2_nano [--config.train.steps=100 ...]`. Rerun on the same workdir to resume."""

import sys

from absl import app, flags, logging
from ml_collections import config_flags

from k2jax.train import ConfigError, train

_CONFIG = config_flags.DEFINE_config_file("config", "experiments/configs/k2_nano.py",
                                          "Experiment config file (ml_collections).")
_WORKDIR = flags.DEFINE_string("workdir", None, "Run directory: checkpoints, metrics, plot.")
flags.mark_flag_as_required("workdir")


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:
    logging.set_verbosity(logging.WARNING)  # orbax logs every save at INFO.
  try:
    train(_CONFIG.value, _WORKDIR.value)
  except (ConfigError, FloatingPointError) as e:
    sys.exit(f"error: {e}")


def parse_flags(argv):
  """absl's flag parsing; a bad --config.* override is a one-line error, not a traceback."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError, TypeError, ValueError) as e:
    raw = str(e.args[0] if e.args else e).replace("\\n", " ").replace("\n", " ")
    message = " ".join(raw.replace("\\", "").replace("'", "").split())
    sys.exit(f"error: bad config override: {message}")


if __name__ == "__main__":
  app.run(main, flags_parser=parse_flags)
